"""Turn a timm Vision Transformer into a V-MoE, and read its MoE layers' losses and plans."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..jsonable import to_jsonable
from ..moe import MoeMlp, RoutingPlan, moe_layers, require_moe_layers, routing_statistics
from ..moe.config import (
    ROUTER_CONFIGS,
    MoeLayerConfig,
    all_router_options,
    did_you_mean,
    misplaced_option,
)
from ..moe.soft_routing import soft_slots_per_expert

__all__ = [
    "moe_block_indices",
    "moeify",
    "MoeifyConfig",
    "nested_moe_options",
    "merge_moe_options",
    "check_moe_options",
    "recipe_layer",
    "aux_loss",
    "aux_losses",
    "routing_plans",
    "routing_stats",
    "MOEIFIED_ARCHITECTURE",
    "MOEIFIED_ARGS",
]

# The timm name that rebuilds a moeified timm model (``vmoe.models.variants.vmoe_moeified``):
# saved directories of such models name it as their architecture, so that timm's ``local-dir:``
# and ``hf-hub:`` loaders build the MoE model. ``MOEIFIED_ARGS`` are its own arguments (every
# other one goes to the base model).
MOEIFIED_ARCHITECTURE = "vmoe_moeified"
MOEIFIED_ARGS = ("base_architecture", "moeify", "routing")


def moe_block_indices(
    depth: int,
    every: Optional[int] = None,
    last: Optional[int] = None,
    blocks: Optional[Sequence[int]] = None,
) -> List[int]:
    """Indices of the blocks that become MoE, from exactly one placement rule.

    ``every=N``: blocks N-1, 2N-1, ... (the paper's "Every 2" is blocks 1, 3, 5, ...).
    ``last=N``: the last N odd blocks (the paper's "Last 2": blocks depth-3 and depth-1 for an
    even depth). ``blocks``: an explicit list (negative indices count from the end).
    """
    given = [
        name for name, v in (("every", every), ("last", last), ("blocks", blocks)) if v is not None
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one of every=, last=, blocks= (got {given or 'none'})")
    if every is not None:
        if not isinstance(every, int) or not 1 <= every <= depth:
            raise ValueError(f"every={every!r} must be an int in [1, depth={depth}]")
        return list(range(every - 1, depth, every))
    if last is not None:
        odd = list(range(1, depth, 2))
        if not isinstance(last, int) or not 1 <= last <= len(odd):
            raise ValueError(
                f"last={last!r} must be an int in [1, {len(odd)}] (the model has depth "
                f"{depth}, i.e. {len(odd)} odd blocks)"
            )
        return odd[-last:]
    indices = []
    for i in blocks:
        if not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(
                f"block index {i!r} is out of range for a model of depth {depth} "
                f"(valid: 0..{depth - 1} or negative)"
            )
        indices.append(i % depth)
    if len(set(indices)) != len(indices):
        raise ValueError(f"blocks={list(blocks)} lists a block twice")
    return sorted(indices)


#: The placement options of ``moeify`` (exactly one is given).
PLACEMENT_KEYS = ("every", "last", "blocks")
#: The options of ``moeify`` that are not the MoE layer's (``MoeLayerConfig``) nor its router's.
MOEIFY_KEYS = PLACEMENT_KEYS + ("router_init_std", "drop", "from_dense")
_ROUTER_TYPES = tuple(ROUTER_CONFIGS.values())
_LAYER_KEYS = tuple(k for k in MoeLayerConfig.options() if k != "router")

Dropout = Union[float, Tuple[float, float]]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_placement(every, last, blocks, where: str, required: bool = True) -> None:
    """The placement values' types (their range depends on the model's depth, checked by
    ``moe_block_indices``); ``required``: exactly one is given."""
    given = [k for k, v in (("every", every), ("last", last), ("blocks", blocks)) if v is not None]
    if required and len(given) != 1:
        raise ValueError(
            f"{where}: give exactly one of {where}.every, {where}.last, "
            f"{where}.blocks (got {', '.join(given) or 'none'})"
        )
    for key, value in (("every", every), ("last", last)):
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{where}.{key}={value!r} must be an int >= 1")
    if blocks is not None and (
        isinstance(blocks, (str, bytes))
        or not isinstance(blocks, Sequence)
        or not blocks
        or not all(_is_int(b) for b in blocks)
    ):
        raise ValueError(
            f"{where}.blocks={blocks!r} must be a non-empty list of block indices (ints)"
        )


def _check_moeify_options(router_init_std, drop, where: str) -> None:
    if router_init_std is not None and (
        isinstance(router_init_std, bool)
        or not isinstance(router_init_std, (int, float))
        or not math.isfinite(router_init_std)
        or router_init_std <= 0
    ):
        raise ValueError(
            f"{where}.router_init_std={router_init_std!r} must be a finite number > 0 or null"
        )
    if drop is not None:
        values = list(drop) if isinstance(drop, (list, tuple)) else [drop]
        if len(values) not in (1, 2) or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0
            for p in values
        ):
            raise ValueError(
                f"{where}.drop={drop!r} must be a dropout probability in [0, 1) or a "
                "pair of them (after fc1, after fc2)"
            )


def _drop_value(drop) -> Optional[Dropout]:
    """``drop`` as ``MoeMlp`` takes it (a JSON list becomes a tuple)."""
    return tuple(drop) if isinstance(drop, list) else drop


@dataclasses.dataclass(frozen=True)
class MoeifyConfig:
    """What ``moeify`` does to a timm ViT (YAML ``model.moe`` of ``vmoe fit``): the placement
    (exactly one of ``every``, ``last``, ``blocks``; see ``moe_block_indices``), the router
    initialisation (``router_init_std``; None: LeCun-normal, or 1e-3 when upcycling), the experts'
    dropout (``drop``; None: the replaced MLP's) and the MoE layer's config (``layer``).

    ``from_dict`` reads the placement keys and the ``MoeLayerConfig`` keys at the same level,
    the router's options nested (``router: {name: top_k, num_selected: 2}``) or flat
    (``router: soft`` with ``num_slots: 1`` next to it); ``to_dict`` writes the nested form.
    """

    every: Optional[int] = None
    last: Optional[int] = None
    blocks: Optional[Tuple[int, ...]] = None
    router_init_std: Optional[float] = None
    drop: Optional[Dropout] = None
    layer: MoeLayerConfig = dataclasses.field(default_factory=MoeLayerConfig)

    def __post_init__(self):
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if isinstance(self.drop, list):
            object.__setattr__(self, "drop", tuple(self.drop))
        _check_placement(self.every, self.last, self.blocks, "moe")
        _check_moeify_options(self.router_init_std, self.drop, "moe")
        if not isinstance(self.layer, MoeLayerConfig):
            raise TypeError(f"moe.layer={self.layer!r} must be a MoeLayerConfig")

    @classmethod
    def from_dict(
        cls, options: Union["MoeifyConfig", Mapping[str, Any]], where: str = "model.moe"
    ) -> "MoeifyConfig":
        """The config of ``options`` (a mapping; a ``MoeifyConfig`` is returned as is).
        ValueError/TypeError naming ``{where}.{key}`` for a bad key or value."""
        if isinstance(options, MoeifyConfig):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(
                f"{where} must be a mapping of MoE placement and layer options "
                f"(e.g. {{last: 2, num_experts: 8, router: {{name: top_k, num_selected: 2}}}}), "
                f"got {type(options).__name__} {options!r:.100}"
            )
        rest = dict(options)
        if "from_dense" in rest:
            raise ValueError(
                f"{where}.from_dense: not an option here (model.upcycle_from "
                "upcycles: every expert starts as the dense MLP)"
            )
        placement = {k: rest.pop(k) for k in PLACEMENT_KEYS if k in rest}
        extra = {k: rest.pop(k) for k in ("router_init_std", "drop") if k in rest}
        _check_placement(
            placement.get("every"), placement.get("last"), placement.get("blocks"), where
        )
        _check_moeify_options(extra.get("router_init_std"), extra.get("drop"), where)
        layer = MoeLayerConfig.from_dict(rest, where=where)
        return cls(**placement, **extra, layer=layer)

    def to_dict(self) -> Dict[str, Any]:
        """The nested form: the placement (and ``router_init_std``/``drop`` when set) next to
        ``MoeLayerConfig.to_dict()``. Plain values (lists, not tuples)."""
        out = {k: getattr(self, k) for k in MOEIFY_KEYS[:-1] if getattr(self, k) is not None}
        out.update(self.layer.to_dict())
        return to_jsonable(out, strict=True)

    def replace(self, **changes) -> "MoeifyConfig":
        """A validated copy with ``changes`` (giving one placement key replaces the other)."""
        unknown = [k for k in changes if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            names = [f.name for f in dataclasses.fields(self)]
            raise ValueError(
                f"{unknown[0]}: not an option of MoeifyConfig (its options: "
                f"{', '.join(names)}){did_you_mean(unknown[0], names)}"
            )
        if any(k in changes for k in PLACEMENT_KEYS):
            changes = {**{k: None for k in PLACEMENT_KEYS}, **changes}
        return dataclasses.replace(self, **changes)

    def apply(self, model: nn.Module, from_dense: bool = False) -> nn.Module:
        """``moeify(model, ...)`` with this config (in place; returns ``model``)."""
        return moeify(
            model,
            every=self.every,
            last=self.last,
            blocks=None if self.blocks is None else list(self.blocks),
            from_dense=from_dense,
            router_init_std=self.router_init_std,
            drop=self.drop,
            config=self.layer,
        )


def nested_moe_options(options, where: str = "moe") -> Dict[str, Any]:
    """MoE options as given (flat or nested, possibly partial: only the keys given) in the
    nested form, nothing added: the ``moeify`` and layer keys at the top, the router's options
    under ``router`` (with its ``name`` when one was given). A ``MoeifyConfig`` or
    ``MoeLayerConfig`` gives its ``to_dict()``. Keys are not validated here."""
    if isinstance(options, (MoeifyConfig, MoeLayerConfig)):
        return options.to_dict()
    if not isinstance(options, Mapping):
        raise TypeError(f"{where} must be a mapping of MoE options, got {type(options).__name__}")
    out: Dict[str, Any] = {}
    flat_router: Dict[str, Any] = {}
    for key, value in options.items():
        if key == "router":
            continue
        (out if key in MOEIFY_KEYS or key in _LAYER_KEYS else flat_router)[key] = value
    router = options.get("router")
    if isinstance(router, _ROUTER_TYPES):
        router = router.to_dict()
    here = (*MOEIFY_KEYS, *MoeLayerConfig.options())
    if isinstance(router, Mapping):
        if flat_router:
            raise misplaced_option(next(iter(flat_router)), where, here)
        out["router"] = dict(router)
    elif router is not None or flat_router:
        out["router"] = {
            **({} if router is None else {"name": router}),
            **_without_ignored(router, flat_router),
        }
    return out


def refuse_unknown_keys(options: Mapping[str, Any], where: str = "moe") -> None:
    """ValueError naming the first top-level key of ``options`` (flat or nested MoE options) that
    is an option of neither ``moeify``, the MoE layer nor any router, with the closest valid
    ones: named where it was written (``nested_moe_options`` would move it under ``router``)."""
    here = (*MOEIFY_KEYS, *MoeLayerConfig.options())
    routers = all_router_options()
    for key in options:
        if key not in here and key not in routers:
            if isinstance(options.get("router"), Mapping):
                raise misplaced_option(key, where, here)
            raise ValueError(
                f"{where}.{key}: not an option of the MoE layer nor of any router"
                f"{did_you_mean(key, (*here, *routers))} (options here: {', '.join(here)}; "
                f"router options: {', '.join(routers)})"
            )


def _without_ignored(name, flat_router: Dict[str, Any]) -> Dict[str, Any]:
    """The flat router options of router ``name`` less those the flat form ignores for it (an
    expert-choice layer next to a family's ``num_selected=2``: ``MoeLayerConfig.from_dict``
    decides which), so that the nested form, which is strict, means the same."""
    cls = ROUTER_CONFIGS.get(name) if isinstance(name, str) else None
    if cls is None:
        return flat_router
    foreign = {
        k: v
        for k, v in flat_router.items()
        if k not in cls.options() and any(k in c.options() for c in _ROUTER_TYPES)
    }
    if not foreign:
        return flat_router
    try:
        ignored = MoeLayerConfig.from_dict({"router": name, **foreign}).router == cls()
    except (ValueError, TypeError):
        ignored = False  # refused: kept, for the reader to name
    return {k: v for k, v in flat_router.items() if not (ignored and k in foreign)}


def merge_moe_options(base, override, where: str = "moe") -> Dict[str, Any]:
    """``override`` over ``base`` (both flat or nested, see ``nested_moe_options``), nested: a
    placement given replaces the other placement keys, ``group_size`` replaces
    ``group_size_images`` (and back), router options merge, and naming another router drops
    ``base``'s router options (they belong to that router)."""
    base, override = nested_moe_options(base, where), nested_moe_options(override, where)
    merged = dict(base)
    if any(k in override for k in PLACEMENT_KEYS):
        for key in PLACEMENT_KEYS:
            merged.pop(key, None)
    for a, b in (("group_size", "group_size_images"), ("group_size_images", "group_size")):
        if override.get(a) is not None:
            merged.pop(b, None)
    merged.update({k: v for k, v in override.items() if k != "router"})
    if "router" in override:
        router = dict(base.get("router") or {})
        new = override["router"]
        if "name" in new and new["name"] != router.get("name", "top_k"):
            router = {}
        merged["router"] = {**router, **new}
    return merged


def check_moe_options(options, where: str) -> None:
    """Validates MoE options as given to a vmoe timm factory (``moe=``, YAML
    ``model.model_kwargs.moe``: flat or nested, possibly partial, the factory's defaults fill in
    the rest): ValueError/TypeError naming ``{where}.{key}`` for an unknown key or a bad value,
    before anything is built. Without a router name the options must fit one of the routers."""
    if options is None:
        return
    nested = nested_moe_options(options, where)
    _check_placement(
        nested.get("every"), nested.get("last"), nested.get("blocks"), where, required=False
    )
    _check_moeify_options(nested.get("router_init_std"), nested.get("drop"), where)
    if "from_dense" in nested and not isinstance(nested["from_dense"], bool):
        raise ValueError(f"{where}.from_dense={nested['from_dense']!r} must be true or false")
    layer = {k: v for k, v in nested.items() if k not in MOEIFY_KEYS}
    router = dict(layer.pop("router", None) or {})
    # flat unless a mapping nests its router (config instances are read back from their dicts)
    flat = not (
        isinstance(options, Mapping)
        and isinstance(options.get("router"), (Mapping, *_ROUTER_TYPES))
    )

    def check(name: str) -> None:
        options_of_router = {k: v for k, v in router.items() if k != "name"}
        if flat:  # as written: a misspelt key is named where it stands
            MoeLayerConfig.from_dict({**layer, "router": name, **options_of_router}, where=where)
        else:
            MoeLayerConfig.from_dict(
                {**layer, "router": {"name": name, **options_of_router}}, where=where
            )

    if "name" in router:
        check(router["name"])
        return
    # the router is the factory's: the options must fit one of the routers
    fitting = [n for n, c in ROUTER_CONFIGS.items() if set(router) <= set(c.options())]
    for name in fitting[:-1]:
        try:
            check(name)
            return
        except (ValueError, TypeError):
            pass
    check(fitting[-1] if fitting else "top_k")


def recipe_layer(
    recipe: Mapping[str, Any], where: str = "moeify"
) -> Tuple[List[int], MoeLayerConfig, Optional[Dropout]]:
    """``(blocks, layer config, expert dropout)`` of a stored ``moeify`` recipe: the nested
    form of config.json format 2 (``{"blocks": [...], "layer": {...}, "drop": ...}``) or the
    flat one of format 1 (``{"blocks": [...], "moe_kwargs": {...}}``). ValueError naming
    ``where`` and the key when it is neither or an option is bad."""
    if (
        not isinstance(recipe, Mapping)
        or not isinstance(recipe.get("blocks"), list)
        or not recipe["blocks"]
    ):
        raise ValueError(
            f"{where}={recipe!r:.200} must be "
            '{"blocks": [block indices], "layer": {MoE layer options}}'
        )
    if "layer" in recipe and "moe_kwargs" in recipe:
        raise ValueError(
            f"{where}: give 'layer' (nested options) or 'moe_kwargs' (the flat ones "
            "of config.json version 1), not both"
        )
    if "layer" in recipe:
        layer, drop = recipe["layer"], recipe.get("drop")
        layer = MoeLayerConfig.from_dict(layer, where=f"{where}.layer")
    else:
        options = dict(recipe.get("moe_kwargs") or {})
        drop = options.pop("drop", None)
        layer = MoeLayerConfig.from_dict(options, where=f"{where}.moe_kwargs")
    _check_moeify_options(None, drop, where)
    return list(recipe["blocks"]), layer, _drop_value(drop)


def _vit_blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(
            f"{type(model).__name__} is not a timm Vision Transformer: it has no "
            "`blocks` list of transformer blocks"
        )
    for i, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)
        if not isinstance(mlp, MoeMlp) and not (
            hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and isinstance(mlp.fc1, nn.Linear)
        ):
            raise TypeError(
                f"block {i} of {type(model).__name__} has no timm `Mlp` "
                f"(`mlp.fc1`/`mlp.fc2` Linear layers); got {type(mlp).__name__}"
            )
    return blocks


