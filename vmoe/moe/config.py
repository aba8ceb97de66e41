"""Typed options of the MoE layer: one frozen dataclass per router, nested in ``MoeLayerConfig``.

Each config owns its defaults and validates itself once, at construction (``__post_init__``,
through ``vmoe.moe.checks``); ``replace`` returns a validated copy, ``to_dict`` a plain dict
(``{"name": ..., every option}`` for a router). ``router_config`` and
``MoeLayerConfig.from_dict`` read user input and name a bad key by its path (``moe.router.K``):

    MoeLayerConfig(num_experts=8, router=TopKRouterConfig(num_selected=2))
    MoeLayerConfig.from_dict({"num_experts": 8, "router": {"name": "soft", "num_slots": 1}})
    MoeLayerConfig.from_dict({"num_experts": 8, "router": "soft", "num_slots": 1})  # flat form

The sparse/soft difference of the evaluation settings lives here too: ``routing_settings()``
gives a router's ``RoutingSettings`` (capacity factor, capacity, BPR) and ``with_routing``
returns the config routing with other ones (a Soft MoE router refuses any change: its slots are
fixed by the shape of its parameters).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    Iterable,
    Mapping,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from .checks import (
    check_batch_priority,
    check_bias_update_rate,
    check_bool,
    check_capacity,
    check_capacity_factor,
    check_capacity_multiple_of,
    check_capacity_rounding,
    check_choice,
    check_loss_weight,
    check_noise_std,
    check_num_selected_fits,
    check_optional_positive_int,
    check_positive_int,
    check_shared_experts,
)
from .dispatch import check_dispatcher
from .experts import EXPERT_GEMMS

__all__ = [
    "SCORE_FUNCS",
    "TopKRouterConfig",
    "ExpertChoiceRouterConfig",
    "SoftRouterConfig",
    "RouterConfig",
    "MoeLayerConfig",
    "RoutingSettings",
    "ROUTER_CONFIGS",
    "router_config",
]

_T = TypeVar("_T")

#: How a top-K router turns its float32 logits into scores: 'softmax' over the E experts (the
#: V-MoE paper's) or an independent 'sigmoid' per expert (DeepSeek-V3, torchtitan's default).
SCORE_FUNCS = ("softmax", "sigmoid")


def _named(where: str, options, build: Callable[[], _T]) -> _T:
    """``build()``, with a ValueError/TypeError message prefixed by the path of the option it
    names: ``where.option...`` when the message starts with one of ``options``, else
    ``where: ...``."""
    try:
        return build()
    except (ValueError, TypeError) as error:
        message = str(error)
        head = re.match(r"[A-Za-z_]\w*", message)
        prefix = f"{where}." if head and head.group(0) in options else f"{where}: "
        raise type(error)(prefix + message) from None


@dataclasses.dataclass(frozen=True)
class RoutingSettings:
    """What a router's evaluation-time options are: ``capacity_factor`` (None when an explicit
    ``capacity`` is set), ``capacity`` (buffer rows per expert and group, or None),
    ``batch_priority`` (BPR) and ``dropless``: in eval mode, run every token on its K experts
    with no capacity (no drop, no padding to a group, batch-independent) instead of the capacity
    path; training always routes with the capacity. ``to_dict``/``from_dict``: the
    ``config.json`` entry. A Soft MoE layer reads ``(None, P, False, False)`` and accepts only
    those values: its slots are fixed; an expert-choice layer has no dropless form (its
    capacity defines who is picked). ``dropless=None`` (what ``from_dict`` gives for an entry
    written before the option existed) means the router's default: True for top-K.
    Each value is validated at construction (ValueError naming it)."""

    capacity_factor: Optional[float]
    capacity: Optional[int]
    batch_priority: bool
    dropless: Optional[bool] = None

    def __post_init__(self):
        check_capacity_factor(self.capacity_factor)
        check_capacity(self.capacity)
        check_batch_priority(self.batch_priority)
        if self.dropless is not None:
            check_bool("dropless", self.dropless)

    @classmethod
    def of(cls, layer) -> "RoutingSettings":
        """The settings ``layer`` (a ``MoeMlp``)'s router routes with now."""
        return layer.router.config.routing_settings()

    @classmethod
    def from_dict(cls, entry: Mapping[str, object]) -> "RoutingSettings":
        """From ``{"capacity_factor", "capacity", "batch_priority"[, "dropless"]}`` (other keys
        ignored; a missing ``dropless`` is None: the router's default)."""
        required = [f.name for f in dataclasses.fields(cls) if f.name != "dropless"]
        return cls(*(entry[name] for name in required), entry.get("dropless"))

    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    def apply(self, layer) -> None:
        """Make ``layer``'s router route with exactly these settings (all or nothing; ValueError
        for a setting its router refuses)."""
        layer.router.apply_routing(self)


