"""Peak memory and throughput of streaming an official V-MoE checkpoint into safetensors.

Writes a synthetic checkpoint of at least ``--size-gb`` GB (a V-MoE-B/16-like float32 tree,
"every 2" MoE placement, as many experts as needed to reach the size; several shards, arrays
split in chunks) with our writer, then runs, each in a fresh SUBPROCESS:

* baseline: imports the same modules and does nothing (its peak RSS is subtracted);
* read:     ``iter_checkpoint_arrays`` over every array;
* convert:  ``iter_checkpoint_arrays`` -> ``torch.from_numpy`` -> ``SafetensorsStreamWriter``.

Peak RSS is the child's own ``ru_maxrss``. The ratio is (peak - baseline) / checkpoint bytes
(target <= 1.3). The checkpoint was just written, so reads come from a warm page cache (the
page cache is not part of a process's RSS). The parent then checks the safetensors file:
every name and shape, and a few tensors against regenerated data.

    python3 benchmarks/convert_checkpoint_memory.py [--size-gb 1.0] [--num-shards 4]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (name, hidden, mlp, depth, heads, patch) of the paper's variants, smallest first
VARIANTS = [("Ti/16", 192, 768, 12, 3, 16), ("S/32", 512, 2048, 8, 8, 32),
            ("B/16", 768, 3072, 12, 12, 16), ("L/16", 1024, 4096, 24, 16, 16)]


def vmoe_shapes(hidden, mlp, depth, heads, patch, experts, classes=1000, image=224):
    """Flattened official V-MoE param names -> shapes (MoE in every odd block)."""
    hd, tokens = hidden // heads, (image // patch) ** 2 + 1
    s = {"cls": (1, 1, hidden), "embedding/kernel": (patch, patch, 3, hidden),
         "embedding/bias": (hidden,), "Encoder/posembed_input/pos_embedding": (1, tokens, hidden),
         "Encoder/encoder_norm/scale": (hidden,), "Encoder/encoder_norm/bias": (hidden,),
         "pre_logits/kernel": (hidden, hidden), "pre_logits/bias": (hidden,),
         "head/kernel": (hidden, classes), "head/bias": (classes,)}
    for i in range(depth):
        b = f"Encoder/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            s[f"{b}/{ln}/scale"] = s[f"{b}/{ln}/bias"] = (hidden,)
        for q in ("query", "key", "value"):
            s[f"{b}/SelfAttention/{q}/kernel"] = (hidden, heads, hd)
            s[f"{b}/SelfAttention/{q}/bias"] = (heads, hd)
        s[f"{b}/SelfAttention/out/kernel"] = (heads, hd, hidden)
        s[f"{b}/SelfAttention/out/bias"] = (hidden,)
        if i % 2:
            s[f"{b}/Moe/Router/dense/kernel"] = (hidden, experts)
            s[f"{b}/Moe/Mlp/Dense_0/kernel"] = (experts, hidden, mlp)
            s[f"{b}/Moe/Mlp/Dense_0/bias"] = (experts, mlp)
            s[f"{b}/Moe/Mlp/Dense_1/kernel"] = (experts, mlp, hidden)
            s[f"{b}/Moe/Mlp/Dense_1/bias"] = (experts, hidden)
        else:
            s[f"{b}/Mlp/Dense_0/kernel"], s[f"{b}/Mlp/Dense_0/bias"] = (hidden, mlp), (mlp,)
            s[f"{b}/Mlp/Dense_1/kernel"], s[f"{b}/Mlp/Dense_1/bias"] = (mlp, hidden), (hidden,)
    return s


def nbytes(shapes):
    return sum(math.prod(v) for v in shapes.values()) * 4


def pick_shapes(target_bytes):
    """The largest variant whose 1-expert model fits the target, with enough experts."""
    fits = [v for v in VARIANTS if nbytes(vmoe_shapes(*v[1:], experts=1)) <= target_bytes]
    name, *dims = (fits or VARIANTS[:1])[-1]
    experts = 1
    while nbytes(vmoe_shapes(*dims, experts=experts)) < target_bytes:
        experts += 1
    return f"V-MoE-{name} E={experts}", vmoe_shapes(*dims, experts=experts)


class LazyArray:
    """A float32 array generated only when numpy asks for it (keeps the writer's side small)."""

    def __init__(self, shape, seed):
        self.shape, self.dtype, self.seed = shape, np.dtype(np.float32), seed

    def __array__(self, dtype=None, copy=None):
        return np.random.default_rng(self.seed).standard_normal(self.shape, dtype=np.float32)


def child(mode, prefix, out):
    """Runs in a subprocess; prints one JSON line with its own peak RSS and timing."""
    import resource
    import torch  # noqa: F401  (imported by every mode so the baseline matches)
    from vmoe.models.official_checkpoint import iter_checkpoint_arrays, read_checkpoint_index
    from vmoe.models.safetensors_stream import SafetensorsStreamWriter
    t0 = time.perf_counter()
    total = 0
    if mode == "read":
        for _, a in iter_checkpoint_arrays(prefix):
            total += a.nbytes
    elif mode == "convert":
        specs = {n: (torch.float32 if i.dtype == "bfloat16" else torch.from_numpy(
            np.empty(0, i.numpy_dtype)).dtype, i.shape) for n, i in read_checkpoint_index(prefix).items()}
        with SafetensorsStreamWriter(out, specs, metadata={"source": "vmoe checkpoint"}) as w:
            for name, a in iter_checkpoint_arrays(prefix):
                w.write(name, torch.from_numpy(a))
                total += a.nbytes
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"mode": mode, "peak_rss": rss, "seconds": seconds, "bytes": total}))


