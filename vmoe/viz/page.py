"""The report's single HTML page (figures embedded as base64 data URIs, so the file can be mailed
or opened anywhere) and the capacity sweep as a markdown table for the terminal.

Both read the JSON-ready report dict written by ``write_routing_report``; nothing is computed
here beyond formatting (and the small summaries the captions quote).
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

__all__ = ["render_page", "sweep_markdown", "caption_numbers"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.92em; color: #333; margin-top: 0.4em; }
.examples { display: flex; flex-wrap: wrap; gap: 0 2%; } .examples figure { flex: 0 0 49%; }
.key { font-weight: 600; } .muted { color: #666; font-size: 0.9em; }
"""


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _esc(x) -> str:
    return html.escape(str(x))


def _img(out_dir: Path, name: str, alt: str) -> str:
    data = base64.b64encode((out_dir / name).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}" data-file="{_esc(name)}">'


def _figure(out_dir: Path, name: str, alt: str, caption: str) -> str:
    return f"<figure>{_img(out_dir, name, alt)}<figcaption>{caption}</figcaption></figure>"


def _class_name(report: dict, label: int) -> str:
    names = report["data"].get("class_names")
    return names[label] if names and 0 <= label < len(names) else str(label)


def _reference_cf(factors: List[float]) -> int:
    """Index of the capacity factor the captions quote: 0.5 when swept, else the smallest."""
    return min(range(len(factors)), key=lambda i: (abs(factors[i] - 0.5) > 1e-9, factors[i]))


def _max_over_mean(per_expert: np.ndarray) -> float:
    """Assignments of the busiest expert over the mean per expert [E]."""
    return float(per_expert.max() / max(per_expert.mean(), 1e-12))


def caption_numbers(report: dict) -> Dict[str, object]:
    """The key numbers quoted in the captions (also handy in tests and notebooks)."""
    load = report["expert_load"]["layers"]
    out: Dict[str, object] = {
        "dropped_fraction": {n: v["dropped_fraction"] for n, v in load.items()},
        # busiest expert's assignments over the mean per expert: 1.0 is perfectly balanced
        "max_over_mean_load": {n: _max_over_mean(np.sum(v["routed"], axis=0)) for n, v in load.items()},
        "mutual_information_bits": {n: v["mutual_information_bits"]
                                    for n, v in report["class_expert"]["layers"].items()},
    }
    sweep = report.get("capacity_sweep")
    if sweep:
        i = _reference_cf(sweep["capacity_factors"])
        out["sweep_at"] = {"capacity_factor": sweep["capacity_factors"][i],
                           **{m: acc[i] for m, acc in sweep["accuracy"].items()}}
    return out


def sweep_markdown(sweep: dict) -> str:
    """The capacity sweep as a markdown table: one row per capacity factor."""
    modes = list(sweep["accuracy"])
    label = {"vanilla": "vanilla", "bpr": "BPR"}
    head = (["capacity factor"] + [f"accuracy {label[m]}" for m in modes]
            + [f"dropped {label[m]}" for m in modes] + ["MoE MFLOPs/image"])
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for i, cf in enumerate(sweep["capacity_factors"]):
        cells = ([f"{cf:g}"] + [_pct(sweep["accuracy"][m][i]) for m in modes]
                 + [_pct(sweep["dropped_fraction"][m][i]) for m in modes]
                 + [f"{sweep['moe_flops_per_image'][modes[0]][i] / 1e6:.3f}"])
        rows.append("| " + " | ".join(cells) + " |")
    if sweep.get("reference_accuracy") is not None:
        rows.append(f"\nModel's own routing settings: accuracy {_pct(sweep['reference_accuracy'])} "
                    f"over {sweep['num_images']} images.")
    return "\n".join(rows)