class _RouterConfig:
    """Shared methods of the router configs (frozen dataclasses)."""

    #: The router's name in configs (``router: top_k``).
    name: ClassVar[str]
    #: Images per routing group when neither ``group_size`` nor ``group_size_images`` is given.
    default_group_size_images: ClassVar[int] = 8
    #: Whether Batch Priority Routing means anything for this router.
    supports_batch_priority: ClassVar[bool] = False
    #: Whether the router is a Soft MoE router (dense mixing, ``SoftRoutingPlan``).
    is_soft: ClassVar[bool] = False

    @classmethod
    def options(cls) -> Tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes):
        """A validated copy with ``changes`` (ValueError for a key that is not an option)."""
        unknown = [k for k in changes if k not in self.options()]
        if unknown:
            raise ValueError(
                f"{unknown[0]}: not an option of router {self.name!r} (its options: "
                f"{', '.join(self.options())})"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """``{"name": ..., every option}``."""
        return {"name": self.name, **{k: getattr(self, k) for k in self.options()}}

    def build(self, dim: int, num_experts: int, group_size: Optional[int] = None):
        """The router ``nn.Module`` for tokens of width ``dim`` and ``num_experts`` experts
        (``group_size``: S in tokens, used by a Soft MoE router to derive its slots)."""
        raise NotImplementedError

    def routing_settings(self) -> RoutingSettings:
        """The evaluation settings this router routes with."""
        raise NotImplementedError

    def with_routing(self, settings: RoutingSettings):
        """This config routing with ``settings`` (ValueError for one the router cannot take)."""
        raise NotImplementedError


def _check_capacity_options(config) -> None:
    """The capacity options shared by the sparse routers."""
    check_capacity_factor(config.capacity_factor)
    check_capacity(config.capacity)
    if config.capacity is None and config.capacity_factor is None:
        raise ValueError("give capacity_factor or capacity, got neither")
    check_capacity_multiple_of(config.capacity_multiple_of)
    check_capacity_rounding(config.capacity_rounding)
    check_noise_std(config.noise_std)
    check_bool("noisy_at_eval", config.noisy_at_eval)
    check_loss_weight("zloss_weight", config.zloss_weight)
    # the former names ('index', ...) become the new ones (with a DeprecationWarning)
    object.__setattr__(config, "dispatcher", check_dispatcher(config.dispatcher))


@dataclasses.dataclass(frozen=True)
class TopKRouterConfig(_RouterConfig):
    """Top-K routing with capacity and optional Batch Priority Routing (see ``TopKRouter``).

    num_selected: K experts per token. capacity_factor: C = ceil(S*K*cf/E) rounded up to
    ``capacity_multiple_of`` (capped at S), unless ``capacity`` (C) is given.
    capacity_rounding: 'ceil' | 'round'. batch_priority: BPR. noise_std: training noise std
    before division by E; noisy_at_eval: also at evaluation. renormalize: combine weights sum
    to 1 over the K choices. *_weight: auxiliary loss weights. dispatcher: see
    ``vmoe.moe.dispatch`` ('auto', 'torch', 'triton', 'einsum'). score_func: 'softmax' | 'sigmoid'
    (float32 scores; with ``renormalize`` the K chosen sum to 1, as DeepSeek-V3).
    bias_update_rate: None, or the rate of auxiliary-loss-free balancing (DeepSeek-V3: 1e-3;
    see ``vmoe.moe.bias_balancing``): a per-expert bias chooses the experts, updated once per
    optimizer step from the load. dropless: in eval mode run every token on its K experts
    without capacity (the inference default; False: the capacity path at ``capacity_factor`` /
    ``capacity``, e.g. the paper's capacity sweeps); training always uses the capacity.
    """

    name: ClassVar[str] = "top_k"
    supports_batch_priority: ClassVar[bool] = True

    num_selected: int = 2
    capacity_factor: Optional[float] = 1.05
    capacity: Optional[int] = None
    capacity_multiple_of: Optional[int] = 4
    capacity_rounding: str = "ceil"
    batch_priority: bool = False
    noise_std: float = 1.0
    noisy_at_eval: bool = False
    renormalize: bool = False
    importance_weight: float = 0.005
    load_weight: float = 0.005
    gshard_weight: float = 0.0
    zloss_weight: float = 0.0
    dispatcher: str = "auto"
    score_func: str = "softmax"
    bias_update_rate: Optional[float] = None
    dropless: bool = True

    def __post_init__(self):
        check_positive_int("num_selected", self.num_selected)
        _check_capacity_options(self)
        check_batch_priority(self.batch_priority)
        check_bool("dropless", self.dropless)
        check_bool("renormalize", self.renormalize)
        check_choice("score_func", self.score_func, SCORE_FUNCS)
        check_bias_update_rate(self.bias_update_rate)
        for name in ("importance_weight", "load_weight", "gshard_weight"):
            check_loss_weight(name, getattr(self, name))

    def build(self, dim: int, num_experts: int, group_size: Optional[int] = None):
        from .routing import TopKRouter

        return TopKRouter(dim, num_experts, config=self)

    def routing_settings(self) -> RoutingSettings:
        return RoutingSettings(
            self.capacity_factor, self.capacity, self.batch_priority, self.dropless
        )

    def with_routing(self, settings: RoutingSettings) -> "TopKRouterConfig":
        return self.replace(
            capacity_factor=settings.capacity_factor,
            capacity=settings.capacity,
            batch_priority=settings.batch_priority,
            dropless=True if settings.dropless is None else settings.dropless,
        )


@dataclasses.dataclass(frozen=True)
class ExpertChoiceRouterConfig(_RouterConfig):
    """Expert-choice routing: each expert takes its top-C tokens, C = ceil(S*cf/E) rounded as
    for top-K (see ``ExpertChoiceRouter``). No token priority (``batch_priority`` is False)."""

    name: ClassVar[str] = "expert_choice"

    capacity_factor: Optional[float] = 1.05
    capacity: Optional[int] = None
    capacity_multiple_of: Optional[int] = 4
    capacity_rounding: str = "ceil"
    noise_std: float = 1.0
    noisy_at_eval: bool = False
    zloss_weight: float = 0.0
    dispatcher: str = "auto"

    def __post_init__(self):
        _check_capacity_options(self)

    def build(self, dim: int, num_experts: int, group_size: Optional[int] = None):
        from .routing import ExpertChoiceRouter

        return ExpertChoiceRouter(dim, num_experts, config=self)

    def routing_settings(self) -> RoutingSettings:
        return RoutingSettings(self.capacity_factor, self.capacity, False, False)

    def with_routing(self, settings: RoutingSettings) -> "ExpertChoiceRouterConfig":
        if settings.batch_priority:
            raise ValueError(
                "batch_priority=True does not apply to the expert-choice router "
                "(ExpertChoiceRouter): it has no token priority"
            )
        if settings.dropless:
            raise ValueError(
                "dropless=True does not apply to the expert-choice router "
                "(ExpertChoiceRouter): its capacity defines which tokens each expert takes"
            )
        return self.replace(capacity_factor=settings.capacity_factor, capacity=settings.capacity)


@dataclasses.dataclass(frozen=True)
class SoftRouterConfig(_RouterConfig):
    """Soft MoE routing (Puigcerver et al. 2023, see ``SoftRouter``).

    num_slots: P slots per expert; None derives P = round(S * capacity_factor / E) (half to
    even) from the group size S in tokens. noise_std: training noise std (not divided by E).
    The slots are fixed by the router's parameters: ``with_routing`` refuses any change.
    """

    name: ClassVar[str] = "soft"
    default_group_size_images: ClassVar[int] = 1
    is_soft: ClassVar[bool] = True

    num_slots: Optional[int] = None
    capacity_factor: Optional[float] = 1.0
    noise_std: float = 0.0

    def __post_init__(self):
        check_optional_positive_int("num_slots", self.num_slots)
        if self.num_slots is None:
            if self.capacity_factor is None:
                raise ValueError("Soft MoE router: give num_slots or capacity_factor, got neither")
        check_capacity_factor(self.capacity_factor)
        check_noise_std(self.noise_std)

    def build(self, dim: int, num_experts: int, group_size: Optional[int] = None):
        from .soft_routing import SoftRouter

        return SoftRouter(dim, num_experts, group_size=group_size, config=self)

    def routing_settings(self) -> RoutingSettings:
        """``(None, P, False, False)``: P slots per expert are its capacity; no factor, no
        priority, nothing to drop. (P must be known: the config of a built router has it.)"""
        return RoutingSettings(None, self.num_slots, False, False)

    def with_routing(self, settings: RoutingSettings) -> "SoftRouterConfig":
        if settings.batch_priority:
            raise ValueError(
                f"batch_priority={settings.batch_priority!r} does not apply to a Soft "
                "MoE layer: soft routing drops no token, so it has no priority"
            )
        if settings.dropless:
            raise ValueError(
                "dropless=True does not apply to a Soft MoE layer: it drops no token already "
                "(every slot runs; see docs/guides/moe-layer.md, inference cost)"
            )
        current = self.routing_settings()
        for name in ("capacity_factor", "capacity"):
            value, now = getattr(settings, name), getattr(current, name)
            if value != now:
                raise ValueError(
                    f"{name}={value!r} does not apply to a Soft MoE layer: its "
                    f"{self.num_slots} slot(s) per expert are fixed by the shape of "
                    f"mu [d, E, P] ({name} stays {now!r})"
                )
        return self


RouterConfig = Union[TopKRouterConfig, ExpertChoiceRouterConfig, SoftRouterConfig]
ROUTER_CONFIGS: Dict[str, Type[_RouterConfig]] = {
    cls.name: cls for cls in (TopKRouterConfig, ExpertChoiceRouterConfig, SoftRouterConfig)
}
_ROUTER_TYPES = tuple(ROUTER_CONFIGS.values())
_SPARSE_ROUTERS = tuple(n for n, c in ROUTER_CONFIGS.items() if not c.is_soft)
#: The top-K options a flat ``router='expert_choice'`` configuration ignores (for compatibility).
_IGNORED_BY_FLAT_EXPERT_CHOICE = (
    "num_selected",
    "batch_priority",
    "renormalize",
    "importance_weight",
    "load_weight",
    "gshard_weight",
    "dropless",  # (False: expert choice has no dropless form)
)


def did_you_mean(key: str, options: Iterable[str]) -> str:
    """``'; did you mean a or b?'`` naming the options closest to a misspelt ``key`` (difflib),
    or ``''`` when none is close."""
    close = difflib.get_close_matches(str(key), list(dict.fromkeys(options)), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def any_router_option(key: str) -> bool:
    """Whether ``key`` is an option of one of the routers."""
    return any(key in c.options() for c in ROUTER_CONFIGS.values())


def all_router_options() -> Tuple[str, ...]:
    return tuple(dict.fromkeys(o for c in ROUTER_CONFIGS.values() for o in c.options()))


#: Top-K options that no other router has (a Soft MoE layer names 'top_k' when refusing them).
_TOP_K_ONLY_OPTIONS = ("score_func", "bias_update_rate")


def _router_class(name, where: str) -> Type[_RouterConfig]:
    if not isinstance(name, str) or name not in ROUTER_CONFIGS:
        raise ValueError(f"{where}={name!r}: unknown router (routers: {', '.join(ROUTER_CONFIGS)})")
    return ROUTER_CONFIGS[name]


def router_config(name: str = "top_k", *, where: str = "moe.router", **options) -> RouterConfig:
    """The config of router ``name`` with ``options`` (the others at their defaults).

    ValueError/TypeError naming ``{where}.{option}`` and its value for an unknown router name,
    an option the router does not have (listing its options) or a bad value.
    """
    cls = _router_class(name, f"{where}.name")
    unknown = [k for k in options if k not in cls.options()]
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]}: not an option of router {name!r} (its options: "
            f"{', '.join(cls.options())}){did_you_mean(unknown[0], cls.options())}"
        )
    return _named(where, cls.options(), lambda: cls(**options))


