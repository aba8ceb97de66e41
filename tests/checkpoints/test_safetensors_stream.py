"""The streaming safetensors writer produces files that safetensors itself reads back."""

import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vmoe.checkpoints.safetensors_stream import SafetensorsStreamWriter


def test_written_in_any_order_reads_back_with_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "blocks.0.w": torch.randn(5, 7, generator=g),
        "bf": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "mask": torch.rand(9, generator=g) > 0.5,
        "idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "half": torch.randn(3, generator=g).half(),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "t": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }
    path = tmp_path / "m.safetensors"
    specs = {k: (v.dtype, v.shape) for k, v in tensors.items()}
    with SafetensorsStreamWriter(path, specs, metadata={"format": "pt"}) as w:
        for k in reversed(list(tensors)):
            w.write(k, tensors[k])
    got = load_file(path)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    assert not os.path.exists(str(path) + ".tmp")


def test_numpy_input_and_mistakes(tmp_path):
    path = tmp_path / "n.safetensors"
    w = SafetensorsStreamWriter(path, {"a": (torch.float32, (2, 2)), "b": (torch.int32, (3,))})
    w.write("a", np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"'a' was already written"):
        w.write("a", np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"'b': expected torch.int32 \[3\], got torch.int64"):
        w.write("b", torch.arange(3))
    with pytest.raises(KeyError, match="'c' is not in the specs"):
        w.write("c", torch.zeros(1))
    with pytest.raises(ValueError, match=r"1 tensors were never written.*'b'"):
        w.close()
    assert not os.listdir(tmp_path)  # neither the file nor the temporary one
    with pytest.raises(TypeError, match="not supported"):
        SafetensorsStreamWriter(path, {"z": (torch.complex64, (1,))})
    with pytest.raises(RuntimeError):
        with SafetensorsStreamWriter(path, {"a": (torch.float32, (1,))}) as w:
            raise RuntimeError("boom")
    assert not os.listdir(tmp_path)
