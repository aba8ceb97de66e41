"""Argument checks for the MoE layer's settings, shared by the routers and ``MoeMlp`` (whose
setters ``vmoe.moe.settings`` goes through): each raises one clear error naming the setting, its
value and what is expected (e.g. ``capacity=0 must be None or an integer >= 1``)."""
from __future__ import annotations

import math
import numbers

__all__ = ["check_positive_int", "check_capacity", "check_capacity_factor", "check_batch_priority",
           "check_noise_std"]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    """``value`` must be an int (not a bool) >= ``minimum``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")


def check_capacity(value) -> None:
    """An explicit buffer size per expert and group: None (use the capacity factor) or an int >= 1."""
    if value is not None and not (_is_int(value) and value >= 1):
        raise ValueError(f"capacity={value!r} must be None or an integer >= 1")


def check_capacity_factor(value, allow_none: bool = True) -> None:
    """A finite number > 0 (or None where an explicit capacity may take its place)."""
    if value is None and allow_none:
        return
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"capacity_factor={value!r} must be a finite number > 0"
                         + (" or None" if allow_none else ""))


def check_batch_priority(value) -> None:
    """Batch Priority Routing on or off: True or False (not a string or a number)."""
    if not isinstance(value, bool):
        raise ValueError(f"batch_priority={value!r} must be a bool (True or False)")


def check_noise_std(value) -> None:
    """Router training noise (std before division by E): a finite number >= 0."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"noise_std={value!r} must be a finite number >= 0")
