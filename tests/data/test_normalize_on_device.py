"""``normalize_on_device``: uint8 training batches from the loader workers, normalized after the
transfer by the data module's ``on_after_batch_transfer`` — the same float batches, the same
training run. All of these fail on main 348d7b1 / e05e5e0 (no such option or function)."""

import lightning as L
import numpy as np
import pytest
import torch

from vmoe.data import (
    DigitsDataModule,
    ShardDataModule,
    TrainTransformConfig,
    build_train_transform,
    normalize_uint8,
    write_shards,
)
from vmoe.train import VmoeClassifier

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_uint8_pipeline_then_normalize_equals_the_float_pipeline():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (150 + 7 * i, 200, 3), dtype=np.uint8) for i in range(6)]
    full = build_train_transform(64, TrainTransformConfig(), MEAN, STD, seed=3)
    raw = build_train_transform(64, TrainTransformConfig(), MEAN, STD, seed=3, normalize=False)
    want = torch.stack([full(image=im)["image"] for im in images])
    got = torch.stack([raw(image=im)["image"] for im in images])
    assert got.dtype == torch.uint8 and got.shape == (6, 3, 64, 64)
    assert want.dtype == torch.float32
    out = normalize_uint8(got, MEAN, STD)
    assert out.dtype == torch.float32 and torch.equal(out, want)  # bit-equal on the CPU


def test_normalize_uint8_refuses_other_inputs():
    with pytest.raises(ValueError, match="needs uint8 \\[B, 3, H, W\\] images, got torch.float32"):
        normalize_uint8(torch.zeros(2, 3, 4, 4), MEAN, STD)
    with pytest.raises(ValueError, match="got torch.uint8 \\[3, 4, 4\\]"):
        normalize_uint8(torch.zeros(3, 4, 4, dtype=torch.uint8), MEAN, STD)
    with pytest.raises(TypeError, match="normalize_on_device='yes' must be a bool"):
        DigitsDataModule(normalize_on_device="yes")


def _batches(dm, n=2):
    torch.manual_seed(0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    return [batch for batch, _ in zip(loader, range(n))]


def test_digits_loader_yields_uint8_and_the_hook_gives_the_float_batch():
    plain = _batches(DigitsDataModule(img_size=16, batch_size=8, mean=MEAN, std=STD))
    dm = DigitsDataModule(img_size=16, batch_size=8, mean=MEAN, std=STD, normalize_on_device=True)
    raw = _batches(dm)
    for (x8, y8), (x, y) in zip(raw, plain):
        assert x8.dtype == torch.uint8 and x8.shape == (8, 3, 16, 16)
        assert torch.equal(y8, y)
        xf, yf = dm.on_after_batch_transfer([x8, y8], 0)
        assert xf.dtype == torch.float32 and torch.equal(xf, x)
        assert yf is y8
    # float batches (evaluation) pass through unchanged
    x = torch.zeros(2, 3, 16, 16)
    assert dm.on_after_batch_transfer((x, y), 0)[0] is x
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))[0].dtype == torch.float32


def test_shard_loader_with_a_worker_yields_uint8(tmp_path):
    rng = np.random.default_rng(1)
    from PIL import Image

    for i in range(8):
        (tmp_path / "src" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
            tmp_path / "src" / f"c{i % 2}" / f"{i}.png"
        )
    write_shards(str(tmp_path / "src"), str(tmp_path / "shards"), progress=False)

    def first(**kw):
        torch.manual_seed(0)
        dm = ShardDataModule(str(tmp_path / "shards"), img_size=32, batch_size=4, **kw)
        dm.setup("fit")
        return dm, next(iter(dm.train_dataloader()))

    _, (x, y) = first(num_workers=1)
    dm, (x8, y8) = first(num_workers=1, normalize_on_device=True)
    assert x8.dtype == torch.uint8 and x8.shape == (4, 3, 32, 32)
    assert torch.equal(y8, y)
    xf, _ = dm.on_after_batch_transfer((x8, y8), 0)
    assert torch.equal(xf, x)  # the same draws in the worker


def _fit(normalize_on_device):
    L.seed_everything(0)
    dm = DigitsDataModule(img_size=16, batch_size=16, normalize_on_device=normalize_on_device)
    module = VmoeClassifier(model_name="vmoe_tiny_e4_k2", num_classes=10, img_size=16)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0].dtype)

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[Record()],
    )
    trainer.fit(module, datamodule=dm)
    return module.state_dict(), seen


def test_fit_with_uint8_batches_equals_the_float_fit():
    want, seen_float = _fit(False)
    got, seen = _fit(True)
    assert seen == seen_float == [torch.float32] * 3  # the model sees float batches either way
    assert max((got[k].float() - want[k].float()).abs().max().item() for k in want) <= 1e-6


def test_uint8_batches_without_the_data_module_are_a_clear_error():
    module = VmoeClassifier(model_name="vmoe_tiny_e4_k2", num_classes=10, img_size=16)
    batch = (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="uint8 training images reached the model"):
        module.training_step(batch, 0)


def test_vmoe_fit_takes_the_option(tmp_path):
    from tests.helpers import fast
    from vmoe.cli import main

    args = ["--trainer.max_steps", "2", "--data.init_args.normalize_on_device", "true"]
    assert main(["fit", *fast(tmp_path, *args)]) == 0
