"""The routing settings of MoE layers: read them, change them, put them back.

Evaluation routes with other settings than training (the paper trains at capacity factor 1.05
and evaluates at 4.0; Batch Priority Routing lets inference run below 1.0). A top-K layer in
eval mode routes dropless by default (every token on its K experts, no capacity); giving a
``capacity_factor`` here selects the capacity path at that factor (``dropless=False``).
Training, the capacity sweep, the routing pictures and save/load all go through this module:

    with routing_settings(model, capacity_factor=4.0):      # capacity path, restored on exit
        logits = model(images)
    with routing_settings(model, dropless=True):            # back to the dropless default
    previous = set_routing(model, batch_priority=True)      # {layer: RoutingSettings}
    restore_routing(model, previous)

``target`` is a model (it must hold at least one ``MoeMlp``) or a mapping ``{name: MoeMlp}``
(e.g. a subset of ``moe_layers(model)``). One writer: every change goes through
``RoutingSettings`` (validated at construction) and ``router.apply_routing``, which replaces the
router's config by ``config.with_routing(settings)`` (the router type decides what it accepts: a
Soft MoE router none but its own); a bad value raises and leaves every layer as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterable, Iterator, Mapping, Optional, Union

import torch.nn as nn

from .checks import check_capacity_factor
from .config import RoutingSettings
from .layer import MoeMlp, require_moe_layers

__all__ = [
    "EVAL_CAPACITY_FACTOR",
    "RoutingSettings",
    "read_routing",
    "set_routing",
    "restore_routing",
    "routing_settings",
]

Layers = Union[nn.Module, Mapping[str, MoeMlp]]

#: The paper's evaluation capacity factor (4.0): what ``vmoe fit`` / ``vmoe export`` evaluated
#: with before dropless inference became the default; pass it to select the capacity path.
EVAL_CAPACITY_FACTOR = 4.0


def _layers(target: Layers, names: Optional[Iterable[str]] = None) -> Dict[str, MoeMlp]:
    """``{name: MoeMlp}`` of ``target`` (a model with MoE layers, or such a mapping), restricted
    to ``names`` (ValueError for a name that is not one of its MoE layers)."""
    layers = dict(target) if isinstance(target, Mapping) else dict(require_moe_layers(target))
    if names is None:
        return layers
    names = list(names)
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"unknown MoE layers {unknown}; the model has {list(layers)}")
    return {n: layers[n] for n in names}


def read_routing(target: Layers) -> Dict[str, RoutingSettings]:
    """``{layer: RoutingSettings}`` of every MoE layer of ``target``, in module order."""
    return {name: RoutingSettings.of(layer) for name, layer in _layers(target).items()}


def restore_routing(
    target: Layers, settings: Mapping[str, Union[RoutingSettings, Mapping[str, object]]]
) -> None:
    """Apply ``{layer: settings}`` (``RoutingSettings`` or their dicts, as ``read_routing``,
    ``set_routing`` and ``config.json`` give them) to the named MoE layers of ``target``, all or
    none: a value the router refuses, or an unknown layer name, raises ValueError and changes
    nothing."""
    layers = _layers(target, settings)
    wanted = {
        name: s if isinstance(s, RoutingSettings) else RoutingSettings.from_dict(s)
        for name, s in settings.items()
    }
    for name, s in wanted.items():  # every router checks its settings before any changes
        layers[name].router.config.with_routing(s)
    for name, s in wanted.items():
        s.apply(layers[name])


def set_routing(
    target: Layers,
    capacity_factor: Optional[float] = None,
    batch_priority: Optional[bool] = None,
    layers: Optional[Iterable[str]] = None,
    dropless: Optional[bool] = None,
) -> Dict[str, RoutingSettings]:
    """Set ``capacity_factor`` (a finite number > 0; clears an explicit ``capacity`` and selects
    the capacity path in eval mode, ``dropless=False``, unless ``dropless`` is given too),
    ``batch_priority`` and/or ``dropless`` (eval mode without capacity: top-K layers only) on
    every MoE layer of ``target`` (or the ``layers`` named); None keeps a setting. All or none:
    a bad value raises ValueError and changes nothing (``batch_priority=True`` names the
    expert-choice and soft layers, which have no priority; ``dropless=True`` names them too; a
    Soft MoE layer's slots are fixed, so any ``capacity_factor`` names it too).

    Returns the previous ``{layer: RoutingSettings}``, for ``restore_routing``.
    """
    selected = _layers(target, layers)
    if batch_priority is True:
        no_priority = [
            n for n, m in selected.items() if not m.router.config.supports_batch_priority
        ]
        if no_priority:
            soft = [n for n in no_priority if selected[n].is_soft]
            kinds = [
                f"{kind} layers {names}"
                for kind, names in (
                    ("expert-choice", [n for n in no_priority if n not in soft]),
                    ("soft", soft),
                )
                if names
            ]
            raise ValueError(f"batch_priority=True does not apply to the {' and the '.join(kinds)}")
    change = {}
    if capacity_factor is not None:
        check_capacity_factor(capacity_factor, allow_none=False)
        change.update(capacity_factor=capacity_factor, capacity=None, dropless=False)
    if batch_priority is not None:
        change.update(batch_priority=batch_priority)
    if dropless is not None:
        change.update(dropless=dropless)
    previous = read_routing(selected)
    wanted = {name: dataclasses.replace(settings, **change) for name, settings in previous.items()}
    restore_routing(selected, wanted)
    return previous


@contextlib.contextmanager
def routing_settings(
    target: Layers,
    capacity_factor: Optional[float] = None,
    batch_priority: Optional[bool] = None,
    dropless: Optional[bool] = None,
) -> Iterator[Dict[str, RoutingSettings]]:
    """``set_routing`` for the ``with`` body; yields the previous settings and puts them back
    exactly (factor, explicit capacity, BPR, dropless) on exit, error or not."""
    previous = set_routing(target, capacity_factor, batch_priority, dropless=dropless)
    try:
        yield previous
    finally:
        restore_routing(target, previous)
