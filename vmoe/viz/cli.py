"""``vmoe routing-report`` and ``vmoe capacity-sweep``: argparse front ends of the report.

    vmoe routing-report --model runs/x/export --data digits --out report/
    vmoe capacity-sweep --model runs/x/export --data path/to/val_images --out sweep/

``--model`` is a directory written by ``vmoe.models.save_pretrained`` (e.g. the ``export/``
folder of a training run). ``--data`` is ``digits`` (scikit-learn's digits, the held-out split
of ``vmoe.data.DigitsDataModule``) or a folder of class sub-folders of images
(``<dir>/<class>/<image>``; labels = sorted folder names, as ``ImageFolderDataModule``).
Images go through the data modules' evaluation pipeline (resize, center crop, normalize) at the
model's input size.

``vmoe.cli`` dispatches to ``routing_report_main(argv)`` / ``capacity_sweep_main(argv)``; both
return an exit code: 0, or 2 with a one-line ``vmoe <command>: error: ...`` for bad input
(``VMOE_DEBUG=1`` re-raises to show the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

__all__ = ["routing_report_main", "capacity_sweep_main", "build_eval_loader", "load_model"]

_SPLITS = ("test", "val", "train")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from .report import DEFAULT_CAPACITY_FACTORS
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", required=True, help="directory written by vmoe.models.save_pretrained "
                   "(config.json + model.safetensors), e.g. a training run's export/ folder")
    p.add_argument("--data", required=True, help="'digits' or a folder of class sub-folders of images")
    p.add_argument("--split", choices=_SPLITS, default="test", help="digits: which split (default: test)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-images", type=_positive_int, default=512, help="use the first N images (default 512)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward (default 64)")
    p.add_argument("--capacity-factors", type=_positive_float, nargs="+", default=list(DEFAULT_CAPACITY_FACTORS),
                   metavar="CF", help="inference capacity factors of the sweep (default: %(default)s)")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="per-channel normalization mean on the [0, 1] scale (default 0.5, as vmoe.data)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std (default 0.5)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:1', ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def load_model(directory: str):
    """``vmoe.models.from_pretrained(directory)`` with a clear error for a wrong path or an
    architecture that timm does not know."""
    import vmoe.models as vm
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {directory}: not a directory (expected a folder written by "
                                "vmoe.models.save_pretrained, holding config.json and model.safetensors)")
    try:
        return vm.from_pretrained(path)
    except RuntimeError as err:  # timm.create_model: "Unknown model (name)"
        if not str(err).startswith("Unknown model"):
            raise
        raise ValueError(f"--model {directory}: config.json names an architecture that is not a "
                         f"registered timm model ({err}); vmoe's are timm.list_models('vmoe_*')") from None


def refuse_non_empty(out: Path, overwrite: bool) -> None:
    """``--out`` must be a new or empty directory unless ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace "
                              "the report's files in it, or choose a new directory")


def _model_img_size(model) -> int:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        raise ValueError("the model has no patch_embed.img_size: cannot tell which image size it expects")
    h, w = size
    if h != w:
        raise ValueError(f"the model expects {h}x{w} images; only square inputs are supported here")
    return int(h)


def build_eval_loader(data: str, img_size: int, batch_size: int, split: str = "test",
                      mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                      num_workers: int = 0) -> Tuple[object, List[str]]:
    """A DataLoader of (images [B,3,img_size,img_size], labels [B]) and the class names.

    ``data``: 'digits' (``split`` of ``DigitsDataModule``) or a folder ``<data>/<class>/<image>``.
    """
    from torch.utils.data import DataLoader

    from vmoe.data import DigitsDataModule, ImageFileDataset, build_eval_transform
    from vmoe.data.base import DEFAULT_MEAN, DEFAULT_STD
    from vmoe.data.imagefolder import IMAGE_EXTENSIONS, list_class_folders, scan_split
    from vmoe.data.transforms import EvalTransformConfig

    if data == "digits":
        dm = DigitsDataModule(img_size=img_size, batch_size=batch_size, mean=mean, std=std,
                              num_workers=num_workers)
        dm.setup("fit" if split in ("train", "val") else "test")
        dataset = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}[split]
        if split == "train":  # show the training images without augmentation
            dataset.transform = dm.build_eval_transform()
        classes = list(dm.classes)
    else:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data {data}: neither 'digits' nor an existing folder of class "
                                    "sub-folders (<dir>/<class>/<image>)")
        classes = list_class_folders(root)
        paths, labels = scan_split(root, classes, IMAGE_EXTENSIONS)
        mean = tuple(DEFAULT_MEAN if mean is None else mean)
        std = tuple(DEFAULT_STD if std is None else std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"--mean/--std need 3 values for RGB images, got mean={mean} std={std}")
        dataset = ImageFileDataset(paths, labels, build_eval_transform(img_size, EvalTransformConfig(), mean, std))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return loader, classes


