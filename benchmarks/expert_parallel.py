"""Expert parallelism: bytes moved by the all-to-alls, and step time with ep = 1, 2, 4.

One MoE layer (``MoeMlp``, top-K, fixed capacity) trained by W processes on W equal local
batches; for each expert-parallel size ep (dp = W / ep) the experts are sharded with
``vmoe.moe.parallel.shard_experts`` and every step runs forward + backward + the gradient
reduction (``average_gradients``). Printed per ep, in one run:

- ``sent/layer/step``: bytes this rank sent to other ranks per MoE layer and step, MEASURED from
  the tensors handed to the all-to-alls (forward: the [E, G*C, d] buffers out and the
  [E, G*C, d'] outputs back; backward: their gradients), ``ExpertParallelExperts.bytes_sent``;
- ``minimum``: the theoretical minimum for a fixed-capacity all-to-all: every row of a buffer
  whose expert lives on another rank must leave once, in each direction and in each pass:
  ``2 * (ep-1)/ep * E * G*C * (d + d') * bytes per element``;
- ``experts/rank``: expert parameter bytes per rank, ``E/ep * (d*h + h + h*d' + d') * 4``;
- ``step ms``: median step time on rank 0 (after warm-up steps), and its ratio to ep=1.

On gloo CPU processes sharing a few cores the times are functional, not representative
(compute is split but the processes fight for the same cores). With ``--backend nccl`` each
rank takes GPU ``rank`` (needs W GPUs on the machine; a single GPU cannot run W > 1 NCCL ranks).

Usage: python benchmarks/expert_parallel.py [--world 4] [--ep 1 2 4] [--backend gloo|nccl]
           [--steps 10] [--experts 8] [--dim 256] [--hidden 1024] [--images 16]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmoe.moe import MoeMlp  # noqa: E402
from vmoe.moe.parallel import (
    ExpertParallelExperts,
    average_gradients,  # noqa: E402
    expert_parallel_mesh,
    shard_experts,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank, args, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=args.world)
    try:
        for ep in args.ep:
            torch.manual_seed(0)
            layer = MoeMlp(
                args.dim,
                args.hidden,
                num_experts=args.experts,
                num_selected=2,
                group_size_images=args.group_images,
                noise_std=0.0,
            ).to(device)
            mesh = expert_parallel_mesh(ep, device.type)
            shard_experts(layer, mesh)
            experts = [m for m in layer.modules() if isinstance(m, ExpertParallelExperts)][0]
            g = torch.Generator(device="cpu").manual_seed(1 + rank)
            # the input needs a gradient, as inside a network: else the backward has no buffer
            # gradients to send back
            x = (
                torch.randn(args.images, args.tokens, args.dim, generator=g)
                .to(device)
                .requires_grad_()
            )
            grad_out = torch.randn(args.images, args.tokens, args.dim, generator=g).to(device)
            times = []
            for step in range(args.warmup + args.steps):
                measure = step == args.warmup  # count one step's bytes
                experts.count_bytes, experts.bytes_sent = measure, 0
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dist.barrier()
                start = time.perf_counter()
                layer.zero_grad(set_to_none=True)
                out = layer(x)
                (out * grad_out).sum().add(layer.aux_loss).backward()
                average_gradients(layer, mesh)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                if measure:
                    sent = experts.bytes_sent
                if step >= args.warmup:
                    times.append(elapsed)
            plan = layer.last_plan
            E, T, d = args.experts, plan.num_groups * plan.capacity, args.dim
            d_out = layer.out_features
            minimum = 2 * (ep - 1) * E * T * (d + d_out) * x.element_size() // ep
            expert_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
            if rank == 0:
                queue.put(
                    dict(
                        ep=ep,
                        dp=args.world // ep,
                        C=plan.capacity,
                        G=plan.num_groups,
                        sent=sent,
                        minimum=minimum,
                        expert_bytes=expert_bytes,
                        ms=1e3 * statistics.median(times),
                    )
                )
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--images", type=int, default=16, help="images per rank")
    p.add_argument("--tokens", type=int, default=50, help="tokens per image (S/32 at 224px: 50)")
    p.add_argument("--group_images", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args(argv)
    bad = [ep for ep in args.ep if args.world % ep or args.experts % ep]
    if bad:
        p.error(
            f"--ep {bad}: each ep must divide --world {args.world} and --experts {args.experts}"
        )
    if args.backend == "nccl" and torch.cuda.device_count() < args.world:
        p.error(
            f"--backend nccl needs {args.world} GPUs (one per rank), "
            f"found {torch.cuda.device_count()}"
        )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        run_rank, args=(args, free_port(), queue), nprocs=args.world, start_method="spawn"
    )
    rows = [queue.get() for _ in args.ep]
    base = next((r["ms"] for r in rows if r["ep"] == 1), None)
    print(
        f"{args.backend}, world {args.world}, E={args.experts}, d={args.dim}, h={args.hidden}, "
        f"{args.images} images x {args.tokens} tokens per rank, "
        f"groups of {args.group_images} images, "
        f"fp32, {args.threads} thread(s) per process, torch {torch.__version__}"
    )
    print(
        "| ep | dp | G | C | experts/rank MB | sent/layer/step bytes (measured) | minimum bytes | "
        "measured/minimum | step ms | step / ep=1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (
            "n/a (nothing to send)"
            if r["minimum"] == 0 and r["sent"] == 0
            else f"{r['sent'] / r['minimum']:.3f}"
            if r["minimum"]
            else "inf"
        )
        rel = f"{r['ms'] / base:.2f}" if base else "n/a"
        print(
            f"| {r['ep']} | {r['dp']} | {r['G']} | {r['C']} | {r['expert_bytes'] / 2**20:.2f} | "
            f"{r['sent']} | {r['minimum']} | {ratio} | {r['ms']:.1f} | {rel} |"
        )


if __name__ == "__main__":
    main()