def moeify(
    model: nn.Module,
    *,
    every: Optional[int] = None,
    last: Optional[int] = None,
    blocks: Optional[Sequence[int]] = None,
    from_dense: bool = False,
    router_init_std: Optional[float] = None,
    config: Optional[Union[MoeLayerConfig, Mapping[str, Any]]] = None,
    drop: Optional[Dropout] = None,
    **options: Any,
) -> nn.Module:
    """Replace the ``mlp`` of chosen blocks of a timm ViT by ``MoeMlp`` (in place; returns model).

    Args:
        model: a timm ``VisionTransformer`` (or any model with ``blocks[i].mlp`` timm ``Mlp``s:
            DeiT, ViTs with registers, with or without class token, ``global_pool='avg'``).
        every: N, blocks N-1, 2N-1, ... become MoE (placement: give one of every, last,
            blocks; see ``moe_block_indices``).
        last: N, the last N odd blocks become MoE.
        blocks: explicit block indices (negative ones count from the end).
        from_dense: sparse upcycling. Every expert starts as a copy of the dense MLP it replaces
            and the router starts small (std 1e-3 unless ``router_init_std``). With shared
            experts the dense output is split in halves: the experts are copies with fc2
            (weight and bias) / 2, the shared MLP holds n copies of fc1 and fc2 / (2n) (gated:
            fc2 / n, the zero-init gate gives the other 1/2), so routed + shared = the dense
            MLP (a ``shared_hidden_features`` that is not a multiple of the dense width is a
            ValueError).
            Otherwise experts get timm's ViT init (truncated normal, std 0.02) and the router
            LeCun-normal.
        config: the MoE layer's ``MoeLayerConfig`` (or its dict, nested or flat).
        drop: expert dropout (one probability or a pair); default the replaced MLP's.
        **options: the flat keyword form of the layer config (num_experts, num_selected,
            capacity_factor, batch_priority, group_size_images, router, noise_std, renormalize,
            loss weights, score_func, bias_update_rate, shared_experts, shared_hidden_features,
            shared_gate, ...; see ``vmoe.moe.config``), or ``router={...}`` nested; with
            ``config``, they change it. Soft MoE: ``router='soft'`` with ``num_slots=P``, or
            without it P = round(S * capacity_factor / E) for the model's group size S in tokens
            (default one image per group).
    """
    vit_blocks = _vit_blocks(model)
    indices = moe_block_indices(len(vit_blocks), every, last, blocks)
    _check_moeify_options(router_init_std, drop, "moeify")
    if config is not None and options:
        config = merge_moe_options(config, options)
    layer_config = _with_slots(
        model, MoeLayerConfig.from_dict(options if config is None else config, where="moe")
    )
    drop = _drop_value(drop)
    for i in indices:
        mlp = vit_blocks[i].mlp
        if isinstance(mlp, MoeMlp):
            raise ValueError(f"block {i} is already a MoE block")
        act = mlp.act
        # Expert dropout: the dense MLP's unless given (the paper's recipes use MoE dropout 0.2).
        layer_drop = (
            drop
            if drop is not None
            else (getattr(mlp.drop1, "p", 0.0), getattr(mlp.drop2, "p", 0.0))
        )
        layer = MoeMlp(
            mlp.fc1.in_features,
            mlp.fc1.out_features,
            mlp.fc2.out_features,
            act_layer=lambda act=act: copy.deepcopy(act),
            bias=mlp.fc1.bias is not None,
            drop=layer_drop,
            config=layer_config,
        )
        layer.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        if from_dense:
            _load_from_dense(layer, mlp)
            layer.router.reset_parameters(std=1e-3 if router_init_std is None else router_init_std)
        else:
            layer.experts.reset_parameters(std=0.02)
            if layer.shared is not None:
                layer.shared.reset_parameters(std=0.02)
            if router_init_std is not None:
                layer.router.reset_parameters(std=router_init_std)
        vit_blocks[i].mlp = layer
    model.vmoe_moe = _recipe(getattr(model, "vmoe_moe", None), indices, layer_config, drop)
    return model


