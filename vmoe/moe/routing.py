"""Routers: tokens of one routing group -> RoutingPlan (+ auxiliary losses).

Axis letters: G groups, S tokens per group, E experts, K choices per token, C capacity, d width.
Everything is static-shape (no ``nonzero``, ``.item()`` or boolean masking), so the routers run
under ``torch.compile(fullgraph=True)`` and without host syncs on CUDA.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capacity import compute_capacity
from .checks import check_num_selected_fits, check_positive_int
from .config import SCORE_FUNCS, ExpertChoiceRouterConfig, RoutingSettings, TopKRouterConfig
from .losses import gshard_loss, importance_loss, load_loss, router_z_loss
from .plan import RoutingPlan

__all__ = [
    "TopKRouter",
    "ExpertChoiceRouter",
    "assign_buffer_slots",
    "SCORE_FUNCS",
    "scores_from_logits",
]

Losses = Dict[str, torch.Tensor]


def scores_from_logits(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """logits: [G, S, E] float32 -> scores [G, S, E] float32 (softmax over E, or sigmoid)."""
    return logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)


def _in_backward() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputes
    the forward there, and that recomputation must not count the tokens a second time."""
    if torch.compiler.is_compiling():
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


#: Under ``torch.export``, orderings along axes up to this length are built from pairwise
#: comparisons (ops every exporter translates, e.g. ONNX; exact on ties) instead of
#: ``aten.sort.stable``, which the ONNX exporter has no translation for.
PAIRWISE_ORDER_MAX = 1024


