"""Inference of exported vmoe models: eager PyTorch vs ``torch.compile`` vs ONNX Runtime.

For each model (the tiny V-MoE, the tiny Soft MoE, V-MoE-S/32 E=8 K=2 at 224 px) and batch size
(1, 8, 64), prints the median forward time of each runtime and the ratios eager/compile and
eager/onnxruntime, measured in one run with interleaved repeats (each repeat times every runtime
once, so a slow phase of a shared machine hits them alike; ratios are medians of per-repeat
ratios). The ONNX model is exported once per model (``vmoe.models.export_onnx``, dynamic batch)
and run at every batch size; ``torch.compile`` compiles with ``dynamic=True``. All runtimes use
the same number of threads (default 1, like ONNX Runtime's ``intra_op_num_threads``) and the
evaluation routing that ``vmoe fit`` uses (capacity factor 4.0).

Then the FLOPs (``torch.utils.flop_counter.FlopCounterMode``, the matmuls: what the experts
cost) of batch-independent inference (one image per routing group) relative to the default
grouping (8 images), at capacity factors 1.05 and 4.0, for 64 images.

Usage: python benchmarks/export_inference.py [--models tiny soft s32] [--batches 1 8 64]
                                             [--repeats 7] [--threads 1] [--no-flops]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import timm  # noqa: E402

import vmoe.models as vm  # noqa: E402
from vmoe.models import export as ex  # noqa: E402

MODELS = {"tiny": "vmoe_tiny_e4_k2", "soft": "soft_moe_tiny_e8", "s32": "vmoe_s32_e8_k2_every2"}


def _time(fn, x, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn(x)
    return (time.perf_counter() - t0) / inner


def bench_model(key, batches, repeats, threads):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = timm.create_model(MODELS[key]).eval()
    shape = ex._input_shape(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = vm.export_onnx(model, os.path.join(tmp, "m.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = []
    with ex.inference_routing(model), torch.no_grad():
        compiled = torch.compile(model, dynamic=True)
        runtimes = {
            "eager": model,
            "compile": compiled,
            "onnxruntime": lambda x: session.run(None, {name: x.numpy()})[0],
        }
        for b in batches:
            x = torch.randn(b, *shape)
            for fn in runtimes.values():  # warm up (compiles)
                fn(x)
            diff = float((torch.from_numpy(runtimes["onnxruntime"](x)) - model(x)).abs().max())
            inner = max(1, int(0.2 / max(_time(model, x, 1), 1e-4)))
            times = {k: [] for k in runtimes}
            for _ in range(repeats):
                for k, fn in runtimes.items():
                    times[k].append(_time(fn, x, inner))
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            ratio = {
                k: statistics.median(e / t for e, t in zip(times["eager"], times[k]))
                for k in ("compile", "onnxruntime")
            }
            rows.append(
                (
                    key,
                    b,
                    med["eager"],
                    med["compile"],
                    med["onnxruntime"],
                    ratio["compile"],
                    ratio["onnxruntime"],
                    diff,
                )
            )
            print(
                f"| {key} | {b} | {med['eager']:.2f} | {med['compile']:.2f} | "
                f"{med['onnxruntime']:.2f} | {ratio['compile']:.2f} | {ratio['onnxruntime']:.2f} | "
                f"{diff:.1e} |",
                flush=True,
            )
    return rows


def flops(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def flops_table(keys):
    print("\n| model | capacity factor | FLOPs 8 images/group (G) | 1 image/group (G) | ratio |")
    print("|---|---|---|---|---|")
    for key in keys:
        if key == "soft":
            continue  # Soft MoE routes one image per group already
        model = timm.create_model(MODELS[key]).eval()  # (the routers' autocast refuses "meta")
        x = torch.randn(64, *ex._input_shape(model))
        for cf in (1.05, 4.0):
            with ex.inference_routing(model, capacity_factor=cf):
                grouped = flops(model, x)
            with ex.inference_routing(model, capacity_factor=cf, batch_independent=True):
                alone = flops(model, x)
            print(
                f"| {key} | {cf} | {grouped / 1e9:.3f} | {alone / 1e9:.3f} "
                f"| {alone / grouped:.3f} |"
            )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-flops", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}, repeats={args.repeats}")
    print(
        "| model | batch | eager ms | compile ms | onnxruntime ms | eager/compile | "
        "eager/onnxruntime | max diff ORT |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key in args.models:
        bench_model(key, args.batches, args.repeats, args.threads)
    if not args.no_flops:
        flops_table(args.models)


if __name__ == "__main__":
    main()
