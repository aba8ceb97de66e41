"""Expert buffer capacity, computed exactly as the official V-MoE code does."""

from __future__ import annotations

import math
from typing import Optional

from .checks import check_capacity_factor, check_capacity_multiple_of

__all__ = ["compute_capacity"]


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    ceil_or_round: str = "ceil",
    multiple_of: Optional[int] = 4,
) -> int:
    """Returns the buffer size C of each expert for one routing group.

    ``C = ceil(num_tokens * capacity_factor / num_experts)`` (or ``round``), evaluated in Python
    floats in exactly that order (so ``200 * 1.1 / 4 = 55.00000000000001`` ceils to 56, as in the
    official code), then rounded *up* to a multiple of ``multiple_of`` (``None`` or ``0``
    disables the rounding).

    For top-K routing pass ``num_tokens = S * K`` (the capacity counts K); for expert-choice
    routing pass ``num_tokens = S``.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got num_experts={num_experts}")
    check_capacity_factor(capacity_factor, allow_none=False)
    check_capacity_multiple_of(multiple_of)
    raw = num_tokens * capacity_factor / num_experts
    if ceil_or_round == "ceil":
        capacity = int(math.ceil(raw))
    elif ceil_or_round == "round":
        capacity = int(round(raw))
    else:
        raise ValueError(
            f"ceil_or_round must be 'ceil' or 'round', got ceil_or_round={ceil_or_round!r}"
        )
    if capacity < 1:
        raise ValueError(
            f"capacity rounds to {capacity} (< 1) for num_tokens={num_tokens}, "
            f"num_experts={num_experts}, capacity_factor={capacity_factor}, "
            f"ceil_or_round={ceil_or_round!r}: use a larger capacity_factor or group size"
        )
    if multiple_of:
        capacity += (-capacity) % multiple_of
    return capacity
