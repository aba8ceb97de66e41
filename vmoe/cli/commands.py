"""``vmoe convert | list-pretrained | routing-report | capacity-sweep | export | make-shards``: the
subcommands that do not train.

Each is a ``Command``: a one-line help, the jsonargparse arguments and the function that runs on
the parsed namespace. Adding a command is one entry in ``COMMANDS`` (``vmoe --help`` lists it,
in that order). This module imports only the standard library: ``add_arguments`` may import
jsonargparse and ``vmoe.cli.defaults`` (so that ``vmoe <command> --help`` and a usage error
answer without torch), everything heavy is imported inside ``run``; none of them imports
Lightning's trainer. Usage of each: the guide "The vmoe command" (``docs/guides/cli.md``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["Command", "COMMANDS", "eval_loader", "load_model"]

_SPLITS = ("test", "val", "train")


@dataclasses.dataclass(frozen=True)
class Command:
    """A ``vmoe <name>`` subcommand: ``add_arguments(parser)`` declares its options,
    ``run(args)`` does the work on the parsed namespace and returns an exit code."""

    help: str
    add_arguments: Callable
    run: Callable


# ------------------------------------------------------------------------------------ convert


def _convert_arguments(p) -> None:
    p.add_argument(
        "prefix",
        help="checkpoint path without '.index', or a released checkpoint's name or timm "
        "name (vmoe list-pretrained): fetched on first use",
    )
    p.add_argument(
        "--out", required=True, help="output directory (config.json + model.safetensors)"
    )
    p.add_argument("--num-selected", type=int, default=None, help="K experts per token (default 2)")
    p.add_argument("--capacity-factor", type=float, default=None, help="default 1.05")
    p.add_argument(
        "--group-size-images",
        type=int,
        default=None,
        help="images per routing group (default 8; Soft MoE checkpoints: 1)",
    )
    p.add_argument("--batch-priority", action="store_true")
    p.add_argument(
        "--bf16-dispatch",
        action="store_true",
        help="Soft MoE: round the mixed data to bfloat16 as the official code does",
    )
    p.add_argument("--overwrite", action="store_true")


def _convert(args) -> int:
    from vmoe.models import official

    out_dir = Path(args.out)
    if (
        out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite
    ):  # before reading anything
        raise FileExistsError(
            f"--out {out_dir} exists and is not empty; pass --overwrite to replace "
            "its files, or choose a new directory"
        )
    # Only the options given: the importer fills in the defaults of the checkpoint's router type.
    given = dict(
        num_selected=args.num_selected,
        capacity_factor=args.capacity_factor,
        group_size_images=args.group_size_images,
        batch_priority=args.batch_priority or None,
        bf16_dispatch=args.bf16_dispatch or None,
    )
    from .pretrained import convert_named, is_catalogue_name

    if is_catalogue_name(args.prefix):
        return convert_named(args, {k: v for k, v in given.items() if v is not None})
    out = official.convert_vmoe_checkpoint(
        args.prefix,
        out_dir,
        overwrite=args.overwrite,
        **{k: v for k, v in given.items() if v is not None},
    )
    from vmoe.models.describe import describe_saved

    print(f"wrote {out} (config.json + model.safetensors): {describe_saved(out)}")
    return 0


# ------------------------------------------------------------------ model and data for a report


def load_model(directory: str):
    """``vmoe.models.from_pretrained(directory)`` with a clear error for a wrong path or an
    architecture that timm does not know."""
    import vmoe.models as vm

    path = Path(directory)
    if directory.startswith("hf-hub:"):
        path = directory  # from_pretrained downloads it (a one-line ConnectionError offline)
    elif directory.startswith("local-dir:"):
        path = Path(directory[len("local-dir:") :])
    if isinstance(path, Path) and not path.is_dir():
        raise FileNotFoundError(
            f"--model {directory}: not a directory (expected a folder written by "
            "vmoe.models.save_pretrained, holding config.json and model.safetensors)"
        )
    try:
        return vm.from_pretrained(path)
    except RuntimeError as err:  # timm.create_model: "Unknown model (name)"
        if not str(err).startswith("Unknown model"):
            raise
        raise ValueError(
            f"--model {directory}: config.json names an architecture that is not a "
            f"registered timm model ({err}); vmoe's are timm.list_models('vmoe_*')"
        ) from None


def _model_img_size(model) -> int:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        raise ValueError(
            "the model has no patch_embed.img_size: cannot tell which image size it expects"
        )
    h, w = size
    if h != w:
        raise ValueError(f"the model expects {h}x{w} images; only square inputs are supported here")
    return int(h)


def eval_loader(
    data: str,
    img_size: int,
    batch_size: int,
    split: str = "test",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    num_workers: int = 0,
) -> Tuple[object, List[str]]:
    """A DataLoader of (images [B,C,img_size,img_size], labels [B]) in order, and the class names.

    ``data``: 'digits' (``split`` of ``DigitsDataModule``) or a folder ``<data>/<class>/<image>``
    (read by ``ImageFolderDataModule`` as a single split). Every split, training included, goes
    through the data module's evaluation pipeline: no augmentation.
    """
    from torch.utils.data import DataLoader

    from vmoe.data import DigitsDataModule, ImageFolderDataModule

    common = dict(
        img_size=img_size, batch_size=batch_size, mean=mean, std=std, num_workers=num_workers
    )
    if data == "digits":
        dm = DigitsDataModule(**common)
    else:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"--data {data}: neither 'digits' nor an existing folder of class "
                "sub-folders (<dir>/<class>/<image>)"
            )
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != 3:
                raise ValueError(f"--{name} needs 3 values for RGB images, got {list(values)}")
        # The folder is the only split: it defines the classes and holds the images.
        dm = ImageFolderDataModule(
            data_dir=str(root), train_split=".", val_split=None, test_split=".", **common
        )
        split = "test"
    dm.setup("test" if split == "test" else "fit")
    dataset = getattr(dm, f"{split}_set")
    dataset.transform = dm.build_eval_transform()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return loader, list(dm.classes)


def _prepare(args):
    """Model on its device (eval mode) and the loader at the model's image size."""
    import torch

    os.environ.setdefault("WANDB_MODE", "offline")  # a report never logs to wandb
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    model = load_model(args.model).to(device).eval()
    loader, classes = eval_loader(
        args.data,
        _model_img_size(model),
        args.batch_size,
        args.split,
        args.mean,
        args.std,
        args.num_workers,
    )
    num_classes = getattr(model, "num_classes", None)
    if num_classes and len(classes) > num_classes:
        raise ValueError(
            f"--data {args.data} has {len(classes)} classes but the model has "
            f"num_classes={num_classes}"
        )
    return model, loader, classes, device


