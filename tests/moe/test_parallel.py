"""Expert parallelism on CPU processes (gloo): the sharded model computes what the one-process
model computes (outputs, input and parameter gradients, an optimizer step), state dicts do not
depend on ep, and bad configurations raise on every rank instead of hanging."""

import copy
import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import load_file

from vmoe.models import save_pretrained
from vmoe.moe import MoeMlp, moe_layers, routing_statistics
from vmoe.moe.parallel import (
    ExpertParallelExperts,
    average_gradients,
    clip_grad_norm_,
    exclude_experts_from_ddp,
    expert_parallel_mesh,
    full_state_dict,
    gather_optimizer_state,
    gather_plan,
    reduce_expert_gradients,
    shard_experts,
    shard_optimizer_state,
    unshard_experts,
)

TOL = 1e-5
IMAGES_PER_RANK = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, checks, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results, seconds = {}, {}
    try:
        for key, fn, args in checks:  # every rank runs the same checks in the same order
            start = time.perf_counter()
            try:
                fn(rank, world, *args)
                results[key] = "ok"
            except Exception as err:  # recorded for the parent: which rank raised what
                results[key] = f"error {type(err).__name__}: {err}\n{traceback.format_exc()}"
            seconds[key] = round(time.perf_counter() - start, 2)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        Path(out_dir, f"seconds{rank}.json").write_text(json.dumps(seconds))  # to see what costs
        dist.destroy_process_group()


def launch(checks, world, out_dir, timeout=300):
    """Run ``[(key, fn, args), ...]`` (``fn(rank, world, *args)``) in ``world`` gloo processes
    started once; returns ``{key: [rank 0's 'ok'/'error ...', rank 1's, ...]}``. A hang fails
    the test (the processes are killed)."""
    ctx = mp.start_processes(
        _entry,
        args=(checks, world, free_port(), str(out_dir)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish in {timeout}s (a hang?)")
    ranks = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]
    return {key: [r.get(key, "not run") for r in ranks] for key, _, _ in checks}


def tiny_model() -> nn.Module:
    """vmoe_tiny_e4_k2 (E=4, K=2, 2 MoE layers) with deterministic routing (no router noise, no
    dropout) and groups of 2 images, so a rank's 4 images form whole groups."""
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10)
    for layer in moe_layers(model).values():
        layer.noise_std = 0.0
        layer.group_size_images = 2
    return model


def global_batch(world):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(world * IMAGES_PER_RANK, 3, 16, 16, generator=g),
        torch.randint(0, 10, (world * IMAGES_PER_RANK,), generator=g),
    )


