"""Lightning's DDP with 2 CPU processes (gloo) through ``vmoe fit``: both processes end with
identical weights, and the synced validation metrics equal a single-process evaluation of those
weights on the whole validation split. Also: bf16-mixed on CPU trains without NaN."""

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file

import vmoe.models as vm
from tests.helpers import cli_subprocess
from vmoe.data import DigitsDataModule
from vmoe.train import VmoeClassifier


class SaveRankState(L.Callback):
    """At fit end each process writes its weights and its view of the logged metrics."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.state_dict().items()}
        save_file(state, os.path.join(self.out_dir, f"rank{rank}.safetensors"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["world_size"] = trainer.world_size
        Path(self.out_dir, f"rank{rank}.json").write_text(json.dumps(metrics))


def test_ddp_two_cpu_processes_sync_metrics_and_weights(tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    proc = cli_subprocess(
        tmp_path / "run",
        "--trainer.strategy",
        "ddp",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "6",
        "--trainer.num_sanity_val_steps",
        "0",
        "--model.warmup_steps",
        "1",
        "--model.label_smoothing",
        "0.1",
        "--trainer.callbacks+=tests.train.test_ddp.SaveRankState",
        f"--trainer.callbacks.out_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks ended with different weights"
    m0, m1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (
        m0["world_size"] == 2
        and m0["val/acc1"] == m1["val/acc1"]
        and m0["val/loss"] == m1["val/loss"]
    )

    # The synced numbers are those of the whole validation split (180 images, 90 per process).
    module = VmoeClassifier(model_name="vmoe_tiny_e4_k2", num_classes=10)
    module.load_state_dict(r0)
    module.eval()
    dm = DigitsDataModule(img_size=16)
    dm.setup("validate")
    assert len(dm.val_set) == 180
    module.on_validation_start()  # evaluation capacity factor, as in the run
    logits, labels = [], []
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logits.append(module(x)), labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    acc = (logits.argmax(-1) == labels).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1).item()
    assert abs(m0["val/acc1"] - acc) < 1e-6
    assert abs(m0["val/loss"] - loss) < 1e-4
    # weights moved away from the seed-0 init: training happened on both ranks' data
    init = VmoeClassifier(model_name="vmoe_tiny_e4_k2", num_classes=10)
    assert not torch.equal(init.state_dict()["model.head.weight"], r0["model.head.weight"])


def test_bf16_mixed_on_cpu_trains_without_nan(tmp_path):
    torch.manual_seed(0)
    module = VmoeClassifier(model_name="vmoe_tiny_e4_k2", num_classes=10, lr=3e-3, warmup_steps=1)
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    plan = vm.routing_plans(module.model)["blocks.1.mlp"]
    assert plan.gates.dtype == torch.float32  # the router stays float32 under autocast

    dm = DigitsDataModule(img_size=16, batch_size=32)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        val_check_interval=6,
    )
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer.callbacks.append(Record())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, datamodule=dm)
    assert len(losses) == 12 and np.isfinite(losses).all()
    after = module.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert after["model.blocks.1.mlp.experts.fc1_weight"].dtype == torch.float32
    assert not torch.equal(
        before["model.blocks.1.mlp.router.weight"], after["model.blocks.1.mlp.router.weight"]
    )
    assert np.isfinite(float(trainer.callback_metrics["val/loss"]))
