"""Routing methods compared on the quickstart: dense ViT vs V-MoE with importance/load losses,
auxiliary-loss-free bias balancing, both, sigmoid scores, and a shared expert.

Every arm trains ``configs/quickstart.yaml`` (``vmoe_tiny_e4_k2``: 4 blocks, hidden 64, blocks 1
and 3 MoE with E=4, K=2; scikit-learn digits at 16x16, 30 epochs of batch 48, one torch thread)
through the real CLI, ``python -m vmoe.cli fit`` in a subprocess (wandb disabled, a CSV logger),
changing only the model options of the arm (``--model.model_kwargs '{"moe": {...}}'``, the flat
option form). Every run's directory lives under ``--root`` (default /tmp/vmoe_routing_methods);
a run whose ``result.json`` exists is not trained again (delete it to redo one).

Per run, measured on the final weights (``checkpoints/last.ckpt``; the quickstart tests the
final weights too):

- test top-1 (the CLI's test after fit, ``test/acc1`` in the CSV log; 180 images);
- training FLOPs per image: one forward + backward (task loss + aux losses) in train mode at the
  training capacity factor 1.05, batch 48 (one training batch = 6 routing groups of 8 images),
  counted by ``torch.utils.flop_counter.FlopCounterMode`` (attention as plain matmuls, so that it
  is counted; multiply-add = 2 FLOPs);
- inference FLOPs per image: one forward in eval mode at the evaluation capacity factor 4.0
  (``model.eval_capacity_factor``, what ``vmoe fit`` validates and tests with), batch 48;
- dropped-token fraction and expert-load CV at the end of training: the final model over the
  1,437 training images (eval transform, no augmentation, batches of 48) with the *training*
  routing (capacity factor 1.05) but eval mode (no router noise). Dropped = token-choices that
  got no buffer place; load CV = std/mean over experts of the assignments the router chose
  (before capacity), pooled over the training images; both averaged over the 2 MoE layers;
- time per training step: median over the run's steps (the first 10 skipped) of
  on_train_batch_start -> on_train_batch_end (forward, backward, clipping, AdamW, the bias
  update), recorded by ``StepTimer`` inside the run. The machine is shared: times are noisy.

Usage:
    PYTHONPATH=. python benchmarks/routing_methods.py [--arms dense losses ...] [--seeds 0 1 2 3 4]
        [--epochs 30] [--jobs 1] [--root /tmp/vmoe_routing_methods] [--out table.md] [--time-steps]
``--time-steps`` adds a same-load step time: every arm's seed-0 final model timed in turns in
one process (``time_steps``), comparable across arms where the in-run times are not.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "quickstart.yaml"
TRAIN_CAPACITY_FACTOR = 1.05
EVAL_CAPACITY_FACTOR = 4.0
MEASURE_BATCH = 48
SKIP_STEPS = 10

# vmoe_tiny_e4_k2's architecture (vmoe/models/variants.py) without MoE layers: vmoe_vit builds
# the same VisionTransformerMoe (same head, no representation layer), with plain MLPs.
TINY_ARCH = dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)


def _moe(**options) -> List[str]:
    return ["--model.model_kwargs", json.dumps({"moe": options})]


# name -> (description, extra `vmoe fit` arguments on top of configs/quickstart.yaml)
ARMS: Dict[str, tuple] = {
    "dense": (
        "dense ViT (same backbone, plain MLPs)",
        ["--model.model_name", "vmoe_vit", "--model.model_kwargs", json.dumps(TINY_ARCH)],
    ),
    "losses": ("importance + load losses (softmax; default)", []),
    "bias": (
        "bias balancing only (rate 1e-3, loss weights 0)",
        _moe(importance_weight=0.0, load_weight=0.0, bias_update_rate=1e-3),
    ),
    "bias_1e-2": (
        "bias balancing only (rate 1e-2, loss weights 0)",
        _moe(importance_weight=0.0, load_weight=0.0, bias_update_rate=1e-2),
    ),
    "losses_bias": ("losses + bias (rate 1e-3)", _moe(bias_update_rate=1e-3)),
    "sigmoid": ("sigmoid scores + losses", _moe(score_func="sigmoid")),
    "shared": ("1 shared expert + losses", _moe(shared_experts=1)),
}
DEFAULT_ARMS = ["dense", "losses", "bias", "bias_1e-2", "losses_bias", "sigmoid", "shared"]


class StepTimer(L.Callback):
    """Wall time of every training step (batch start -> batch end: forward, backward, clipping,
    optimizer step and its hooks), written as JSON ``{"step_s": [...]}`` to ``path`` at the end
    of training. Used by this benchmark through ``--trainer.callbacks``."""

    def __init__(self, path: str):
        self.path = path
        self.step_s: List[float] = []
        self._start: Optional[float] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is not None:
            self.step_s.append(time.perf_counter() - self._start)
            self._start = None

    def on_train_end(self, trainer, pl_module):
        Path(self.path).write_text(json.dumps({"step_s": self.step_s}))


# --- one run ----------------------------------------------------------------------------------
def fit_command(arm: str, seed: int, epochs: int, run_dir: Path) -> List[str]:
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir), "name": "csv", "version": "0"},
    }
    timer = [
        {
            "class_path": "benchmarks.routing_methods.StepTimer",
            "init_args": {"path": str(run_dir / "step_times.json")},
        }
    ]
    return [
        sys.executable,
        "-m",
        "vmoe.cli",
        "fit",
        "--config",
        str(CONFIG),
        "--seed_everything",
        str(seed),
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger",
        json.dumps(logger),
        "--trainer.callbacks",
        json.dumps(timer),
        "--trainer.enable_progress_bar",
        "false",
        *ARMS[arm][1],
    ]


def run_env() -> Dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    return env


def test_accuracy(run_dir: Path) -> float:
    """test/acc1 of the run's CSV log (the CLI's test of the final weights)."""
    (path,) = glob.glob(str(run_dir / "csv" / "version_0" / "metrics.csv"))
    with open(path) as f:
        values = [float(r["test/acc1"]) for r in csv.DictReader(f) if r.get("test/acc1")]
    if len(values) != 1:
        raise RuntimeError(f"{path}: expected one test/acc1, found {values}")
    return values[0]


def run_one(arm: str, seed: int, epochs: int, root: Path) -> dict:
    """Train (unless done) and measure one arm x seed; returns its result dict."""
    run_dir = root / f"{arm}_e{epochs}" / f"seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = fit_command(arm, seed, epochs, run_dir)
    start = time.time()
    with open(run_dir / "fit.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=run_env(), stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{arm} seed {seed}: vmoe fit failed (rc {proc.returncode}); see {run_dir / 'fit.log'}"
        )
    measure = subprocess.run(
        [sys.executable, __file__, "--measure-run", str(run_dir)],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    if measure.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed}: measuring failed:\n{measure.stderr[-3000:]}")
    steps = json.loads((run_dir / "step_times.json").read_text())["step_s"]
    result = {
        "arm": arm,
        "seed": seed,
        "epochs": epochs,
        "run_dir": str(run_dir),
        "test_acc1": test_accuracy(run_dir),
        "fit_wall_s": wall,
        "step_ms_median": 1e3 * statistics.median(steps[SKIP_STEPS:] or steps),
        "num_steps": len(steps),
        "command": cmd,
        **json.loads(measure.stdout.strip().splitlines()[-1]),
    }
    result_path.write_text(json.dumps(result, indent=1))
    return result


# --- measuring a trained run (in its own process: --measure-run DIR) ------------------------
def measure_run(run_dir: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import vmoe.models as vm
    from vmoe.data.digits import ArrayDataset, DigitsDataModule, load_digits_uint8
    from vmoe.train import VmoeClassifier

    torch.set_num_threads(1)
    module = VmoeClassifier.load_from_checkpoint(
        str(run_dir / "checkpoints" / "last.ckpt"), map_location="cpu", weights_only=False
    )
    model = module.model
    for m in model.modules():  # attention as plain matmuls, so that the counter sees them
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    layers = vm.moe_layers(model)

    dm = DigitsDataModule(img_size=16, batch_size=MEASURE_BATCH, num_workers=0)
    images, labels = load_digits_uint8(dm.channels)
    train_idx, _, _ = dm.split_indices(labels)
    train_set = ArrayDataset(images[train_idx], labels[train_idx], dm.build_eval_transform())
    loader = torch.utils.data.DataLoader(train_set, batch_size=MEASURE_BATCH, shuffle=False)
    x, y = next(iter(loader))

    def set_cf(cf: float) -> None:
        if layers:
            vm.set_routing(model, capacity_factor=cf)

    out = {"params": sum(p.numel() for p in model.parameters())}
    # training FLOPs: train mode, capacity factor 1.05, forward + backward of task + aux losses
    model.train()
    set_cf(TRAIN_CAPACITY_FACTOR)
    with FlopCounterMode(display=False) as counter:
        logits = model(x)
        forward = counter.get_total_flops()
        loss = F.cross_entropy(logits, y.long()) + vm.aux_loss(model)
        loss.backward()
    out["train_fwd_flops_per_image"] = forward / len(x)
    out["train_flops_per_image"] = counter.get_total_flops() / len(x)
    model.zero_grad(set_to_none=True)
    # inference FLOPs: eval mode, the evaluation capacity factor 4.0
    model.eval()
    set_cf(EVAL_CAPACITY_FACTOR)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    out["infer_flops_per_image"] = counter.get_total_flops() / len(x)
    out["infer_flops_train_cf_per_image"] = None
    set_cf(TRAIN_CAPACITY_FACTOR)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    out["infer_flops_train_cf_per_image"] = counter.get_total_flops() / len(x)
    if not layers:
        return out
    # routing at the end of training: eval mode (no noise), capacity factor 1.05, training images
    chosen = {name: torch.zeros(layer_num_experts(layer)) for name, layer in layers.items()}
    kept = {name: 0.0 for name in layers}
    total = {name: 0.0 for name in layers}
    with torch.no_grad():
        for xb, _ in loader:
            model(xb)
            for name, layer in layers.items():
                plan = layer.last_plan
                G, S, K = plan.expert_index.shape
                valid = plan.valid if plan.valid is not None else torch.ones(G, S, dtype=torch.bool)
                index = plan.expert_index[valid]  # [T, K]
                chosen[name] += torch.bincount(
                    index.reshape(-1), minlength=chosen[name].numel()
                ).float()
                kept[name] += float((plan.kept & valid.unsqueeze(-1)).sum())
                total[name] += float(index.numel())
    per_layer = {}
    for name in layers:
        load = chosen[name]
        per_layer[name] = {
            "dropped_fraction": 1.0 - kept[name] / total[name],
            "load_cv": float(load.std(unbiased=False) / load.mean()),
            "load_share": (load / load.sum()).tolist(),
        }
        bias = _expert_bias(layers[name])
        if bias is not None:
            per_layer[name]["expert_bias"] = bias
    out["per_layer"] = per_layer
    out["dropped_fraction"] = statistics.mean(v["dropped_fraction"] for v in per_layer.values())
    out["load_cv"] = statistics.mean(v["load_cv"] for v in per_layer.values())
    return out


def layer_num_experts(layer) -> int:
    """E of a MoeMlp (``num_experts`` today, ``config.num_experts`` with the typed configs)."""
    if hasattr(layer, "num_experts"):
        return int(layer.num_experts)
    return int(layer.config.num_experts)


def _expert_bias(layer) -> Optional[list]:
    """The router's ``expert_bias`` buffer (bias balancing), if it has one."""
    for name, buf in layer.named_buffers():
        if name.endswith("expert_bias"):
            return [round(float(v), 6) for v in buf]
    return None


