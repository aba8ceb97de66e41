"""Training throughput (images/s) of V-MoE against the dense ViT of the same architecture.

Pairs (the paper's models): V-MoE B/16 (E=8, K=2, every 2) vs dense ViT-B/16, and V-MoE S/32
(E=8, K=2, last 2) vs dense ViT-S/32. For each pair it prints the throughput ratio vmoe/dense next
to the FLOPs ratio dense/vmoe (what the extra FLOPs predict; counted with torch.utils.flop_counter
over one forward+backward, MoE layers at the E*G*C rows they actually compute) and their quotient.
Target: quotient >= 0.9, i.e. V-MoE reaches at least 90% of the throughput its FLOPs allow.

    python benchmarks/train_throughput.py --device cuda                 # GPU, bf16 autocast
    python benchmarks/train_throughput.py --device cpu --steps 2        # CPU smoke run

Steps are timed in interleaved rounds (dense, vmoe, dense, vmoe, ...), each round ``--steps``
training steps (AdamW, cross-entropy + auxiliary loss); the median of the per-round ratios is
reported. ``--compile`` wraps both models in torch.compile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vmoe.models  # noqa: E402  (registers the vmoe_* models)

# name -> (V-MoE factory, dense architecture, default GPU batch)
PAIRS = {
    "b16": (
        "vmoe_b16_e8_k2_every2",
        dict(
            img_size=224,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4.0,
            representation_size=768,
        ),
        256,
    ),
    "s32": (
        "vmoe_s32_e8_k2_last2",
        dict(
            img_size=224,
            patch_size=32,
            embed_dim=512,
            depth=8,
            num_heads=8,
            mlp_ratio=4.0,
            representation_size=512,
        ),
        1024,
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(pair: str, moe: bool, num_classes: int) -> torch.nn.Module:
    factory, dense_arch, _ = PAIRS[pair]
    if moe:
        return timm.create_model(factory, num_classes=num_classes)
    return timm.create_model("vmoe_vit", num_classes=num_classes, **dense_arch)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Trainer:
    """One model, its optimizer and a fixed batch; ``steps(n)`` returns the seconds taken."""

    def __init__(self, model, images, labels, dtype, compile_model: bool):
        self.model = model
        self.forward = torch.compile(model) if compile_model else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.images, self.labels = images, labels
        self.autocast = torch.autocast(
            images.device.type, dtype=dtype, enabled=dtype != torch.float32
        )
        self.has_moe = bool(vmoe.models.moe_layers(model))

    def loss(self):
        with self.autocast:
            logits = self.forward(self.images)
        loss = torch.nn.functional.cross_entropy(logits.float(), self.labels)
        return loss + vmoe.models.aux_loss(self.model) if self.has_moe else loss

    def steps(self, n: int) -> float:
        device = self.images.device.type
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            self.optimizer.zero_grad(set_to_none=True)
            self.loss().backward()
            self.optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.loss().backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def run_pair(pair: str, args, dtype) -> dict:
    device = args.device
    batch = args.batch_size or (PAIRS[pair][2] if device == "cuda" else 2)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    trainers = {
        k: Trainer(
            build(pair, k == "vmoe", 1000).to(device).train(), images, labels, dtype, args.compile
        )
        for k in ("dense", "vmoe")
    }
    flops = {k: t.flops() for k, t in trainers.items()}  # eager: the FLOPs actually computed
    for t in trainers.values():
        t.steps(args.warmup)
    times = {k: [] for k in trainers}
    for _ in range(args.rounds):
        for k, t in trainers.items():
            times[k].append(t.steps(args.steps))
    ips = {k: batch * args.steps / statistics.median(v) for k, v in times.items()}
    throughput_ratio = statistics.median(d / m for d, m in zip(times["dense"], times["vmoe"]))
    predicted = flops["dense"] / flops["vmoe"]
    del trainers
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(
        pair=pair,
        batch=batch,
        ips=ips,
        flops=flops,
        throughput_ratio=throughput_ratio,
        predicted=predicted,
        quotient=throughput_ratio / predicted,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu"
    )
    p.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default: 256 (B/16), 1024 (S/32) on cuda; 2 on cpu",
    )
    p.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        args.warmup = min(args.warmup, 1)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(
        f"torch {torch.__version__}, device={args.device}, dtype={dtype}, compile={args.compile}, "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    print(
        "\n| pair | batch | dense img/s | vmoe img/s | dense GFLOPs/img | vmoe GFLOPs/img "
        "| throughput ratio | FLOPs-predicted | quotient |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for pair in args.pairs:
        r = run_pair(pair, args, dtype)
        f = {k: v / r["batch"] / 1e9 for k, v in r["flops"].items()}
        print(
            f"| {pair} | {r['batch']} | {r['ips']['dense']:.1f} | {r['ips']['vmoe']:.1f} "
            f"| {f['dense']:.2f} | {f['vmoe']:.2f} | {r['throughput_ratio']:.3f} "
            f"| {r['predicted']:.3f} | {r['quotient']:.3f} |",
            flush=True,
        )
        passed = r["quotient"] >= 0.9
        ok &= passed
        print(
            f"  [{'PASS' if passed else 'FAIL'}] {pair}: vmoe throughput >= 0.9x FLOPs-predicted: "
            f"{r['quotient']:.3f}",
            flush=True,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