def loss_fn(model, x, y):
    logits = model(x)
    aux = sum(layer.aux_loss for layer in moe_layers(model).values())
    return logits, nn.functional.cross_entropy(logits, y) + aux


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_equal_to_one_process(rank, world, ep):
    reference = tiny_model()
    model = tiny_model()
    mesh = expert_parallel_mesh(ep)
    shard_experts(model, mesh)
    sharded = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    assert len(sharded) == 2 and all(m.fc1_weight.shape[0] == 4 // ep for m in sharded)
    for m in sharded:
        m.count_bytes = True

    x, y = global_batch(world)
    x.requires_grad_(True)
    ref_logits, ref_loss = loss_fn(reference, x, y)
    ref_loss.backward()

    part = slice(rank * IMAGES_PER_RANK, (rank + 1) * IMAGES_PER_RANK)
    x_local = x.detach()[part].clone().requires_grad_(True)
    logits, loss = loss_fn(model, x_local, y[part])
    loss.backward()
    average_gradients(model, mesh)

    problems = []
    if _max_diff(logits, ref_logits[part]) > TOL:
        problems.append(f"logits differ by {_max_diff(logits, ref_logits[part])}")
    # the local loss is 1/W of the global one's terms: d(global)/dx = d(local)/dx / W
    if _max_diff(x_local.grad / world, x.grad[part]) > TOL:
        problems.append(f"input grads differ by {_max_diff(x_local.grad / world, x.grad[part])}")
    ref_params = dict(reference.named_parameters())
    start = mesh.get_local_rank("ep") * (4 // ep)
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if name.endswith(("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")):
            want = want[start : start + 4 // ep]
        if p.grad is None or _max_diff(p.grad, want) > TOL:
            problems.append(
                f"grad of {name} differs by {None if p.grad is None else _max_diff(p.grad, want)}"
            )
    # the bytes read from the all-to-all inputs: per layer, forward and backward each move the
    # [E, G*C, d] buffers out and [E, G*C, d'] back, (ep-1)/ep of them to other ranks
    G, C, d = 2, moe_layers(reference)["blocks.1.mlp"].last_plan.capacity, 64
    expected = 2 * (4 * G * C * (d + d) * 4) * (ep - 1) // ep
    for m in sharded:
        if m.bytes_sent != expected:
            problems.append(f"bytes sent {m.bytes_sent}, expected {expected}")

    # clipping computes the one-process global norm on every rank
    total = clip_grad_norm_(model.parameters(), 0.5, model, mesh)
    ref_total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    if abs(total.item() - ref_total.item()) > TOL:
        problems.append(f"grad norm {total.item()} vs one process {ref_total.item()}")

    # one optimizer step leaves the same weights as the one-process step (SGD: AdamW's first
    # step is lr * sign(grad), which turns float noise in near-zero gradients into lr-sized steps)
    for params in (reference.parameters(), model.parameters()):
        torch.optim.SGD(params, lr=0.5, weight_decay=0.01).step()
    after = full_state_dict(model)
    ref_after = reference.state_dict()
    assert after.keys() == ref_after.keys()
    for k in after:
        if _max_diff(after[k], ref_after[k]) > TOL:
            problems.append(f"after the step {k} differs by {_max_diff(after[k], ref_after[k])}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_pretrained(model, Path(tmp) / "sharded")
            problems.append("save_pretrained wrote a sharded model")
        except ValueError as err:
            assert "unshard_experts" in str(err)
        unshard_experts(model)
        assert not any(isinstance(m, ExpertParallelExperts) for m in model.modules())
        if any(not torch.equal(v, model.state_dict()[k]) for k, v in after.items()):
            problems.append("unshard_experts changed the weights")
        # the directory of the unsharded model is that of the one-process model
        save_pretrained(model, Path(tmp) / "ep"), save_pretrained(reference, Path(tmp) / "one")
        if (Path(tmp) / "ep/config.json").read_text() != (
            Path(tmp) / "one/config.json"
        ).read_text():
            problems.append("config.json differs from the one-process model's")
        saved, ref_saved = (load_file(Path(tmp) / f"{d}/model.safetensors") for d in ("ep", "one"))
        if {k: v.shape for k, v in saved.items()} != {k: v.shape for k, v in ref_saved.items()}:
            problems.append("model.safetensors holds other tensors than the one-process model's")
    if problems:
        raise AssertionError("; ".join(problems[:8]))


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2), (4, 4)])
def test_expert_parallel_equals_one_process(two_ranks, four_ranks, world, ep):
    results = (two_ranks if world == 2 else four_ranks)[f"equal_ep{ep}"]
    assert all(r == "ok" for r in results), "\n".join(results)


def check_state_dict_independent_of_ep(rank, world, ep, path):
    """Save with ep (full-E state dict), load into ep=1 and ep=world: equal logits."""
    model = tiny_model()
    with torch.no_grad():  # move off the same-init weights so that experts differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    shard_experts(model, expert_parallel_mesh(ep))
    state = full_state_dict(model)
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    x, _ = global_batch(world)
    part = slice(rank * IMAGES_PER_RANK, (rank + 1) * IMAGES_PER_RANK)
    model.eval()
    saved_logits = model(x[part])

    one = tiny_model().eval()
    one.load_state_dict(torch.load(path, weights_only=True))
    wide = tiny_model()
    shard_experts(wide, expert_parallel_mesh(world))
    wide.load_state_dict(torch.load(path, weights_only=True))  # slices the full slabs
    wide.eval()
    problems = [
        f"{name}: {_max_diff(got, saved_logits)}"
        for name, got in (("ep=1", one(x)[part]), (f"ep={world}", wide(x[part])))
        if _max_diff(got, saved_logits) > TOL
    ]
    if problems:
        raise AssertionError(f"logits differ from the ep={ep} model: {problems}")


def test_checkpoint_saved_with_ep2_loads_with_ep1_and_ep4(four_ranks):
    results = four_ranks["checkpoint"]
    assert all(r == "ok" for r in results), "\n".join(results)


def bad_configuration(rank, world, case):
    if case == "world":
        expert_parallel_mesh(3)
    elif case == "ep_disagrees":
        expert_parallel_mesh(2 if rank == 0 else 1)
    elif case == "E":
        shard_experts(
            nn.Sequential(MoeMlp(8, 16, num_experts=3, group_size=4)), expert_parallel_mesh(2)
        )
    elif case == "model_disagrees":
        torch.manual_seed(0)
        layer = MoeMlp(8, 16, num_experts=4 if rank == 0 else 2, group_size=4)
        shard_experts(nn.Sequential(layer), expert_parallel_mesh(2))
    elif case == "checkpoint_E":
        model = nn.Sequential(MoeMlp(8, 16, num_experts=4, group_size=4))
        state = nn.Sequential(MoeMlp(8, 16, num_experts=8, group_size=4)).state_dict()
        shard_experts(model, expert_parallel_mesh(2))
        model.load_state_dict(state)
    return "no error"


def _step(model, optimizer, mesh, world, rank):
    """One training step on this rank's part of the global batch (mesh None: one process, the
    whole batch)."""
    x, y = global_batch(world)
    if mesh is not None:
        part = slice(rank * IMAGES_PER_RANK, (rank + 1) * IMAGES_PER_RANK)
        x, y = x[part], y[part]
    optimizer.zero_grad()
    loss_fn(model, x, y)[1].backward()
    if mesh is not None:
        average_gradients(model, mesh)
    optimizer.step()


def check_optimizer_state_independent_of_ep(rank, world, ep):
    """A step with ep, its gathered optimizer state equals the one-process state; loaded into
    ep=world (sliced), the next step leaves the one-process weights."""
    sgd = dict(lr=0.5, momentum=0.9)
    reference = tiny_model()
    ref_opt = torch.optim.SGD(reference.parameters(), **sgd)
    model = shard_experts(tiny_model(), expert_parallel_mesh(ep))
    opt = torch.optim.SGD(model.parameters(), **sgd)
    _step(reference, ref_opt, None, world, rank)
    _step(model, opt, expert_parallel_mesh(ep), world, rank)
    saved_model, saved_opt = full_state_dict(model), gather_optimizer_state(opt, model)
    ref_state = ref_opt.state_dict()["state"]
    problems = [
        f"momentum {i} differs"
        for i in ref_state
        if _max_diff(saved_opt["state"][i]["momentum_buffer"], ref_state[i]["momentum_buffer"])
        > TOL
    ]

    mesh = expert_parallel_mesh(world)
    resumed = shard_experts(tiny_model(), mesh)
    resumed.load_state_dict(saved_model)
    resumed_opt = torch.optim.SGD(resumed.parameters(), **sgd)
    resumed_opt.load_state_dict(shard_optimizer_state(saved_opt, resumed_opt, resumed))
    _step(reference, ref_opt, None, world, rank)
    _step(resumed, resumed_opt, mesh, world, rank)
    after, ref_after = full_state_dict(resumed), reference.state_dict()
    problems += [
        f"{k} differs by {_max_diff(after[k], ref_after[k])}"
        for k in ref_after
        if _max_diff(after[k], ref_after[k]) > TOL
    ]
    if problems:
        raise AssertionError("; ".join(problems[:8]))


def test_optimizer_state_saved_with_ep2_resumes_with_ep4(four_ranks):
    results = four_ranks["optimizer_state"]
    assert all(r == "ok" for r in results), "\n".join(results)


def check_gathered_routing_statistics(rank, world):
    """Statistics of the gathered plans equal those of the one-process forward (every rank's
    tokens counted, in rank order)."""
    reference = tiny_model()
    model = shard_experts(tiny_model(), expert_parallel_mesh(world))
    x, _ = global_batch(world)
    with torch.no_grad():  # (a module keeping a loss with grad cannot be deep-copied below)
        reference(x)
        model(x[rank * IMAGES_PER_RANK : (rank + 1) * IMAGES_PER_RANK])
    for name, layer in moe_layers(model).items():
        ours = routing_statistics(gather_plan(layer.last_plan))
        ref = routing_statistics(moe_layers(reference)[name].last_plan)
        local = routing_statistics(layer.last_plan)
        for key in ("load", "dropped_fraction", "importance", "buffer_fill", "router_entropy"):
            assert _max_diff(ours[key], ref[key]) <= TOL, f"{name} {key}: {ours[key]} vs {ref[key]}"
        assert not torch.equal(local["load"], ref["load"]), (
            "one rank's tokens already give the global load"
        )
    # a deep copy (EMA, detached copies) shares the process group and computes the same
    clone = copy.deepcopy(model)
    assert clone.blocks[1].mlp.experts.group is model.blocks[1].mlp.experts.group
    part = x[rank * IMAGES_PER_RANK : (rank + 1) * IMAGES_PER_RANK]
    with torch.no_grad():
        assert torch.equal(clone(part), model(part))


def check_ddp_with_sharded_experts(rank, world, ep):
    """The strategy's recipe without Lightning: DDP (ignoring the slabs) + reduce_expert_gradients
    after backward give the one-process gradients; DDP leaves each rank's slabs its own."""
    from torch.nn.parallel import DistributedDataParallel

    reference = tiny_model()
    model = tiny_model()
    mesh = expert_parallel_mesh(ep)
    shard_experts(model, mesh)
    exclude_experts_from_ddp(model)
    ddp = DistributedDataParallel(model)
    x, y = global_batch(world)
    loss_fn(reference, x, y)[1].backward()
    part = slice(rank * IMAGES_PER_RANK, (rank + 1) * IMAGES_PER_RANK)
    logits = ddp(x[part])
    aux = sum(layer.aux_loss for layer in moe_layers(model).values())
    (nn.functional.cross_entropy(logits, y[part]) + aux).backward()
    reduce_expert_gradients(model, mesh)
    ref = dict(reference.named_parameters())
    start = mesh.get_local_rank("ep") * (4 // ep)
    problems = []
    for name, p in model.named_parameters():
        want = ref[name].grad
        if name.endswith(("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")):
            want = want[start : start + 4 // ep]
            if not torch.equal(p.detach(), ref[name].detach()[start : start + 4 // ep]):
                problems.append(f"DDP overwrote this rank's {name}")
        if _max_diff(p.grad, want) > TOL:
            problems.append(f"grad of {name} differs by {_max_diff(p.grad, want)}")
    if problems:
        raise AssertionError("; ".join(problems[:8]))


def test_ddp_ignoring_the_slabs_plus_expert_reduction_equals_one_process(four_ranks):
    results = four_ranks["ddp_ep2"]
    assert all(r == "ok" for r in results), "\n".join(results)


def check_soft_moe_equal_to_one_process(rank, world):
    """Soft MoE layers go through the same wrapper: their [E, G*P, d] slot buffers travel like
    sparse buffers. Outputs and every gradient equal one process on the global batch."""
    from vmoe.moe import MoeMlp
    from vmoe.moe.parallel import average_gradients

    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            MoeMlp(8, 16, num_experts=4, router="soft", num_slots=2, group_size=5, same_init=False)
        )

    reference, model = make(), make()
    mesh = expert_parallel_mesh(world)
    shard_experts(model, mesh)
    x = torch.randn(4 * world, 5, 8, generator=torch.Generator().manual_seed(1))
    reference(x).pow(2).mean().backward()
    mine = slice(rank * 4, (rank + 1) * 4)
    out = model(x[mine])
    out.pow(2).mean().backward()
    average_gradients(model, mesh)
    with torch.no_grad():
        assert _max_diff(out, reference(x)[mine]) <= 1e-5
    per_rank = 4 // world
    wanted = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        want = wanted[name].grad
        if "experts.fc" in name:
            want = want[rank * per_rank : (rank + 1) * per_rank]
        assert _max_diff(param.grad, want) <= 1e-5, name


def test_routing_statistics_count_every_ranks_tokens(two_ranks):
    results = two_ranks["gathered_stats"]
    assert all(r == "ok" for r in results), "\n".join(results)


def check_bias_balancing_over_ranks(rank, world):
    """Bias balancing under expert parallelism + DDP (the strategy's recipe): each rank counts
    its own tokens over 2 micro-batches (DDP must not broadcast rank 0's counts over them), one
    update sums the counts of every rank, and every rank ends with the same bias:
    bias_update(sum over ranks and micro-batches of the chosen assignments)."""
    from torch.nn.parallel import DistributedDataParallel

    from vmoe.moe import update_expert_biases
    from vmoe.moe.bias_balancing import bias_update

    torch.manual_seed(0)
    model = timm.create_model(
        "vmoe_tiny_e4_k2",
        num_classes=10,
        moe=dict(bias_update_rate=0.1, noise_std=0.0, group_size_images=2, score_func="sigmoid"),
    )
    shard_experts(model, expert_parallel_mesh(world))
    exclude_experts_from_ddp(model)
    assert "blocks.1.mlp.router.expert_load" in model._ddp_params_and_buffers_to_ignore
    ddp = DistributedDataParallel(model)  # broadcast_buffers=True
    layers = moe_layers(model)
    counts = {name: torch.zeros(4) for name in layers}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(world * IMAGES_PER_RANK, 3, 16, 16, generator=g) for _ in range(2)]
    part = slice(rank * IMAGES_PER_RANK, (rank + 1) * IMAGES_PER_RANK)
    for x in batches:  # (without no_sync: DDP broadcasts the buffers before every forward)
        ddp(x[part]).sum().backward()
        for name, layer in layers.items():
            counts[name] += torch.bincount(
                layer.last_plan.expert_index.flatten(), minlength=4
            ).float()
    mine = {name: layer.router.expert_load.clone() for name, layer in layers.items()}
    update_expert_biases(model)  # every rank joins every collective before any assert
    gathered = [None] * world
    dist.all_gather_object(
        gathered,
        {n: (counts[n].tolist(), m.router.expert_bias.tolist()) for n, m in layers.items()},
    )
    for name in layers:
        assert torch.equal(mine[name], counts[name]), (
            f"{name}: counts {mine[name]} vs {counts[name]}"
        )
        total = sum(torch.tensor(g[name][0]) for g in gathered)
        assert gathered[0][name][0] != gathered[1][name][0], "the ranks routed the same tokens"
        assert all(g[name][1] == gathered[0][name][1] for g in gathered), "biases differ over ranks"
        assert torch.allclose(torch.tensor(gathered[0][name][1]), bias_update(total, 0.1)), name


def test_bias_balancing_sums_the_counts_of_every_rank(two_ranks):
    results = two_ranks["bias_balancing"]
    assert all(r == "ok" for r in results), "\n".join(results)


def check_bias_update_uses_the_sum_of_the_counts_over_ranks(rank, world):
    """The ranks' own counts have other sign patterns than their sum (rank 0 [3, 1, 0, 0],
    rank 1 [0, 0, 1, 3], sum [3, 1, 1, 3]): the update must return the sum on every rank and
    move the biases by bias_update(sum), not by each rank's own counts."""
    from vmoe.moe import update_expert_biases
    from vmoe.moe.bias_balancing import bias_update

    assert world == 2
    layer = MoeMlp(
        4,
        8,
        num_experts=4,
        num_selected=1,
        group_size=4,
        capacity_factor=4.0,
        noise_std=0.0,
        bias_update_rate=0.1,
    ).train()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))  # a token 5 * one_hot(e) chooses expert e
    wanted = [[0, 0, 0, 1], [3, 3, 3, 2]][rank]
    layer(5.0 * torch.eye(4)[wanted].reshape(1, 4, 4))
    own = layer.router.expert_load.clone()
    total = torch.tensor([3.0, 1.0, 1.0, 3.0])
    assert torch.equal(
        own, [torch.tensor([3.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 3.0])][rank]
    )
    assert not torch.equal(bias_update(own, 0.1).sign(), bias_update(total, 0.1).sign())
    counts = update_expert_biases(layer)["router"]
    assert torch.equal(counts, total), f"rank {rank} updated from {counts}, not the sum {total}"
    assert torch.equal(layer.router.expert_bias, bias_update(total, 0.1))
    assert torch.equal(layer.router.expert_load, torch.zeros(4))


def test_each_rank_updates_its_biases_from_the_sum_of_the_counts(two_ranks):
    results = two_ranks["bias_sum"]
    assert all(r == "ok" for r in results), "\n".join(results)


BAD_CASES = ("world", "ep_disagrees", "E", "model_disagrees", "checkpoint_E")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One start of 2 processes for every 2-process check (starting processes dominates)."""
    checks = [
        ("equal_ep2", check_equal_to_one_process, (2,)),
        ("gathered_stats", check_gathered_routing_statistics, ()),
        ("soft_moe", check_soft_moe_equal_to_one_process, ()),
        ("bias_balancing", check_bias_balancing_over_ranks, ()),
        ("bias_sum", check_bias_update_uses_the_sum_of_the_counts_over_ranks, ()),
    ]
    # the bad configurations go last: each raises on every rank and leaves the group usable
    checks += [(f"bad_{case}", bad_configuration, (case,)) for case in BAD_CASES]
    return launch(checks, 2, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("four_ranks")
    checks = [
        ("equal_ep2", check_equal_to_one_process, (2,)),
        ("equal_ep4", check_equal_to_one_process, (4,)),
        ("checkpoint", check_state_dict_independent_of_ep, (2, str(out / "ep2.pt"))),
        ("optimizer_state", check_optimizer_state_independent_of_ep, (2,)),
        ("ddp_ep2", check_ddp_with_sharded_experts, (2,)),
    ]
    return launch(checks, 4, out)


@pytest.mark.parametrize(
    "case,message",
    [
        ("world", "world size 2 is not a multiple of expert_parallel_size=3"),
        (
            "ep_disagrees",
            "ranks disagree on the expert-parallel configuration (expert_parallel_size: "
            "rank 0=2, rank 1=1)",
        ),
        (
            "E",
            "expert_parallel_size=2 must divide every MoE layer's number of experts; "
            "these do not: {'0': 3}",
        ),
        ("model_disagrees", "ranks disagree on the model to shard"),
        ("checkpoint_E", "0.experts.fc1_weight: the checkpoint has 8 experts, the model 4"),
    ],
)
def test_bad_configuration_raises_on_every_rank(two_ranks, case, message):
    for rank, text in enumerate(two_ranks[f"bad_{case}"]):
        assert text.startswith("error") and message in text, f"rank {rank}: {text}"


def test_soft_moe_layers_are_expert_parallel_too(two_ranks):
    results = two_ranks["soft_moe"]
    assert all(r == "ok" for r in results), "\n".join(results)