def _flat_router_config(name, options: Mapping[str, Any], where: str) -> RouterConfig:
    """The router config of the flat form: router options given next to the layer's, ``where``
    the layer's path. A Soft MoE option for a sparse router, or a sparse one for a Soft MoE router,
    is refused naming the router type it belongs to."""
    cls = _router_class(name, f"{where}.router")
    if cls is ExpertChoiceRouterConfig:
        # As before the typed configs, the flat form of an expert-choice layer ignores the top-K
        # options it always ignored (e.g. a family's ``num_selected=2``), so flat configs saved
        # with them keep loading; BPR on is refused (it has no priority). The nested form, and
        # any newer top-K option, are strict.
        if options.get("batch_priority") is True:
            raise ValueError(
                f"{where}.batch_priority=True does not apply to router='expert_choice':"
                " it has no token priority"
            )
        if options.get("dropless") is True:
            raise ValueError(
                f"{where}.dropless=True does not apply to router='expert_choice': its "
                "capacity defines which tokens each expert takes"
            )
        options = {k: v for k, v in options.items() if k not in _IGNORED_BY_FLAT_EXPERT_CHOICE}
    others = [k for k in options if k not in cls.options()]
    if others:
        given = ", ".join(f"{k}={options[k]!r}" for k in others)
        owners = [n for n, c in ROUTER_CONFIGS.items() if others[0] in c.options()]
        layer_options = ", ".join(f.name for f in dataclasses.fields(MoeLayerConfig))
        if not owners:
            hint = did_you_mean(others[0], (*MoeLayerConfig.options(), *cls.options()))
            raise ValueError(
                f"{where}.{others[0]}: not an option of the MoE layer nor of router "
                f"{name!r}{hint} (layer options: {layer_options}; router options: "
                f"{', '.join(cls.options())})"
            )
        verb = "applies" if len(others) == 1 else "apply"
        head = f"{where}.{given}" if len(others) == 1 else f"{where}: {given}"
        if cls.is_soft:
            # (the newer top-K-only options name their one router; the older ones, as before,
            # the sparse routers)
            targets = (
                f"router {' or '.join(map(repr, owners))}"
                if others[0] in _TOP_K_ONLY_OPTIONS
                else f"sparse routers ({', '.join(_SPARSE_ROUTERS)})"
            )
            raise ValueError(
                f"{head} only {verb} to {targets}, not to router='soft' "
                f"(router 'soft' has no such option; its options: "
                f"{', '.join(cls.options())})"
            )
        if owners == ["soft"]:
            raise ValueError(
                f"{head} only {verb} to router='soft' (got router={name!r}; "
                "sparse routers use capacity)"
            )
        raise ValueError(
            f"{head} only {verb} to router {' or '.join(map(repr, owners))}, "
            f"not to router={name!r} (its options: {', '.join(cls.options())})"
        )
    return _named(where, cls.options(), lambda: cls(**options))


