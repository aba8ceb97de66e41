"""VisionTransformerMoe: timm's VisionTransformer + the paper's representation layer + MoE blocks.

The V-MoE paper's ViTs differ from timm's defaults in two places this class adds: an optional
representation ("pre_logits") layer ``tanh(Linear(d, r))`` before the head, and a head bias
that can start at ``-log(num_classes)`` (the paper trains with sigmoid cross-entropy). Everything
else (patch embedding, class token, learned position embedding, pre-LN blocks with LayerNorm
eps 1e-6, final norm, token pooling) is timm's ``VisionTransformer``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_module
from timm.models.vision_transformer import VisionTransformer

from ..moe import MoeMlp
from .moeify import MoeifyConfig, moeify

__all__ = ["VisionTransformerMoe"]

# torch.fx cannot trace the routing (checks and branches on sizes, per-layer bookkeeping): the MoE
# layer is a leaf of timm's FX tracer (timm's answer for such modules), so features_only with
# feature_cls="fx" and timm's/torchvision's create_feature_extractor work. A leaf runs eagerly,
# so the traced model still keeps aux losses and plans on its (shared) MoeMlp modules.
register_notrace_module(MoeMlp)


class VisionTransformerMoe(VisionTransformer):
    """A timm ``VisionTransformer`` whose chosen MLP blocks are sparse MoE blocks.

    Args:
        representation_size: size r of the tanh pre-logits layer (None: no such layer).
        head_bias_init: initial value of every head bias (the paper: ``-log(num_classes)``;
            None keeps timm's zero init).
        moe: placement and MoE options passed to ``moeify``, flat (e.g. ``dict(every=2,
            num_experts=8, num_selected=2)``, or ``dict(last=..., router='soft', num_slots=1)``
            for Soft MoE) or nested (``dict(every=2, num_experts=8, router=dict(name='top_k',
            num_selected=2))``), or a ``MoeifyConfig``; None builds a dense ViT.
        qk_norm_bias: with timm's ``qk_norm=True``, whether the q/k LayerNorms have a bias
            (timm: yes; the official Soft MoE ViTs' ``normalize_qk``: no, a scale only).
        **vit_kwargs: timm ``VisionTransformer`` arguments (img_size, patch_size, embed_dim,
            depth, num_heads, mlp_ratio, num_classes, global_pool, class_token, act_layer, ...).
    """

    def __init__(
        self,
        representation_size: Optional[int] = None,
        head_bias_init: Optional[float] = None,
        moe: Optional[Union[dict, MoeifyConfig]] = None,
        qk_norm_bias: bool = True,
        **vit_kwargs: Any,
    ):
        super().__init__(**vit_kwargs)
        if not qk_norm_bias:
            self._drop_qk_norm_bias()
        self.representation_size = representation_size
        self.head_hidden_size = (
            representation_size or self.embed_dim
        )  # forward_head(pre_logits=True)
        if representation_size:
            self.pre_logits = nn.Sequential(
                OrderedDict(fc=nn.Linear(self.embed_dim, representation_size), act=nn.Tanh())
            )
        else:
            self.pre_logits = nn.Identity()
        self.head_bias_init = head_bias_init
        self._reset_head()
        if isinstance(moe, MoeifyConfig):
            moe.apply(self)
        elif moe:
            moeify(self, **moe)

    def _drop_qk_norm_bias(self) -> None:
        """q/k LayerNorms with a scale and no bias (same eps), as the official ``normalize_qk``."""
        for block in self.blocks:
            for name in ("q_norm", "k_norm"):
                norm = getattr(block.attn, name)
                if not isinstance(norm, nn.LayerNorm):
                    raise ValueError("qk_norm_bias=False needs qk_norm=True (LayerNorm q/k norms)")
                setattr(
                    block.attn,
                    name,
                    nn.LayerNorm(
                        norm.normalized_shape,
                        eps=norm.eps,
                        bias=False,
                        device=norm.weight.device,
                        dtype=norm.weight.dtype,
                    ),
                )

    def _reset_head(self) -> None:
        width = self.representation_size or self.embed_dim
        if self.num_classes > 0:
            self.head = nn.Linear(width, self.num_classes)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.constant_(
                self.head.bias, 0.0 if self.head_bias_init is None else self.head_bias_init
            )
        else:
            self.head = nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if self.head_bias_init is not None and num_classes > 0:
            self.head_bias_init = -math.log(num_classes)
        self._reset_head()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: [B, N, d] tokens after the final norm -> [B, num_classes] (or [B, r] pre-logits)."""
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)
