"""Inference cost of a deployed MoE model against the dense ViT with the same backbone, in eager
PyTorch and in ONNX Runtime, side by side in one run.

For each model (V-MoE-S/32 E=8 K=2 "last 2", V-MoE-S/32 E=32 K=2 "every 2", the tiny Soft MoE)
and batch size (1, 8, 32) it prints the median forward time of the MoE model and of its dense
counterpart (the same ViT with a timm ``Mlp`` in place of every MoE layer) in each runtime, the
ratio MoE / dense per runtime, and eager / ONNX Runtime for the MoE model. Everything runs as a
user gets it by default: eager is ``model.eval()`` under ``torch.no_grad()`` (top-K layers
dropless), ONNX Runtime runs ``vmoe.models.export_onnx``'s default file (dynamic batch, dropless;
the dense ViT through ``torch.onnx.export(..., dynamo=True)`` with the same dynamic batch).

Timing: interleaved repeats (each repeat times the four runs once, so a slow phase of a shared
machine hits them alike); times are medians over repeats, ratios medians of per-repeat ratios,
and in brackets the ratio of the fastest repeats (a contention-robust cross-check).
One thread everywhere: ``torch.set_num_threads(1)``; ONNX Runtime ``SessionOptions`` with
``intra_op_num_threads=1``, ``inter_op_num_threads=1``, ``execution_mode=ORT_SEQUENTIAL``,
``graph_optimization_level=ORT_ENABLE_ALL`` (all graph optimisations on), CPU provider.
Random weights (routing on random weights spreads tokens about evenly over the experts).

Usage: python benchmarks/export_inference.py [--models s32_e8_last2 s32_e32_every2 soft_tiny]
                                             [--batches 1 8 32] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import timm  # noqa: E402
from timm.layers import Mlp  # noqa: E402

import vmoe.models as vm  # noqa: E402
from vmoe.models import export as ex  # noqa: E402
from vmoe.moe import moe_layers  # noqa: E402

MODELS = {
    "s32_e8_last2": "vmoe_s32_e8_k2_last2",
    "s32_e32_every2": "vmoe_s32_e32_k2_every2",
    "soft_tiny": "soft_moe_tiny_e8",
}


def dense_counterpart(model: torch.nn.Module) -> torch.nn.Module:
    """The same ViT with a timm ``Mlp`` (same widths and activation) in place of every MoE layer."""
    dense = copy.deepcopy(model)
    for name, layer in moe_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = dense.get_submodule(parent_name)
        ex_ = layer.experts
        mlp = Mlp(
            ex_.in_features,
            ex_.hidden_features,
            ex_.out_features,
            act_layer=lambda act=ex_.act: copy.deepcopy(act),
        )
        setattr(parent, child, mlp)
    return dense.eval()


def ort_session(path, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def export_dense_onnx(model, path, example):
    from torch.export import Dim

    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        verbose=False,
        dynamic_shapes=({0: Dim("batch", min=1)},),
        input_names=["images"],
        output_names=["logits"],
    )
    program.save(str(path), external_data=False)
    return path


def _time(fn, x, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn(x)
    return (time.perf_counter() - t0) / inner


def bench_model(key, batches, repeats, threads):
    torch.manual_seed(0)
    moe = timm.create_model(MODELS[key]).eval()
    dense = dense_counterpart(moe)
    shape = ex._input_shape(moe)
    example = torch.randn(3, *shape)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = vm.export_onnx(moe, os.path.join(tmp, "moe.onnx"), example)
        routing = {
            s["path"]
            for s in ex.export_program(moe, example).graph_module.meta["vmoe_routing"].values()
        }
        t1 = time.perf_counter()
        dense_path = export_dense_onnx(dense, os.path.join(tmp, "dense.onnx"), example)
        print(
            f"# {key} ({MODELS[key]}): layers' path {sorted(routing)}; export "
            f"{t1 - t0:.0f} s (MoE, ONNX + program), {time.perf_counter() - t1:.0f} s (dense)",
            flush=True,
        )
        runs = {
            "eager_moe": moe,
            "eager_dense": dense,
            "ort_moe": ort_session(path, threads),
            "ort_dense": ort_session(dense_path, threads),
        }
    rows = []
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, *shape)
            for fn in runs.values():  # warm up
                fn(x)
            diff = float((torch.from_numpy(runs["ort_moe"](x)) - moe(x)).abs().max())
            inner = max(1, int(0.3 / max(_time(moe, x, 1), 1e-4)))
            times = {k: [] for k in runs}
            for _ in range(repeats):
                for k, fn in runs.items():
                    times[k].append(_time(fn, x, inner))
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

            def ratio(a, c, times=times):
                return statistics.median(u / v for u, v in zip(times[a], times[c]))

            def fastest(a, c, times=times):
                return min(times[a]) / min(times[c])

            row = (
                key,
                b,
                med["eager_moe"],
                med["eager_dense"],
                ratio("eager_moe", "eager_dense"),
                fastest("eager_moe", "eager_dense"),
                med["ort_moe"],
                med["ort_dense"],
                ratio("ort_moe", "ort_dense"),
                fastest("ort_moe", "ort_dense"),
                ratio("eager_moe", "ort_moe"),
                fastest("eager_moe", "ort_moe"),
                diff,
            )
            rows.append(row)
            print(
                "| {} | {} | {:.2f} | {:.2f} | {:.2f}x ({:.2f}x) | {:.2f} | {:.2f} | "
                "{:.2f}x ({:.2f}x) | {:.2f}x ({:.2f}x) | {:.1e} |".format(*row),
                flush=True,
            )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"threads={args.threads}, repeats={args.repeats}"
    )
    print("ratios: median of per-repeat ratios (in brackets: the ratio of the fastest repeats)")
    print(
        "| model | batch | eager MoE ms | eager dense ms | eager MoE/dense | ORT MoE ms | "
        "ORT dense ms | ORT MoE/dense | MoE eager/ORT | max diff ORT |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in args.models:
        bench_model(key, args.batches, args.repeats, args.threads)


if __name__ == "__main__":
    main()
