"""Makes the pictures of the routing visualization guide (docs/guides/routing-visualization.md).

Trains the quickstart (``vmoe fit --config configs/quickstart.yaml``, into a temporary run
folder) unless ``--model`` names a trained model already (e.g. ``runs/quickstart/export``),
writes its routing report over the digits test split, and copies the report's figures that the
guide shows (``FIGURES``) into ``--out`` (default ``docs/images/routing``).
``tests/test_docs_figures.py`` runs this script with ``--fast`` (an untrained model, a few images,
into a temporary folder) and checks that it writes every picture the guide shows.

    python3 scripts/routing_figures.py [--model runs/quickstart/export] [--out docs/images/routing]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# report file -> the name it has beside the guide (the patch map: the example with the most
# dropped tokens, so that the guide shows what a drop looks like)
FIGURES = {
    "patch_map": "patch_map.png",
    "class_expert.png": "class_expert.png",
    "capacity_sweep.png": "capacity_sweep.png",
}


def _most_drops(report: dict) -> str:
    def drops(example):
        return sum(example["tokens_with_a_dropped_choice"].values())

    return max(report["examples"], key=drops)["figure"]


def _train(run: Path) -> Path:
    from vmoe.cli import main

    argv = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml")]
    argv += ["--trainer.default_root_dir", str(run), "--trainer.logger", "false"]
    if main(argv) != 0:
        raise SystemExit("vmoe fit failed")
    return run / "export"


def _untrained(where: Path) -> Path:
    import timm

    import vmoe.models as vm

    vm.save_pretrained(timm.create_model("vmoe_tiny_e4_k2", num_classes=10), where)
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a trained model's folder (default: train the quickstart)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "routing"))
    parser.add_argument(
        "--fast", action="store_true", help="an untrained model on 32 images (for the test)"
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    from vmoe.cli.commands import eval_loader, load_model
    from vmoe.viz import write_routing_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmoe-figures-") as tmp:
        tmp = Path(tmp)
        if args.model:
            source = Path(args.model)
        elif args.fast:
            source = _untrained(tmp / "model")
        else:
            source = _train(tmp / "run")
        model = load_model(str(source)).eval()
        loader, classes = eval_loader("digits", 16, 64, "test")
        report = write_routing_report(
            model,
            loader,
            tmp / "report",
            max_images=32 if args.fast else 512,
            capacity_factors=(0.5, 1.0, 2.0)
            if args.fast
            else (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0),
            class_names=classes,
            progress=False,
            title="Routing report: vmoe_tiny_e4_k2 on digits (the quickstart)",
            # the patch maps at the training capacity factor, so the picture shows what it drops
            # (the evaluation default, dropless, drops nothing)
            record_capacity_factor=1.05,
        )
        for name, shown in FIGURES.items():
            name = _most_drops(report) if name == "patch_map" else name
            shutil.copyfile(tmp / "report" / name, out / shown)
    print(f"accuracy {100 * report['accuracy']:.1f}%; wrote {', '.join(FIGURES.values())} to {out}")


if __name__ == "__main__":
    main()
