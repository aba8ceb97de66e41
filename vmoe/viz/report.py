"""A routing report of a model over a dataset: PNGs, one self-contained ``index.html`` and a
``report.json`` with every number drawn.

    report = write_routing_report(model, loader, "report/")   # loader yields (images, labels)

One recording pass over the data (``record_routing``, with a progress bar) gives the patch maps
of a few example images, the BPR priority map, the expert load and the class x expert matrix;
the capacity sweep then evaluates the same images again at each inference capacity factor.
Soft MoE layers get their own pictures instead (``vmoe.viz.soft``: dispatch maps, combine
entropy, slot similarity; class x expert through the combine weights); the sparse-only sections
(patch maps, priority, expert load, capacity sweep) are left out for them with a one-line note.
The numbers in ``report.json`` are the ones the library functions return (arrays as lists).
"""

from __future__ import annotations

import collections.abc
import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm  # text bar: tqdm.auto warns in Jupyter without ipywidgets

from vmoe.jsonable import to_jsonable
from vmoe.moe import require_moe_layers, restore_routing, set_routing, soft_routing_statistics

from .maps import patch_map, priority_map
from .page import render_page
from .record import RoutingRecord, record_routing, ungroup
from .soft import combine_entropy_map, dispatch_map, slot_similarity
from .stats import class_expert_matrix, expert_load
from .sweep import capacity_sweep

__all__ = ["write_routing_report", "DEFAULT_CAPACITY_FACTORS", "FirstImages"]

DEFAULT_CAPACITY_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
REPORT_FORMAT = "vmoe-routing-report"


class FirstImages:
    """Re-iterable view of ``data`` (batches of (images [B,C,H,W], labels [B])) cut after
    ``max_images`` images (the last batch sliced); ``on_batch`` is called after each batch."""

    def __init__(self, data: Iterable, max_images: Optional[int] = None, on_batch=None):
        self.data, self.max_images, self.on_batch = data, max_images, on_batch

    def __iter__(self):
        seen = 0
        for i, batch in enumerate(self.data):
            if self.max_images is not None and seen >= self.max_images:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(
                    f"data must yield (images, labels) batches; batch {i} is a "
                    f"{type(batch).__name__}"
                )
            images, labels = batch[0], torch.as_tensor(batch[1])
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise ValueError(
                    f"batch {i}: images must be a tensor [B, C, H, W], got "
                    f"{type(images).__name__} of shape {tuple(getattr(images, 'shape', ()))}"
                )
            if labels.shape != images.shape[:1]:
                raise ValueError(
                    f"batch {i}: {len(images)} images but labels of shape {tuple(labels.shape)}"
                )
            if self.max_images is not None and seen + len(images) > self.max_images:
                images, labels = images[: self.max_images - seen], labels[: self.max_images - seen]
            seen += len(images)
            yield images, labels
            if self.on_batch is not None:
                self.on_batch()


def _expected_batches(data, max_images: Optional[int]) -> Optional[int]:
    try:
        total = len(data)
    except TypeError:
        return None
    batch_size = getattr(data, "batch_size", None)
    if max_images is not None and batch_size:
        total = min(total, math.ceil(max_images / batch_size))
    return total


def _save(fig, out_dir: Path, name: str, dpi: int) -> str:
    fig.savefig(out_dir / name, dpi=dpi)
    plt.close(fig)
    return name


def _method_info(layer) -> dict:
    """The routing methods of issue 24 a layer uses (only those it uses): sigmoid scores, the
    bias per expert of auxiliary-loss-free balancing, the shared experts' width."""
    router, info = layer.router, {}
    if getattr(router, "score_func", "softmax") != "softmax":
        info["score_func"] = router.score_func
    if getattr(router, "expert_bias", None) is not None:
        info["bias_update_rate"] = router.bias_update_rate
        info["expert_bias"] = [round(float(b), 6) for b in router.expert_bias]
    shared = getattr(layer, "shared", None)
    if shared is not None:
        info["shared_hidden_features"] = shared.hidden_features
        info["shared_gate"] = shared.gate is not None
    return info


def _model_info(model: nn.Module, layers) -> dict:
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return {
        "architecture": (getattr(model, "pretrained_cfg", None) or {}).get(
            "architecture", type(model).__name__
        ),
        "num_classes": getattr(model, "num_classes", None),
        "img_size": list(img_size) if img_size is not None else None,
        "moe_layers": {
            name: {
                "router": type(m.router).__name__,
                "num_experts": m.num_experts,
                "num_selected": getattr(m.router, "num_selected", None),
                "capacity_factor": getattr(m.router, "capacity_factor", None),
                "capacity": getattr(m.router, "capacity", None),
                "batch_priority": bool(getattr(m.router, "batch_priority", False)),
                **_method_info(m),
            }
            for name, m in layers.items()
        },
    }


