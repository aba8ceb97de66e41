"""MoeMlp: a sparse Mixture-of-Experts drop-in replacement for timm's ``Mlp``."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .balancing import AttachAuxLoss, check_aux_loss_mode, check_aux_loss_scale
from .dispatch import check_dispatcher, combine, dispatch
from .experts import Experts
from .plan import RoutingPlan, SoftRoutingPlan
from .checks import check_capacity_factor, check_positive_int
from .routing import ExpertChoiceRouter, TopKRouter
from .shared import SharedExperts, check_shared_options, shared_width
from .soft_routing import SoftRouter

__all__ = ["MoeMlp", "moe_layers", "require_moe_layers", "ROUTERS"]

ROUTERS = ("top_k", "expert_choice", "soft")


class _Default:
    """A constructor default that depends on the router type (``repr``: what it resolves to)."""

    def __init__(self, sparse, soft):
        self.sparse, self.soft = sparse, soft

    def resolve(self, router: str):
        return self.soft if router == "soft" else self.sparse

    def __repr__(self) -> str:
        return f"{self.sparse!r} (soft: {self.soft!r})"


_CAPACITY_FACTOR = _Default(1.05, 1.0)
_NOISE_STD = _Default(1.0, 0.0)


class _SparseDefault(_Default):
    """The default of a sparse-only option: a Soft MoE layer refuses the option when it is
    given (whatever its value), not when it differs from the default."""

    def __init__(self, value):
        super().__init__(value, value)

    def __repr__(self) -> str:
        return repr(self.sparse)


# Sparse-only options and their defaults (marked: a Soft MoE layer refuses any that is given).
_SPARSE_ONLY = {k: _SparseDefault(v) for k, v in dict(
    num_selected=2, capacity=None, capacity_multiple_of=4, capacity_rounding="ceil",
    batch_priority=False, renormalize=False, importance_weight=0.005, load_weight=0.005,
    gshard_weight=0.0, zloss_weight=0.0, dispatcher="auto").items()}

# Options of the top-K router only: expert-choice and Soft MoE layers refuse them when given.
_TOP_K_ONLY = {k: _SparseDefault(v) for k, v in dict(score_func="softmax", bias_update_rate=None).items()}


def _round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round float values to bfloat16 (nearest even) and back: the official
    ``Bfloat16Dispatcher``'s cast of the dispatched data and of the expert outputs."""
    return x.to(torch.bfloat16).to(x.dtype) if x.dtype == torch.float32 else x


