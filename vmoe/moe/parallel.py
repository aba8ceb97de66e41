"""Expert parallelism: each process holds E/ep experts; buffers travel with all-to-all.

The world of W processes is a 2-D device mesh ``(dp, ep)`` (``expert_parallel_mesh``): ranks
``dp_index * ep + ep_index``, so an expert-parallel group is ``ep`` consecutive ranks (one
machine's GPUs when ep <= GPUs per machine) and a data-parallel group holds the ranks with the
same slice of experts. Expert-parallel rank ``r`` owns experts ``r*E/ep .. (r+1)*E/ep - 1``.

A MoE layer's router, dispatch and combine are untouched: ``ExpertParallelExperts`` replaces the
layer's ``experts`` and takes this rank's full ``[E, G*C, d]`` buffers. Because capacity is
static, every rank sends every peer the same number of rows, so one ``all_to_all_single`` with
equal splits moves them (no counts exchange, no host sync; CUDA-graph and ``torch.compile``
friendly), the local experts run on ``[E/ep, ep*G*C, d]`` and the reverse all-to-all brings the
outputs back as ``[E, G*C, d']``. Autograd runs through both collectives. Soft MoE layers, whose
buffers are ``[E, G*P, d]``, go through the same wrapper.

Gradients (``reduce_expert_gradients``): with the loss a mean over the global batch of W
equal local batches, a rank's local expert gradient already sums the contributions of the
tokens of its ep peers (they came through the all-to-all), so the true gradient of a slab is the
SUM of the local gradients over its dp group divided by W (an average over dp alone would be ep
times too large). Everything else is averaged over all W ranks (DDP's usual reduction).

State dicts stay independent of ep: ``full_state_dict`` gathers the slabs (a collective), and
loading a full-E state dict into a sharded model slices it (a load hook on the wrapper).

Configuration errors (E % ep, W % ep, ranks that disagree) raise on every rank, never hang: the
configuration is compared with one small ``all_gather_object`` before any other collective.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .bias_balancing import expert_load_buffer_names
from .experts import Experts
from .layer import moe_layers

__all__ = [
    "MESH_DIM_NAMES",
    "ExpertParallelExperts",
    "expert_parallel_mesh",
    "shard_experts",
    "unshard_experts",
    "expert_parallel_layers",
    "expert_parameters",
    "full_state_dict",
    "reduce_expert_gradients",
    "average_gradients",
    "clip_grad_norm_",
    "check_same_configuration",
    "gather_plan",
    "gather_optimizer_state",
    "shard_optimizer_state",
    "exclude_experts_from_ddp",
]

MESH_DIM_NAMES = ("dp", "ep")
_EXPERT_PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def _require_distributed(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs torch.distributed initialized (init_process_group, "
            "torchrun, or Lightning's ExpertParallelStrategy)"
        )


def check_same_configuration(
    config: dict,
    what: str = "expert-parallel configuration",
    group: Optional[dist.ProcessGroup] = None,
) -> None:
    """All ranks of ``group`` (default: the world) must hold equal ``config`` dicts (small,
    picklable). One ``all_gather_object``; on a mismatch every rank raises the same ValueError
    naming the differing entries and the ranks' values, so no rank goes on to a collective
    that the others never join."""
    _require_distributed("check_same_configuration")
    world = dist.get_world_size(group)
    configs: List[Optional[dict]] = [None] * world
    dist.all_gather_object(configs, config, group=group)
    keys = sorted({k for c in configs for k in c}, key=str)
    differ = [k for k in keys if any(c.get(k) != configs[0].get(k) for c in configs)]
    if differ:
        lines = "; ".join(
            f"{k}: " + ", ".join(f"rank {i}={c.get(k)!r}" for i, c in enumerate(configs))
            for k in differ
        )
        raise ValueError(
            f"the ranks disagree on the {what} ({lines}); start every process with "
            "the same configuration"
        )


def expert_parallel_mesh(
    expert_parallel_size: int, device_type: Optional[str] = None
) -> DeviceMesh:
    """The ``(dp, ep)`` DeviceMesh of the world with ``ep = expert_parallel_size`` and
    ``dp = world_size // ep``. ``device_type``: 'cpu' (gloo) or 'cuda' (NCCL); default from the
    default process group's backend. ValueError on every rank when the world size is not a
    multiple of ep or when ranks were given different sizes."""
    _require_distributed("expert_parallel_mesh")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    # compared before anything depends on it: a rank with another ep would build another mesh
    check_same_configuration(
        {"expert_parallel_size": expert_parallel_size, "device_type": device_type}
    )
    if (
        not isinstance(expert_parallel_size, int)
        or isinstance(expert_parallel_size, bool)
        or expert_parallel_size < 1
    ):
        raise ValueError(f"expert_parallel_size={expert_parallel_size!r} must be an int >= 1")
    world = dist.get_world_size()
    if world % expert_parallel_size:
        raise ValueError(
            f"the world size {world} is not a multiple of expert_parallel_size="
            f"{expert_parallel_size}: every data-parallel replica needs all "
            f"{expert_parallel_size} expert-parallel ranks"
        )
    return init_device_mesh(
        device_type,
        (world // expert_parallel_size, expert_parallel_size),
        mesh_dim_names=MESH_DIM_NAMES,
    )


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Equal-split all-to-all along dim 0 with autograd (the backward is the same exchange)."""
    from torch.distributed import _functional_collectives as fc

    return fc.wait_tensor(fc.all_to_all_single_autograd(x.contiguous(), None, None, group))