def _sweep_html(sweep: dict) -> str:
    lines = [ln for ln in sweep_markdown(sweep).splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{_esc(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in cells[2:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _priority_table(dataset: dict, num_images: int) -> str:
    """Over every image: share of patches skipped and their mean priority, per routing."""
    rows = []
    for key, layers in dataset.items():
        mode, cf = key.split("@")
        for name, v in layers.items():
            skipped = "-" if v["mean_priority_skipped"] is None else f"{v['mean_priority_skipped']:.3f}"
            rows.append(f"<tr><td>{'BPR' if mode == 'bpr' else 'vanilla'}, capacity factor {_esc(cf)}</td>"
                        f"<td>{_esc(name)}</td><td>{_pct(v['skipped_fraction'])}</td><td>{skipped}</td>"
                        f"<td>{v['mean_priority_all']:.3f}</td></tr>")
    return (f"<p>Over all {num_images} images: the share of patches no expert would process, and the mean "
            "priority of those patches against the mean of all patches (lower under BPR: it skips the "
            "patches the router is least sure about).</p><table><tr><th>routing</th><th>layer</th>"
            "<th>patches skipped</th><th>mean priority, skipped</th><th>mean priority, all</th></tr>"
            + "".join(rows) + "</table>")


def _summary(report: dict, keys: dict) -> str:
    model, data = report["model"], report["data"]
    size = "x".join(map(str, model["img_size"])) if model.get("img_size") else "?"
    rows = "".join(
        f"<tr><td>{_esc(n)}</td><td>{_esc(m['router'])}</td><td>{m['num_experts']}</td>"
        f"<td>{m['num_selected'] if m['num_selected'] is not None else '-'}</td>"
        f"<td>{_esc(m['capacity_factor'])}</td><td>{'yes' if m['batch_priority'] else 'no'}</td>"
        f"<td>{_pct(keys['dropped_fraction'].get(n))}</td>"
        f"<td>{keys['max_over_mean_load'].get(n, float('nan')):.2f}</td>"
        f"<td>{keys['mutual_information_bits'].get(n, float('nan')):.3f}</td></tr>"
        for n, m in model["moe_layers"].items())
    return (f"<p>Model <span class='key'>{_esc(model['architecture'])}</span>, {model['num_classes']} classes, "
            f"input {size} pixels. Data: <span class='key'>{data['num_images']}</span> images of "
            f"{len(data['classes'])} classes. Top-1 accuracy with the model's own routing settings: "
            f"<span class='key'>{_pct(report['accuracy'])}</span>.</p>"
            "<table><tr><th>MoE layer</th><th>router</th><th>experts E</th><th>choices K</th>"
            "<th>capacity factor</th><th>BPR</th><th>dropped assignments</th>"
            "<th>busiest / mean load</th><th>I(class; expert) bits</th></tr>" + rows + "</table>")


def render_page(report: dict, out_dir: Path) -> str:
    """The self-contained ``index.html`` for ``report`` (PNGs read from ``out_dir``)."""
    out_dir = Path(out_dir)
    keys = caption_numbers(report)
    n_img = report["data"]["num_images"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_esc(report['title'])}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_esc(report['title'])}</h1>",
             "<p class='muted'>Written by vmoe.viz.write_routing_report; the numbers are in report.json "
             "beside this page.</p>", _summary(report, keys)]

    if report.get("examples"):
        parts.append("<h2>Patch maps: which expert each patch goes to</h2><p>Each patch is colored by the "
                     "expert its token chose first (left column) and second (right column), one row per MoE "
                     "layer; the square left of the grid is the class token. Hatched: that choice was dropped "
                     "because the expert's buffer was full, so the token skips that expert (with every choice "
                     "dropped, only the residual connection carries it through the layer).</p>"
                     "<div class='examples'>")
        for ex in report["examples"]:
            dropped = ", ".join(f"{_esc(n)} {c}/{ex['num_tokens']}"
                                for n, c in ex["tokens_with_a_dropped_choice"].items())
            caption = (f"Image {ex['index']}: label {_esc(_class_name(report, ex['label']))}, predicted "
                       f"{_esc(_class_name(report, ex['prediction']))}. Colors: expert of the 1st (left) and 2nd "
                       "(right) choice of each patch, hatched = dropped. <span class='key'>Tokens with a dropped "
                       f"choice: {dropped}.</span>")
            parts.append(_figure(out_dir, ex["figure"], f"patch map of image {ex['index']}", caption))
        parts.append("</div>")

    if "priority_map" in report:
        pm = report["priority_map"]
        skipped = "; ".join(f"{'BPR' if k.startswith('bpr') else 'vanilla'} at capacity factor {k.split('@')[1]}: "
                            + ", ".join(f"{_esc(n)} {c}" for n, c in v.items())
                            for k, v in pm["skipped_patches"].items())
        caption = ("Left: each patch's priority, its largest gate, the score Batch Priority Routing (BPR) sorts "
                   "tokens by. Other columns: the recorded gates routed again at a lower capacity factor; filled "
                   "and hatched patches would be processed by no expert at all, with BPR (highest priority "
                   "first) and with vanilla routing (earlier tokens first). BPR drops the low-priority patches "
                   f"instead of whatever comes last. <span class='key'>Skipped patches of this image (of "
                   f"{pm['num_patches']}): {skipped}.</span>")
        parts += ["<h2>Batch Priority Routing</h2>",
                  _figure(out_dir, pm["figure"], f"priority map of image {pm['index']}", caption),
                  _priority_table(pm["dataset"], n_img)]

    dropped = ", ".join(f"{_esc(n)} {_pct(v)}" for n, v in keys["dropped_fraction"].items())
    balance = ", ".join(f"{_esc(n)} {v:.2f}x" for n, v in keys["max_over_mean_load"].items())
    parts.append("<h2>Expert load</h2>")
    for name in report["expert_load"]["figures"]:
        caption = (f"Token assignments each expert received over {n_img} images, stacked: kept first choices, "
                   "kept later choices, dropped ones (hatched), against each expert's capacity summed over all "
                   "routing groups (dashed line). Bars above the line mean tokens were dropped. "
                   f"<span class='key'>Dropped assignments: {dropped}. Busiest expert over the mean load "
                   f"(1.00 = balanced): {balance}.</span>")
        parts.append(_figure(out_dir, name, "expert load per layer", caption))

    ce = report["class_expert"]
    num_experts = max(len(v["matrix"][0]) for v in ce["layers"].values())
    bound = math.log2(max(1, min(num_experts, len(ce["classes"]))))
    mi = ", ".join(f"{_esc(n)} {v:.3f}" for n, v in keys["mutual_information_bits"].items())
    what = "first-choice expert" if ce["choice"] == 0 else "experts (every kept assignment)"
    caption = (f"For each class (rows), the share of its patches whose {what} is each expert (columns); rows sum "
               "to 1. Experts are ordered by load and classes grouped by their dominant expert, so blocks show "
               "experts that specialize in some classes. <span class='key'>Mutual information between class and "
               f"expert, in bits (0: no specialization, at most {bound:.2f}): {mi}.</span>")
    parts += ["<h2>Class x expert</h2>", _figure(out_dir, ce["figure"], "class by expert matrix", caption)]

    if "capacity_sweep" in report:
        sw = report["capacity_sweep"]
        at = keys["sweep_at"]
        quoted = ", ".join(f"{'BPR' if m == 'bpr' else 'vanilla'} {_pct(at[m])}" for m in sw["accuracy"])
        caption = ("Top-1 accuracy (left), dropped token assignments (middle) and the FLOPs the MoE layers spend "
                   "per image (right) against the capacity factor used at inference, with vanilla routing and "
                   f"with BPR, over the same {sw['num_images']} images; dashed: the model's own settings "
                   f"({_pct(sw['reference_accuracy'])}). As in the V-MoE paper, BPR should keep accuracy at low "
                   f"capacity. <span class='key'>At capacity factor {at['capacity_factor']:g}: {quoted}.</span>")
        parts += ["<h2>Capacity sweep</h2>", _figure(out_dir, sw["figure"], "capacity sweep", caption),
                  _sweep_html(sw)]
    parts.append("</body></html>")
    return "\n".join(parts)