class MoeMlp(nn.Module):
    """Sparse MoE MLP: ``forward(x: [B, N, d]) -> [B, N, d']``, like timm's ``Mlp``.

    Tokens are flattened in row-major order and cut into routing groups of S tokens (a group
    spans consecutive images, as in the official code). With ``router='soft'`` it is a Soft MoE
    layer (Puigcerver et al. 2023): every slot mixes all tokens of its group, every token mixes
    all slots (``SoftRouter``, ``SoftRoutingPlan``); nothing is dropped and there is no
    auxiliary loss (``aux_loss`` is 0). The last group is padded when B*N is
    not a multiple of S; padding tokens never take a buffer place and never reach the output.
    Buffer capacity is computed from S, so a short batch routes as a full group would.

    After each forward the layer keeps, for the loss, metrics and plots:
        ``aux_loss``: scalar tensor, the weighted sum of the auxiliary losses, averaged over
            groups;
        ``aux_losses``: dict name -> scalar tensor, each loss averaged over groups (unweighted);
        ``last_plan``: the RoutingPlan (detached); a SoftRoutingPlan for a Soft MoE layer.
    Balancing losses (``vmoe.moe.balancing``): with ``aux_loss_mode='backward'`` (the default) the
    aux loss reaches the gradients through the backward pass of the layer output, times
    ``aux_loss_scale`` (default 1.0), in any training loop; ``aux_loss``/``aux_losses`` are then
    detached (for logging: adding them to a loss changes nothing). With ``'manual'`` they keep
    their graph and the loop adds ``aux_loss`` to its loss (``vmoe fit`` does).
    An empty batch (B = 0) returns an empty [0, N, d'] output, as timm's ``Mlp`` does: every
    auxiliary loss is 0 and ``last_plan`` is a plan of 0 groups.

    Args (timm ``Mlp`` ones first): in_features, hidden_features, out_features, act_layer,
        norm_layer (must be None), bias, drop.
    MoE args:
        num_experts: E.
        num_selected: K (top-K router).
        router: 'top_k', 'expert_choice' or 'soft'.
        group_size: tokens per routing group S; or ``group_size_images`` images per group
            (S = images * N). Default: 8 images per group, as the paper (soft: 1 image per
            group, as the Soft MoE paper).
        capacity_factor / capacity / capacity_multiple_of / capacity_rounding / batch_priority /
        noise_std / renormalize / *_weight: see ``TopKRouter``. ``capacity_factor`` defaults
            to 1.05 (soft: 1.0) and ``noise_std`` to 1.0 (soft: 0.0, not divided by E).
    Soft MoE args (``router='soft'``):
        num_slots: P, slots per expert (the paper: 1). If None, P = round(S * capacity_factor /
            E) (half to even, as the official code), which needs ``group_size`` in tokens.
        bf16_dispatch: round the tokens before dispatch and the expert outputs before combine
            to bfloat16, as the official ``Bfloat16Dispatcher`` does (the official Soft MoE
            router always uses it; it works for any router here; default False: float32
            throughout). Use it to reproduce the official logits of imported Soft MoE
            checkpoints to ~3e-4; without it they agree with the official model run without
            its bf16 casts to 1e-5.
        The sparse-only options (num_selected, capacity, capacity_multiple_of,
        capacity_rounding, batch_priority, renormalize, the loss weights, dispatcher) must stay
        at their defaults: any other value raises ValueError naming it.
        dispatcher: 'auto' (default: Triton kernels on CUDA, portable gathers elsewhere),
            'torch' / 'triton' (force a backend), or 'einsum' (the one-hot oracle; slow, for
            tests). See ``vmoe.moe.dispatch``.
        same_init: every expert starts from the same values (paper default).
        expert_gemm: 'bmm' (default) or 'grouped_mm' for the expert GEMMs (see ``Experts``;
            'grouped_mm' needs bf16 autocast and widths that are multiples of 8).
    Top-K only (any other router refuses them): ``score_func`` ('softmax' or 'sigmoid') and
        ``bias_update_rate`` (auxiliary-loss-free balancing), see ``TopKRouter``.
    Shared experts (any router; ``vmoe.moe.shared``):
        shared_experts: n >= 0 dense experts every token passes through (DeepSeek-MoE); the
            output is ``routed(x) + shared(x)``, ``self.shared`` a ``SharedExperts`` (None if 0).
        shared_hidden_features: the shared MLP's width (default n x hidden_features).
        shared_gate: scale the shared output by ``sigmoid(x @ w)`` per token (Qwen-MoE).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Optional[Callable] = None,
        bias: bool = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        *,
        num_experts: int = 8,
        num_selected: int = _SPARSE_ONLY["num_selected"],
        router: str = "top_k",
        group_size: Optional[int] = None,
        group_size_images: Optional[int] = None,
        capacity_factor: Optional[float] = _CAPACITY_FACTOR,
        capacity: Optional[int] = _SPARSE_ONLY["capacity"],
        capacity_multiple_of: Optional[int] = _SPARSE_ONLY["capacity_multiple_of"],
        capacity_rounding: str = _SPARSE_ONLY["capacity_rounding"],
        batch_priority: bool = _SPARSE_ONLY["batch_priority"],
        noise_std: float = _NOISE_STD,
        renormalize: bool = _SPARSE_ONLY["renormalize"],
        importance_weight: float = _SPARSE_ONLY["importance_weight"],
        load_weight: float = _SPARSE_ONLY["load_weight"],
        gshard_weight: float = _SPARSE_ONLY["gshard_weight"],
        zloss_weight: float = _SPARSE_ONLY["zloss_weight"],
        dispatcher: str = _SPARSE_ONLY["dispatcher"],
        same_init: bool = True,
        expert_gemm: str = "bmm",
        num_slots: Optional[int] = None,
        bf16_dispatch: bool = False,
        score_func: str = _TOP_K_ONLY["score_func"],
        bias_update_rate: Optional[float] = _TOP_K_ONLY["bias_update_rate"],
        shared_experts: int = 0,
        shared_hidden_features: Optional[int] = None,
        shared_gate: bool = False,
    ):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got router={router!r}")
        top_k_options = dict(score_func=score_func, bias_update_rate=bias_update_rate)
        if router != "top_k":
            given = [f"{k}={v!r}" for k, v in top_k_options.items() if not isinstance(v, _SparseDefault)]
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise ValueError(f"{', '.join(given)} only {verb} to router='top_k', not to "
                                 f"router={router!r}")
        score_func, bias_update_rate = (v.resolve(router) if isinstance(v, _Default) else v
                                        for v in top_k_options.values())
        check_shared_options(shared_experts, shared_hidden_features, shared_gate)
        if isinstance(capacity_factor, _Default):
            capacity_factor = capacity_factor.resolve(router)
        if isinstance(noise_std, _Default):
            noise_std = noise_std.resolve(router)
        sparse_options = dict(zip(_SPARSE_ONLY, (
            num_selected, capacity, capacity_multiple_of, capacity_rounding, batch_priority, renormalize,
            importance_weight, load_weight, gshard_weight, zloss_weight, dispatcher)))
        (num_selected, capacity, capacity_multiple_of, capacity_rounding, batch_priority, renormalize,
         importance_weight, load_weight, gshard_weight, zloss_weight, dispatcher) = (
            v.resolve(router) if isinstance(v, _Default) else v for v in sparse_options.values())
        if router == "soft":
            sparse = [f"{k}={v!r}" for k, v in sparse_options.items() if not isinstance(v, _SparseDefault)]
            if sparse:
                verb = "applies" if len(sparse) == 1 else "apply"
                raise ValueError(f"{', '.join(sparse)} only {verb} to sparse routers (top_k, "
                                 "expert_choice), not to router='soft'")
        elif num_slots is not None:
            raise ValueError(f"num_slots={num_slots!r} only applies to router='soft' "
                             f"(got router={router!r}; sparse routers use capacity)")
        if not isinstance(bf16_dispatch, bool):
            raise ValueError(f"bf16_dispatch={bf16_dispatch!r} must be a bool")
        if norm_layer is not None:
            raise ValueError("MoeMlp does not support norm_layer inside the MLP (got "
                             f"norm_layer={norm_layer!r}); use a ViT without scale_mlp_norm")
        check_positive_int("in_features", in_features)
        if group_size is not None and group_size_images is not None:
            raise ValueError("give group_size (tokens) or group_size_images, not both: "
                             f"got group_size={group_size}, group_size_images={group_size_images}")
        if group_size is not None:
            check_positive_int("group_size", group_size)
        if group_size_images is not None:
            check_positive_int("group_size_images", group_size_images)
        if group_size is None and group_size_images is None:
            group_size_images = 1 if router == "soft" else 8
        self.in_features = in_features
        self.out_features = out_features or in_features
        self.group_size = group_size
        self.group_size_images = group_size_images
        self.dispatcher = check_dispatcher(dispatcher)
        self.bf16_dispatch = bf16_dispatch
        if router == "soft":
            self.router = SoftRouter(in_features, num_experts, num_slots=num_slots,
                                     capacity_factor=capacity_factor, group_size=group_size,
                                     noise_std=noise_std)
        elif router == "top_k":
            self.router = TopKRouter(
                in_features, num_experts, num_selected, capacity_factor=capacity_factor,
                capacity=capacity, capacity_multiple_of=capacity_multiple_of,
                capacity_rounding=capacity_rounding, batch_priority=batch_priority,
                noise_std=noise_std, renormalize=renormalize,
                importance_weight=importance_weight, load_weight=load_weight,
                gshard_weight=gshard_weight, zloss_weight=zloss_weight, score_func=score_func,
                bias_update_rate=bias_update_rate)
        elif router == "expert_choice":
            self.router = ExpertChoiceRouter(
                in_features, num_experts, capacity_factor=capacity_factor, capacity=capacity,
                capacity_multiple_of=capacity_multiple_of, capacity_rounding=capacity_rounding,
                noise_std=noise_std, zloss_weight=zloss_weight)
        self.experts = Experts(num_experts, in_features, hidden_features, out_features,
                               act_layer=act_layer, bias=bias, drop=drop, same_init=same_init,
                               gemm=expert_gemm)
        self.shared: Optional[SharedExperts] = None
        if shared_experts:
            self.shared = SharedExperts(
                in_features, shared_width(shared_experts, shared_hidden_features,
                                          self.experts.hidden_features),
                out_features, act_layer=act_layer, bias=bias, drop=drop, gate=shared_gate)
        self.aux_loss: Optional[torch.Tensor] = None
        self._aux_loss_mode, self._aux_loss_scale = "backward", 1.0
        self.aux_losses: Dict[str, torch.Tensor] = {}
        self.last_plan: Optional[Union[RoutingPlan, SoftRoutingPlan]] = None

    # --- routing options that evaluation/inference commonly changes -------------------------
    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def capacity_factor(self) -> Optional[float]:
        return self.router.capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float) -> None:
        """Routes with this factor from now on (clears an explicit ``capacity``)."""
        check_capacity_factor(value, allow_none=False)
        self.router.capacity_factor = value
        self.router.capacity = None

    @property
    def num_slots(self) -> Optional[int]:
        """P, slots per expert of a Soft MoE layer (None for sparse routers)."""
        return getattr(self.router, "num_slots", None)

    @property
    def is_soft(self) -> bool:
        """Whether this is a Soft MoE layer (its plans are ``SoftRoutingPlan``)."""
        return isinstance(self.router, SoftRouter)

    @property
    def batch_priority(self) -> bool:
        return self.router.batch_priority

    @batch_priority.setter
    def batch_priority(self, value: bool) -> None:
        self.router.batch_priority = value  # validated there (a bool; False for expert-choice)

    @property
    def noise_std(self) -> float:
        """The router's training noise std before division by E (validated: finite, >= 0)."""
        return self.router.noise_std

    @noise_std.setter
    def noise_std(self, value: float) -> None:
        self.router.noise_std = value

    @property
    def aux_loss_mode(self) -> str:
        """'backward' (aux loss attached to the output's backward) or 'manual' (see ``vmoe.moe.balancing``)."""
        return self._aux_loss_mode

    @aux_loss_mode.setter
    def aux_loss_mode(self, value: str) -> None:
        self._aux_loss_mode = check_aux_loss_mode(value)

    @property
    def aux_loss_scale(self) -> float:
        """The factor the attached aux loss enters the backpropagated loss with ('backward' mode)."""
        return self._aux_loss_scale

    @aux_loss_scale.setter
    def aux_loss_scale(self, value: float) -> None:
        self._aux_loss_scale = check_aux_loss_scale(value)

    def group_size_for(self, tokens_per_image: int) -> int:
        """S, the number of tokens per routing group for images of N tokens."""
        if self.group_size is not None:
            return self.group_size
        return self.group_size_images * tokens_per_image

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, d] -> [B, N, d']."""
        if x.dim() != 3:
            raise ValueError(f"MoeMlp expects input of shape [B, N, d], got shape {tuple(x.shape)}")
        B, N, d = x.shape
        if d != self.in_features:
            raise ValueError(f"MoeMlp input width d={d} differs from in_features={self.in_features}")
        S = self.group_size_for(N)
        T = B * N
        pad = (-T) % S                                   # in [0, S): fills the last group
        G = (T + pad) // S
        tokens = x.reshape(T, d)
        valid = None
        # Skip the padding only when it is known to be 0 without a guard: in eager mode sizes
        # are ints; under torch.export / dynamic shapes a batch-derived ``pad`` stays symbolic
        # and every batch size takes the padded path (same result, no specialization on B).
        if not statically_known_true(pad == 0):
            tokens = F.pad(tokens, (0, 0, 0, pad))
            valid = (torch.arange(G * S, device=x.device) < T).view(G, S)
        tokens = tokens.view(G, S, d)

        if G > 0:
            # plan: [G, S, K] fields (sparse) or [G, S, E, P] weights (soft, with C = P)
            plan, losses = self.router(tokens, valid)
            aux_losses, aux_loss = self._aux_losses(losses, G, x)
            if self.bf16_dispatch:
                tokens = _round_to_bf16(tokens)
            buffers = dispatch(tokens, plan, dispatcher=self.dispatcher)       # [E, G*C, d]
            expert_out = self.experts(buffers)                                 # [E, G*C, d']
            if self.bf16_dispatch:
                expert_out = _round_to_bf16(expert_out)
            if self._aux_loss_mode == "backward" and aux_loss.requires_grad:
                # the aux loss's gradient joins the backward pass here (before combine, a real
                # op: its output may be modified in place, e.g. by timm's LayerScale)
                expert_out = AttachAuxLoss.apply(expert_out, aux_loss, self._aux_loss_scale)
            out = combine(expert_out, plan, dispatcher=self.dispatcher)        # [G, S, d']
            out = out.reshape(G * S, -1)                     # [G*S, d']
            if valid is not None:  # drop the padding rows (split: sizes T and pad, no Min(T, G*S))
                out = out.split([T, pad])[0]                 # [T, d']
        else:
            plan, losses, out = self._route_no_tokens(tokens)  # out: [0, d']
            aux_losses, aux_loss = self._aux_losses(losses, G, x)
        out = out.view(B, N, out.shape[-1]).to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x).to(out.dtype)            # [B, N, d']

        if self._aux_loss_mode == "backward":  # already in the backward pass: for logging only
            aux_losses = {name: value.detach() for name, value in aux_losses.items()}
            aux_loss = aux_loss.detach()
        self.aux_losses, self.aux_loss = aux_losses, aux_loss
        self.last_plan = plan.detach()
        return out

    def _aux_losses(self, losses: Dict[str, torch.Tensor], G: int, x: torch.Tensor
                    ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Per-group losses {name: [G]} -> ({name: scalar}, the weighted sum: float32 scalar).
        No group at all (B = 0) gives 0, not the NaN of an empty mean."""
        weights = self.router.loss_weights()
        means = {name: value.mean() if G > 0 else value.sum() for name, value in losses.items()}
        total = sum((means[name] * weights[name] for name in means if weights.get(name, 0.0) > 0),
                    x.new_zeros((), dtype=torch.float32))
        return means, total

    def _route_no_tokens(self, tokens: torch.Tensor
                         ) -> Tuple[Union[RoutingPlan, SoftRoutingPlan], Dict[str, torch.Tensor],
                                    torch.Tensor]:
        """tokens: [0, S, d] (an empty batch) -> (plan of 0 groups, per-group losses [0], output
        [0, d']). The experts run on zero buffer rows, so the output depends on the input and
        the expert weights and backward works (all gradients zero), as with timm's ``Mlp``.
        Dispatch and combine are skipped: they have no row to move."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # var() over 0 groups; the sum is 0
            plan, losses = self.router(tokens)
        E, d = self.num_experts, tokens.shape[-1]
        rows = tokens.reshape(1, 0, d).expand(E, 0, d)       # [E, 0, d]
        return plan, losses, self.experts(rows)[0]

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this on every submodule: refuse with the supported route."""
        raise RuntimeError(
            "vmoe's MoE layer (MoeMlp) cannot be compiled by TorchScript: its routing uses Python "
            "that TorchScript does not support (and TorchScript is deprecated in PyTorch). "
            "Export with torch.export instead (vmoe.models.export_program(model) for a dynamic "
            "batch), which is also the route to ONNX (vmoe.models.export_onnx, or `vmoe export "
            "--format onnx`); use torch.compile(model) for speed.")

    def extra_repr(self) -> str:
        groups = (f"group_size={self.group_size}" if self.group_size is not None
                  else f"group_size_images={self.group_size_images}")
        if self.is_soft:
            return f"{groups}, bf16_dispatch={self.bf16_dispatch}"
        return f"{groups}, dispatcher={self.dispatcher!r}"


def moe_layers(model: nn.Module) -> "OrderedDict[str, MoeMlp]":
    """Every ``MoeMlp`` in ``model`` by module name (e.g. ``"blocks.1.mlp"``), in module order;
    empty for a model without MoE layers."""
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, MoeMlp))


def require_moe_layers(model: nn.Module) -> "OrderedDict[str, MoeMlp]":
    """``moe_layers(model)``, or ValueError naming the model's type when it has none (TypeError
    when ``model`` is not an ``nn.Module``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers (no vmoe.moe.MoeMlp module): "
                         "replace some MLPs by MoeMlp first (vmoe.models.moeify)")
    return layers
