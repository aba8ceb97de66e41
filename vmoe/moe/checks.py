"""Argument checks for the MoE layer's options, one function per rule, shared by the configs
(``vmoe.moe.config``), the routers and ``RoutingSettings``: each raises one clear error naming
the option, its value and what is expected (e.g. ``capacity=0 must be None or an integer >= 1``).
Messages start with the option's name, so a config can prefix its path (``moe.router.``)."""

from __future__ import annotations

import math
import numbers
from typing import Iterable

__all__ = [
    "check_positive_int",
    "check_optional_positive_int",
    "check_capacity",
    "check_capacity_factor",
    "check_capacity_multiple_of",
    "check_capacity_rounding",
    "check_batch_priority",
    "check_bool",
    "check_noise_std",
    "check_loss_weight",
    "check_choice",
    "check_num_selected_fits",
    "check_bias_update_rate",
    "check_shared_experts",
    "CAPACITY_ROUNDINGS",
]

#: How ``compute_capacity`` rounds S*K*cf/E: the official 'ceil' or 'round'.
CAPACITY_ROUNDINGS = ("ceil", "round")


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


def check_optional_positive_int(name: str, value, minimum: int = 1) -> None:
    """None, or an int (not a bool) >= ``minimum``."""
    if value is not None:
        check_positive_int(name, value, minimum)


def check_capacity(value) -> None:
    """An explicit buffer size per expert and group: None (use the capacity factor) or an
    int >= 1."""
    if value is not None and not (_is_int(value) and value >= 1):
        raise ValueError(f"capacity={value!r} must be None or an integer >= 1")


def check_capacity_factor(value, allow_none: bool = True) -> None:
    """A finite number > 0 (or None where an explicit capacity may take its place)."""
    if value is None and allow_none:
        return
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(
            f"capacity_factor={value!r} must be a finite number > 0"
            + (" or None" if allow_none else "")
        )


def check_capacity_multiple_of(value) -> None:
    """Round C up to a multiple of this: None or an int >= 0 (0: no rounding)."""
    if value is not None and not (_is_int(value) and value >= 0):
        raise ValueError(f"capacity_multiple_of={value!r} must be None or an integer >= 0")


def check_capacity_rounding(value) -> None:
    """'ceil' (official default) or 'round'."""
    check_choice("capacity_rounding", value, CAPACITY_ROUNDINGS)


def check_bool(name: str, value) -> None:
    """True or False (not a string or a number)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a bool (True or False)")


def check_batch_priority(value) -> None:
    """Batch Priority Routing on or off: True or False (not a string or a number)."""
    check_bool("batch_priority", value)


def check_noise_std(value) -> None:
    """Router training noise (std before division by E): a finite number >= 0."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"noise_std={value!r} must be a finite number >= 0")


def check_loss_weight(name: str, value) -> None:
    """An auxiliary loss weight: a finite number >= 0 (0: the loss is off)."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")


def check_choice(name: str, value, choices: Iterable[str]) -> None:
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")


def check_num_selected_fits(num_selected: int, num_experts: int) -> None:
    """K experts per token out of E: K <= E."""
    if num_selected > num_experts:
        raise ValueError(
            f"num_selected (K) must be <= num_experts={num_experts}, "
            f"got num_selected={num_selected}"
        )


def check_bias_update_rate(value) -> None:
    """Auxiliary-loss-free balancing's rate: None (off) or a finite number > 0."""
    if value is None:
        return
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(
            f"bias_update_rate={value!r} must be None (off) or a finite number > 0 "
            "(DeepSeek-V3 / torchtitan / Megatron-Core use 1e-3)"
        )


def check_shared_experts(shared_experts, shared_hidden_features, shared_gate) -> None:
    """``shared_experts``: an int >= 0; ``shared_hidden_features``: None or an int >= 1, only
    with ``shared_experts`` >= 1; ``shared_gate``: a bool, True only with shared experts."""
    check_positive_int("shared_experts", shared_experts, minimum=0)
    if shared_hidden_features is not None:
        if shared_experts == 0:
            raise ValueError(
                f"shared_hidden_features={shared_hidden_features!r} needs "
                "shared_experts >= 1 (got shared_experts=0)"
            )
        check_positive_int("shared_hidden_features", shared_hidden_features)
    check_bool("shared_gate", shared_gate)
    if shared_gate and shared_experts == 0:
        raise ValueError("shared_gate=True needs shared_experts >= 1 (got shared_experts=0)")
