"""Training-step time (forward+backward, fp32) of V-MoE S/32 (E=8, K=2, last-2) against its
dense counterpart, on CPU. The optimizer update is left out of the timing: FLOPs do not count
it, and its cost follows the parameter count (the V-MoE has 2.1x the dense model's), not compute.

Prints the step-time ratio, the FLOPs ratio (counted with torch.utils.flop_counter over one
forward+backward; the MoE FLOPs are those of the capacity buffers actually computed, E*G*C rows
per layer, padding rows included) and their quotient. Target: quotient <= 1.10, i.e. the V-MoE
step costs no more than 1.10x what its extra FLOPs explain.

    python benchmarks/train_step.py [--batch-size 32] [--repeats 5] [--threads 2]

Repeats are interleaved (dense, moe, dense, moe, ...) and the ratio is taken per repeat, then the
median, because this machine is noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import vmoe.models  # noqa: F401  (registers the vmoe_* models)


def build(moe: bool, num_classes: int) -> torch.nn.Module:
    if moe:
        return timm.create_model("vmoe_s32_e8_k2_last2", num_classes=num_classes)
    # The same architecture with every block dense.
    return timm.create_model(
        "vmoe_vit",
        num_classes=num_classes,
        img_size=224,
        patch_size=32,
        embed_dim=512,
        depth=8,
        num_heads=8,
        mlp_ratio=4.0,
        representation_size=512,
    )


def step(model, images, labels):
    """One forward+backward (gradients dropped first, so each step allocates them anew)."""
    model.zero_grad(set_to_none=True)
    logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, labels) + vmoe.models.aux_loss(model)
    loss.backward()


def count_flops(model, images, labels) -> int:
    with FlopCounterMode(display=False) as counter:
        logits = model(images)
        (torch.nn.functional.cross_entropy(logits, labels) + vmoe.models.aux_loss(model)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    images = torch.randn(args.batch_size, 3, 224, 224)
    labels = torch.randint(0, 1000, (args.batch_size,))
    models = {"dense": build(False, 1000).train(), "vmoe": build(True, 1000).train()}
    flops = {k: count_flops(m, images, labels) for k, m in models.items()}
    for k in models:  # warm-up
        step(models[k], images, labels)
    times = {k: [] for k in models}
    for _ in range(args.repeats):
        for k in models:
            start = time.perf_counter()
            step(models[k], images, labels)
            times[k].append(time.perf_counter() - start)
    ratios = [m / d for m, d in zip(times["vmoe"], times["dense"])]
    time_ratio = statistics.median(ratios)
    flops_ratio = flops["vmoe"] / flops["dense"]
    layer = vmoe.models.moe_layers(models["vmoe"])["blocks.5.mlp"]
    plan = layer.last_plan
    print(
        f"torch {torch.__version__}, threads={args.threads}, fp32, batch {args.batch_size}, "
        f"{plan.num_groups} routing groups of {plan.group_size} tokens, "
        f"C={plan.capacity} per expert"
    )
    print("| model | fwd+bwd time median (s) | GFLOPs fwd+bwd |")
    print("|---|---|---|")
    for k in models:
        print(f"| {k} | {statistics.median(times[k]):.3f} | {flops[k] / 1e9:.1f} |")
    print(f"\nstep-time ratio vmoe/dense (median of paired repeats): {time_ratio:.3f}")
    print(f"FLOPs ratio vmoe/dense (capacity buffers incl. padding rows): {flops_ratio:.3f}")
    quotient = time_ratio / flops_ratio
    verdict = "PASS" if quotient <= 1.10 else "FAIL"
    print(f"time ratio / FLOPs ratio: {quotient:.3f}  (target <= 1.10: {verdict})")


if __name__ == "__main__":
    main()