# --- same-load step times (--time-steps): every arm's final model, interleaved -----------------
def time_steps(run_dirs: Dict[str, Path], rounds: int = 5, steps: int = 20) -> Dict[str, float]:
    """Median ms of one training step (train mode, capacity factor 1.05, batch 48: forward, task +
    aux loss, backward, clipping at 1.0, AdamW, then the bias update) per arm, from each arm's
    final model (``last.ckpt``), the arms taking turns (``steps`` steps each, ``rounds`` rounds),
    so that a busy phase of the shared machine hits every arm alike. One torch thread."""
    import torch
    import torch.nn.functional as F

    import vmoe.models as vm
    from vmoe.data.digits import ArrayDataset, DigitsDataModule, load_digits_uint8
    from vmoe.moe import update_expert_biases
    from vmoe.train import VmoeClassifier

    torch.set_num_threads(1)
    dm = DigitsDataModule(img_size=16, batch_size=MEASURE_BATCH, num_workers=0)
    images, labels = load_digits_uint8(dm.channels)
    train_idx, _, _ = dm.split_indices(labels)
    data = ArrayDataset(images[train_idx], labels[train_idx], dm.build_eval_transform())
    x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=MEASURE_BATCH)))
    setups = {}
    for arm, run_dir in run_dirs.items():
        model = VmoeClassifier.load_from_checkpoint(
            str(run_dir / "checkpoints" / "last.ckpt"), map_location="cpu", weights_only=False
        ).model
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
        setups[arm] = (model, optimizer)
    times: Dict[str, List[float]] = {arm: [] for arm in run_dirs}
    for round_ in range(rounds + 1):  # round 0 warms up
        for arm, (model, optimizer) in setups.items():
            for _ in range(steps):
                start = time.perf_counter()
                loss = F.cross_entropy(model(x), y.long(), label_smoothing=0.1) + vm.aux_loss(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                update_expert_biases(model)
                optimizer.step()
                if round_:
                    times[arm].append(time.perf_counter() - start)
    return {arm: 1e3 * statistics.median(t) for arm, t in times.items()}


# --- the table --------------------------------------------------------------------------------
def _mean_std(values: List[float]) -> tuple:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(
    results: List[dict], arms: List[str], same_load_ms: Optional[Dict[str, float]] = None
) -> str:
    same_load_ms = same_load_ms or {}
    rows = [
        "| arm | test top-1 %, mean ± std (min-max) | per seed "
        "| train MFLOPs/img (fwd+bwd, cf 1.05) | inference MFLOPs/img (cf 4.0) "
        "| dropped % (cf 1.05) | load CV | ms/step in the runs, median (range over seeds) "
        "| ms/step, same load | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        rs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        acc = [100 * r["test_acc1"] for r in rs]
        m, s = _mean_std(acc)
        per_seed = " / ".join(f"{a:.2f}" for a in acc)
        moe = "dropped_fraction" in rs[0]
        dropped = (
            (lambda v: f"{v[0]:.2f} ± {v[1]:.2f}")(
                _mean_std([100 * r["dropped_fraction"] for r in rs])
            )
            if moe
            else "-"
        )
        cv = (
            (lambda v: f"{v[0]:.3f} ± {v[1]:.3f}")(_mean_std([r["load_cv"] for r in rs]))
            if moe
            else "-"
        )
        step = statistics.median(r["step_ms_median"] for r in rs)
        steps = [r["step_ms_median"] for r in rs]
        same = f"{same_load_ms[arm]:.1f}" if arm in same_load_ms else "-"
        rows.append(
            f"| {ARMS[arm][0]} | {m:.2f} ± {s:.2f} ({min(acc):.2f}-{max(acc):.2f}) | {per_seed} "
            f"| {rs[0]['train_flops_per_image'] / 1e6:.2f} "
            f"| {rs[0]['infer_flops_per_image'] / 1e6:.2f} "
            f"| {dropped} | {cv} | {step:.1f} ({min(steps):.1f}-{max(steps):.1f}) "
            f"| {same} | {rs[0]['params']:,} |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=sorted(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (1 or 2 on a shared 2-core CPU)"
    )
    parser.add_argument(
        "--root", default="/tmp/vmoe_routing_methods", help="run directories (not in the repo)"
    )
    parser.add_argument("--out", default=None, help="write the markdown table to this file too")
    parser.add_argument(
        "--time-steps",
        action="store_true",
        help="also time training steps of every arm's seed-0 final model, interleaved (same load)",
    )
    parser.add_argument("--measure-run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_run:
        print(json.dumps(measure_run(Path(args.measure_run))))
        return
    if args.jobs < 1:
        raise ValueError(f"--jobs={args.jobs} must be >= 1")
    if args.epochs < 1:
        raise ValueError(f"--epochs={args.epochs} must be >= 1")
    root = Path(args.root)
    tasks = [
        (arm, seed) for seed in args.seeds for arm in args.arms
    ]  # interleaved: load hits all arms
    results, failures = [], []

    def job(task):
        arm, seed = task
        t0 = time.time()
        try:
            r = run_one(arm, seed, args.epochs, root)
        except Exception as err:  # report and go on with the other runs
            failures.append(f"{arm} seed {seed}: {err}")
            print(f"FAILED {arm} seed {seed}: {err}", flush=True)
            return None
        print(
            f"{arm:12s} seed {seed}: test {100 * r['test_acc1']:.2f}%  "
            f"step {r['step_ms_median']:.1f} ms  ({time.time() - t0:.0f} s)",
            flush=True,
        )
        return r

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = [r for r in pool.map(job, tasks) if r is not None]
    same_load = None
    if args.time_steps:
        done = {r["arm"]: Path(r["run_dir"]) for r in sorted(results, key=lambda r: -r["seed"])}
        same_load = time_steps(done)
        print(
            "same-load ms/step:",
            json.dumps({k: round(v, 1) for k, v in same_load.items()}),
            flush=True,
        )
    text = (
        f"{table(results, args.arms, same_load)}\n\nseeds {args.seeds}, {args.epochs} epochs; "
        f"runs under {root}"
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if failures:
        print("\n".join(["failed runs:"] + failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