def _load_from_dense(layer: MoeMlp, mlp: nn.Module) -> None:
    """Start ``layer`` as the dense ``mlp`` (sparse upcycling), so that it computes ``mlp(x)``
    when its combine weights sum to 1 and nothing is dropped.

    Without shared experts every expert is a copy of ``mlp``. With shared experts the routed
    and the shared part each contribute half of the dense output: the experts are copies with
    ``fc2`` (weight and bias) halved, and the shared MLP computes ``mlp(x) / 2`` ungated, or
    ``mlp(x)`` gated (its zero-init gate is ``sigmoid(0) = 1/2`` for every token). So
    ``routed + shared = mlp(x) / 2 + mlp(x) / 2 = mlp(x)`` at the start."""
    if layer.shared is None:
        layer.experts.load_from_mlp(mlp)
        return
    layer.experts.load_from_mlp(mlp, scale=0.5)
    layer.shared.load_from_mlp(mlp, scale=1.0 if layer.shared.gate is not None else 0.5)


def _recipe(
    previous: Optional[dict],
    indices: List[int],
    layer_config: MoeLayerConfig,
    drop: Optional[Dropout],
) -> dict:
    """The ``model.vmoe_moe`` recipe (config.json's ``moeify`` entry, nested form):
    ``{"blocks": [...], "layer": {...}}`` (+ ``"drop"`` when given; the derived ``num_slots``
    of a Soft MoE included, so that a rebuild at another image size keeps P). A second
    ``moeify`` with other options marks the recipe ``"mixed"``: such a model cannot be saved
    (one recipe replays one layer config)."""
    recipe = dict(previous or {})
    layer = layer_config.to_dict()
    stored = {"layer": layer, **({"drop": _storable("drop", drop)} if drop is not None else {})}
    if recipe and any(recipe.get(k) != v for k, v in stored.items()):
        recipe["mixed"] = sorted(set(recipe.get("mixed", [])) | set(recipe["blocks"]))
    recipe.update(stored)
    recipe["blocks"] = sorted(set(recipe.get("blocks", [])) | set(indices))
    return recipe


