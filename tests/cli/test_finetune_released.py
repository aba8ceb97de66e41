"""From nothing to fine-tuning a released V-MoE with one command, in a fresh process: ``vmoe fit
--config configs/finetune_vmoe_b16.yaml --model.pretrained_dir TAG`` with the real catalogue entry
``vmoe_s32_e8_k2_last2.ilsvrc2012_randaug_light1``, its files served by the loopback bucket
(``tests/checkpoints/bucket_server.py``). The checkpoint is synthetic (random weights of the
released architecture, written in the official format, bfloat16 as 2 shards): the bucket is not
reachable from the tests."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vmoe.models as vm
from tests.checkpoints.bucket_server import BucketServer
from tests.checkpoints.official_writer import float32_to_bfloat16_bits, write_checkpoint
from tests.helpers import ROOT
from vmoe.models.official import _official_shapes

NAME = "vmoe_s32_last2_ilsvrc2012_randaug_light1"
TAG = "vmoe_s32_e8_k2_last2.ilsvrc2012_randaug_light1"
# V-MoE S/32, E=8, Last 2, 224 px, 1000 classes, a 512-wide representation layer (the README's)
ARCH = dict(
    patch=(32, 32),
    in_chans=3,
    embed_dim=512,
    depth=8,
    num_heads=8,
    mlp_dim=2048,
    moe_blocks=[5, 7],
    num_experts=8,
    grid=7,
    num_tokens=50,
    class_token=True,
    representation_size=512,
    num_classes=1000,
    qk_norm=False,
    router="top_k",
)


def synthetic_params(seed=0):
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in _official_shapes(ARCH).items():
        if name.endswith("/scale"):  # LayerNorm scales
            params[name] = np.ones(shape, np.float32)
        else:
            params[name] = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return params


@pytest.mark.slow
def test_one_command_fetches_converts_and_fine_tunes_a_released_vmoe(tmp_path):
    params = synthetic_params()
    write_checkpoint(tmp_path / "bucket" / NAME, params, num_shards=2, bfloat16=True)
    server = BucketServer.serving(tmp_path / "bucket" / NAME).start()
    server.hash_kinds, server.chunk = ("md5",), 1 << 20  # (its CRC-32C is pure Python: slow)
    server.drop_after[f"{NAME}.data-00001-of-00002"] = (10_000_000, 1)  # a flaky network
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        VMOE_CHECKPOINT_BASE_URL=server.base_url,
        VMOE_CACHE_DIR=str(tmp_path / "cache"),
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
    )
    run = tmp_path / "run"
    # the getting-started command, with a CPU and digits in place of GPUs and an image folder
    cmd = [sys.executable, "-m", "vmoe.cli", "fit", "--config", "configs/finetune_vmoe_b16.yaml"]
    cmd += ["--model.pretrained_dir", TAG, "--model.img_size", "64"]
    cmd += ["--data", "vmoe.data.DigitsDataModule", "--data.img_size", "64"]
    cmd += ["--data.batch_size", "8", "--data.num_workers", "0"]
    cmd += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
    cmd += ["--trainer.precision", "32-true", "--trainer.max_steps", "2"]
    cmd += ["--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "1"]
    cmd += ["--trainer.limit_test_batches", "1", "--trainer.logger", "false"]
    cmd += ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"vmoe: fetching {NAME} from {server.base_url}" in done.stderr
    shards = [f"{NAME}.data-0000{i}-of-00002" for i in range(2)]
    assert [n for n, _ in server.requests] == [f"{NAME}.index", shards[0], shards[1], shards[1]]
    assert server.ranges(shards[1])[1] == "bytes=10000000-"  # resumed
    cached = tmp_path / "cache" / NAME
    assert sorted(p.name for p in cached.iterdir()) == [
        "config.json",
        "model.safetensors",
        "vmoe_source.json",
    ]
    tuned = vm.from_pretrained(run / "export")
    assert tuned.num_classes == 10 and tuned.patch_embed.img_size == (64, 64)
    layer = vm.moe_layers(tuned)["blocks.7.mlp"]
    assert (layer.num_experts, layer.router.num_selected) == (8, 2)
    # started from the fetched weights (bfloat16 in the files), moved by two small steps
    qkv = params["Encoder/encoderblock_0/SelfAttention/query/kernel"]
    stored = float32_to_bfloat16_bits(qkv).astype(np.uint32) << 16
    start = torch.from_numpy(stored.view(np.float32).reshape(512, -1).T.copy())
    torch.testing.assert_close(tuned.blocks[0].attn.qkv.weight[:512], start, rtol=0, atol=1e-3)