def run_child(mode, prefix, out):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--prefix", prefix,
           "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size, GB (1e9 bytes)")
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--max-chunk-mb", type=float, default=32.0, help="max chunk size, MiB")
    p.add_argument("--workdir", default=None, help="where the temporary files go")
    p.add_argument("--child", choices=["baseline", "read", "convert"], help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.prefix, args.out)

    from safetensors import safe_open
    from vmoe.models.official_checkpoint import read_checkpoint_index, write_checkpoint
    label, shapes = pick_shapes(int(args.size_gb * 1e9))
    params = {n: LazyArray(s, seed) for seed, (n, s) in enumerate(shapes.items())}
    tmp = tempfile.mkdtemp(prefix="vmoe_ckpt_bench_", dir=args.workdir)
    try:
        prefix, out = os.path.join(tmp, "ckpt"), os.path.join(tmp, "model.safetensors")
        t0 = time.perf_counter()
        write_checkpoint(prefix, params, num_shards=args.num_shards,
                         max_chunk_bytes=int(args.max_chunk_mb * 2**20))
        write_s = time.perf_counter() - t0
        files = [f for f in os.listdir(tmp) if f.startswith("ckpt.")]
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
        index = read_checkpoint_index(prefix)
        chunks = sum(len(i.chunks) for i in index.values())
        largest = max(i.stored_nbytes for i in index.values())
        runs = {m: run_child(m, prefix, out) for m in ("baseline", "read", "convert")}

        with safe_open(out, framework="np") as f:  # the converted file is right
            assert set(f.keys()) == set(shapes), "safetensors names differ from the checkpoint"
            for n in f.keys():
                assert tuple(f.get_slice(n).get_shape()) == shapes[n], n
            big = max(shapes, key=lambda n: math.prod(shapes[n]))
            for n in (big, "cls", "head/kernel"):
                assert np.array_equal(f.get_tensor(n), np.asarray(params[n])), n

        mb, base = 1e6, runs["baseline"]["peak_rss"]
        print(f"checkpoint: {label}, {len(index)} float32 arrays, {size / mb:.1f} MB in "
              f"{args.num_shards} shards, {chunks} chunks of <= {args.max_chunk_mb:g} MiB, "
              f"largest array {largest / mb:.1f} MB; written in {write_s:.1f} s "
              f"({size / mb / write_s:.0f} MB/s)")
        print(f"baseline child (imports numpy, msgpack, torch, vmoe reader/writer): peak RSS "
              f"{base / mb:.1f} MB; reads come from a warm page cache")
        print("| stage | peak RSS - baseline (MB) | / checkpoint size | seconds | MB/s |")
        print("|---|---|---|---|---|")
        for m, what in (("read", "read: iter_checkpoint_arrays"),
                        ("convert", "convert: read -> torch -> safetensors (streamed)")):
            r = runs[m]
            assert r["bytes"] == sum(i.stored_nbytes for i in index.values()), m
            extra = r["peak_rss"] - base
            print(f"| {what} | {extra / mb:.1f} | {extra / size:.3f}x | {r['seconds']:.2f} | "
                  f"{r['bytes'] / mb / r['seconds']:.0f} |")
        print("converted file checked: all names and shapes, 3 tensors equal to the source")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