def _with_slots(model: nn.Module, config: MoeLayerConfig) -> MoeLayerConfig:
    """``config`` with ``num_slots`` set for a Soft MoE router whose slots come from a capacity
    factor: P = round(S * capacity_factor / E) (official rounding) with S = the group size in
    tokens of this model's images (``config.resolved_group_size_images`` images)."""
    router = config.router
    if not router.is_soft or router.num_slots is not None:
        return config
    group_size = config.group_size
    if group_size is None:
        patch_embed = getattr(model, "patch_embed", None)
        num_patches = getattr(patch_embed, "num_patches", None)
        if num_patches is None:
            raise ValueError(
                "router='soft' without num_slots derives the slots per expert from "
                "the tokens per group, but the model has no patch_embed.num_patches: "
                "give num_slots or group_size (tokens)"
            )
        tokens = num_patches + getattr(model, "num_prefix_tokens", 0)
        group_size = config.resolved_group_size_images * tokens
    slots = soft_slots_per_expert(group_size, config.num_experts, router.capacity_factor)
    return config.replace(router=router.replace(num_slots=slots))


def _storable(name: str, value):
    """``value`` as a JSON value (``model.vmoe_moe`` goes into config.json), or TypeError
    naming the option that is not a plain value."""
    try:
        return to_jsonable(value, strict=True)
    except TypeError:
        raise TypeError(
            f"MoE option {name}={value!r} is not a plain value (None, bool, int, float, "
            "str, or lists/dicts of them); "
            "pass a name instead so the model can be saved and rebuilt"
        ) from None


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over MoE layers of the weighted auxiliary loss of the last forward (float32 scalar).

    In the layers' default ``aux_loss_mode='backward'`` it is detached, for logging: the aux
    losses already reach the gradients through the backward pass of the layer outputs, so adding
    it to a loss changes nothing. After ``set_aux_loss_mode(model, 'manual')`` it has a graph and
    the training loop adds it to its loss (``vmoe.moe.balancing``)."""
    losses = [m.aux_loss for m in moe_layers(model).values() if m.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()


def aux_losses(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per layer, each unweighted auxiliary loss of the last forward: {layer: {name: scalar}}."""
    return {name: dict(m.aux_losses) for name, m in moe_layers(model).items()}


def routing_plans(model: nn.Module) -> Dict[str, RoutingPlan]:
    """The RoutingPlan of every MoE layer from the last forward."""
    plans = {name: m.last_plan for name, m in require_moe_layers(model).items()}
    missing = [name for name, plan in plans.items() if plan is None]
    if missing:
        raise RuntimeError(f"no forward has run yet through {missing}")
    return plans


def routing_stats(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """``routing_statistics`` of every MoE layer's last plan."""
    return {name: routing_statistics(plan) for name, plan in routing_plans(model).items()}
