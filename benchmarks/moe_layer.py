"""Benchmark of the sparse MoE layer against its floor, a dense MLP and the einsum oracle.

Prints, in one run, forward and forward+backward times (medians over interleaved repeats) of:

- ``dense``:        timm-style dense MLP (fc1 -> GELU -> fc2) on all B*N tokens;
- ``floor``:        the batched expert MLP alone on ready-made [E, G*C, d] buffers of the same
                    capacity (no routing, no dispatch, no combine): what any MoE layer must pay;
- ``einsum``:       ``MoeMlp(dispatcher='einsum')``, the official one-hot dispatch (oracle);
- ``moe``:          ``MoeMlp`` with the default dispatcher ("auto": Triton on CUDA, else torch);
- ``einsum_id``/``moe_id``: the same two layers with identity experts, i.e. their routing +
                    dispatch + combine overhead alone;
- ``floor_gmm``:    (bf16 only) the floor with ``Experts(gemm='grouped_mm')``, i.e.
                    ``torch.nn.functional.grouped_mm`` instead of bmm: the column
                    ``floor_gmm/floor`` says whether grouped GEMM measures faster (< 1) here.

The last column, the ratio of the fastest repeats, is a contention-robust cross-check on a
shared machine (the targets use the paired medians). Ratios are formed per repeat (each repeat
times every variant once, in turn, so slow phases of a shared machine hit all variants alike)
and then the median ratio is reported. The targets of issues 2 and 7 are checked at the end.
Forward is timed in eval mode under ``no_grad``; forward+backward in train mode (router noise and
the load loss on), backpropagating a fixed random output gradient plus the auxiliary loss.

Peak memory: the profiler's allocation events (CPU) or the allocator's peak (CUDA) during one
forward+backward, for several
group sizes at a fixed token count. E*C per token grows linearly with the group size S (E*C ~
S*K*cf), so the einsum path's [G, S, E, C] one-hot tensors grow with it, while the index path's
largest tensors are the [E, G*C, h] expert activations (~ tokens*K*cf*h, independent of S).

Soft MoE (``--soft``): ``MoeMlp(router='soft')`` at the S/32 layer shape (d=512, h=2048,
32 images x 50 tokens, one image per group, E=8 and E=32, slots per expert from capacity factor
1.0: P = round(50/E)) against the sum of its essential matmuls, each timed alone on ready inputs
in the same repeat: the router logits ([G*S, d] @ [d, E*P]), the dispatch mix
([G, E*P, S] @ [G, S, d]), the experts on ready [E, G*P, d] slots, and the combine mix
([G, S, E*P] @ [G, E*P, d]), forward and backward each. Target: layer / sum <= 1.10.

New routing methods (issue 24; ``--no-methods`` skips them): the same layer with
``score_func='sigmoid'`` (``moe_sigmoid``), with auxiliary-loss-free bias balancing
(``moe_bias``: selection by scores + bias, demand counted in training forwards; the once-per-step
bias update is not part of the layer) and with one shared expert of the experts' width
(``moe_shared``: a dense MLP on every token on top of the routed experts). Targets (S/32):
sigmoid and bias layers fwd+bwd <= 1.08x the floor (as ``moe``); the shared-expert layer
<= 1.08x (floor + dense), the two things it must run. The columns ``*/moe`` and
``(moe_shared - moe) / dense`` (the shared expert's own cost in dense MLPs) compare with plain
``moe`` timed in the same repeat: on a loaded machine they hold when the floor ratios do not.

Usage: python benchmarks/moe_layer.py [--repeats 7] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
                                     [--shapes NAME ...] [--no-memory] [--soft] [--no-methods]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vmoe.moe import MoeMlp  # noqa: E402


@dataclass
class Shape:
    name: str
    d: int
    h: int
    E: int
    K: int = 2
    cf: float = 1.05
    images: int = 32
    tokens: int = 50
    group_images: int = 8


SHAPES = {
    "S/32 E=8": Shape("S/32 E=8", 512, 2048, 8),
    "S/32 E=32": Shape("S/32 E=32", 512, 2048, 32),
    "tiny E=4": Shape("tiny E=4", 64, 256, 4),
    # The GPU shapes: the paper's B/16 layer (196 patches + cls, 8 images per group).
    "B/16 E=8": Shape("B/16 E=8", 768, 3072, 8, images=64, tokens=197),
    "B/16 E=32": Shape("B/16 E=32", 768, 3072, 32, images=64, tokens=197),
}
DEFAULT_SHAPES = {
    "cpu": ["S/32 E=8", "S/32 E=32", "tiny E=4"],
    "cuda": ["S/32 E=8", "S/32 E=32", "B/16 E=8", "B/16 E=32", "tiny E=4"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ["dense", "floor", "einsum", "moe", "einsum_id", "moe_id"]


class DenseMlp(nn.Module):
    """timm's ``Mlp`` (fc1 -> GELU -> fc2) without the extras."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def make_layer(shape: Shape, dispatcher: str, identity: bool = False, **options) -> MoeMlp:
    """The capacity path in the eval-mode forward too (``dropless=False``): the layer is
    measured against its floor at capacity C (dropless inference: export_inference.py)."""
    options.setdefault("dropless", False)
    layer = MoeMlp(
        shape.d,
        shape.h,
        num_experts=shape.E,
        num_selected=shape.K,
        capacity_factor=shape.cf,
        group_size_images=shape.group_images,
        dispatcher=dispatcher,
        **options,
    )
    if identity:
        layer.experts = nn.Identity()
    return layer


