"""Command-line values of ``model.moe`` and ``model.model_kwargs`` merge into what is already
there (a ``--config`` file, an earlier option) instead of replacing it::

    vmoe fit --config my.yaml --model.moe.router.num_selected 1 --model.moe.num_experts 8
    vmoe fit --config my.yaml --model.moe '{router: {num_selected: 1}}'   # the placement stays
    vmoe fit --config configs/quickstart.yaml --model.model_kwargs.moe.num_experts 8  # a variant

MoE options merge as ``vmoe.models.moeify.merge_moe_options`` says (a placement given replaces
the other placement keys, router options merge, naming another router drops the old router's
options), other ``model_kwargs`` keys are set one by one; ``null`` resets (``--model.moe null``).
Values are read as YAML (``1`` an int, ``true`` a bool). The merged value is validated as a whole
when the option is parsed, so a misspelt key is still one line naming it (exit 2) before any data
or model is built.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import yaml
from jsonargparse._typehints import ActionTypeHint

__all__ = ["MergingOption", "merge_on_the_command_line"]

MERGED = ("model.moe", "model.model_kwargs")


def _yaml(text):
    """A command-line value as YAML reads it ('1' -> 1, 'true' -> True, '{a: 1}' -> a dict)."""
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _dotted(key: str, value) -> Dict[str, Any]:
    """'router.num_selected', 1 -> {'router': {'num_selected': 1}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _merge_moe(previous, given: Mapping[str, Any], where: str, cfg=None) -> Dict[str, Any]:
    from vmoe.models.moeify import (
        PLACEMENT_KEYS,
        check_moe_options,
        merge_moe_options,
        refuse_unknown_keys,
    )

    refuse_unknown_keys(given, where)
    if previous is None and not any(key in given for key in PLACEMENT_KEYS):
        check_moe_options(given, where)  # a misspelt key is named first
        raise ValueError(_nothing_to_merge_into(given, where, cfg))
    return merge_moe_options({} if previous is None else previous, given, where=where)


def _nothing_to_merge_into(given: Mapping[str, Any], where: str, cfg) -> str:
    """A partial ``model.moe`` with no ``model.moe`` to merge into: a registered V-MoE variant
    (the quickstart's ``vmoe_tiny_e4_k2``) is changed through ``model.model_kwargs.moe``."""
    key, value = next(iter(given.items()))
    while isinstance(value, Mapping) and len(value) == 1:
        inner, value = next(iter(value.items()))
        key = f"{key}.{inner}"
    shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    name = cfg.get("model.model_name") if cfg is not None else None
    model = f" of {name}" if name else ""
    return (
        f"{where}.{key}: the config sets no {where} to merge into ({where} moeifies a dense "
        f"model and needs its placement: {where}.every, {where}.last or {where}.blocks); to "
        f"change the MoE layers{model}, use --model.model_kwargs.moe.{key} {shown}"
    )


def _merge_model_kwargs(previous, given: Mapping[str, Any], where: str, cfg=None) -> Dict[str, Any]:
    """``given`` over ``previous`` key by key; ``moe`` merged as MoE options and checked as
    ``VmoeClassifier`` checks ``model_kwargs.moe`` (partial: the factory fills in the rest)."""
    from vmoe.models.moeify import check_moe_options

    merged = dict(previous or {})
    for key, value in given.items():
        if key == "moe" and isinstance(value, Mapping) and merged.get("moe") is not None:
            merged["moe"] = _merge_moe(merged["moe"], value, f"{where}.moe")
        else:
            merged[key] = value
    if merged.get("moe") is not None:
        check_moe_options(merged["moe"], f"{where}.moe")
    return merged


_MERGERS = {"model.moe": _merge_moe, "model.model_kwargs": _merge_model_kwargs}


class MergingOption(ActionTypeHint):
    """A typed option whose command-line mappings (``--X '{...}'`` or ``--X.a.b VALUE``) merge
    into its previous value (``_MERGERS[dest]``); a bad result is jsonargparse's one-line
    ``Parser key "X": ...`` error."""

    def __call__(self, *args, **kwargs):
        if len(args) == 0:  # jsonargparse builds actions by calling the class's instances
            return super().__call__(*args, **kwargs)
        parser, cfg, val, opt_str = args
        base = self.option_strings[0]
        value = _yaml(val)
        if isinstance(opt_str, str) and opt_str.startswith(base + "."):
            value = _dotted(opt_str[len(base) + 1 :], value)
        if isinstance(value, Mapping):
            previous = cfg.get(self.dest) if cfg else None
            try:
                value = _MERGERS[self.dest](previous, value, self.dest, cfg)
            except (ValueError, TypeError) as err:
                raise TypeError(f'Parser key "{self.dest}": {err}') from err
        return super().__call__(parser, cfg, value, base)


def merge_on_the_command_line(parser, dests=MERGED) -> None:
    """Makes the actions of ``dests`` in ``parser`` ``MergingOption``s."""
    found = set()
    for action in parser._actions:
        if action.dest in dests and isinstance(action, ActionTypeHint):
            action.__class__ = MergingOption
            found.add(action.dest)
    missing = set(dests) - found
    if missing:
        raise KeyError(f"no option {', '.join(sorted(missing))} to merge into")