def misplaced_option(key: str, where: str, options: Iterable[str]) -> ValueError:
    """The error for ``key`` next to a router given as a mapping: a router option belongs
    inside ``{where}.router``; any other key is not an option (``options`` are the valid keys
    at that level, the closest named)."""
    if any_router_option(key):
        return ValueError(
            f"{where}.{key}: give the router options inside {where}.router when it is a "
            "mapping, not next to it"
        )
    options = tuple(options)
    return ValueError(
        f"{where}.{key}: not an option of the MoE layer{did_you_mean(key, options)} (options "
        f"here: {', '.join(options)}; the router's go inside {where}.router)"
    )


@dataclasses.dataclass(frozen=True)
class MoeLayerConfig:
    """Options of a ``MoeMlp`` besides the experts' shape.

    num_experts: E. router: its config (``TopKRouterConfig()`` by default). group_size: S
    tokens per routing group, or group_size_images: images per group (S = images * N); neither:
    ``router.default_group_size_images`` (8 sparse, 1 soft). same_init: every expert starts
    from the same values. expert_gemm: 'bmm' | 'grouped_mm' (see ``Experts``). bf16_dispatch:
    round the dispatched tokens and the expert outputs to bfloat16, as the official
    ``Bfloat16Dispatcher``. shared_experts: n dense experts every token passes through
    (DeepSeek-MoE; ``vmoe.moe.shared``), of width ``shared_hidden_features`` (default n x the
    experts' width); shared_gate: a per-token sigmoid gate on their output (Qwen-MoE).
    """

    num_experts: int = 8
    router: RouterConfig = TopKRouterConfig()
    group_size: Optional[int] = None
    group_size_images: Optional[int] = None
    same_init: bool = True
    expert_gemm: str = "bmm"
    bf16_dispatch: bool = False
    shared_experts: int = 0
    shared_hidden_features: Optional[int] = None
    shared_gate: bool = False

    def __post_init__(self):
        check_positive_int("num_experts", self.num_experts)
        if not isinstance(self.router, _ROUTER_TYPES):
            raise TypeError(
                f"router={self.router!r} must be a router config "
                f"({', '.join(c.__name__ for c in _ROUTER_TYPES)})"
            )
        if isinstance(self.router, TopKRouterConfig):
            try:
                check_num_selected_fits(self.router.num_selected, self.num_experts)
            except ValueError:
                raise ValueError(
                    f"router.num_selected={self.router.num_selected} must be <= "
                    f"num_experts={self.num_experts} (K experts per token out of "
                    "E)"
                ) from None
        check_optional_positive_int("group_size", self.group_size)
        check_optional_positive_int("group_size_images", self.group_size_images)
        if self.group_size is not None and self.group_size_images is not None:
            raise ValueError(
                "give group_size (tokens) or group_size_images, not both: got "
                f"group_size={self.group_size}, group_size_images={self.group_size_images}"
            )
        check_bool("same_init", self.same_init)
        check_choice("expert_gemm", self.expert_gemm, EXPERT_GEMMS)
        check_bool("bf16_dispatch", self.bf16_dispatch)
        check_shared_experts(self.shared_experts, self.shared_hidden_features, self.shared_gate)

    @classmethod
    def options(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def resolved_group_size_images(self) -> Optional[int]:
        """Images per group (None when ``group_size`` in tokens is given)."""
        if self.group_size is not None:
            return None
        if self.group_size_images is not None:
            return self.group_size_images
        return self.router.default_group_size_images

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], where: str = "moe") -> "MoeLayerConfig":
        """The config of ``options``, nested (``{"num_experts": 8, "router": {"name": "top_k",
        "num_selected": 2}}``; ``router`` may also be a router config) or flat (today's keyword
        form: ``{"router": "soft", "num_slots": 1, ...}``, router options next to the layer's,
        ``router`` a name or absent for 'top_k'). A ``MoeLayerConfig`` is returned as is.
        ValueError/TypeError naming ``{where}.{key}`` for a bad key or value."""
        if isinstance(options, MoeLayerConfig):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(
                f"{where} must be a mapping of MoE layer options, got {type(options).__name__}"
            )
        rest = dict(options)
        router = rest.pop("router", "top_k")
        layer = {k: rest.pop(k) for k in cls.options() if k in rest}
        if isinstance(router, (Mapping, *_ROUTER_TYPES)) and rest:
            raise misplaced_option(next(iter(rest)), where, cls.options())
        if isinstance(router, _ROUTER_TYPES):
            config = router
        elif isinstance(router, Mapping):
            nested = dict(router)
            config = router_config(nested.pop("name", "top_k"), where=f"{where}.router", **nested)
        elif isinstance(router, str):
            config = _flat_router_config(router, rest, where)
        else:
            raise TypeError(
                f"{where}.router={router!r} must be a router name "
                f"({', '.join(ROUTER_CONFIGS)}), a mapping with a 'name' or a router config"
            )
        return _named(where, cls.options(), lambda: cls(router=config, **layer))

    def to_dict(self) -> Dict[str, Any]:
        """The nested form: the layer's options with ``router`` as ``router.to_dict()``."""
        out = {k: getattr(self, k) for k in self.options()}
        out["router"] = self.router.to_dict()
        return out

    def replace(self, **changes) -> "MoeLayerConfig":
        """A validated copy with ``changes`` (ValueError for a key that is not an option)."""
        unknown = [k for k in changes if k not in self.options()]
        if unknown:
            raise ValueError(
                f"{unknown[0]}: not an option of the MoE layer (its options: "
                f"{', '.join(self.options())}){did_you_mean(unknown[0], self.options())}"
            )
        return dataclasses.replace(self, **changes)