class ExpertParallelExperts(Experts):
    """This rank's E/ep experts of a MoE layer, fed by all-to-all: ``[E, T, d] -> [E, T, d']``.

    Holds ``fc1_weight`` [E/ep, d, h], ``fc1_bias`` [E/ep, h], ``fc2_weight`` [E/ep, h, d'],
    ``fc2_bias`` [E/ep, d'] (the same names as ``Experts``, so state-dict keys are unchanged):
    experts ``ep_rank*E/ep ...`` of ``experts``, copied. ``num_experts`` is still E (what the
    layer's buffers hold); ``num_local_experts`` is E/ep.

    Every rank of the ep group must call forward with buffers of the same shape (the same local
    batch and routing settings), as every collective requires.

    ``count_bytes``: when True, ``bytes_sent`` accumulates the bytes this rank sends to other
    ranks, read from the tensors handed to the all-to-alls (forward and backward).
    """

    # the dropless path's per-expert row counts would need a counts exchange: an
    # expert-parallel layer runs its dropless plans (C = S, nothing dropped) through buffers
    runs_sorted_rows = False

    def __init__(self, experts: Experts, group: dist.ProcessGroup):
        E = experts.num_experts
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        if E % ep:
            raise ValueError(
                f"{E} experts cannot be split over expert_parallel_size={ep} ranks "
                "(E must be a multiple of ep)"
            )
        local = E // ep
        super().__init__(
            local,
            experts.in_features,
            experts.hidden_features,
            experts.out_features,
            bias=experts.fc1_bias is not None,
            drop=(experts.drop1.p, experts.drop2.p),
            gemm=experts.gemm,
        )
        self.act = copy.deepcopy(experts.act)
        self.num_experts, self.num_local_experts = E, local
        self.group, self.ep_size, self.ep_rank = group, ep, rank
        self.count_bytes, self.bytes_sent = False, 0
        with torch.no_grad():
            for name in _EXPERT_PARAMS:
                full, mine = getattr(experts, name), getattr(self, name)
                if full is not None:
                    mine.data = full.detach()[rank * local : (rank + 1) * local].clone()
                    mine.requires_grad_(full.requires_grad)  # frozen experts stay frozen
        self.register_load_state_dict_pre_hook(self._slice_full_state)

    def __deepcopy__(self, memo):
        """A copy that shares the process group (a handle to the ranks, which cannot be copied)."""
        memo[id(self.group)] = self.group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [E, T, d] (T = G*C rows per expert, this rank's tokens) -> [E, T, d']."""
        E, T, d = x.shape
        if E != self.num_experts:
            raise ValueError(f"expert buffers hold {E} experts, the layer has {self.num_experts}")
        ep, local = self.ep_size, self.num_local_experts
        # [E, T, d] = [ep (owner), E/ep, T, d]: chunk j goes to rank j
        received = self._exchange(x)  # [ep (source), E/ep, T, d]
        rows = received.view(ep, local, T, d).transpose(0, 1).reshape(local, ep * T, d)
        out = super().forward(rows)  # [E/ep, ep*T, d']
        back = out.view(local, ep, T, -1).transpose(0, 1)  # [ep (source), E/ep, T, d']
        return self._exchange(back).view(E, T, -1)  # [E, T, d']

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        out = _all_to_all(x, self.group)
        if self.count_bytes:
            self.bytes_sent += self._bytes_to_peers(x)
            if out.requires_grad:  # the gradient of ``out`` is what the backward exchange sends
                out.register_hook(self._count_grad)
        return out

    def _bytes_to_peers(self, t: torch.Tensor) -> int:
        return t.numel() * t.element_size() * (self.ep_size - 1) // self.ep_size

    def _count_grad(self, grad: torch.Tensor) -> None:
        self.bytes_sent += self._bytes_to_peers(grad)

    def local_slab(self, value: torch.Tensor, what: str) -> torch.Tensor:
        """value [E, ...] (a full-E weight or optimizer state) -> this rank's [E/ep, ...] rows (a
        view); ValueError naming ``what`` when the value holds another number of experts."""
        if value.shape[0] != self.num_experts:
            raise ValueError(
                f"{what}: the checkpoint has {value.shape[0]} experts, the model "
                f"{self.num_experts} (state dicts of expert-parallel models "
                "always hold all E experts)"
            )
        start = self.ep_rank * self.num_local_experts
        return value[start : start + self.num_local_experts]

    def _slice_full_state(self, module, state_dict, prefix, *args) -> None:
        """Loading a full-E state dict keeps this rank's slabs; any other E is an error."""
        for name in _EXPERT_PARAMS:
            key = prefix + name
            value = state_dict.get(key)
            if value is None or getattr(self, name) is None:
                continue
            state_dict[key] = self.local_slab(value, key)

    def gathered(self) -> Dict[str, torch.Tensor]:
        """The full [E, ...] expert tensors (all_gather over the ep group; every rank calls)."""
        out = {}
        for name in _EXPERT_PARAMS:
            local = getattr(self, name)
            if local is not None:
                parts = [torch.empty_like(local) for _ in range(self.ep_size)]
                dist.all_gather(parts, local.detach().contiguous(), group=self.group)
                out[name] = torch.cat(parts)
        return out

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", num_local_experts={self.num_local_experts}, "
            f"expert_parallel={self.ep_rank}/{self.ep_size}"
        )


