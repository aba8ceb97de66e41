"""The report's single HTML page (figures embedded as base64 data URIs, so the file can be mailed
or opened anywhere) and the capacity sweep as a table for the terminal.

Both read the JSON-ready report dict written by ``write_routing_report``; nothing is computed
here beyond formatting (and the small summaries the captions quote). The page is the jinja2
template ``templates/report.html`` (autoescaped); the sweep's table cells are made once, by
``sweep_table``, from the sweep's rows and written out as markdown or as HTML.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import jinja2
import numpy as np

__all__ = ["render_page", "sweep_markdown", "sweep_table", "caption_numbers", "SweepTable"]

_ROUTING_LABEL = {"vanilla": "vanilla", "bpr": "BPR"}


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _reference_cf(factors: List[float]) -> float:
    """The capacity factor the captions quote: 0.5 when swept, else the smallest."""
    return min(factors, key=lambda f: (abs(f - 0.5) > 1e-9, f))


def _max_over_mean(per_expert: np.ndarray) -> float:
    """Assignments of the busiest expert over the mean per expert [E]."""
    return float(per_expert.max() / max(per_expert.mean(), 1e-12))


def caption_numbers(report: dict) -> Dict[str, object]:
    """The key numbers quoted in the captions (also handy in tests and notebooks)."""
    load = (
        report["expert_load"]["layers"] if "expert_load" in report else {}
    )  # none: all layers Soft MoE
    out: Dict[str, object] = {
        "dropped_fraction": {n: v["dropped_fraction"] for n, v in load.items()},
        # busiest expert's assignments over the mean per expert: 1.0 is perfectly balanced
        "max_over_mean_load": {
            n: _max_over_mean(np.sum(v["routed"], axis=0)) for n, v in load.items()
        },
        "mutual_information_bits": {
            n: v["mutual_information_bits"] for n, v in report["class_expert"]["layers"].items()
        },
    }
    sweep = report.get("capacity_sweep")
    if sweep:
        cf = _reference_cf([r["capacity_factor"] for r in sweep["rows"]])
        out["sweep_at"] = {
            "capacity_factor": cf,
            "accuracy": {
                r["routing"]: r["accuracy"] for r in sweep["rows"] if r["capacity_factor"] == cf
            },
        }
    return out


class SweepTable(NamedTuple):
    """The capacity sweep as text cells: ``head`` [columns], ``body`` [capacity factors]
    [columns]."""

    head: List[str]
    body: List[List[str]]


def sweep_table(sweep: dict) -> SweepTable:
    """One row per capacity factor: accuracy and dropped fraction per routing, MoE MFLOPs/image.

    ``sweep``: a dict with ``rows``, the ``SweepRow``s of ``capacity_sweep`` (its numbers, or the
    report's ``capacity_sweep`` entry). The FLOPs are the same for every routing (same buffers).
    """
    rows = sweep["rows"]
    modes = list(dict.fromkeys(r["routing"] for r in rows))
    factors = list(dict.fromkeys(r["capacity_factor"] for r in rows))
    at = {(r["routing"], r["capacity_factor"]): r for r in rows}
    head = (
        ["capacity factor"]
        + [f"accuracy {_ROUTING_LABEL[m]}" for m in modes]
        + [f"dropped {_ROUTING_LABEL[m]}" for m in modes]
        + ["MoE MFLOPs/image"]
    )
    body = [
        [f"{cf:g}"]
        + [_pct(at[m, cf]["accuracy"]) for m in modes]
        + [_pct(at[m, cf]["dropped_fraction"]) for m in modes]
        + [f"{at[modes[0], cf]['moe_flops_per_image'] / 1e6:.3f}"]
        for cf in factors
    ]
    return SweepTable(head, body)


def sweep_markdown(sweep: dict) -> str:
    """The capacity sweep as a markdown table (``sweep_table``'s cells), then the model's own
    settings' accuracy when it was measured."""
    table = sweep_table(sweep)
    lines = [
        "| " + " | ".join(table.head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(table.head) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table.body]
    if sweep.get("reference_accuracy") is not None:
        lines.append(
            f"\nModel's own routing settings: accuracy {_pct(sweep['reference_accuracy'])} "
            f"over {sweep['num_images']} images."
        )
    return "\n".join(lines)


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("vmoe.viz", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
_ENV.filters.update(pct=_pct, g=lambda x: f"{x:g}")


def render_page(report: dict, out_dir: Path) -> str:
    """The self-contained ``index.html`` for ``report`` (PNGs read from ``out_dir``)."""
    out_dir = Path(out_dir)
    class_names = report["data"].get("class_names")
    ce = report["class_expert"]
    num_experts = max(len(v["matrix"][0]) for v in ce["layers"].values())

    def data_uri(name: str) -> str:
        return "data:image/png;base64," + base64.b64encode((out_dir / name).read_bytes()).decode(
            "ascii"
        )

    def class_name(label: int) -> str:
        return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)

    sweep = report.get("capacity_sweep")
    return _ENV.get_template("report.html").render(
        report=report,
        keys=caption_numbers(report),
        data_uri=data_uri,
        class_name=class_name,
        nan=float("nan"),
        mi_bound=math.log2(max(1, min(num_experts, len(ce["classes"])))),
        sweep_table=sweep_table(sweep) if sweep else None,
    )