def build(shape: Shape, device: str, dtype: torch.dtype, dispatcher: str = "auto"):
    """name -> (module, input, output-gradient) for every variant, same weights throughout."""
    torch.manual_seed(0)
    x = torch.randn(shape.images, shape.tokens, shape.d, device=device)
    moe = make_layer(shape, dispatcher).to(device)
    layers = {"dense": DenseMlp(shape.d, shape.h).to(device), "moe": moe}
    layers["einsum"] = copy.deepcopy(moe)
    layers["einsum"].dispatcher = "einsum"
    layers["moe_id"] = make_layer(shape, dispatcher, identity=True).to(device)
    layers["moe_id"].router.load_state_dict(moe.router.state_dict())
    layers["einsum_id"] = copy.deepcopy(layers["moe_id"])
    layers["einsum_id"].dispatcher = "einsum"
    # The floor's buffers: as many rows as the layer's buffers (E * G * C).
    S = shape.tokens * shape.group_images
    G = -(-shape.images * shape.tokens // S)
    C = moe.router.capacity_for(S)
    layers["floor"] = moe.experts
    if dtype == torch.bfloat16:
        layers["floor_gmm"] = copy.deepcopy(moe.experts)
        layers["floor_gmm"].gemm = "grouped_mm"
    floors = {"floor", "floor_gmm"} & set(layers)
    # Ready buffers are in the compute dtype: dispatch casts on the way (see vmoe.moe.dispatch).
    buffers = torch.randn(shape.E, G * C, shape.d, device=device, dtype=dtype)
    buffer_grad = torch.randn(shape.E, G * C, shape.d, device=device)
    inputs = {name: buffers if name in floors else x for name in layers}
    grads = {
        name: buffer_grad
        if name in floors
        else torch.randn(shape.images, shape.tokens, shape.d, device=device)
        for name in layers
    }
    return layers, inputs, grads, C


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(
    layer, x, grad, backward: bool, device: str, dtype: torch.dtype, inner: int = 1
) -> float:
    """Seconds per call, averaged over ``inner`` calls, of a forward (eval, no_grad) or a
    forward+backward (train)."""
    layer.train(backward)
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        _call(layer, x, grad, backward, device, dtype)
    _sync(device)
    return (time.perf_counter() - start) / inner


def _call(layer, x, grad, backward: bool, device: str, dtype: torch.dtype) -> None:
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    if backward:
        xi = x.detach().requires_grad_()
        with autocast:
            out = layer(xi)
        tensors, grad_tensors = [out], [grad.to(out.dtype)]
        if (
            isinstance(layer, MoeMlp)
            and layer.aux_loss is not None
            and layer.aux_loss.requires_grad
        ):
            tensors.append(layer.aux_loss)
            grad_tensors.append(torch.ones_like(layer.aux_loss))
        torch.autograd.backward(tensors, grad_tensors)
        layer.zero_grad(set_to_none=True)
    else:
        with torch.no_grad(), autocast:
            layer(x)


def bench_shape(
    shape: Shape, repeats: int, warmup: int, device: str, dtype: torch.dtype, inner: int = 1
):
    layers, inputs, grads, C = build(shape, device, dtype)
    variants = list(layers)
    times = {(v, bwd): [] for v in variants for bwd in (False, True)}
    for bwd in (False, True):
        for _ in range(warmup):
            for v in variants:
                run_once(layers[v], inputs[v], grads[v], bwd, device, dtype, inner)
    for _ in range(repeats):  # interleaved: every repeat times every variant once
        for bwd in (False, True):
            for v in variants:
                times[(v, bwd)].append(
                    run_once(layers[v], inputs[v], grads[v], bwd, device, dtype, inner)
                )
    return times, C


def paired_ratio(times, a, b, bwd) -> float:
    """Median over repeats of time(a)/time(b) within the same repeat."""
    return statistics.median(x / y for x, y in zip(times[(a, bwd)], times[(b, bwd)]))


# --- the new routing methods -----------------------------------------------------------------
METHODS = {
    "moe_sigmoid": dict(score_func="sigmoid", renormalize=True),
    "moe_bias": dict(bias_update_rate=1e-3),
    "moe_shared": dict(shared_experts=1),
}


def methods_table(shapes, repeats: int, warmup: int, device: str, dtype: torch.dtype, inner: int):
    """Prints the table of the new routing options; returns the checks [(text, ratio, ok)]."""
    print("\nNew routing methods (issue 24), vs the floor (shared expert: vs floor + dense):")
    names = ["floor", "dense", "moe", *METHODS]
    print(
        "| shape | pass | "
        + " | ".join(f"{n} ms" for n in names)
        + " | moe/floor | moe_sigmoid/floor | moe_bias/floor | moe_shared/(floor+dense)"
        " | moe_sigmoid/moe | moe_bias/moe | (moe_shared-moe)/dense |"
    )
    print("|" + "---|" * (len(names) + 9))
    checks = []
    for name in shapes:
        shape = SHAPES[name]
        layers, inputs, grads, _ = build(shape, device, dtype)
        for method, options in METHODS.items():
            torch.manual_seed(0)
            layers[method] = make_layer(shape, "auto", **options).to(device)
            layers[method].load_state_dict(layers["moe"].state_dict(), strict=False)
            inputs[method], grads[method] = inputs["moe"], grads["moe"]
        times = {(v, bwd): [] for v in names for bwd in (False, True)}
        for bwd in (False, True):
            for _ in range(warmup):
                for v in names:
                    run_once(layers[v], inputs[v], grads[v], bwd, device, dtype, inner)
        for _ in range(repeats):
            for bwd in (False, True):
                for v in names:
                    times[(v, bwd)].append(
                        run_once(layers[v], inputs[v], grads[v], bwd, device, dtype, inner)
                    )
        for bwd in (False, True):
            med = {v: 1e3 * statistics.median(times[(v, bwd)]) for v in names}
            ratios = {v: paired_ratio(times, v, "floor", bwd) for v in ("moe_sigmoid", "moe_bias")}
            both = [f + d for f, d in zip(times[("floor", bwd)], times[("dense", bwd)])]
            shared = statistics.median(t / b for t, b in zip(times[("moe_shared", bwd)], both))
            extra = statistics.median(
                (a - b) / c
                for a, b, c in zip(
                    times[("moe_shared", bwd)], times[("moe", bwd)], times[("dense", bwd)]
                )
            )
            print(
                f"| {name} | {'fwd+bwd' if bwd else 'fwd'} | "
                + " | ".join(f"{med[v]:.1f}" for v in names)
                + f" | {paired_ratio(times, 'moe', 'floor', bwd):.3f} | {ratios['moe_sigmoid']:.3f}"
                f" | {ratios['moe_bias']:.3f} | {shared:.3f}"
                f" | {paired_ratio(times, 'moe_sigmoid', 'moe', bwd):.3f}"
                f" | {paired_ratio(times, 'moe_bias', 'moe', bwd):.3f} | {extra:.3f} |",
                flush=True,
            )
            if bwd and name.startswith(("S/32", "B/16")):
                target = 1.08 if device == "cpu" else 1.10
                for v in ("moe_sigmoid", "moe_bias"):
                    checks.append(
                        (
                            f"{name}: {v} fwd+bwd / floor <= {target:.2f}",
                            ratios[v],
                            ratios[v] <= target,
                        )
                    )
                checks.append(
                    (
                        f"{name}: moe_shared fwd+bwd / (floor + dense) <= {target:.2f}",
                        shared,
                        shared <= target,
                    )
                )
    return checks


# --- peak memory ------------------------------------------------------------------------------
def peak_alloc_bytes(fn, device: str = "cpu") -> int:
    """Peak of (bytes allocated - bytes freed) while ``fn`` runs; tensors alive before the call
    count as 0. CUDA: the caching allocator's peak statistic. CPU (no such statistic): the
    profiler's memory events in time order."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations inside an op count as that op's self memory; frees of tensors outliving their
    # op appear as separate "[memory]" events. Summed in time order they give the live bytes.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def memory_table(shape: Shape, group_images=(2, 8, 32), device: str = "cpu", dtype=torch.float32):
    rows = []
    torch.manual_seed(0)
    x = torch.randn(shape.images, shape.tokens, shape.d, device=device)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    for gi in group_images:
        row = {"group_images": gi}
        for path, dispatcher in (("index", "auto"), ("einsum", "einsum")):
            layer = make_layer(Shape(**{**shape.__dict__, "group_images": gi}), dispatcher)
            layer = layer.to(device).train()

            def step(layer=layer):  # bound now: each step() is this iteration's layer
                xi = x.detach().requires_grad_()
                with autocast:
                    out = layer(xi)
                (out.float().square().mean() + layer.aux_loss).backward()
                layer.zero_grad(set_to_none=True)

            step()  # warm-up (lazy init), then measure
            row[path] = peak_alloc_bytes(step, device)
            S = gi * shape.tokens
            row["EC"] = shape.E * layer.router.capacity_for(S)
        rows.append(row)
    return rows


# --- Soft MoE ---------------------------------------------------------------------------------
SOFT_SHAPES = {
    "S/32 E=8": Shape("S/32 E=8", 512, 2048, 8, cf=1.0, group_images=1),
    "S/32 E=32": Shape("S/32 E=32", 512, 2048, 32, cf=1.0, group_images=1),
}
SOFT_PARTS = ["logits", "dispatch_mix", "experts", "combine_mix"]


class _Matmul(nn.Module):
    """One essential matmul of the soft layer on ready inputs: ``a @ b`` (batched if 3-d), with
    gradients for both operands. ``fp32=True`` keeps it in float32 under autocast (the router)."""

    def __init__(
        self, a: torch.Tensor, b: torch.Tensor, fp32: bool = False, transpose_a: bool = False
    ):
        super().__init__()
        self.a, self.b, self.fp32, self.transpose_a = (
            nn.Parameter(a),
            nn.Parameter(b),
            fp32,
            transpose_a,
        )

    def forward(self, _x):
        a = self.a.transpose(-1, -2) if self.transpose_a else self.a  # the layer's layout
        with torch.autocast(
            device_type=self.a.device.type,
            enabled=not self.fp32 and torch.is_autocast_enabled(self.a.device.type),
        ):
            return a @ self.b


def build_soft(shape: Shape, device: str, dtype: torch.dtype):
    """name -> (module, input, output gradient) for the soft layer and each essential matmul."""
    torch.manual_seed(0)
    S, G = shape.tokens * shape.group_images, shape.images // shape.group_images
    layer = MoeMlp(
        shape.d, shape.h, num_experts=shape.E, router="soft", capacity_factor=shape.cf, group_size=S
    ).to(device)
    P, E, d = layer.num_slots, shape.E, shape.d
    x = torch.randn(shape.images, shape.tokens, d, device=device)
    rand = lambda *size: torch.randn(*size, device=device)  # noqa: E731
    slots = rand(E, G * P, d).to(dtype)
    parts = {
        "layer": (layer, x, rand(shape.images, shape.tokens, d)),
        "logits": (_Matmul(rand(G * S, d), rand(d, E * P), fp32=True), None, rand(G * S, E * P)),
        "dispatch_mix": (
            _Matmul(rand(G, S, E * P).softmax(1), rand(G, S, d), transpose_a=True),
            None,
            rand(G, E * P, d),
        ),
        "experts": (layer.experts, slots, rand(E, G * P, d)),
        "combine_mix": (
            _Matmul(rand(G, S, E * P).softmax(-1), rand(G, E * P, d)),
            None,
            rand(G, S, d),
        ),
    }
    return parts, P


def _soft_call(module, x, grad, device, dtype) -> None:
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    xi = x.detach().requires_grad_() if x is not None else None
    with autocast:
        out = module(xi)
    out.backward(grad.to(out.dtype))
    module.zero_grad(set_to_none=True)


def soft_table(shapes, repeats: int, warmup: int, device: str, dtype: torch.dtype, inner: int):
    """Prints the Soft MoE table; returns the checks [(text, ratio, ok)]."""
    print(
        "\nSoft MoE layer, forward+backward, vs its essential matmuls timed alone on ready inputs:"
    )
    print(
        "| shape | P | layer ms | "
        + " | ".join(f"{p} ms" for p in SOFT_PARTS)
        + " | layer/sum | layer/sum (min) |"
    )
    print("|" + "---|" * (len(SOFT_PARTS) + 5))
    checks = []
    for name in shapes:
        parts, P = build_soft(SOFT_SHAPES[name], device, dtype)
        times = {k: [] for k in parts}

        def timed(k, parts=parts):  # bound now: this shape's parts
            module, x, grad = parts[k]
            module.train()
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                _soft_call(module, x, grad, device, dtype)
            _sync(device)
            return (time.perf_counter() - start) / inner

        for _ in range(warmup):
            for k in parts:
                timed(k)
        for _ in range(repeats):  # interleaved: each repeat times the layer and every part once
            for k in parts:
                times[k].append(timed(k))
        sums = [sum(times[p][i] for p in SOFT_PARTS) for i in range(repeats)]
        ratio = statistics.median(t / s for t, s in zip(times["layer"], sums))
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(
            f"| {name} | {P} | {med['layer']:.2f} | "
            + " | ".join(f"{med[p]:.2f}" for p in SOFT_PARTS)
            + f" | {ratio:.3f} | {min(times['layer']) / min(sums):.3f} |",
            flush=True,
        )
        checks.append(
            (f"soft {name}: layer fwd+bwd / essential matmuls <= 1.10", ratio, ratio <= 1.10)
        )
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--inner",
        type=int,
        default=None,
        help="calls per timed sample (default: 1 on cpu, 10 on cuda)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory check")
    p.add_argument("--soft", action="store_true", help="the Soft MoE table only (see above)")
    p.add_argument(
        "--no-methods", action="store_true", help="skip the table of the new routing methods"
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    known = SOFT_SHAPES if args.soft else SHAPES
    shapes = args.shapes or (list(SOFT_SHAPES) if args.soft else DEFAULT_SHAPES[args.device])
    for name in shapes:
        if name not in known:
            raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {list(known)}")
    alloc = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD"))}
    print(
        f"torch {torch.__version__}, device={args.device}, dtype={args.dtype}, "
        f"threads={torch.get_num_threads()}, repeats={args.repeats}, "
        f"allocator env={alloc or 'glibc default'}"
    )
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    if args.soft:
        inner = args.inner or (10 if args.device == "cuda" else 1)
        checks = soft_table(shapes, args.repeats, args.warmup, args.device, dtype, inner)
        print("\nTargets:")
        for text, value, ok in checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {text}: {value:.3f}")
        return 0 if all(ok for _, _, ok in checks) else 1

    gmm = dtype == torch.bfloat16  # the grouped_mm floor runs in bfloat16 only
    print(
        "\n| shape | C | pass | dense ms | floor ms | einsum ms | moe ms | einsum_id ms "
        "| moe_id ms | moe/floor | einsum/floor | moe/dense | moe_id/einsum_id "
        "| moe/floor (min) |" + (" floor_gmm/floor |" if gmm else "")
    )
    print("|" + "---|" * (15 if gmm else 14))
    checks = []
    floor_target = 1.08 if args.device == "cpu" else 1.10
    overhead_target = 1 / 3 if args.device == "cpu" else 1 / 5
    for name in shapes:
        shape = SHAPES[name]
        inner = args.inner or (10 if args.device == "cuda" else 1)
        times, C = bench_shape(shape, args.repeats, args.warmup, args.device, dtype, inner)
        for bwd in (False, True):
            med = {v: 1e3 * statistics.median(times[(v, bwd)]) for v in VARIANTS}
            r_floor = paired_ratio(times, "moe", "floor", bwd)
            r_over = paired_ratio(times, "moe_id", "einsum_id", bwd)
            print(
                f"| {name} | {C} | {'fwd+bwd' if bwd else 'fwd'} | "
                + " | ".join(f"{med[v]:.1f}" for v in VARIANTS)
                + f" | {r_floor:.3f} | {paired_ratio(times, 'einsum', 'floor', bwd):.3f}"
                f" | {paired_ratio(times, 'moe', 'dense', bwd):.2f} | {r_over:.3f}"
                f" | {min(times[('moe', bwd)]) / min(times[('floor', bwd)]):.3f} |"
                + (f" {paired_ratio(times, 'floor_gmm', 'floor', bwd):.3f} |" if gmm else ""),
                flush=True,
            )
            if bwd and name.startswith(("S/32", "B/16")):
                checks.append(
                    (
                        f"{name}: moe fwd+bwd / floor <= {floor_target:.2f}",
                        r_floor,
                        r_floor <= floor_target,
                    )
                )
                if args.device == "cpu" or "E=32" in name:
                    checks.append(
                        (
                            f"{name}: overhead moe_id / einsum_id <= {overhead_target:.3f}",
                            r_over,
                            r_over <= overhead_target,
                        )
                    )
    if not args.no_methods:
        checks += methods_table(
            shapes,
            args.repeats,
            args.warmup,
            args.device,
            dtype,
            args.inner or (10 if args.device == "cuda" else 1),
        )
    print("\nTargets:")
    for text, value, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}: {value:.3f}")

    if not args.no_memory:
        shape = SHAPES["S/32 E=8"]
        rows = memory_table(shape, device=args.device, dtype=dtype)
        print(
            f"\nPeak allocated bytes during one fwd+bwd "
            f"({shape.name}, {shape.images}x{shape.tokens} tokens), "
            "by group size (E*C per token grows with it):"
        )
        print("| images/group | E*C | index MiB | einsum MiB |\n|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['group_images']} | {r['EC']} "
                f"| {r['index'] / 2**20:.1f} | {r['einsum'] / 2**20:.1f} |"
            )
        idx = [r["index"] for r in rows]
        growth = max(idx) / min(idx)
        ec_growth = rows[-1]["EC"] / rows[0]["EC"]
        ok = growth <= 1.10
        print(
            f"  [{'PASS' if ok else 'FAIL'}] index peak max/min = {growth:.3f} (<= 1.10) "
            f"while E*C grows {ec_growth:.1f}x; "
            f"einsum peak grows {rows[-1]['einsum'] / rows[0]['einsum']:.2f}x"
        )
        checks.append(("memory", growth, ok))
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