def _layer_fingerprint(model: nn.Module, ep: int, mesh: DeviceMesh) -> dict:
    layers = {
        name: [
            m.num_experts,
            m.experts.in_features,
            m.experts.hidden_features,
            m.experts.out_features,
            m.experts.gemm,
        ]
        for name, m in moe_layers(model).items()
    }
    shapes = sorted((n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters())
    return {
        "expert_parallel_size": ep,
        "mesh": tuple(mesh.mesh.shape),
        "moe_layers": layers,
        "parameters": hashlib.sha1(repr(shapes).encode()).hexdigest()[:16],
    }


def shard_experts(model: nn.Module, mesh: DeviceMesh, sync_from_rank0: bool = True) -> nn.Module:
    """Replace every MoE layer's ``experts`` by an ``ExpertParallelExperts`` holding this rank's
    E/ep slabs (in place; returns ``model``). Every rank of the world calls it.

    The ranks' models are compared first (MoE layers, E, widths, parameter shapes: one
    ``all_gather_object``); with ``sync_from_rank0`` the full expert weights are broadcast from
    global rank 0 before slicing, so the sharded model equals rank 0's one-process model even if
    the ranks initialized differently. Already-sharded layers are left alone.
    """
    _require_distributed("shard_experts")
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIM_NAMES:
        raise ValueError(
            f"mesh must have dimensions {MESH_DIM_NAMES} (expert_parallel_mesh), "
            f"got {mesh.mesh_dim_names}"
        )
    ep = mesh.size(1)
    check_same_configuration(_layer_fingerprint(model, ep, mesh), "model to shard")
    layers = moe_layers(model)
    bad = {name: m.num_experts for name, m in layers.items() if m.num_experts % ep}
    if bad:
        raise ValueError(
            f"expert_parallel_size={ep} must divide every MoE layer's number of "
            f"experts; these do not: {bad}"
        )
    group = mesh.get_group("ep")
    for layer in layers.values():
        if isinstance(layer.experts, ExpertParallelExperts):
            continue
        if sync_from_rank0 and dist.get_world_size() > 1:
            for p in layer.experts.parameters():
                dist.broadcast(p.data, src=0)
        layer.experts = ExpertParallelExperts(layer.experts, group).to(
            layer.experts.fc1_weight.device
        )
    return model


def expert_parallel_layers(model: nn.Module) -> Dict[str, ExpertParallelExperts]:
    """Every ``ExpertParallelExperts`` of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def expert_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of every sharded expert parameter of ``model``."""
    return [
        (f"{n}.{pn}", p)
        for n, m in expert_parallel_layers(model).items()
        for pn, p in m.named_parameters(recurse=False)
    ]


def exclude_experts_from_ddp(model: nn.Module) -> None:
    """Make ``DistributedDataParallel(model)`` neither broadcast nor average the sharded expert
    parameters (they differ from rank to rank; ``reduce_expert_gradients`` reduces them): DDP's
    list of parameters to ignore. Call before wrapping; ``model`` is the module DDP wraps."""
    # (and each rank's own expert_load counts of bias-balanced routers, which
    # update_expert_biases sums over the ranks: DDP must not broadcast rank 0's over them)
    model._ddp_params_and_buffers_to_ignore = [
        name for name, _ in expert_parameters(model)
    ] + expert_load_buffer_names(model)


def unshard_experts(model: nn.Module) -> nn.Module:
    """Put plain ``Experts`` with all E experts back (all_gather over each ep group; every rank
    calls). The model is then a one-process model again, equal on every rank."""
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if not isinstance(experts, ExpertParallelExperts):
            continue
        full = experts.gathered()
        plain = Experts(
            experts.num_experts,
            experts.in_features,
            experts.hidden_features,
            experts.out_features,
            bias=experts.fc1_bias is not None,
            drop=(experts.drop1.p, experts.drop2.p),
            gemm=experts.gemm,
        )
        plain.act = experts.act
        with torch.no_grad():
            for pn, value in full.items():
                getattr(plain, pn).data = value
                getattr(plain, pn).requires_grad_(getattr(experts, pn).requires_grad)
        plain.train(experts.training)
        module.experts = plain.to(experts.fc1_weight.device)
    return model


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded expert tensor gathered to all E experts: the
    state dict of the one-process model (a collective: every rank calls, every rank gets it)."""
    state = model.state_dict()
    for name, layer in expert_parallel_layers(model).items():
        prefix = f"{name}." if name else ""
        for pn, value in layer.gathered().items():
            state[prefix + pn] = value
    return state


def _expert_param_slots(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> Dict[int, ExpertParallelExperts]:
    """{index of the parameter in ``optimizer.state_dict()``: its expert-parallel layer}."""
    owner = {
        id(p): layer for layer in expert_parallel_layers(model).values() for p in layer.parameters()
    }
    slots, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in owner:
                slots[index] = owner[id(p)]
            index += 1
    return slots


def gather_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with the per-expert state of sharded expert parameters (e.g.
    Adam's moments, [E/ep, ...]) gathered to [E, ...]: the optimizer state of the one-process
    model. A collective: every rank calls."""
    state = optimizer.state_dict()
    slots = _expert_param_slots(optimizer, model)
    state["state"] = dict(state["state"])
    for index in sorted(slots):
        layer = slots[index]
        entry = dict(state["state"].get(index, {}))
        for key in sorted(entry):
            value = entry[key]
            if (
                torch.is_tensor(value)
                and value.dim() > 0
                and value.shape[0] == layer.num_local_experts
            ):
                parts = [torch.empty_like(value) for _ in range(layer.ep_size)]
                dist.all_gather(parts, value.contiguous(), group=layer.group)
                entry[key] = torch.cat(parts)
        if entry:
            state["state"][index] = entry
    return state


def shard_optimizer_state(
    state: Mapping[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> Dict[str, Any]:
    """The inverse of ``gather_optimizer_state``: keep this rank's experts of every per-expert
    state tensor. ValueError when the state was saved with another number of experts."""
    slots = _expert_param_slots(optimizer, model)
    state = dict(state)
    state["state"] = dict(state["state"])
    for index, layer in slots.items():
        entry = dict(state["state"].get(index, {}))
        for key, value in entry.items():
            if not (torch.is_tensor(value) and value.dim() > 0):
                continue
            entry[key] = layer.local_slab(value, f"optimizer state {index}.{key}").clone()
        if entry:
            state["state"][index] = entry
    return state


def _all_reduce_sum(tensors: List[torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> None:
    """Sum ``tensors`` over ``group`` in place with one collective (flattened together)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def reduce_expert_gradients(model: nn.Module, mesh: DeviceMesh) -> None:
    """Expert gradients -> the gradient of the global-batch mean loss: SUM over the dp group,
    divided by the world size (see the module docstring). Call once per optimizer step, after
    the last backward, on every rank; non-expert gradients are left to DDP (or
    ``average_gradients``)."""
    world = dist.get_world_size()
    grads = [p.grad for _, p in expert_parameters(model) if p.grad is not None]
    if not grads:
        return
    if mesh.size(0) > 1:
        _all_reduce_sum(grads, mesh.get_group("dp"))
    for g in grads:
        g.div_(world)


def average_gradients(model: nn.Module, mesh: DeviceMesh) -> None:
    """Without DDP (a torchrun loop): average non-expert gradients over all ranks and reduce the
    expert gradients (``reduce_expert_gradients``). Every rank calls, after backward."""
    experts = {id(p) for _, p in expert_parameters(model)}
    grads = [p.grad for p in model.parameters() if id(p) not in experts and p.grad is not None]
    if grads and dist.get_world_size() > 1:
        _all_reduce_sum(grads)
        for g in grads:
            g.div_(dist.get_world_size())
    reduce_expert_gradients(model, mesh)


def _squared_norm(params: List[torch.Tensor], device_type: str) -> torch.Tensor:
    """Sum of the squared gradient entries of ``params`` (float32 scalar; 0 for none)."""
    if not params:
        return torch.zeros((), device=device_type)
    return torch.stack([p.grad.detach().float().pow(2).sum() for p in params]).sum()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, model: nn.Module, mesh: DeviceMesh
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for an expert-parallel model: the norm counts
    every expert once (the local slabs' squared norms summed over the ep group), so every rank
    computes the same global norm and scales by the same factor. Returns the total norm."""
    params = [p for p in parameters if p.grad is not None]
    experts = {id(p) for _, p in expert_parameters(model)}
    shared = _squared_norm([p for p in params if id(p) not in experts], mesh.device_type)
    local = _squared_norm([p for p in params if id(p) in experts], mesh.device_type).to(
        shared.device
    )
    dist.all_reduce(local, group=mesh.get_group("ep"))
    total = (shared + local).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
    return total


@torch.no_grad()
def gather_plan(plan, group: Optional[dist.ProcessGroup] = None):
    """One plan of every rank's groups: each tensor field of the plan (a dataclass of [G, S, ...]
    tensors: ``RoutingPlan``, Soft MoE's plan) all-gathered along G over ``group`` (default: the
    world), so statistics read from it count every rank's tokens. A missing ``valid`` mask (no
    padding) becomes all-True first, so the ranks always exchange the same fields. Every rank calls,
    with plans of the same shapes (the same local batch)."""
    if not dataclasses.is_dataclass(plan):
        raise TypeError(
            f"gather_plan needs a dataclass plan (RoutingPlan), got {type(plan).__name__}"
        )
    world = dist.get_world_size(group)
    tensors = [
        getattr(plan, f.name)
        for f in dataclasses.fields(plan)
        if torch.is_tensor(getattr(plan, f.name))
    ]
    changes = {}
    for field in dataclasses.fields(plan):
        value = getattr(plan, field.name)
        if value is None and field.name == "valid":  # every plan's fields start with [G, S]
            value = torch.ones(tensors[0].shape[:2], dtype=torch.bool, device=tensors[0].device)
        if torch.is_tensor(value):
            sent = (
                value.to(torch.uint8) if value.dtype == torch.bool else value.contiguous()
            )  # gloo: no bool
            parts = [torch.empty_like(sent) for _ in range(world)]
            dist.all_gather(parts, sent, group=group)
            changes[field.name] = torch.cat(parts).to(value.dtype)
    return dataclasses.replace(plan, **changes)