def _model_name(model) -> str:
    """The model's name (its timm architecture, e.g. vmoe_tiny_e4_k2), not its folder's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _refuse_non_empty(out: Path, overwrite: bool) -> None:
    """``--out`` must be a new or empty directory unless ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} exists and is not empty; pass --overwrite to replace "
            "the report's files in it, or choose a new directory"
        )


def _report_arguments(p) -> None:
    """The options routing-report and capacity-sweep share."""
    from jsonargparse.typing import PositiveFloat, PositiveInt

    from .defaults import DEFAULT_CAPACITY_FACTORS

    p.add_argument(
        "--model",
        required=True,
        help="directory written by vmoe.models.save_pretrained "
        "(config.json + model.safetensors), e.g. a training run's export/ folder",
    )
    p.add_argument(
        "--data", required=True, help="'digits' or a folder of class sub-folders of images"
    )
    p.add_argument("--split", choices=_SPLITS, default="test", help="digits: which split")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-images", type=PositiveInt, default=512, help="use the first N images")
    p.add_argument("--batch-size", type=PositiveInt, default=64, help="images per forward")
    p.add_argument(
        "--capacity-factors",
        type=PositiveFloat,
        nargs="+",
        default=list(DEFAULT_CAPACITY_FACTORS),
        metavar="CF",
        help="inference capacity factors of the sweep",
    )
    p.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=None,
        help="per-channel normalization mean on the [0, 1] scale (default 0.5, as vmoe.data)",
    )
    p.add_argument(
        "--std", type=float, nargs="+", default=None, help="per-channel std (default 0.5)"
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument(
        "--device", default="auto", help="'cpu', 'cuda', 'cuda:1', ...; auto: cuda if available"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


# ----------------------------------------------------------------------------- routing-report


def _routing_report_arguments(p) -> None:
    from typing import Optional

    from jsonargparse.typing import PositiveFloat, PositiveInt

    _report_arguments(p)
    p.add_argument("--examples", type=PositiveInt, default=4, help="patch maps drawn")
    p.add_argument(
        "--capacity-factor",
        type=Optional[PositiveFloat],
        default=None,
        help="record the maps, load and accuracy on the capacity path at this factor (e.g. "
        "the training one, to see what it drops); default: the model's evaluation routing, "
        "dropless for top-K layers (nothing dropped)",
    )
    p.add_argument("--no-sweep", action="store_true", help="skip the capacity sweep")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out (replacing the report's files there)",
    )


def _routing_report(args) -> int:
    from vmoe.models.pretrained import staged_save_dir
    from vmoe.viz.report import write_routing_report

    out = Path(args.out)
    _refuse_non_empty(out, args.overwrite)  # before any work
    model, loader, classes, device = _prepare(args)
    # Written into a temporary folder beside --out, moved into place when complete.
    with staged_save_dir(out, overwrite=True) as tmp:
        report = write_routing_report(
            model,
            loader,
            tmp,
            max_images=args.max_images,
            num_examples=args.examples,
            capacity_factors=None if args.no_sweep else args.capacity_factors,
            class_names=classes,
            device=device,
            progress=not args.no_progress,
            title=f"Routing report: {_model_name(model)} on {args.data}",
            record_capacity_factor=args.capacity_factor,
        )
    print(f"accuracy {100 * report['accuracy']:.1f}% over {report['data']['num_images']} images")
    print(f"wrote {len(report['files'])} files to {out}/; open {out / 'index.html'}")
    return 0


# ----------------------------------------------------------------------------- capacity-sweep


def _capacity_sweep(args) -> int:
    import matplotlib.pyplot as plt
    from tqdm import tqdm  # text bar: tqdm.auto warns in Jupyter without ipywidgets

    from vmoe.jsonable import to_jsonable
    from vmoe.models.pretrained import staged_save_dir
    from vmoe.moe import ExpertChoiceRouter, moe_layers
    from vmoe.viz.page import sweep_markdown
    from vmoe.viz.report import FirstImages
    from vmoe.viz.sweep import capacity_sweep

    model, loader, _, device = _prepare(args)
    layers = moe_layers(model)
    # BPR needs per-token priorities, which expert-choice layers do not have
    top_k = not any(isinstance(m.router, ExpertChoiceRouter) for m in layers.values())
    modes = ("vanilla", "bpr") if top_k else ("vanilla",)
    batches = -(-min(len(loader.dataset), args.max_images) // args.batch_size)
    with tqdm(
        total=batches * (1 + len(args.capacity_factors) * len(modes)),
        desc="capacity sweep",
        unit="batch",
        disable=args.no_progress,
    ) as bar:
        fig, numbers = capacity_sweep(
            model,
            FirstImages(loader, args.max_images, lambda: bar.update(1)),
            capacity_factors=args.capacity_factors,
            modes=modes,
            device=device,
        )
    out = Path(args.out)
    numbers = to_jsonable(numbers)
    with staged_save_dir(out, overwrite=True) as tmp:  # moved into --out when both are written
        fig.savefig(tmp / "capacity_sweep.png", dpi=110)
        (tmp / "capacity_sweep.json").write_text(json.dumps(numbers, indent=1))
    plt.close(fig)
    print(sweep_markdown(numbers))
    print(f"\nwrote {out / 'capacity_sweep.png'} and {out / 'capacity_sweep.json'}")
    return 0


# ------------------------------------------------------------------------------------- export


def _export_arguments(p) -> None:
    from typing import Optional

    from jsonargparse.typing import PositiveFloat, PositiveInt

    from .defaults import EVAL_CAPACITY_FACTOR

    p.add_argument(
        "--model",
        required=True,
        help="directory written by vmoe.models.save_pretrained, local-dir:DIR or hf-hub:ORG/NAME",
    )
    p.add_argument(
        "--format",
        default="onnx",
        help="'onnx' (ONNX Runtime; needs the export extra: "
        "pip install -e \".[export]\") or 'pt2' (torch.export.save)",
    )
    p.add_argument("--out", required=True, help="output file (e.g. model.onnx, model.pt2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--capacity-factor",
        type=Optional[PositiveFloat],
        default=None,
        help="default: dropless inference of the top-K layers (every token on its K experts, "
        f"batch-independent); a number: the capacity path at that factor (the paper's: "
        f"{EVAL_CAPACITY_FACTOR})",
    )
    p.add_argument(
        "--batch-priority",
        type=Optional[bool],
        default=None,
        help="true/false: Batch Priority Routing at inference (default: the model's)",
    )
    p.add_argument(
        "--batch-independent",
        action="store_true",
        help="one image per routing group: an image's logits do not depend on its batch",
    )
    p.add_argument(
        "--max-batch",
        type=Optional[PositiveInt],
        default=None,
        help="largest batch the artifact accepts, a bigger one is refused when it runs "
        "(default: unbounded)",
    )
    p.add_argument(
        "--check-batch-sizes",
        type=PositiveInt,
        nargs=2,
        default=None,
        metavar="B",
        help="the two batch sizes the artifact is checked at against the eager model "
        "(default: 1 and 5, at most --max-batch)",
    )


def _export(args) -> int:
    from vmoe.writes import require_writable_dir

    out = Path(args.out)
    if args.format not in ("onnx", "pt2"):  # vmoe.models.export.EXPORT_FORMATS
        raise ValueError(f"--format {args.format!r}: choose one of onnx, pt2")
    if out.exists() and not args.overwrite:  # before importing torch or loading anything
        raise FileExistsError(
            f"--out {out} exists; pass --overwrite to replace it, or choose a new file"
        )
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the directory {out.parent} does not exist")
    require_writable_dir(out)
    sizes = args.check_batch_sizes
    if sizes is not None and args.max_batch is not None and max(sizes) > args.max_batch:
        raise ValueError(
            f"--check-batch-sizes {' '.join(map(str, sizes))}: at most --max-batch "
            f"{args.max_batch}, the largest batch the artifact accepts"
        )
    from vmoe.models.export import MissingExtraError, check_export, export_model, require_onnx

    try:
        if args.format == "onnx":
            require_onnx()
    except MissingExtraError as err:
        raise ValueError(str(err)) from None
    model = load_model(args.model).eval()
    routing = dict(
        capacity_factor=args.capacity_factor,
        batch_priority=args.batch_priority,
        batch_independent=args.batch_independent,
    )
    diffs = {}

    def check(written: Path) -> None:  # before the file replaces --out: a failed check writes none
        diffs.update(check_export(written, model, sizes, format=args.format, **routing))

    export_model(
        model,
        out,
        args.format,
        overwrite=args.overwrite,
        max_batch=args.max_batch,
        verify=check,
        **routing,
    )
    shown = ", ".join(f"batch {b}: {d:.2e}" for b, d in diffs.items())
    print(f"wrote {out} ({args.format}); max |exported - eager| {shown}")
    return 0


# -------------------------------------------------------------------------------- make-shards


def _make_shards_arguments(p) -> None:
    p.add_argument(
        "--source",
        required=True,
        help="a folder of class sub-folders (<dir>/<class>/<image>, or "
        "<dir>/<split>/<class>/<image>), or a Hugging Face dataset (save_to_disk/Parquet/"
        "imagefolder folder or hub name)",
    )
    p.add_argument(
        "--out", required=True, help="output folder of litdata chunks + vmoe_shards.json"
    )
    p.add_argument("--split", default="train", help="the split to write (default train)")
    p.add_argument("--image-column", default="image", help="Hugging Face source: the image column")
    p.add_argument("--label-column", default="label", help="Hugging Face source: the label column")
    p.add_argument(
        "--chunk-bytes", default="64MB", help="target size of one chunk (litdata), e.g. 64MB"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out (its old chunks are removed)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave unreadable images out (counted in the summary) instead of stopping",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="store images whose longer side exceeds N pixels resized to N (faster training "
        "input; e.g. 320 for 224 px training)",
    )


def _make_shards(args) -> int:
    from vmoe.data.shards import parse_chunk_bytes, write_shards

    chunk_bytes = parse_chunk_bytes(args.chunk_bytes, "--chunk-bytes")
    if args.max_size is not None and args.max_size < 1:
        raise ValueError(f"--max-size {args.max_size} must be a positive number of pixels")
    out = Path(args.out)  # a non-empty --out is refused before any work
    manifest = write_shards(
        args.source,
        out,
        overwrite=args.overwrite,
        chunk_bytes=chunk_bytes,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        progress=not args.no_progress,
        skip_corrupt=args.skip_corrupt,
        max_size=args.max_size,
    )
    skipped = manifest["skipped"]
    print(
        f"wrote {manifest['num_images']} images of {manifest['num_classes']} classes to {out}/"
        + (
            f" (skipped {len(skipped)} unreadable: {', '.join(skipped[:3])}"
            + (", ..." if len(skipped) > 3 else "")
            + ")"
            if skipped
            else ""
        )
        + f"; train with --data vmoe.data.ShardDataModule --data.path {out}"
    )
    return 0


def _pretrained_command():
    """``vmoe.cli.pretrained`` (list-pretrained, convert NAME), imported when one runs."""
    from . import pretrained

    return pretrained


COMMANDS = {
    "convert": Command(
        "convert an official V-MoE checkpoint (PREFIX.index + shards, or a released one by "
        "name: vmoe list-pretrained) to a save_pretrained dir",
        _convert_arguments,
        _convert,
    ),
    "list-pretrained": Command(
        "list Google's released V-MoE checkpoints (timm pretrained tags) and what is cached",
        lambda p: _pretrained_command().list_arguments(p),
        lambda args: _pretrained_command().list_pretrained(args),
    ),
    "routing-report": Command(
        "write routing plots, index.html and report.json for a model on a dataset",
        _routing_report_arguments,
        _routing_report,
    ),
    "capacity-sweep": Command(
        "accuracy and MoE FLOPs vs inference capacity factor, vanilla vs BPR "
        "(sparse MoE layers only)",
        _report_arguments,
        _capacity_sweep,
    ),
    "export": Command(
        "export a model to ONNX or torch.export (.pt2) with a dynamic batch, checked against eager",
        _export_arguments,
        _export,
    ),
    "make-shards": Command(
        "write litdata streaming shards from an image folder or a Hugging Face dataset",
        _make_shards_arguments,
        _make_shards,
    ),
}