def _descending_order(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices sorting ``values`` high to low along ``dim``; ties keep the lower index first
    (like ``jax.lax.top_k`` and the official stable argsort). Non-finite values (NaN, +-inf) sort
    last, as -inf: a token with NaN gates never outranks a healthy one."""
    key = torch.nan_to_num(values, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    if torch.compiler.is_exporting() and key.shape[dim] <= PAIRWISE_ORDER_MAX:
        return _pairwise_descending_order(key, dim)
    return torch.sort(key, dim=dim, descending=True, stable=True).indices


def _pairwise_descending_order(key: torch.Tensor, dim: int) -> torch.Tensor:
    """The stable descending order of ``key`` (no NaN) along ``dim`` (length n) from its ranks:
    element i goes to position #{j: key_j > key_i} + #{j < i: key_j == key_i}. O(n^2)
    comparisons, exactly the stable sort's result (ties included)."""
    k = key.movedim(dim, -1)
    n = k.shape[-1]
    index = torch.arange(n, device=k.device)
    a, b = k.unsqueeze(-1), k.unsqueeze(-2)  # [..., n (i), 1], [..., 1, n (j)]
    before = (b > a) | ((b == a) & (index.view(1, n) < index.view(n, 1)))  # j goes before i
    rank = before.sum(-1)  # [..., n]: position of element i
    # order[p] = the i with rank p (no scatter of an expanded index: that would guard on the
    # leading sizes, e.g. a dynamic number of groups being 1)
    at = rank.unsqueeze(-2) == index.view(n, 1)  # [..., n (p), n (i)]
    order = (at * index).sum(-1)
    return order.movedim(-1, dim)


def assign_buffer_slots(
    expert_index: torch.Tensor,
    num_experts: int,
    priority_order: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
    deferred: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Each assignment's position in its expert's buffer, before the capacity cut.

    All first choices take places before any second choice; within a round tokens go in group
    order, or in ``priority_order`` (Batch Priority Routing).

    Args:
        expert_index: [G, S, K] int64, the chosen experts, best first.
        num_experts: E.
        priority_order: [G, S] int64 permutation of the tokens, highest priority first, or None
            for group order.
        valid: [G, S] bool; padding tokens (False) take no place and get position -1.
        deferred: [G, S] bool; these tokens' assignments (all K rounds) queue after every other
            assignment of the group, in the same order among themselves. The top-K router
            defers tokens with non-finite gates under BPR, so they never take a healthy
            token's place.

    Returns:
        [G, S, K] int64: number of earlier assignments (in priority order) to the same expert.
    """
    G, S, K = expert_index.shape
    if priority_order is not None:
        expert_index = expert_index.gather(1, priority_order.unsqueeze(-1).expand(G, S, K))
        if valid is not None:
            valid = valid.gather(1, priority_order)
        if deferred is not None:
            deferred = deferred.gather(1, priority_order)
    # [G, K*S]: round-major order, so first choices come before second choices.
    rounds = expert_index.transpose(1, 2).reshape(G, K * S)
    valid_rounds = valid.repeat(1, K) if valid is not None else None
    queue = None
    if deferred is not None:
        # [G, K*S] permutation moving the deferred assignments to the end (a stable sort).
        queue = torch.sort(deferred.repeat(1, K).to(torch.int8), dim=1, stable=True).indices
        rounds = rounds.gather(1, queue)
        if valid_rounds is not None:
            valid_rounds = valid_rounds.gather(1, queue)
    experts = torch.arange(num_experts, device=expert_index.device)
    one_hot = (rounds.unsqueeze(-1) == experts).to(torch.int32)  # [G, K*S, E]
    if valid_rounds is not None:
        one_hot = one_hot * valid_rounds.unsqueeze(-1).to(torch.int32)
    position = one_hot.cumsum(1).gather(2, rounds.unsqueeze(-1)).squeeze(-1).long() - 1
    if valid_rounds is not None:
        position = torch.where(valid_rounds, position, torch.full_like(position, -1))
    if queue is not None:
        position = torch.empty_like(position).scatter_(1, queue, position)
    position = position.view(G, K, S).transpose(1, 2)  # [G, S, K], in priority order
    if priority_order is not None:
        position = torch.empty_like(position).scatter_(
            1, priority_order.unsqueeze(-1).expand(G, S, K), position
        )
    return position


class _GatingRouter(nn.Module):
    """Shared part of the sparse routers: float32 gating logits without bias, training noise,
    and the capacity settings.

    The options live in ``self.config`` (a frozen, validated ``TopKRouterConfig`` or
    ``ExpertChoiceRouterConfig``). ``noise_std``, ``capacity_factor``, ``capacity`` and
    ``batch_priority`` may be assigned (evaluation settings, ``config.json`` routing entries):
    each assignment replaces ``self.config`` by a validated copy, so a bad value raises
    ValueError naming the setting and changes nothing.
    """

    def __init__(self, dim: int, num_experts: int, config):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_experts", num_experts)
        self.dim = dim
        self.num_experts = num_experts
        self.config = config
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    @property
    def supports_batch_priority(self) -> bool:
        """Whether Batch Priority Routing means anything for this router."""
        return self.config.supports_batch_priority

    # --- settings (read from the config; assignments write a validated copy) -------------------
    def apply_routing(self, settings: RoutingSettings) -> None:
        """Route with ``settings`` from now on (validated by the config: all or nothing)."""
        self.config = self.config.with_routing(settings)

    def _set_routing(self, **change) -> None:
        self.apply_routing(dataclasses.replace(self.config.routing_settings(), **change))

    @property
    def noise_std(self) -> float:
        return self.config.noise_std

    @noise_std.setter
    def noise_std(self, value: float) -> None:
        self.config = self.config.replace(noise_std=value)

    @property
    def capacity_factor(self) -> Optional[float]:
        return self.config.capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: Optional[float]) -> None:
        self._set_routing(capacity_factor=value)

    @property
    def capacity(self) -> Optional[int]:
        """Explicit buffer size per expert and group (None: from ``capacity_factor``)."""
        return self.config.capacity

    @capacity.setter
    def capacity(self, value: Optional[int]) -> None:
        self._set_routing(capacity=value)

    @property
    def batch_priority(self) -> bool:
        return getattr(self.config, "batch_priority", False)  # expert choice: none

    @batch_priority.setter
    def batch_priority(self, value: bool) -> None:
        self._set_routing(batch_priority=value)

    @property
    def capacity_multiple_of(self) -> Optional[int]:
        return self.config.capacity_multiple_of

    @property
    def capacity_rounding(self) -> str:
        return self.config.capacity_rounding

    @property
    def noisy_at_eval(self) -> bool:
        return self.config.noisy_at_eval

    @property
    def zloss_weight(self) -> float:
        return self.config.zloss_weight

    # --- capacity ------------------------------------------------------------------------------
    def _choices_per_token(self) -> int:
        """How many buffer places one token may ask for (K for top-K; 1 per expert for
        expert-choice), the factor of S in the capacity formula."""
        raise NotImplementedError

    def capacity_for(self, group_size: int) -> int:
        """Buffer size C per expert for groups of ``group_size`` tokens (S).

        The explicit ``capacity``, else ``compute_capacity`` (the official formula), capped at
        S: an expert can never hold more than every token of its group once, so e.g.
        ``capacity_factor=1e9`` ("never drop") allocates S rows per expert and group, not
        S*K*1e9/E.
        """
        config = self.config
        if config.capacity is not None:
            capacity = config.capacity
        elif config.capacity_factor is None:
            raise ValueError(f"{type(self).__name__} has neither capacity nor capacity_factor set")
        else:
            capacity = compute_capacity(
                group_size * self._choices_per_token(),
                self.num_experts,
                config.capacity_factor,
                config.capacity_rounding,
                config.capacity_multiple_of,
            )
        return min(capacity, group_size)

    # --- gating --------------------------------------------------------------------------------
    def reset_parameters(self, std: Optional[float] = None) -> None:
        """Normal init with ``std`` (default: LeCun, 1/sqrt(d), as Flax's Dense)."""
        nn.init.normal_(self.weight, std=self.dim**-0.5 if std is None else std)

    @property
    def adds_noise(self) -> bool:
        config = self.config
        return config.noise_std > 0 and (self.training or config.noisy_at_eval)

    def gating_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [G, S, d] -> (clean logits, logits used for routing), both [G, S, E] float32.

        Computed in float32 even under autocast. The routing logits carry Gaussian noise of std
        ``noise_std / E`` in training.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        if self.adds_noise:
            noise = torch.randn_like(logits) * (self.noise_std / self.num_experts)
            return logits, logits + noise
        return logits, logits

    def extra_repr(self) -> str:
        cap = (
            f"capacity={self.capacity}"
            if self.capacity is not None
            else f"capacity_factor={self.capacity_factor}"
        )
        return f"dim={self.dim}, num_experts={self.num_experts}, {cap}, noise_std={self.noise_std}"


class TopKRouter(_GatingRouter):
    """Top-K experts per token, with capacity and optional Batch Priority Routing.

    Args:
        dim: token width d.
        num_experts: E.
        num_selected: K, experts per token (1 <= K <= E).
        capacity_factor: buffer size per expert = ceil(S*K*cf/E) rounded up to
            ``capacity_multiple_of``, capped at S. Ignored when ``capacity`` is given.
        capacity: explicit buffer size C per expert and group (capped at S).
        capacity_multiple_of: round C up to a multiple of this (None/0: no rounding).
        capacity_rounding: 'ceil' (official default) or 'round'.
        batch_priority: Batch Priority Routing: tokens with the largest (unbiased) top-1 gate
            take buffer places first; otherwise earlier tokens of the group do.
        noise_std: training noise std before division by E (paper: 1.0, i.e. std 1/E).
        noisy_at_eval: also add noise in eval mode.
        renormalize: combine weights are the gates renormalized over the K choices (sum 1)
            instead of the raw softmax gates (paper default: raw).
        importance_weight: weight of the importance loss.
        load_weight: weight of the load loss.
        gshard_weight: weight of the GShard loss.
        zloss_weight: weight of the router z-loss.
        score_func: 'softmax' (default, the paper's) or 'sigmoid' (an independent sigmoid per
            expert, in float32).
        bias_update_rate: None (default) or the rate of auxiliary-loss-free balancing: a
            per-expert ``expert_bias`` [E] added to the scores to choose the experts only,
            updated by ``vmoe.moe.update_expert_biases``.
        dropless: in eval mode keep every assignment (C = S, no priority): the dropless
            inference of ``MoeMlp``; training always routes with the capacity.
        config: a ``TopKRouterConfig`` holding all of the options above (then they are not
            read); ``TopKRouterConfig.build`` passes it.

    The options are held in ``self.config``. The routing options may be changed after
    construction (e.g. a larger ``capacity_factor`` for evaluation); assignments are validated.
    See the guide [The MoE layer](../guides/moe-layer.md).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_selected: int = 1,
        capacity_factor: Optional[float] = 1.05,
        capacity: Optional[int] = None,
        capacity_multiple_of: Optional[int] = 4,
        capacity_rounding: str = "ceil",
        batch_priority: bool = False,
        noise_std: float = 1.0,
        noisy_at_eval: bool = False,
        renormalize: bool = False,
        importance_weight: float = 0.005,
        load_weight: float = 0.005,
        gshard_weight: float = 0.0,
        zloss_weight: float = 0.0,
        score_func: str = "softmax",
        bias_update_rate: Optional[float] = None,
        dropless: bool = True,
        *,
        config: Optional[TopKRouterConfig] = None,
    ):
        if config is None:
            config = TopKRouterConfig(
                dropless=dropless,
                num_selected=num_selected,
                capacity_factor=capacity_factor,
                capacity=capacity,
                capacity_multiple_of=capacity_multiple_of,
                capacity_rounding=capacity_rounding,
                batch_priority=batch_priority,
                noise_std=noise_std,
                noisy_at_eval=noisy_at_eval,
                renormalize=renormalize,
                importance_weight=importance_weight,
                load_weight=load_weight,
                gshard_weight=gshard_weight,
                zloss_weight=zloss_weight,
                score_func=score_func,
                bias_update_rate=bias_update_rate,
            )
        elif not isinstance(config, TopKRouterConfig):
            raise TypeError(f"config must be a TopKRouterConfig, got {type(config).__name__}")
        super().__init__(dim, num_experts, config)
        check_num_selected_fits(config.num_selected, num_experts)
        if config.bias_update_rate is not None:
            # Only with balancing on: the state dict of every other router stays as it was.
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.register_buffer("expert_bias", None)  # None buffers are not in the state dict
            self.register_buffer("expert_load", None)

    #: The bias-balancing buffers, float32 under any module cast (see ``_apply``).
    FLOAT32_BUFFERS = ("expert_bias", "expert_load")

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (behind ``.to``, ``.half()``, ``.bfloat16()``, ``.cuda()``, ...),
        except that ``expert_bias`` and ``expert_load`` stay float32: a cast moves them to the
        new device with their float32 values (no rounding through bf16/fp16), as the router's
        scores are float32 under any dtype of the model."""
        kept = {
            name: self._buffers[name]
            for name in self.FLOAT32_BUFFERS
            if self._buffers.get(name) is not None
        }
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = (
                    after.float() if before.is_meta else before.to(device=after.device)
                )
        return self

    @property
    def score_func(self) -> str:
        return self.config.score_func

    @property
    def bias_update_rate(self) -> Optional[float]:
        return self.config.bias_update_rate

    @property
    def num_selected(self) -> int:
        return self.config.num_selected

    @property
    def renormalize(self) -> bool:
        return self.config.renormalize

    @property
    def importance_weight(self) -> float:
        return self.config.importance_weight

    @property
    def load_weight(self) -> float:
        return self.config.load_weight

    @property
    def gshard_weight(self) -> float:
        return self.config.gshard_weight

    def _choices_per_token(self) -> int:
        return self.num_selected

    def route(self, gates: torch.Tensor, valid: Optional[torch.Tensor] = None) -> RoutingPlan:
        """gates: [G, S, E] scores (softmax or sigmoid) -> RoutingPlan. Pure function of the
        gates and ``expert_bias`` (no noise).

        With bias balancing the experts are chosen by ``gates + expert_bias`` and everything
        else uses the unbiased ``gates``: the combine weights, and the BPR priority, which is
        the unbiased gate of the token's first choice. That gate is what the token's output is
        mixed with (exactly the combine weight without ``renormalize``): when an expert
        overflows, the tokens dropped are those whose output loses least. The biased score is
        not a token's affinity but a balancing offset, the same for every token of an expert,
        and would rank tokens by how crowded their first expert is. With ``renormalize`` the
        priority stays the gate before renormalization (as without it, so a K=1 router's
        priorities do not all become 1, and BPR routes exactly as before for softmax).
        """
        G, S, E = gates.shape
        config = self.config
        K = config.num_selected
        dropless = self.routes_dropless
        # dropless: every valid assignment is kept (an expert gets at most S of them: C = S
        # never binds), slots in group order (nothing competes, priority changes nothing kept)
        capacity = S if dropless else self.capacity_for(S)
        expert_index, top_gates, weight = self.select(gates)  # [G, S, K] each
        priority_order = deferred = None
        if config.batch_priority and not dropless:
            # [G, S]: a token with any non-finite gate has the lowest priority, and with K > 1
            # its assignments also wait for every healthy second choice.
            unhealthy = ~torch.isfinite(gates.sum(-1))  # NaN/inf anywhere (gates are <= 1)
            priority = top_gates[..., 0].masked_fill(unhealthy, -math.inf)
            priority_order = _descending_order(priority, dim=1)
            deferred = unhealthy if K > 1 else None
        position = assign_buffer_slots(expert_index, E, priority_order, valid, deferred)
        kept = (position >= 0) & (position < capacity)
        slot = torch.where(kept, position, torch.full_like(position, -1))
        combine_weight = torch.where(kept, weight, torch.zeros_like(weight))
        return RoutingPlan(
            expert_index=expert_index,
            slot=slot,
            combine_weight=combine_weight,
            gates=gates,
            capacity=capacity,
            valid=valid,
            dropless=dropless,
        )

    @property
    def routes_dropless(self) -> bool:
        """Whether ``route`` keeps every assignment now: eval mode with ``config.dropless``."""
        return self.config.dropless and not self.training

    def select(self, gates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gates: [..., E] scores -> (expert_index, top_gates, combine weight), each [..., K]:
        the K experts of each token, best first (ties -> lower expert index, as lax.top_k;
        non-finite gates last; by the biased scores under bias balancing), their unbiased
        gates, and the weights their outputs are mixed with (the gates, renormalized over the
        K if ``renormalize``). Per token: no token's choice depends on another's."""
        selection = gates if self.expert_bias is None else gates + self.expert_bias
        expert_index = _descending_order(selection, dim=-1)[..., : self.config.num_selected]
        top_gates = gates.gather(-1, expert_index)
        if self.config.renormalize:
            return expert_index, top_gates, top_gates / top_gates.sum(-1, keepdim=True)
        return expert_index, top_gates, top_gates

    def select_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [T, d] tokens -> (expert_index [T, K], combine weight [T, K]), with no group and
        no loss: the dropless inference path (``select`` on the routing gates)."""
        _, routing_logits = self.gating_logits(x.unsqueeze(0))
        gates = scores_from_logits(routing_logits, self.config.score_func)[0]  # [T, E]
        expert_index, _, weight = self.select(gates)
        return expert_index, weight

    def forward(
        self, x: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> Tuple[RoutingPlan, Losses]:
        """x: [G, S, d] -> (RoutingPlan, losses). ``losses`` maps each auxiliary loss to its
        per-group values [G]; 'load' is present only when noise was added (training)."""
        logits, routing_logits = self.gating_logits(x)
        score_func = self.config.score_func
        gates = scores_from_logits(logits, score_func)
        routing_gates = scores_from_logits(routing_logits, score_func) if self.adds_noise else gates
        losses: Losses = {
            "importance": importance_loss(gates, valid),
            "gshard": gshard_loss(routing_gates, valid),
        }
        if self.adds_noise:
            losses["load"] = load_loss(
                logits, routing_logits, self.noise_std / self.num_experts, self.num_selected, valid
            )
        if self.zloss_weight > 0:
            losses["z"] = router_z_loss(logits, valid)
        plan = self.route(routing_gates, valid)
        if self.expert_load is not None and self.training and not _in_backward():
            self.count_load(plan.expert_index, valid)
        return plan, losses

    @torch.no_grad()
    def count_load(self, expert_index: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Add the chosen assignments of the valid tokens (expert_index: [G, S, K], valid:
        [G, S] or None) to ``expert_load`` [E]. Counted before the capacity cut: the bias must
        answer the router's demand; what fit is capped at C per group, so an overloaded expert
        would look less overloaded the more it overflows, and dropped demand would be invisible."""
        G, S, K = expert_index.shape
        weight = (
            torch.ones(G, S, K, device=expert_index.device)
            if valid is None
            else valid.unsqueeze(-1).expand(G, S, K).float()
        )
        self.expert_load.index_add_(0, expert_index.reshape(-1), weight.reshape(-1))

    def loss_weights(self) -> Dict[str, float]:
        config = self.config
        return {
            "importance": config.importance_weight,
            "load": config.load_weight,
            "gshard": config.gshard_weight,
            "z": config.zloss_weight,
        }

    def extra_repr(self) -> str:
        extra = "" if self.score_func == "softmax" else f", score_func={self.score_func!r}"
        if self.bias_update_rate is not None:
            extra += f", bias_update_rate={self.bias_update_rate}"
        return (
            f"{super().extra_repr()}, num_selected={self.num_selected}, "
            f"batch_priority={self.batch_priority}{extra}"
        )


class ExpertChoiceRouter(_GatingRouter):
    """Each expert takes its top-C tokens of the group ("top items per expert").

    The plan it returns uses K = E: ``expert_index[..., e] = e`` and ``slot[g, s, e]`` is the
    token's position in expert e's buffer (-1 if e did not pick it), so dispatch and combine are
    the same as for top-K routing. C = ceil(S*cf/E) (no K factor), rounded as for top-K and
    capped at S (an expert then takes every token). Tokens with non-finite gates are picked
    last. The official router has no auxiliary loss (perfect balance by construction); z-loss
    is available. ``batch_priority`` is always False (assigning True raises). The options
    (the capacity ones as for top-K, ``noise_std``, ``noisy_at_eval``, ``zloss_weight``) are
    held in ``self.config`` (an ``ExpertChoiceRouterConfig``; pass ``config=`` to give them so).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: Optional[float] = 1.0,
        capacity: Optional[int] = None,
        capacity_multiple_of: Optional[int] = 4,
        capacity_rounding: str = "ceil",
        noise_std: float = 1.0,
        noisy_at_eval: bool = False,
        zloss_weight: float = 0.0,
        *,
        config: Optional[ExpertChoiceRouterConfig] = None,
    ):
        if config is None:
            config = ExpertChoiceRouterConfig(
                capacity_factor=capacity_factor,
                capacity=capacity,
                capacity_multiple_of=capacity_multiple_of,
                capacity_rounding=capacity_rounding,
                noise_std=noise_std,
                noisy_at_eval=noisy_at_eval,
                zloss_weight=zloss_weight,
            )
        elif not isinstance(config, ExpertChoiceRouterConfig):
            raise TypeError(
                f"config must be an ExpertChoiceRouterConfig, got {type(config).__name__}"
            )
        super().__init__(dim, num_experts, config)

    def _choices_per_token(self) -> int:
        return 1

    def route(self, gates: torch.Tensor, valid: Optional[torch.Tensor] = None) -> RoutingPlan:
        G, S, E = gates.shape
        capacity = self.capacity_for(S)
        scores = (
            gates
            if valid is None
            else torch.where(valid.unsqueeze(-1), gates, torch.full_like(gates, -1.0))
        )
        # [G, E, C]: each expert's C best tokens, ties -> lower token index, non-finite last.
        token_index = _descending_order(scores.transpose(1, 2), dim=-1)[..., :capacity]
        position = torch.arange(capacity, device=gates.device).expand(G, E, capacity)
        slot = torch.full((G, S, E), -1, dtype=torch.long, device=gates.device)
        slot.scatter_(1, token_index.transpose(1, 2), position.transpose(1, 2).contiguous())
        if valid is not None:
            slot = torch.where(valid.unsqueeze(-1), slot, torch.full_like(slot, -1))
        expert_index = torch.arange(E, device=gates.device).expand(G, S, E).contiguous()
        combine_weight = torch.where(slot >= 0, gates, torch.zeros_like(gates))
        return RoutingPlan(
            expert_index=expert_index,
            slot=slot,
            combine_weight=combine_weight,
            gates=gates,
            capacity=capacity,
            valid=valid,
        )

    def forward(
        self, x: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> Tuple[RoutingPlan, Losses]:
        logits, routing_logits = self.gating_logits(x)
        losses: Losses = {}
        if self.zloss_weight > 0:
            losses["z"] = router_z_loss(logits, valid)
        return self.route(routing_logits.softmax(-1), valid), losses

    def loss_weights(self) -> Dict[str, float]:
        return {"z": self.zloss_weight}
