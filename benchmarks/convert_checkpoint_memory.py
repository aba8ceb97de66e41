"""Peak memory and throughput of streaming an official V-MoE checkpoint into safetensors.

Writes a synthetic checkpoint of at least ``--size-gb`` GB (a V-MoE-B/16-like float32 tree,
"every 2" MoE placement, as many experts as needed to reach the size; several shards, arrays
split in chunks) with our writer, then runs, each in a fresh SUBPROCESS:

* baseline: imports the same modules and does nothing (its peak RSS is subtracted);
* read:     ``iter_checkpoint_arrays`` over every array;
* convert:  ``iter_checkpoint_arrays`` -> ``torch.from_numpy`` -> ``SafetensorsStreamWriter``;
* import:   ``convert_vmoe_checkpoint`` (the real converter: parameters mapped to our
            timm-based V-MoE, written as a ``save_pretrained`` directory, streamed);
* load:     ``from_vmoe_checkpoint`` (the model itself is in memory: expect ~1x + one array).

Peak RSS is the child's own ``ru_maxrss``. Two extra-memory figures are printed: peak minus the
baseline child's peak, and peak minus the child's own RSS right after its imports (imports have a
transient peak, so the first can under-count small figures); the ratio uses the larger one,
divided by the checkpoint bytes (target <= 1.3). The checkpoint was just written, so reads come
from a warm page cache (the page cache is not part of a process's RSS). The parent then checks
the safetensors file: every name and shape, and a few tensors against regenerated data.

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
VARIANTS = [
    ("Ti/16", 192, 768, 12, 3, 16),
    ("S/32", 512, 2048, 8, 8, 32),
    ("B/16", 768, 3072, 12, 12, 16),
    ("L/16", 1024, 4096, 24, 16, 16),
]


def vmoe_shapes(hidden, mlp, depth, heads, patch, experts, classes=1000, image=224):
    """Flattened official V-MoE param names -> shapes (MoE in every odd block)."""
    hd, tokens = hidden // heads, (image // patch) ** 2 + 1
    s = {
        "cls": (1, 1, hidden),
        "embedding/kernel": (patch, patch, 3, hidden),
        "embedding/bias": (hidden,),
        "Encoder/posembed_input/pos_embedding": (1, tokens, hidden),
        "Encoder/encoder_norm/scale": (hidden,),
        "Encoder/encoder_norm/bias": (hidden,),
        "pre_logits/kernel": (hidden, hidden),
        "pre_logits/bias": (hidden,),
        "head/kernel": (hidden, classes),
        "head/bias": (classes,),
    }
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


def _write(job):
    """Child job: writes the synthetic checkpoint; returns its description."""
    from tests.checkpoints.official_writer import write_checkpoint
    from vmoe.checkpoints import read_checkpoint_index

    label, shapes = pick_shapes(int(job["size_gb"] * 1e9))
    params = {n: LazyArray(s, seed) for seed, (n, s) in enumerate(shapes.items())}
    t0 = time.perf_counter()
    write_checkpoint(
        job["prefix"],
        params,
        num_shards=job["num_shards"],
        max_chunk_bytes=int(job["max_chunk_mb"] * 2**20),
    )
    folder, base = os.path.split(job["prefix"])
    index = read_checkpoint_index(job["prefix"])
    return {
        "label": label,
        "write_s": time.perf_counter() - t0,
        "arrays": len(index),
        "size": sum(
            os.path.getsize(os.path.join(folder, f))
            for f in os.listdir(folder)
            if f.startswith(base + ".")
        ),
        "chunks": sum(len(i.chunks) for i in index.values()),
        "largest": max(i.stored_nbytes for i in index.values()),
        "array_bytes": sum(i.stored_nbytes for i in index.values()),
    }


def _verify(job):
    """Child job: the streamed safetensors file and the converted model hold the right data."""
    from safetensors import safe_open

    _, shapes = pick_shapes(int(job["size_gb"] * 1e9))
    source = {n: LazyArray(s, seed) for seed, (n, s) in enumerate(shapes.items())}
    with safe_open(job["out"], framework="np") as f:
        assert set(f.keys()) == set(shapes), "safetensors names differ from the checkpoint"
        for n in f.keys():
            assert tuple(f.get_slice(n).get_shape()) == shapes[n], n
        big = max(shapes, key=lambda n: math.prod(shapes[n]))
        for n in (big, "cls", "head/kernel"):
            assert np.array_equal(f.get_tensor(n), np.asarray(source[n])), n
    with safe_open(os.path.join(job["converted"], "model.safetensors"), framework="np") as f:
        moe = max(int(n.split("_")[1].split("/")[0]) for n in shapes if "/Moe/Router/" in n)
        src = f"Encoder/encoderblock_{moe}/Moe/Mlp/Dense_0/kernel"
        assert np.array_equal(
            f.get_tensor(f"blocks.{moe}.mlp.experts.fc1_weight"), np.asarray(source[src])
        )
        assert np.array_equal(f.get_tensor("head.weight"), np.asarray(source["head/kernel"]).T)
    return {"ok": True}


def child(mode, job):
    """Runs in a subprocess; prints one JSON line (peak RSS and timing for the measured modes)."""
    if mode == "write":
        return print(json.dumps(_write(job)))
    if mode == "verify":
        return print(json.dumps(_verify(job)))
    import resource

    import torch  # noqa: F401  (imported by every measured mode so the baseline matches)

    import vmoe.models  # noqa: F401  (timm and our model code)
    from vmoe.checkpoints import (
        SafetensorsStreamWriter,
        iter_checkpoint_arrays,
        read_checkpoint_index,
    )
    from vmoe.models.official import convert_vmoe_checkpoint, from_vmoe_checkpoint

    with open("/proc/self/statm") as f:  # resident pages after the imports, before any work
        rss_start = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    prefix = job["prefix"]
    t0 = time.perf_counter()
    total = 0
    if mode == "read":
        for _, a in iter_checkpoint_arrays(prefix):
            total += a.nbytes
    elif mode == "convert":
        specs = {n: (torch.float32, i.shape) for n, i in read_checkpoint_index(prefix).items()}
        with SafetensorsStreamWriter(
            job["out"], specs, metadata={"source": "vmoe checkpoint"}
        ) as w:
            for name, a in iter_checkpoint_arrays(prefix):
                w.write(name, torch.from_numpy(a))
                total += a.nbytes
    elif mode in ("import", "load"):
        if mode == "import":
            convert_vmoe_checkpoint(prefix, job["converted"])
        else:
            model = from_vmoe_checkpoint(prefix)
            assert sum(p.numel() for p in model.parameters()) * 4 == sum(
                i.stored_nbytes for i in read_checkpoint_index(prefix).values()
            )
        total = sum(i.stored_nbytes for i in read_checkpoint_index(prefix).values())
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_rss": rss, "rss_start": rss_start, "seconds": seconds, "bytes": total}))


def run_child(mode, job):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--job", json.dumps(job)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(f"child {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size, GB (1e9 bytes)")
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--max-chunk-mb", type=float, default=32.0, help="max chunk size, MiB")
    p.add_argument("--workdir", default=None, help="where the temporary files go")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, json.loads(args.job))

    # This parent stays small (numpy only) and does everything in children: Linux carries a
    # parent's resident size into a spawned child's ru_maxrss, which would pollute the figures.
    tmp = tempfile.mkdtemp(prefix="vmoe_ckpt_bench_", dir=args.workdir)
    job = dict(
        size_gb=args.size_gb,
        num_shards=args.num_shards,
        max_chunk_mb=args.max_chunk_mb,
        prefix=os.path.join(tmp, "ckpt"),
        out=os.path.join(tmp, "model.safetensors"),
        converted=os.path.join(tmp, "converted"),
    )
    try:
        info = run_child("write", job)
        runs = {m: run_child(m, job) for m in ("baseline", "read", "convert", "import", "load")}
        run_child("verify", job)
        mb, base, size = 1e6, runs["baseline"]["peak_rss"], info["size"]
        print(
            f"checkpoint: {info['label']}, {info['arrays']} float32 arrays, {size / mb:.1f} MB "
            f"in {args.num_shards} shards, {info['chunks']} chunks of <= {args.max_chunk_mb:g} "
            f"MiB, largest array {info['largest'] / mb:.1f} MB; written in "
            f"{info['write_s']:.1f} s ({size / mb / info['write_s']:.0f} MB/s)"
        )
        print(
            f"baseline child (imports numpy, msgpack, torch, timm, vmoe.models): peak RSS "
            f"{base / mb:.1f} MB; reads come from a warm page cache"
        )
        print(
            "| stage | peak RSS - baseline peak (MB) | peak RSS - own RSS after imports (MB) "
            "| larger / checkpoint size | seconds | MB/s |"
        )
        print("|---|---|---|---|---|---|")
        for m, what in (
            ("read", "read: iter_checkpoint_arrays"),
            ("convert", "convert: read -> torch -> safetensors (streamed)"),
            ("import", "import: convert_vmoe_checkpoint -> save_pretrained dir"),
            ("load", "load: from_vmoe_checkpoint (whole model in memory)"),
        ):
            r = runs[m]
            assert r["bytes"] == info["array_bytes"], m
            extra, own = r["peak_rss"] - base, r["peak_rss"] - r["rss_start"]
            print(
                f"| {what} | {extra / mb:.1f} | {own / mb:.1f} | {max(extra, own) / size:.3f}x | "
                f"{r['seconds']:.2f} | {r['bytes'] / mb / r['seconds']:.0f} |"
            )
        print(
            "checked: safetensors names/shapes + 3 tensors, "
            "converted model's expert and head weights"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