def _prepare(args):
    """Model on its device (eval mode) and the loader at the model's image size."""
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.model).to(device).eval()
    loader, classes = build_eval_loader(args.data, _model_img_size(model), args.batch_size, args.split,
                                        args.mean, args.std, args.num_workers)
    num_classes = getattr(model, "num_classes", None)
    if num_classes and len(classes) > num_classes:
        raise ValueError(f"--data {args.data} has {len(classes)} classes but the model has "
                         f"num_classes={num_classes}")
    return model, loader, classes, device


def _run(prog: str, body, argv: Optional[Sequence[str]]) -> int:
    """The one error path of every vmoe command (``vmoe.cli.run_command``)."""
    from vmoe.cli import run_command
    os.environ.setdefault("WANDB_MODE", "offline")
    return run_command(prog.removeprefix("vmoe "), lambda: body(argv))


def routing_report_main(argv: Optional[Sequence[str]] = None) -> int:
    """``vmoe routing-report``: PNGs + self-contained index.html + report.json in ``--out``."""
    prog = "vmoe routing-report"

    def body(argv) -> int:
        p = _common_parser(prog, "Write a routing report (patch maps, BPR priority map, expert load, "
                                 "class x expert matrix, capacity sweep) as PNGs, one self-contained "
                                 "index.html and report.json.")
        p.add_argument("--examples", type=_positive_int, default=4, help="patch maps drawn (default 4)")
        p.add_argument("--no-sweep", action="store_true", help="skip the capacity sweep")
        p.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty --out (replacing the report's files there)")
        args = p.parse_args(argv)
        from vmoe.models.pretrained import staged_save_dir

        from .report import write_routing_report
        out = Path(args.out)
        refuse_non_empty(out, args.overwrite)  # before any work
        model, loader, classes, device = _prepare(args)
        # Written into a temporary folder beside --out, moved into place when complete.
        with staged_save_dir(out, overwrite=True) as tmp:
            report = write_routing_report(
                model, loader, tmp, max_images=args.max_images, num_examples=args.examples,
                capacity_factors=None if args.no_sweep else args.capacity_factors, class_names=classes,
                device=device, progress=not args.no_progress,
                title=f"Routing report: {Path(args.model).name} on {args.data}")
        print(f"accuracy {100 * report['accuracy']:.1f}% over {report['data']['num_images']} images")
        print(f"wrote {len(report['files'])} files to {out}/; open {out / 'index.html'}")
        return 0

    return _run(prog, body, argv)


def capacity_sweep_main(argv: Optional[Sequence[str]] = None) -> int:
    """``vmoe capacity-sweep``: prints a markdown table; writes capacity_sweep.png/.json to ``--out``."""
    prog = "vmoe capacity-sweep"

    def body(argv) -> int:
        p = _common_parser(prog, "Accuracy and MoE FLOPs against the inference capacity factor, with "
                                 "vanilla routing and Batch Priority Routing.")
        args = p.parse_args(argv)
        import matplotlib.pyplot as plt
        from tqdm import tqdm  # text bar: tqdm.auto warns in Jupyter without ipywidgets

        from vmoe.moe import ExpertChoiceRouter

        from .page import sweep_markdown
        from .record import moe_layers
        from .report import FirstImages, to_jsonable
        from .sweep import capacity_sweep

        model, loader, _, device = _prepare(args)
        layers = moe_layers(model)
        # BPR needs per-token priorities, which expert-choice layers do not have
        top_k = not any(isinstance(m.router, ExpertChoiceRouter) for m in layers.values())
        modes = ("vanilla", "bpr") if top_k else ("vanilla",)
        batches = -(-min(len(loader.dataset), args.max_images) // args.batch_size)
        with tqdm(total=batches * (1 + len(args.capacity_factors) * len(modes)), desc="capacity sweep",
                  unit="batch", disable=args.no_progress) as bar:
            fig, numbers = capacity_sweep(model, FirstImages(loader, args.max_images, lambda: bar.update(1)),
                                          capacity_factors=args.capacity_factors, modes=modes, device=device)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "capacity_sweep.png", dpi=110)
        plt.close(fig)
        numbers = to_jsonable(numbers)
        (out / "capacity_sweep.json").write_text(json.dumps(numbers, indent=1))
        print(sweep_markdown(numbers))
        print(f"\nwrote {out / 'capacity_sweep.png'} and {out / 'capacity_sweep.json'}")
        return 0

    return _run(prog, body, argv)
