"""``vmoe fit`` with ExpertParallelStrategy (from the YAML) on 2 CPU processes (gloo): it trains,
both ranks end with the same full model, the checkpoint holds all E experts (weights and
optimizer state), and the exported directory loads in one process with the same logits."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from safetensors.torch import load_file, save_file

import vmoe.models as vm
from tests.helpers import cli_subprocess
from vmoe.moe.parallel import ExpertParallelExperts
from vmoe.train import ExpertParallelStrategy, VmoeClassifier, read_checkpoint

STRATEGY_YAML = """\
trainer:
  strategy:
    class_path: vmoe.train.strategy.ExpertParallelStrategy
    init_args:
      expert_parallel_size: 2
"""


def probe_images() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))


class RecordShardsAndLogits(L.Callback):
    """Each process writes, during training, the shape of its expert slabs and the bytes each
    layer sent, and at fit end its (put back together) weights and evaluation logits."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            shards = [
                tuple(m.fc1_weight.shape)
                for m in pl_module.modules()
                if isinstance(m, ExpertParallelExperts)
            ]
            Path(self.out_dir, f"shards{trainer.global_rank}.txt").write_text(repr(shards))

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        model = pl_module.model.eval()
        with torch.no_grad():
            logits = model(probe_images())
        state = {k: v.detach().contiguous() for k, v in pl_module.state_dict().items()}
        save_file(
            {**state, "probe_logits": logits}, os.path.join(self.out_dir, f"rank{rank}.safetensors")
        )


class CheckResumedOptimizer(L.Callback):
    """On a resumed run: the optimizer state after loading (sliced to this rank's experts) gathers
    back to the checkpoint's full-E state; each rank writes what differs."""

    def __init__(self, out_dir: str, ckpt: str):
        self.out_dir, self.ckpt = out_dir, ckpt

    def on_train_start(self, trainer, pl_module):
        saved = read_checkpoint(self.ckpt)["optimizer_states"][0]["state"]
        now = trainer.strategy.optimizer_state(trainer.optimizers[0])["state"]  # a collective
        differ = [
            f"{i}.{k}"
            for i in saved
            for k, v in saved[i].items()
            if torch.is_tensor(v) and not torch.equal(v, now[i][k])
        ]
        local = [
            tuple(v.shape)
            for v in trainer.optimizers[0].state_dict()["state"].values()
            for v in v.values()
            if torch.is_tensor(v) and v.dim() == 3
        ]
        Path(self.out_dir, f"resumed{trainer.global_rank}.json").write_text(
            json.dumps({"differ": differ, "shapes": sorted(set(local))})
        )


def test_vmoe_fit_with_expert_parallel_strategy_on_two_processes(tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    overlay = tmp_path / "ep.yaml"
    overlay.write_text(STRATEGY_YAML)
    proc = cli_subprocess(
        tmp_path / "run",
        "--config",
        str(overlay),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.num_sanity_val_steps",
        "0",
        "--model.warmup_steps",
        "1",
        "--routing_stats.figures",
        "true",
        "--routing_stats.every_n_steps",
        "2",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'csv'}",
        "--trainer.callbacks+=tests.train.test_expert_parallel_fit.RecordShardsAndLogits",
        f"--trainer.callbacks.out_dir={out}",
        "--test_after_fit",
        "true",
        "--trainer.limit_test_batches",
        "2",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "test accuracy: acc1" in proc.stdout  # testing after fit shards the experts again
    # while training, each rank held 2 of the 4 experts of each MoE layer
    for rank in (0, 1):
        assert (out / f"shards{rank}.txt").read_text() == repr([(2, 64, 128), (2, 64, 128)])
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks ended with different weights"
    assert r0["model.blocks.1.mlp.experts.fc1_weight"].shape == (4, 64, 128)
    init = VmoeClassifier(model_name="vmoe_tiny_e4_k2", num_classes=10)
    for key in ("model.head.weight", "model.blocks.1.mlp.experts.fc1_weight"):
        assert not torch.equal(init.state_dict()[key], r0[key]), f"{key} did not train"
    # the experts trained apart: their slabs are no longer the same-init copies
    experts = r0["model.blocks.3.mlp.experts.fc2_weight"]
    assert not torch.equal(experts[0], experts[3])

    # the routing statistics and pictures of an expert-parallel run (every rank joins them)
    metrics = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "routing/blocks.1/load_max" in metrics and "routing/blocks.3/importance_loss" in metrics
    assert (tmp_path / "run" / "routing" / "expert_load.png").is_file() or next(
        (tmp_path / "csv").rglob("expert_load.png"), None
    ) is not None

    # the exported directory is a one-process model with the same logits
    model = vm.from_pretrained(tmp_path / "run" / "export").eval()
    with torch.no_grad():
        logits = model(probe_images())
    assert (logits - r0["probe_logits"]).abs().max().item() <= 1e-5

    # the last checkpoint holds all E experts, for the weights and Adam's moments
    ckpt = read_checkpoint(next((tmp_path / "run").rglob("last.ckpt")))
    assert ckpt["state_dict"]["model.blocks.1.mlp.experts.fc1_weight"].shape == (4, 64, 128)
    moments = [s["exp_avg"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert (4, 64, 128) in [tuple(m.shape) for m in moments]
    one = VmoeClassifier(model_name="vmoe_tiny_e4_k2", num_classes=10)
    one.load_state_dict(ckpt["state_dict"])
    assert all(torch.equal(v, r0[k]) for k, v in one.state_dict().items())

    # resume with ep=2: each rank gets its experts' optimizer state back, exactly
    last = str(next((tmp_path / "run").rglob("last.ckpt")))
    proc = cli_subprocess(
        tmp_path / "run",
        "--config",
        str(overlay),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--model.warmup_steps",
        "1",
        "--ckpt_path",
        last,
        "--export.enabled",
        "false",
        "--trainer.callbacks+=tests.train.test_expert_parallel_fit.CheckResumedOptimizer",
        f"--trainer.callbacks.out_dir={out}",
        f"--trainer.callbacks.ckpt={last}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        resumed = json.loads((out / f"resumed{rank}.json").read_text())
        assert resumed["differ"] == [], (rank, resumed)
        # the expert moments on the rank are its 2 experts' ([E/ep, d, h] and [E/ep, h, d])
        assert [2, 64, 128] in resumed["shapes"] and [4, 64, 128] not in resumed["shapes"], resumed


def test_strategy_rejects_a_bad_expert_parallel_size_ema_and_predict():
    with pytest.raises(ValueError, match="expert_parallel_size=0 must be an int >= 1"):
        ExpertParallelStrategy(expert_parallel_size=0)
    strategy = ExpertParallelStrategy(expert_parallel_size=2)
    fitting = SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.FITTING), callbacks=[EMAWeightAveraging()]
    )
    with pytest.raises(NotImplementedError, match="weight averaging"):
        strategy.setup(fitting)
    predicting = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.PREDICTING), callbacks=[])
    with pytest.raises(
        NotImplementedError, match="predict with ExpertParallelStrategy is not supported"
    ):
        strategy.setup(predicting)
    trainer = L.Trainer(strategy="expert_parallel_2", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, ExpertParallelStrategy)
    assert trainer.strategy.expert_parallel_size == 2
