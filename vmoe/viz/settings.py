"""Temporarily change the routing options of MoE layers, restoring them even on error."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

from vmoe.moe import ExpertChoiceRouter, MoeMlp

__all__ = ["routing_settings"]


@contextlib.contextmanager
def routing_settings(layers: Dict[str, MoeMlp], capacity_factor: Optional[float] = None,
                     batch_priority: Optional[bool] = None) -> Iterator[None]:
    """Set ``capacity_factor`` and/or ``batch_priority`` on every layer for the ``with`` body.

    The routers' ``capacity_factor``, explicit ``capacity`` (cleared by the capacity_factor
    setter) and ``batch_priority`` are put back exactly as they were on exit, error or not.
    ``batch_priority=True`` on an expert-choice layer raises ValueError (it has no priority).
    """
    saved = {name: (m.router.capacity_factor, m.router.capacity, m.router.batch_priority)
             for name, m in layers.items()}
    try:
        for name, m in layers.items():
            if capacity_factor is not None:
                m.capacity_factor = capacity_factor  # validates the value
            if batch_priority is not None:
                if batch_priority and isinstance(m.router, ExpertChoiceRouter):
                    raise ValueError(f"batch_priority=True does not apply to layer {name!r}: "
                                     "it uses expert-choice routing")
                m.batch_priority = batch_priority
        yield
    finally:
        for name, m in layers.items():
            m.router.capacity_factor, m.router.capacity, m.router.batch_priority = saved[name]
