"""Auxiliary balancing losses of the V-MoE router, computed per routing group.

Every function takes tensors with a leading group axis G and returns one value per group,
shape [G]; the layer averages over groups, as the official trainer does. ``valid`` ([G, S]
bool, optional) excludes padding tokens. Standard deviations are population (ddof=0) ones.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["importance_loss", "load_loss", "gshard_loss", "router_z_loss"]


def _token_weight(valid: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """[G, S, 1] float: 1 for real tokens, 0 for padding."""
    if valid is None:
        return torch.ones(like.shape[:2] + (1,), dtype=like.dtype, device=like.device)
    return valid.to(like.dtype).unsqueeze(-1)


def _masked_mean_over_tokens(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[G, S, E] -> [G, E], the mean over real tokens only."""
    return (values * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def _cv_squared(values: torch.Tensor) -> torch.Tensor:
    """[G, E] -> [G]: (population std / mean)^2, written as var / mean^2 (finite gradient at 0)."""
    mean = values.mean(-1)
    var = values.var(-1, unbiased=False)
    return var / mean.square()


def importance_loss(gates: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CV^2 of the importance ``I_e = sum_s gates[g, s, e]``. gates: [G, S, E] -> [G].

    The official router computes it on the clean (noise-free) gates, also in training.
    """
    importance = (gates * _token_weight(valid, gates)).sum(1)
    return _cv_squared(importance)


def gshard_loss(gates: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GShard's ``E^2 * mean_e(fraction routed top-1 to e * mean gate of e)``. [G, S, E] -> [G].

    In training the official router applies it to the noisy gates.
    """
    num_experts = gates.shape[-1]
    weight = _token_weight(valid, gates)
    mean_gate = _masked_mean_over_tokens(gates, weight)
    top1 = gates.argmax(-1, keepdim=True)
    top1_one_hot = torch.zeros_like(gates).scatter_(-1, top1, 1.0)
    fraction_top1 = _masked_mean_over_tokens(top1_one_hot, weight)
    return (fraction_top1 * mean_gate).mean(-1) * num_experts**2


def load_loss(
    logits: torch.Tensor,
    noisy_logits: torch.Tensor,
    noise_std: float,
    num_selected: int,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CV^2 of each expert's probability of being selected if the noise were drawn again.

    Args:
        logits: [G, S, E] clean gating logits.
        noisy_logits: [G, S, E] the logits plus the noise that was actually drawn.
        noise_std: the *effective* std of that noise (the router's noise_std / E).
        num_selected: K. The threshold of token s is its K-th largest noisy logit.
        valid: [G, S] bool, False for padding tokens.

    Returns:
        [G]. ``P_e = mean_s (1 - Phi((t_s - logits[s, e]) / noise_std))`` over all experts, the
        selected ones too, then ``var(P) / mean(P)^2``.
    """
    threshold = noisy_logits.topk(num_selected, dim=-1).values[..., -1:]
    noise_required_to_win = (threshold - logits) / noise_std
    probability = 1.0 - torch.special.ndtr(noise_required_to_win)
    p_mean = _masked_mean_over_tokens(probability, _token_weight(valid, logits))
    return _cv_squared(p_mean)


def router_z_loss(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``. [G, S, E] -> [G]."""
    z = torch.logsumexp(logits, dim=-1, keepdim=True).square()
    return _masked_mean_over_tokens(z, _token_weight(valid, logits)).squeeze(-1)
