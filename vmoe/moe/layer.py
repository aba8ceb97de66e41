"""MoeMlp: a sparse Mixture-of-Experts drop-in replacement for timm's ``Mlp``."""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .balancing import AttachAuxLoss, check_aux_loss_mode, check_aux_loss_scale
from .checks import check_capacity_factor, check_positive_int
from .config import ROUTER_CONFIGS, MoeLayerConfig
from .dispatch import combine, dispatch
from .dropless import run_dropless
from .experts import Experts
from .plan import RoutingPlan, SoftRoutingPlan
from .shared import SharedExperts, shared_width

__all__ = ["MoeMlp", "moe_layers", "require_moe_layers", "ROUTERS"]

ROUTERS = tuple(ROUTER_CONFIGS)  # ("top_k", "expert_choice", "soft")


def _round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round float values to bfloat16 (nearest even) and back: the official
    ``Bfloat16Dispatcher``'s cast of the dispatched data and of the expert outputs."""
    return x.to(torch.bfloat16).to(x.dtype) if x.dtype == torch.float32 else x


class MoeMlp(nn.Module):
    """Sparse (or Soft) MoE MLP, a drop-in for timm's ``Mlp``: ``[B, N, d] -> [B, N, d']``.

    Args:
        in_features: d, the token width.
        hidden_features: Width of each expert's hidden layer (default ``in_features``).
        out_features: d', the output width (default ``in_features``).
        act_layer: The experts' activation.
        norm_layer: Must be None (timm's ``scale_mlp_norm`` is not supported).
        bias: Whether the expert layers have biases.
        drop: Expert dropout: one rate, or (after the activation, after the output layer).
        config: A ``MoeLayerConfig``, or its dict (nested or flat).
        **options: The flat keyword form of ``config`` (``num_experts=8, num_selected=2,
            router="soft", ...``: the fields of ``MoeLayerConfig`` and of the router's config).

    Attributes:
        aux_loss: After a forward, the weighted sum of the auxiliary losses (scalar).
        aux_losses: After a forward, ``{name: scalar}``, unweighted.
        last_plan: After a forward, the detached ``RoutingPlan`` or ``SoftRoutingPlan``.
        shared: The ``SharedExperts`` when ``config.shared_experts >= 1``, else None.

    Raises:
        ValueError: ``config`` and ``**options`` both given, a ``norm_layer``, or a bad option
            (named in the message).
        TypeError: An option of the wrong type.

    See the guide [The MoE layer](../guides/moe-layer.md) for grouping, capacity,
    auxiliary losses and Soft MoE.
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
        config: Optional[Union[MoeLayerConfig, Mapping[str, Any]]] = None,
        **options: Any,
    ):
        super().__init__()
        if config is not None and options:
            raise ValueError(
                f"give config or the flat options, not both (got config and {', '.join(options)})"
            )
        config = MoeLayerConfig.from_dict(options if config is None else config)
        if norm_layer is not None:
            raise ValueError(
                "MoeMlp does not support norm_layer inside the MLP (got "
                f"norm_layer={norm_layer!r}); use a ViT without scale_mlp_norm"
            )
        check_positive_int("in_features", in_features)
        self.in_features = in_features
        self.out_features = out_features or in_features
        self.group_size = config.group_size
        self.group_size_images = config.resolved_group_size_images
        self.dispatcher = getattr(config.router, "dispatcher", "auto")
        self.bf16_dispatch = config.bf16_dispatch
        self.router = config.router.build(in_features, config.num_experts, config.group_size)
        self.experts = Experts(
            config.num_experts,
            in_features,
            hidden_features,
            out_features,
            act_layer=act_layer,
            bias=bias,
            drop=drop,
            same_init=config.same_init,
            gemm=config.expert_gemm,
        )
        self._same_init = config.same_init
        self.shared: Optional[SharedExperts] = None
        if config.shared_experts:
            self.shared = SharedExperts(
                in_features,
                shared_width(
                    config.shared_experts,
                    config.shared_hidden_features,
                    self.experts.hidden_features,
                ),
                out_features,
                act_layer=act_layer,
                bias=bias,
                drop=drop,
                gate=config.shared_gate,
            )
        self._shared_options = (config.shared_experts, config.shared_hidden_features)
        self.aux_loss: Optional[torch.Tensor] = None
        self._aux_loss_mode, self._aux_loss_scale = "backward", 1.0
        self.aux_losses: Dict[str, torch.Tensor] = {}
        self.last_plan: Optional[Union[RoutingPlan, SoftRoutingPlan]] = None

    @property
    def config(self) -> MoeLayerConfig:
        """The ``MoeLayerConfig`` this layer routes with now: its router's config (evaluation
        settings included, a Soft MoE router's derived ``num_slots`` too), group size, dispatcher
        and expert GEMM as they are set on the layer."""
        router = self.router.config
        if getattr(router, "dispatcher", self.dispatcher) != self.dispatcher:
            router = router.replace(dispatcher=self.dispatcher)
        return MoeLayerConfig(
            num_experts=self.router.num_experts,
            router=router,
            group_size=self.group_size,
            group_size_images=self.group_size_images if self.group_size is None else None,
            same_init=self._same_init,
            expert_gemm=self.experts.gemm,
            bf16_dispatch=self.bf16_dispatch,
            shared_experts=self._shared_options[0],
            shared_hidden_features=self._shared_options[1],
            shared_gate=self.shared is not None and self.shared.gate is not None,
        )

    # --- routing options that evaluation/inference commonly changes -------------------------
    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def capacity_factor(self) -> Optional[float]:
        return self.router.capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float) -> None:
        """Routes with this factor from now on (clears an explicit ``capacity``; in eval mode
        the capacity path runs, ``dropless`` becomes False)."""
        check_capacity_factor(value, allow_none=False)
        settings = self.router.config.routing_settings()
        self.router.apply_routing(
            dataclasses.replace(settings, capacity_factor=value, capacity=None, dropless=False)
        )

    @property
    def dropless(self) -> bool:
        """Whether eval-mode forwards run dropless (top-K routers; default True)."""
        return bool(getattr(self.router.config, "dropless", False))

    @dropless.setter
    def dropless(self, value: bool) -> None:
        settings = self.router.config.routing_settings()
        self.router.apply_routing(dataclasses.replace(settings, dropless=value))

    @property
    def routes_dropless(self) -> bool:
        """Whether the next forward takes the dropless path: eval mode and ``dropless``."""
        return self.dropless and not self.training

    @property
    def num_slots(self) -> Optional[int]:
        """P, slots per expert of a Soft MoE layer (None for sparse routers)."""
        return getattr(self.router, "num_slots", None)

    @property
    def is_soft(self) -> bool:
        """Whether this is a Soft MoE layer (its plans are ``SoftRoutingPlan``)."""
        return self.router.config.is_soft

    @property
    def batch_priority(self) -> bool:
        return self.router.batch_priority

    @batch_priority.setter
    def batch_priority(self, value: bool) -> None:
        self.router.batch_priority = (
            value  # validated by its config (a bool; False for expert-choice)
        )

    @property
    def noise_std(self) -> float:
        """The router's training noise std before division by E (validated: finite, >= 0)."""
        return self.router.noise_std

    @noise_std.setter
    def noise_std(self, value: float) -> None:
        self.router.noise_std = value

    @property
    def aux_loss_mode(self) -> str:
        """'backward' (aux loss attached to the output's backward) or 'manual' (the training
        loop adds it)."""
        return self._aux_loss_mode

    @aux_loss_mode.setter
    def aux_loss_mode(self, value: str) -> None:
        self._aux_loss_mode = check_aux_loss_mode(value)

    @property
    def aux_loss_scale(self) -> float:
        """The factor the attached aux loss enters the backward with ('backward' mode)."""
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
        """x: [B, N, d] -> [B, N, d'].

        Training, and eval mode with ``dropless=False``: the capacity path (group, route,
        dispatch into [E, G*C, d] buffers, experts, combine). Eval mode with ``dropless`` (the
        default of top-K layers): the same routing with nothing dropped, each expert run on
        exactly its tokens (``vmoe.moe.dropless``): K*T rows, no padding, batch-independent.
        Under ``torch.export`` the layer traces size-obliviously (a dynamic batch needs no
        guard on the number of groups) and keeps no tensor attribute (``aux_loss``,
        ``aux_losses``, ``last_plan`` stay as they were).
        """
        if x.dim() != 3:
            raise ValueError(f"MoeMlp expects input of shape [B, N, d], got shape {tuple(x.shape)}")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MoeMlp input width d={x.shape[-1]} differs from in_features={self.in_features}"
            )
        if torch.compiler.is_exporting():
            from torch.fx.experimental import _config as shape_config

            with shape_config.patch(backed_size_oblivious=True):
                return self._export_forward(x)
        out, plan, aux_losses, aux_loss = self._forward(x)
        if self._aux_loss_mode == "backward":  # already in the backward pass: for logging only
            aux_losses = {name: value.detach() for name, value in aux_losses.items()}
            aux_loss = aux_loss.detach()
        self.aux_losses, self.aux_loss = aux_losses, aux_loss
        self.last_plan = plan.detach()
        return out

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The traced forward of ``torch.export``: the dropless path needs no group, plan or
        loss (an artifact returns logits only); the capacity path as in eager."""
        B, N, d = x.shape
        if self.routes_dropless and getattr(self.experts, "runs_sorted_rows", False) and B * N > 0:
            tokens = x.reshape(B * N, d)
            expert_index, weight = self.router.select_tokens(tokens)
            out = self._run_dropless(tokens, expert_index, weight)
            return self._add_shared(out.view(B, N, -1).to(x.dtype), x)
        return self._forward(x)[0]

    def _run_dropless(self, tokens, expert_index, weight) -> torch.Tensor:
        """tokens [T, d], expert_index / weight [T, K] -> [T, d'] (``vmoe.moe.dropless``)."""
        return run_dropless(
            tokens,
            expert_index,
            weight,
            self.experts,
            _round_to_bf16 if self.bf16_dispatch else None,
        )

    def _add_shared(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            out = out + self.shared(x).to(out.dtype)  # [B, N, d']
        return out

    def _forward(self, x: torch.Tensor):
        """x: [B, N, d] -> (out [B, N, d'], plan, {name: loss}, weighted aux loss)."""
        B, N, d = x.shape
        S = self.group_size_for(N)
        T = B * N
        pad = (-T) % S  # in [0, S): fills the last group
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
            if (
                getattr(plan, "dropless", False)
                and getattr(self.experts, "runs_sorted_rows", False)
                and not torch.compiler.is_compiling()
            ):
                # every valid assignment kept: the experts run on exactly those rows (the
                # plan's first T tokens; the padding of the last group never runs). Under
                # torch.compile the plan (C = S) goes through the static-shape buffers instead:
                # the same result without data-dependent sizes (fullgraph=True works).
                K = plan.num_selected
                expert_index = plan.expert_index.reshape(G * S, K)
                weight = plan.combine_weight.reshape(G * S, K)
                if valid is not None:
                    expert_index, weight = expert_index[:T], weight[:T]
                out = self._run_dropless(x.reshape(T, d), expert_index, weight)
                if self._aux_loss_mode == "backward" and aux_loss.requires_grad:
                    out = AttachAuxLoss.apply(out, aux_loss, self._aux_loss_scale)  # as below
                return (
                    self._add_shared(out.view(B, N, -1).to(x.dtype), x),
                    plan,
                    aux_losses,
                    aux_loss,
                )
            if self.bf16_dispatch:
                tokens = _round_to_bf16(tokens)
            buffers = dispatch(tokens, plan, dispatcher=self.dispatcher)  # [E, G*C, d]
            expert_out = self.experts(buffers)  # [E, G*C, d']
            if self.bf16_dispatch:
                expert_out = _round_to_bf16(expert_out)
            if (
                self._aux_loss_mode == "backward"
                and aux_loss.requires_grad
                and not torch.compiler.is_exporting()
            ):
                # the aux loss's gradient joins the backward pass here (before combine, a real
                # op: its output may be modified in place, e.g. by timm's LayerScale)
                expert_out = AttachAuxLoss.apply(expert_out, aux_loss, self._aux_loss_scale)
            out = combine(expert_out, plan, dispatcher=self.dispatcher)  # [G, S, d']
            out = out.reshape(G * S, -1)  # [G*S, d']
            if valid is not None:  # drop the padding rows (split: sizes T and pad, no Min(T, G*S))
                out = out.split([T, pad])[0]  # [T, d']
        else:
            plan, losses, out = self._route_no_tokens(tokens)  # out: [0, d']
            aux_losses, aux_loss = self._aux_losses(losses, G, x)
        out = out.view(B, N, out.shape[-1]).to(x.dtype)
        return self._add_shared(out, x), plan, aux_losses, aux_loss

    def _aux_losses(
        self, losses: Dict[str, torch.Tensor], G: int, x: torch.Tensor
    ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Per-group losses {name: [G]} -> ({name: scalar}, the weighted sum: float32 scalar).
        No group at all (B = 0) gives 0, not the NaN of an empty mean."""
        weights = self.router.loss_weights()
        means = {name: value.mean() if G > 0 else value.sum() for name, value in losses.items()}
        total = sum(
            (means[name] * weights[name] for name in means if weights.get(name, 0.0) > 0),
            x.new_zeros((), dtype=torch.float32),
        )
        return means, total

    def _route_no_tokens(
        self, tokens: torch.Tensor
    ) -> Tuple[Union[RoutingPlan, SoftRoutingPlan], Dict[str, torch.Tensor], torch.Tensor]:
        """tokens: [0, S, d] (an empty batch) -> (plan of 0 groups, per-group losses [0], output
        [0, d']). The experts run on zero buffer rows, so the output depends on the input and
        the expert weights and backward works (all gradients zero), as with timm's ``Mlp``.
        Dispatch and combine are skipped: they have no row to move."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # var() over 0 groups; the sum is 0
            plan, losses = self.router(tokens)
        E, d = self.num_experts, tokens.shape[-1]
        rows = tokens.reshape(1, 0, d).expand(E, 0, d)  # [E, 0, d]
        return plan, losses, self.experts(rows)[0]

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this on every submodule: refuse with the supported route."""
        raise RuntimeError(
            "vmoe's MoE layer (MoeMlp) cannot be compiled by TorchScript: its routing uses Python "
            "that TorchScript does not support (and TorchScript is deprecated in PyTorch). "
            "Export with torch.export instead (vmoe.models.export_program(model) for a dynamic "
            "batch), which is also the route to ONNX (vmoe.models.export_onnx, or `vmoe export "
            "--format onnx`); use torch.compile(model) for speed."
        )

    def extra_repr(self) -> str:
        groups = (
            f"group_size={self.group_size}"
            if self.group_size is not None
            else f"group_size_images={self.group_size_images}"
        )
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
        raise ValueError(
            f"{type(model).__name__} has no MoE layers (no vmoe.moe.MoeMlp module): "
            "replace some MLPs by MoeMlp first (vmoe.models.moeify)"
        )
    return layers
