"""Checks of an untrusted ``save_pretrained`` directory, before anything is built or allocated.

``validate_config`` checks the structure of ``config.json`` (every message names the file and
the entry). ``check_config_against_header`` compares the numbers that decide the model's size
(depth, hidden size, experts, MoE blocks, routed layers) with the ``model.safetensors`` header,
so a config edited to ``depth: 100000`` or ``num_experts: 10**9`` is refused from a few
dictionary look-ups instead of a model build. ``check_shapes`` then compares every parameter
of the model (built on the meta device: no memory) with the header.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional

from vmoe.checkpoints import TensorEntry

from ..moe import RoutingSettings
from .moeify import MOEIFIED_ARCHITECTURE, check_moe_options, recipe_layer

__all__ = ["validate_config", "check_config_against_header", "check_shapes"]

#: 2: MoE options nested (router options under ``router``): ``moeify: {"blocks": [...],
#: "layer": {...}}`` and ``model_args.moe``. 1: flat (``moeify: {"blocks", "moe_kwargs"}``);
#: still read.
FORMAT_VERSION = 2
# the keys of a 'routing' entry ('dropless' may be missing: entries written before it existed)
ROUTING_KEYS = tuple(f.name for f in dataclasses.fields(RoutingSettings) if f.name != "dropless")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config, path: Path) -> None:
    """Raises ValueError naming ``path`` and the entry when ``config`` (parsed JSON) is not a
    vmoe model config (format version 1 or 2): ``architecture`` a name, ``model_args`` an
    object, ``moeify`` null or ``{"blocks": [ints], "layer": {MoE layer options}}`` (version
    1: ``"moe_kwargs"``, flat; both validated as ``MoeLayerConfig``), ``model_args.moe`` valid
    MoE options (flat or nested), ``routing`` (and its copy ``model_args.routing``,
    which timm's ``local-dir:``/``hf-hub:`` loader passes to the factory) null or ``{layer:
    {capacity_factor: number > 0 or null, capacity: int >= 1 or null (not both null),
    batch_priority: bool}}``."""

    def bad(entry: str, expected: str, got) -> ValueError:
        return ValueError(f"{path}: entry {entry} must be {expected}, got {got!r:.200}")

    if not isinstance(config, dict):
        raise bad("(top level)", "a JSON object", type(config).__name__)
    for key in ("architecture", "model_args"):
        if key not in config:
            raise ValueError(f"{path} has no '{key}' entry: not a vmoe config")
    version = config.get("version", 1)  # files of the first vmoe releases had no version
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise bad(
            "'version'", f"an int in [1, {FORMAT_VERSION}] (a newer vmoe wrote this file?)", version
        )
    if not isinstance(config["architecture"], str) or not config["architecture"]:
        raise bad("'architecture'", "a timm model name", config["architecture"])
    if not isinstance(config["model_args"], dict):
        raise bad("'model_args'", "a JSON object of timm model arguments", config["model_args"])
    moe = config.get("moeify")
    options_key = "layer" if version >= 2 else "moe_kwargs"
    if moe is not None:
        if not isinstance(moe, dict):
            raise bad("'moeify'", f'null or {{"blocks": [...], "{options_key}": {{...}}}}', moe)
        blocks = moe.get("blocks")
        if not isinstance(blocks, list) or not blocks or not all(_is_int(b) for b in blocks):
            raise bad("'moeify' -> 'blocks'", "a non-empty list of block indices (ints)", blocks)
        other = "moe_kwargs" if version >= 2 else "layer"
        if other in moe:
            raise bad(
                f"'moeify' -> '{other}'",
                f"absent in a version-{version} file (it stores "
                f"the MoE options in '{options_key}')",
                moe[other],
            )
        if not isinstance(moe.get(options_key, {}), dict):
            raise bad(
                f"'moeify' -> '{options_key}'", "a JSON object of MoE options", moe[options_key]
            )
        try:
            recipe_layer(
                {
                    "blocks": blocks,
                    options_key: moe.get(options_key, {}),
                    **({"drop": moe["drop"]} if "drop" in moe else {}),
                },
                where="moeify",
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: entry {err}") from None
    if config["model_args"].get("moe") is not None:
        try:
            check_moe_options(config["model_args"]["moe"], where="model_args.moe")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: entry {err}") from None
    if config["architecture"] == MOEIFIED_ARCHITECTURE:
        if moe is None:
            raise bad(
                "'moeify'",
                f"the MoE recipe (architecture {MOEIFIED_ARCHITECTURE!r} replays it)",
                moe,
            )
        base = config["model_args"].get("base_architecture")
        if not isinstance(base, str) or not base or base == MOEIFIED_ARCHITECTURE:
            raise bad("'model_args' -> 'base_architecture'", "the dense timm model name", base)
    _validate_routing(config.get("routing"), "'routing'", bad, path)
    _validate_routing(config["model_args"].get("routing"), "'model_args' -> 'routing'", bad, path)


def _validate_routing(routing, where: str, bad, path: Path) -> None:
    """A routing entry (``where`` names it): null or ``{layer: settings}``."""
    if routing is None:
        return
    if not isinstance(routing, dict):
        raise bad(where, "null or an object {layer name: settings}", routing)
    for name, settings in routing.items():
        entry = f"{where} -> {name!r}"
        if not isinstance(settings, dict) or set(ROUTING_KEYS) - set(settings):
            raise bad(entry, "an object with keys " + ", ".join(ROUTING_KEYS), settings)
        if settings["capacity_factor"] is None and settings["capacity"] is None:
            raise bad(
                f"{entry}",
                "settings with a capacity_factor or a capacity (both are null)",
                settings,
            )
        try:
            RoutingSettings.from_dict(settings)  # each value checked once, by RoutingSettings
        except (ValueError, TypeError) as err:
            key = re.match(r"(\w+)=", str(err))
            named = f" -> '{key.group(1)}'" if key and key.group(1) in ROUTING_KEYS else ""
            raise ValueError(f"{path}: entry {entry}{named}: {err}") from None


def _block_indices(header: Mapping[str, TensorEntry]) -> set:
    return {int(m.group(1)) for name in header if (m := re.match(r"blocks\.(\d+)\.", name))}


def check_config_against_header(
    config: dict,
    args: dict,
    header: Mapping[str, TensorEntry],
    config_path: Path,
    weights_path: Path,
) -> None:
    """Compares the size-deciding numbers of the config (with the caller's overrides in
    ``args``) with the weights header; ValueError naming both files and the entry on a
    mismatch. Costs a few look-ups: nothing is built."""

    def mismatch(entry: str, value, found: str) -> ValueError:
        return ValueError(
            f"{config_path}: {entry}={value!r:.100} does not match {weights_path}, which {found}"
        )

    blocks = _block_indices(header)
    depth = args.get("depth")
    if depth is not None and (not _is_int(depth) or depth != len(blocks)):
        found = (
            f"holds {len(blocks)} transformer blocks (blocks.0..{max(blocks)})"
            if blocks
            else "holds no transformer blocks (blocks.N.*)"
        )
        raise mismatch("model_args.depth", depth, found)
    width = next(
        (
            header[k].shape[0]
            for k in ("patch_embed.proj.weight", "norm.weight")
            if k in header and header[k].shape
        ),
        None,
    )
    embed_dim = args.get("embed_dim")
    if embed_dim is not None and width is not None and embed_dim != width:
        raise mismatch("model_args.embed_dim", embed_dim, f"has hidden size {width}")
    # layer -> (E,): sparse routers' weight is [E, d], the Soft MoE router's mu [d, E, P].
    routers = {
        name[: -len(".router.weight")]: entry.shape[:1]
        for name, entry in header.items()
        if name.endswith(".router.weight")
    }
    routers.update(
        {
            name[: -len(".router.mu")]: entry.shape[1:2]
            for name, entry in header.items()
            if name.endswith(".router.mu")
        }
    )
    experts = [
        (
            "model_args.moe.num_experts",
            (args.get("moe") or {}).get("num_experts")
            if isinstance(args.get("moe"), dict)
            else None,
        )
    ]
    moe = config.get("moeify")
    if moe:
        key = "layer" if "layer" in moe else "moe_kwargs"
        experts.append((f"moeify.{key}.num_experts", (moe.get(key) or {}).get("num_experts")))
        missing = [
            i for i in moe["blocks"] if f"blocks.{i % max(len(blocks), 1)}.mlp" not in routers
        ]
        if missing:
            raise mismatch(
                "moeify.blocks",
                moe["blocks"],
                f"has MoE routers only in {sorted(routers) or 'no layer'}",
            )
    for entry, value in experts:
        shapes = {shape[0] for shape in routers.values() if shape}
        if value is not None and shapes != {value}:
            raise mismatch(entry, value, f"has routers with {sorted(shapes) or 'no'} experts")
    for entry, routing in (
        ("'routing'", config.get("routing")),
        ("'model_args' -> 'routing'", args.get("routing")),
    ):
        unknown = [name for name in (routing or {}) if name not in routers]
        if unknown:
            raise ValueError(
                f"{config_path}: entry {entry} names layers {unknown[:5]} that are not "
                f"MoE layers of the model in {weights_path} (its MoE layers: "
                f"{sorted(routers)})"
            )


def shape_mismatches(
    expected: Mapping[str, tuple],
    found: Mapping[str, tuple],
    expected_as: str = "model",
    found_as: str = "file",
    may_differ: Iterable[str] = (),
    limit: Optional[int] = 8,
) -> str:
    """What keeps ``found`` (name -> shape) from fitting ``expected`` (name -> shape): missing
    keys, unexpected keys and wrong shapes as one readable string ('' when they fit), at most
    ``limit`` names of each kind. ``may_differ`` names entries whose shape may differ."""
    may_differ = set(may_differ)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - may_differ)
    wrong = [
        f"{k}: {found_as} {tuple(found[k])} vs {expected_as} {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k]) != tuple(found[k]) and k not in may_differ
    ]
    parts = []
    for label, names in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong),
    ):
        if names:
            more = ", ..." if limit is not None and len(names) > limit else ""
            parts.append(f"{label} ({len(names)}): {', '.join(names[:limit])}{more}")
    return "; ".join(parts)


def check_shapes(
    expected: Mapping[str, tuple],
    header: Mapping[str, TensorEntry],
    config_path: Path,
    weights_path: Path,
    may_differ: Iterable[str] = (),
) -> None:
    """Every parameter of the model built from the config (``expected``: name -> shape, from a
    meta-device build) must be in the header with that shape, and nothing else; ``may_differ``
    names the parameters whose shape a fine-tuning override changes (head, pos_embed)."""
    problems = shape_mismatches(
        expected,
        {k: v.shape for k, v in header.items()},
        expected_as="config",
        found_as="file",
        may_differ=may_differ,
    )
    if problems:
        raise ValueError(
            f"{config_path} describes a model that does not fit {weights_path}: {problems}"
        )
