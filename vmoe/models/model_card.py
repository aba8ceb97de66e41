"""The model card (``README.md``) of a saved V-MoE: architecture, routing settings, parameter
counts, and the training data and metrics when the caller knows them."""

from __future__ import annotations

from typing import Mapping, Optional

import torch.nn as nn

from ..moe import moe_layers

#: Architecture names whose timm factory builds the MoE layers itself (vmoe's registered models).
VMOE_FACTORY_PREFIXES = ("vmoe_", "soft_moe_")

__all__ = ["parameter_counts", "model_card"]


def parameter_counts(model: nn.Module) -> dict:
    """``total`` parameters, those in ``experts``, and ``active`` per token (the dense part plus
    K of the E experts of each MoE layer)."""
    total = sum(p.numel() for p in model.parameters())
    experts = active_experts = 0
    for layer in moe_layers(model).values():
        count = sum(p.numel() for p in layer.experts.parameters())
        experts += count
        k = getattr(layer.router, "num_selected", None) or layer.router.num_experts
        active_experts += count * k // layer.router.num_experts
    return {"total": total, "experts": experts, "active": total - experts + active_experts}


def _routing_rows(model: nn.Module) -> list:
    layers = moe_layers(model)
    methods = {name: _methods(layer) for name, layer in layers.items()}
    extra = any(methods.values())  # the column only for models that use the issue-24 methods
    rows = [
        "| layer | router | experts | K | capacity factor | capacity | BPR | group |"
        + (" methods |" if extra else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""),
    ]
    for name, layer in layers.items():
        router = layer.router
        group = (
            f"{layer.group_size} tokens"
            if layer.group_size
            else f"{layer.group_size_images} images"
        )
        rows.append(
            f"| `{name}` | {type(router).__name__} | {router.num_experts} | "
            f"{getattr(router, 'num_selected', '-')} | {router.capacity_factor} | "
            f"{router.capacity} | "
            f"{router.batch_priority} | {group} |" + (f" {methods[name] or '-'} |" if extra else "")
        )
    return rows


def _methods(layer) -> str:
    """'sigmoid scores, bias balancing (rate r), shared experts (width h, gated)' or ''."""
    router, parts = layer.router, []
    if getattr(router, "score_func", "softmax") != "softmax":
        parts.append(f"{router.score_func} scores")
    if getattr(router, "bias_update_rate", None) is not None:
        parts.append(f"bias balancing (rate {router.bias_update_rate})")
    if getattr(layer, "shared", None) is not None:
        parts.append(
            f"shared experts (width {layer.shared.hidden_features}"
            + (", gated)" if layer.shared.gate is not None else ")")
        )
    return ", ".join(parts)


def _input_size(model: nn.Module, cfg: Mapping) -> tuple:
    """(C, H, W) the model takes: its patch embedding's image size (which a new ``img_size``
    changes while a timm pretrained_cfg keeps the original), else the cfg's."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        return tuple(cfg.get("input_size", ()))
    return (cfg.get("input_size", (3,))[0], *size)


def _kind(model: nn.Module) -> str:
    """'Soft MoE' when every MoE layer is soft, else 'V-MoE'."""
    layers = moe_layers(model).values()
    return "Soft MoE" if layers and all(m.is_soft for m in layers) else "V-MoE"


def model_card(model: nn.Module, config: Mapping, info: Optional[Mapping] = None) -> str:
    """Markdown with a Hugging Face front matter. ``config``: the model's ``config.json``
    entries (architecture, model_args); ``info``: optional ``dataset`` (str), ``metrics``
    ({name: value}) and ``notes`` (str)."""
    info = dict(info or {})
    architecture = config["architecture"]
    base = (config.get("model_args") or {}).get("base_architecture")
    title = f"{base} made MoE" if base else architecture
    cfg = getattr(model, "pretrained_cfg", None) or {}
    counts = parameter_counts(model)
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, vmoe, mixture-of-experts]",
        f"license: {cfg.get('license', 'apache-2.0')}",
        "---",
        "",
        f"# {title} ({_kind(model)})",
        "",
        f"A Vision Mixture-of-Experts ({type(model).__name__}, {len(model.blocks)} blocks, "
        f"hidden {getattr(model, 'embed_dim', '?')}, {model.num_classes} classes, input "
        f"{_input_size(model, cfg)}).",
        "",
        "## Parameters",
        "",
        f"- total: {counts['total']:,}",
        f"- in experts: {counts['experts']:,}",
        f"- active per token: {counts['active']:,}",
        "",
        "## Routing",
        "",
        *_routing_rows(model),
        "",
    ]
    if info.get("dataset"):
        lines += ["## Training data", "", str(info["dataset"]), ""]
    if info.get("metrics"):
        lines += [
            "## Metrics",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in dict(info["metrics"]).items()),
            "",
        ]
    if info.get("notes"):
        lines += ["## Notes", "", str(info["notes"]), ""]
    usage = [
        "import timm",
        "import vmoe.models  # registers vmoe_* and soft_moe_*",
        'model = timm.create_model("local-dir:DIR", pretrained=True)  # or "hf-hub:ORG/NAME"',
        '# or, checking the files before building: vmoe.models.from_pretrained("DIR")',
    ]
    lines += ["## Usage", "", "```python", *usage, "```", ""]
    return "\n".join(lines)