def _dropped_per_image(record: RoutingRecord) -> Optional[np.ndarray]:
    """[B] tokens with a dropped choice in the last recorded batch, summed over the top-K
    layers (None when the model has none)."""
    total = None
    for name in record.layer_names:
        if not record.is_top_k(name):
            continue
        last = record.forwards[name][-1]
        slot = ungroup(last.plan.slot, last.batch_size, last.tokens_per_image)  # [B, N, K]
        count = (slot < 0).any(-1).sum(-1).numpy()
        total = count if total is None else total + count
    return total


def _choose_examples(examples: dict, spare: list, dropping: list, num_examples: int) -> list:
    """The example images: when some images had dropped tokens, half of the examples (rounded
    up) are those with the most (so that the patch maps show what a drop looks like), the rest
    the first image of each class, then any others; in data order."""
    chosen = [(i, img) for _, i, img in sorted(dropping, key=lambda d: (-d[0], d[1]))]
    chosen = chosen[: -(-num_examples // 2)]
    taken = {i for i, _ in chosen}
    for index, image in sorted(examples.values(), key=lambda e: e[0]) + spare:
        if len(chosen) >= num_examples:
            break
        if index not in taken:
            chosen.append((index, image))
            taken.add(index)
    return sorted(chosen, key=lambda e: e[0])


@torch.no_grad()
def _record(model, data, device, num_examples: int, bar) -> dict:
    """One pass: routing of every image, labels, predictions and a few example images."""
    labels, predictions, examples, spare, dropping = [], [], {}, [], []
    seen = 0
    with record_routing(model) as record:
        for images, y in data:
            logits = model(images.to(device))
            for j in range(len(images)):  # first image of each new class, then any others
                label = int(y[j])
                if label not in examples and len(examples) < num_examples:
                    examples[label] = (seen + j, images[j].cpu())
                elif len(spare) < num_examples:
                    spare.append((seen + j, images[j].cpu()))
            # the images with the most dropped tokens so far: (count, index, image)
            counts = _dropped_per_image(record)
            for j in np.nonzero(counts)[0] if counts is not None else ():
                dropping.append((int(counts[j]), seen + int(j), images[int(j)].cpu()))
            dropping = sorted(dropping, key=lambda d: (-d[0], d[1]))[:num_examples]
            labels.append(y.cpu())
            predictions.append(logits.argmax(-1).cpu())
            seen += len(images)
            bar.update(1)
    if seen == 0:
        raise ValueError(
            "data yielded no images: the dataset is empty (or a generator that was "
            "already consumed)"
        )
    chosen = _choose_examples(examples, spare, dropping, num_examples)
    return {
        "record": record,
        "labels": torch.cat(labels).numpy(),
        "predictions": torch.cat(predictions).numpy(),
        "examples": chosen,
    }


def _example_figures(
    record: RoutingRecord, rec: dict, top_k: List[str], class_names, out_dir, dpi
) -> list:
    """Patch maps of the example images, with per-layer dropped-token counts."""
    entries = []
    for n, (index, image) in enumerate(rec["examples"]):
        fig, numbers = patch_map(record, index=index, image=image, layers=top_k)
        label, pred = int(rec["labels"][index]), int(rec["predictions"][index])
        fig.suptitle(
            f"Expert chosen by each patch: image {index}, label {_name(label, class_names)}, "
            f"predicted {_name(pred, class_names)}",
            fontsize=11,
        )
        dropped = {
            name: int(
                numbers["dropped"][i].any(0).sum() + numbers["prefix_dropped"][i].any(0).sum()
            )
            for i, name in enumerate(numbers["layers"])
        }
        entries.append(
            {
                "index": index,
                "label": label,
                "prediction": pred,
                "figure": _save(fig, out_dir, f"patch_map_{n}.png", dpi),
                "tokens_with_a_dropped_choice": dropped,
                "num_tokens": int(record.tokens(top_k[0]).expert.shape[1]),
                "expert": numbers["expert"],
                "dropped": numbers["dropped"],
            }
        )
    return entries


def _name(label: int, class_names) -> str:
    return (
        str(class_names[label])
        if class_names is not None and 0 <= label < len(class_names)
        else str(label)
    )


def _priority(record, index, image, top_k, capacity_factors, out_dir, dpi) -> dict:
    fig, numbers = priority_map(
        record, index=index, image=image, layers=top_k, capacity_factors=capacity_factors
    )
    h, w = numbers["grid_size"]
    # Per what-if routing: the patches of this image no expert would process, and over every
    # recorded image the share of such patches and their mean priority (BPR should skip the
    # low-priority ones, vanilla whatever comes last). One row per (routing, capacity factor).
    P = record.num_prefix_tokens
    whatif = []
    for mode, cf in numbers["skipped"]:
        dataset = {}
        for name in top_k:
            skip = ~record.reroute(name, cf, batch_priority=(mode == "bpr"))[:, P:].any(
                -1
            )  # [B, h*w]
            prio = record.tokens(name).priority[:, P:]
            dataset[name] = {
                "skipped_fraction": float(skip.mean()),
                "mean_priority_skipped": float(prio[skip].mean()) if skip.any() else None,
                "mean_priority_all": float(prio.mean()),
            }
        whatif.append(
            {
                "routing": mode,
                "capacity_factor": float(cf),
                "skipped_patches": {
                    name: int(numbers["skipped"][(mode, cf)][i].sum())
                    for i, name in enumerate(top_k)
                },
                "dataset": dataset,
            }
        )
    return {
        "index": index,
        "figure": _save(fig, out_dir, "priority_map.png", dpi),
        "capacity_factors": [float(c) for c in capacity_factors],
        "num_patches": h * w,
        "whatif": whatif,
        "priority": numbers["priority"],
    }


def _load(record: RoutingRecord, sparse: List[str], out_dir, dpi) -> dict:
    """Expert load of the sparse layers; layers of different (E, K) are drawn in separate
    figures."""
    groups: Dict[tuple, List[str]] = {}
    for name in sparse:
        plan = record.plans(name)[0]
        groups.setdefault(
            (plan.num_experts, plan.num_selected if record.is_top_k(name) else 1), []
        ).append(name)
    figures, layers = [], {}
    for g, names in enumerate(groups.values()):
        fig, numbers = expert_load(record, layers=names)
        figures.append(
            _save(
                fig, out_dir, "expert_load.png" if len(groups) == 1 else f"expert_load_{g}.png", dpi
            )
        )
        for i, name in enumerate(names):
            layers[name] = {
                k: numbers[k][i] for k in ("routed", "kept", "capacity", "dropped_fraction")
            }
    return {"figures": figures, "layers": layers}


def _soft_sections(
    record: RoutingRecord, rec: dict, soft: List[str], class_names, out_dir, dpi
) -> dict:
    """Soft MoE layers: dispatch maps of the example images, the combine-entropy map of the
    first one, the slot similarity, and per-layer statistics over every recorded group."""
    maps = []
    for n, (index, image) in enumerate(rec["examples"]):
        fig, numbers = dispatch_map(record, index=index, image=image, layers=soft)
        label, pred = int(rec["labels"][index]), int(rec["predictions"][index])
        fig.suptitle(
            f"Which patches each slot mixes: image {index}, label {_name(label, class_names)}, "
            f"predicted {_name(pred, class_names)}",
            fontsize=11,
        )
        maps.append(
            {
                "index": index,
                "label": label,
                "prediction": pred,
                "figure": _save(fig, out_dir, f"dispatch_map_{n}.png", dpi),
                "slots": numbers["slots"],
                "dispatch": numbers["dispatch"],
            }
        )
    index, image = rec["examples"][0]
    fig, entropy = combine_entropy_map(record, index=index, image=image, layers=soft)
    fig_sim, similarity = slot_similarity(record, layers=soft)
    layers = {}
    for i, name in enumerate(soft):
        plans = record.plans(name)
        groups = sum(p.num_groups for p in plans)
        stats = [soft_routing_statistics(p) for p in plans]
        mean = {
            k: sum(s[k].double() * p.num_groups for s, p in zip(stats, plans)) / groups
            for k in (
                "importance",
                "combine_entropy",
                "dispatch_effective_tokens",
                "dispatch_weights_max_mean",
                "combine_weights_max_mean",
            )
        }
        layers[name] = {
            "num_experts": plans[0].num_experts,
            "slots_per_expert": plans[0].slots_per_expert,
            "group_size": plans[0].group_size,
            "max_entropy": float(entropy["max_entropy"][i]),
            "mean_off_diagonal_similarity": float(similarity["mean_off_diagonal"][i]),
            "slot_similarity": similarity["similarity"][i],
            **{k: v.float().numpy() if v.dim() else float(v) for k, v in mean.items()},
        }
    return {
        "dispatch_maps": maps,
        "combine_entropy": {
            "index": index,
            "figure": _save(fig, out_dir, "combine_entropy.png", dpi),
            "entropy": entropy["entropy"],
        },
        "slot_similarity": {"figure": _save(fig_sim, out_dir, "slot_similarity.png", dpi)},
        "layers": layers,
    }


def write_routing_report(
    model: nn.Module,
    data: Iterable,
    out_dir: Union[str, Path],
    *,
    max_images: Optional[int] = 512,
    num_examples: int = 4,
    capacity_factors: Optional[Sequence[float]] = DEFAULT_CAPACITY_FACTORS,
    priority_capacity_factors: Sequence[float] = (0.5,),
    class_names: Optional[Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    title: Optional[str] = None,
    dpi: int = 110,
    record_capacity_factor: Optional[float] = None,
) -> dict:
    """Write the routing report of ``model`` over ``data`` into ``out_dir``.

    Args:
        model: a model with MoeMlp layers (a timm ViT / V-MoE); evaluated in eval mode, its
            mode and routing settings restored afterwards.
        data: batches of (images [B, C, H, W] at the model's input size, labels [B] int), e.g. a
            DataLoader. Iterated once for the routing and, when it can be iterated again, again
            for each point of the capacity sweep (a one-shot iterator is kept in memory).
        max_images: use the first this many images (None: all).
        num_examples: patch maps drawn (the first image of each class first).
        capacity_factors: the sweep's inference capacity factors; None or () skips the sweep.
        priority_capacity_factors: the capacity factors of the priority map's what-if panels.
        class_names: names of the label ids (tick labels and captions).
        device: where to run (default: the model's parameters' device).
        progress: show tqdm progress bars (stderr).
        record_capacity_factor: None (default): the patch maps, expert load and accuracy are
            recorded with the model's own evaluation routing, dropless for top-K layers (every
            token reaches its K experts: nothing is dropped); a number: recorded on the capacity
            path at that factor (e.g. the training factor, to see which tokens it drops).
    Returns:
        The report as written to ``report.json`` (numbers as lists), with ``files``: every
        written file name.
    Raises:
        ValueError: a model without MoE layers, an empty dataset, images whose size does not
        match the model's, bad arguments.
    """
    layers = require_moe_layers(model)  # ValueError naming the model when it has no MoE layer
    if max_images is not None and (
        isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1
    ):
        raise ValueError(
            f"max_images must be a positive int or None, got max_images={max_images!r}"
        )
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got num_examples={num_examples!r}")
    capacity_factors = tuple(capacity_factors or ())
    extra = () if record_capacity_factor is None else (record_capacity_factor,)
    for cf in (*capacity_factors, *priority_capacity_factors, *extra):
        if not isinstance(cf, (int, float)) or isinstance(cf, bool) or not cf > 0:
            raise ValueError(f"capacity factors must be positive numbers, got {cf!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device if device is not None else next(model.parameters()).device

    # A generator/iterator can be read once: keep its batches for the sweep. (Never call
    # iter() here: on a DataLoader that would start its workers for nothing.)
    one_shot = isinstance(data, collections.abc.Iterator)
    kept_batches: List = []
    view = FirstImages(data, max_images)
    previous = None
    if record_capacity_factor is not None:
        sparse_layers = [n for n, m in layers.items() if not m.is_soft]
        if not sparse_layers:
            raise ValueError(
                "record_capacity_factor: the model has only Soft MoE layers, which have no "
                "capacity factor (their slots are fixed)"
            )
        previous = set_routing(
            model, capacity_factor=float(record_capacity_factor), layers=sparse_layers
        )
    was_training = model.training
    model.eval()
    # the forward each layer ran while recording: 'dropless' (nothing dropped), 'capacity'
    # (at the layer's factor, or record_capacity_factor) or 'soft'
    paths = {
        n: "soft" if m.is_soft else "dropless" if m.routes_dropless else "capacity"
        for n, m in layers.items()
    }
    try:
        with tqdm(
            total=_expected_batches(data, max_images),
            desc="recording routing",
            unit="batch",
            disable=not progress,
        ) as bar:
            batches = ((kept_batches.append(b) or b) if one_shot else b for b in view)
            rec = _record(model, batches, device, num_examples, bar)
    finally:
        if previous is not None:
            restore_routing(model, previous)
        model.train(was_training)
    record: RoutingRecord = rec["record"]
    labels = rec["labels"]
    if class_names is not None and int(labels.max()) >= len(class_names):
        raise ValueError(
            f"class_names has {len(class_names)} names but the data has label {int(labels.max())}"
        )

    report: dict = {
        "format": REPORT_FORMAT,
        "version": 1,
        "title": title or "Routing report",
        "model": _model_info(model, layers),
        "data": {
            "num_images": int(len(labels)),
            "classes": np.unique(labels),
            "class_names": list(map(str, class_names)) if class_names is not None else None,
        },
        "accuracy": float((rec["predictions"] == labels).mean()),
        "recorded_with": {"paths": paths, "capacity_factor": record_capacity_factor},
    }
    soft = [n for n in record.layer_names if record.is_soft(n)]
    sparse = [n for n in record.layer_names if n not in soft]
    top_k = [n for n in sparse if record.is_top_k(n)]
    if top_k:
        report["examples"] = _example_figures(record, rec, top_k, class_names, out_dir, dpi)
        index, image = rec["examples"][0]
        report["priority_map"] = _priority(
            record, index, image, top_k, priority_capacity_factors, out_dir, dpi
        )
    if sparse:
        report["expert_load"] = _load(record, sparse, out_dir, dpi)
    if soft:
        report["soft"] = _soft_sections(record, rec, soft, class_names, out_dir, dpi)
        report["omitted"] = [
            f"Soft MoE layers ({', '.join(soft)}) drop no token and have no per-token "
            "expert choice: the patch maps, BPR priority map and expert load are drawn "
            + ("for the sparse layers only." if sparse else "for sparse layers only.")
        ]
        if capacity_factors:
            report["omitted"].append(
                "Capacity sweep omitted: a Soft MoE layer's slots are parameters, "
                "there is no capacity factor to vary at inference."
            )

    choice = (
        0 if top_k == sparse else None
    )  # expert choice: every kept pick (soft layers: combine weights)
    fig, numbers = class_expert_matrix(record, labels, choice=choice, class_names=class_names)
    report["class_expert"] = {
        "figure": _save(fig, out_dir, "class_expert.png", dpi),
        "choice": choice if sparse else None,
        "weighting": "combine" if not sparse else ("mixed" if soft else "count"),
        "classes": numbers["classes"],
        "layers": {
            name: {
                k: numbers[k][i]
                for k in (
                    "counts",
                    "matrix",
                    "mutual_information_bits",
                    "class_order",
                    "expert_order",
                )
            }
            for i, name in enumerate(numbers["layers"])
        },
    }

    if capacity_factors and not soft:
        modes = ("vanilla", "bpr") if top_k == record.layer_names else ("vanilla",)
        sweep_data = kept_batches if one_shot else view
        num_batches = len(record.forwards[record.layer_names[0]])  # one forward per batch
        with tqdm(
            total=num_batches * (1 + len(capacity_factors) * len(modes)),
            desc="capacity sweep",
            unit="batch",
            disable=not progress,
        ) as bar:
            fig, numbers = capacity_sweep(
                model,
                FirstImages(sweep_data, max_images, lambda: bar.update(1)),
                capacity_factors=capacity_factors,
                modes=modes,
                device=device,
            )
        report["capacity_sweep"] = {
            "figure": _save(fig, out_dir, "capacity_sweep.png", dpi),
            **{k: numbers[k] for k in ("rows", "reference_accuracy", "num_images")},
        }

    report = to_jsonable(report)
    report["files"] = _figure_names(report) + ["index.html", "report.json"]
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "index.html").write_text(render_page(report, out_dir), encoding="utf-8")
    return report


def _figure_names(report: dict) -> List[str]:
    """Every PNG the report drew, in page order."""
    names = [e["figure"] for e in report.get("examples", [])]
    if "priority_map" in report:
        names.append(report["priority_map"]["figure"])
    if "expert_load" in report:
        names += report["expert_load"]["figures"]
    if "soft" in report:
        names += [m["figure"] for m in report["soft"]["dispatch_maps"]]
        names += [
            report["soft"]["combine_entropy"]["figure"],
            report["soft"]["slot_similarity"]["figure"],
        ]
    names.append(report["class_expert"]["figure"])
    if "capacity_sweep" in report:
        names.append(report["capacity_sweep"]["figure"])
    return names
