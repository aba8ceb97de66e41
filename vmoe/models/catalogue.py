"""The checkpoints Google released with google-research/vmoe, as timm pretrained tags.

``CATALOGUE`` lists every checkpoint of that repository's README ("Checkpoints"), with what the
files do not store, read from the official configs (``vmoe/configs/vmoe_paper/*.py``,
``common.get_vmoe_config``): K, the capacity factor of training and of evaluation, the routing
group (8 images' tokens), BPR (off), the representation layer, the resolution; plus the
pretraining data and the accuracies the configs publish. Soft MoE: the repository releases no
checkpoint (``vmoe/projects/soft_moe/README.md``: the paper's models are trained on JFT-4B, which
is proprietary, and no LAION-400M checkpoint is planned), so there is none here.

Each supported entry is the timm name ``MODEL.TAG`` of a registered vmoe variant, e.g.
``timm.create_model("vmoe_s32_e8_k2_last2.ilsvrc2012_randaug_light1", pretrained=True)``:
on first use the official files are fetched over HTTPS (``vmoe.checkpoints.download``:
resumable, verified), converted (``vmoe.models.official``) into ``cache_dir()/NAME``
(``config.json`` + ``model.safetensors``), the downloaded files removed; later uses read the
cache with no network. ``$VMOE_CACHE_DIR`` moves the cache, ``$VMOE_CHECKPOINT_BASE_URL`` the
server (a mirror with the bucket's layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

from vmoe.checkpoints.download import DEFAULT_BASE_URL, base_url, fetch_official_checkpoint

__all__ = [
    "CATALOGUE",
    "CACHE_ENV",
    "OfficialCheckpoint",
    "cache_dir",
    "official_checkpoint",
    "find_official_checkpoint",
    "fetch_pretrained",
    "convert_local_checkpoint",
    "register_official_checkpoint",
    "unregister_official_checkpoint",
    "timm_pretrained_cfg",
]

CACHE_ENV = "VMOE_CACHE_DIR"
README_URL = "https://github.com/google-research/vmoe#checkpoints"
SOURCE_NAME = "vmoe_source.json"  # written last into a converted cache entry: it is complete


@dataclasses.dataclass(frozen=True)
class OfficialCheckpoint:
    """One released checkpoint (``gs://vmoe_checkpoints/NAME``) and how vmoe builds it.

    Attributes:
        name: the checkpoint prefix in the bucket.
        model: the registered timm model it fits (``""`` when vmoe cannot build it).
        tag: its timm pretrained tag (``MODEL.TAG``).
        summary: the README's description.
        pretraining: data and recipe (from the official config).
        img_size: input resolution it was trained at.
        num_classes: classes of its head.
        representation_size: the tanh pre-logits layer (None: none).
        moe: the routing options its files do not store, as ``MoeMlp`` keywords.
        eval_capacity_factor: the capacity factor the official config evaluates with.
        accuracy: ``(dataset/split, top-1 %)`` pairs the official config publishes.
        config: the official config file (in google-research/vmoe), when there is one.
        fine_tuned_from: the upstream checkpoint, for a fine-tuned one.
        crop_pct: evaluation crop (``resize_small(256)|central_crop(224)``: 0.875;
            ``resize(384)``: 1.0).
        unsupported: why vmoe cannot build it (empty when it can).
        notes: anything else worth knowing.
        model_args: more ``timm.create_model`` arguments (for ``vmoe_vit``: all of them).
        data: the pretraining data in a few words (the docs table).
    """

    name: str
    model: str
    tag: str
    summary: str
    pretraining: str
    img_size: int
    num_classes: int
    representation_size: Optional[int]
    moe: Dict[str, object]
    eval_capacity_factor: float
    accuracy: Tuple[Tuple[str, float], ...] = ()
    config: str = ""
    fine_tuned_from: str = ""
    crop_pct: float = 0.875
    unsupported: str = ""
    notes: str = ""
    model_args: Dict[str, object] = dataclasses.field(default_factory=dict)
    data: str = ""

    @property
    def timm_name(self) -> str:
        """``MODEL.TAG`` (empty for an unsupported entry)."""
        return f"{self.model}.{self.tag}" if self.model else ""

    def url(self, base: Optional[str] = None) -> str:
        """The URL of the checkpoint's index file."""
        return f"{base_url(base)}/{self.name}.index"

    def model_kwargs(self) -> dict:
        """The arguments of ``timm.create_model(self.model, ...)`` that build this checkpoint's
        model (the registered variant's defaults under them)."""
        return dict(
            self.model_args,
            img_size=self.img_size,
            num_classes=self.num_classes,
            representation_size=self.representation_size,
            moe=dict(self.moe),
        )

    def routing_options(self) -> dict:
        """``moe`` without the placement and expert count (the checkpoint stores those)."""
        return {k: v for k, v in self.moe.items() if k not in _STORED}


_STORED = ("blocks", "every", "last", "num_experts")


def _routing(k: int, capacity_factor: float) -> dict:
    """common.get_vmoe_config: group_size = 8 images' tokens, no BPR in training."""
    return dict(
        num_selected=k, capacity_factor=capacity_factor, group_size_images=8, batch_priority=False
    )


_CONFIGS = "vmoe/configs/vmoe_paper/"
_IN1K_ACC = "ILSVRC2012 validation (official test split)"
_LIGHT1 = (
    "ILSVRC2012 train[:99%], from scratch, 300 epochs at 224 px: inception crop + flip, "
    "RandAugment(2, 10), mixup 0.2, sigmoid cross-entropy, Adam, MoE dropout 0.2"
)
_IN21K = (
    "ImageNet-21k (21,843 classes) full[102400:], from scratch, 300 epochs at 224 px: inception "
    "crop + flip, RandAugment(2, 20), mixup 0.5, sigmoid cross-entropy, Adam"
)
_FT_1K = (
    "; fine-tuned on ILSVRC2012 train[:99%] at 384 px: 10k steps, SGD momentum 0.9, "
    "softmax cross-entropy, a new head, no pre-logits layer"
)
_E3 = (
    "E^3 (VisionTransformerMoeEnsemble: each token repeated for 2 ensemble members, the 8 "
    "experts split between them, their predictions averaged) is not implemented in vmoe"
)

CATALOGUE: Dict[str, OfficialCheckpoint] = {
    e.name: e
    for e in (
        OfficialCheckpoint(
            name="vmoe_s32_last2_ilsvrc2012_randaug_light1",
            data="ILSVRC2012, 300 epochs",
            model="vmoe_s32_e8_k2_last2",
            tag="ilsvrc2012_randaug_light1",
            summary="V-MoE S/32, 8 experts on the last two odd blocks, trained from scratch on "
            "ILSVRC2012 with RandAugment for 300 epochs",
            pretraining=_LIGHT1,
            img_size=224,
            num_classes=1000,
            representation_size=512,
            moe=_routing(2, 1.05),
            eval_capacity_factor=4.0,
            accuracy=(
                ("ILSVRC2012 train[99%:] (held out)", 76.8),
                (_IN1K_ACC, 73.1),
                ("ILSVRC2012 ReaL", 74.4),
                ("ImageNet V2", 59.2),
            ),
            config=_CONFIGS + "vmoe_s32_last2_ilsvrc2012_randaug_light1.py",
        ),
        OfficialCheckpoint(
            name="vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",
            data="ILSVRC2012 300 epochs, then ILSVRC2012 at 384 px",
            model="vmoe_s32_e8_k2_last2",
            tag="ilsvrc2012_randaug_light1_ft_ilsvrc2012",
            summary="vmoe_s32_last2_ilsvrc2012_randaug_light1 fine-tuned on ILSVRC2012 with a "
            "resolution of 384 pixels",
            pretraining=_LIGHT1 + _FT_1K,
            img_size=384,
            num_classes=1000,
            representation_size=None,
            moe=_routing(2, 1.5),
            eval_capacity_factor=1.5,
            accuracy=(
                ("ILSVRC2012 train[99%:] (held out)", 78.8),
                (_IN1K_ACC, 75.9),
                ("ILSVRC2012 ReaL", 77.1),
                ("ImageNet V2", 62.0),
            ),
            config=_CONFIGS + "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012.py",
            fine_tuned_from="vmoe_s32_last2_ilsvrc2012_randaug_light1",
            crop_pct=1.0,
        ),
        OfficialCheckpoint(
            name="vmoe_s32_last2_ilsvrc2012_randaug_medium",
            data="ILSVRC2012, 1000 epochs",
            model="vmoe_s32_e8_k2_last2",
            tag="ilsvrc2012_randaug_medium",
            summary="V-MoE S/32, 8 experts on the last two odd blocks, trained from scratch on "
            "ILSVRC2012 with RandAugment for 1000 epochs",
            pretraining="ILSVRC2012, from scratch, 1000 epochs at 224 px, RandAugment (medium)",
            img_size=224,
            num_classes=1000,
            representation_size=512,
            moe=_routing(2, 1.05),
            eval_capacity_factor=4.0,
            notes="the repository has no config or accuracy for it; K=2 and the routing "
            "options are those of the 300-epoch S/32 (common.get_vmoe_config)",
        ),
        OfficialCheckpoint(
            name="vmoe_b16_imagenet21k_randaug_strong",
            data="ImageNet-21k, 300 epochs",
            model="vmoe_b16_e8_k2_every2",
            tag="imagenet21k_randaug_strong",
            summary="V-MoE B/16, 8 experts on every odd block, trained from scratch on "
            "ImageNet-21k with RandAugment",
            pretraining=_IN21K,
            img_size=224,
            num_classes=21843,
            representation_size=None,
            moe=_routing(2, 1.05),
            eval_capacity_factor=1.05,
            config=_CONFIGS + "pretrain_imagenet21k.py",
            notes="no upstream accuracy published; fine-tuned (configs in the repository): "
            "ILSVRC2012 at 384 px 85.6% (the _ft_ilsvrc2012 checkpoint), CIFAR-10 at 128 px "
            "98.7% (not released)",
        ),
        OfficialCheckpoint(
            name="vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
            data="ImageNet-21k 300 epochs, then ILSVRC2012 at 384 px",
            model="vmoe_b16_e8_k2_every2",
            tag="imagenet21k_randaug_strong_ft_ilsvrc2012",
            summary="vmoe_b16_imagenet21k_randaug_strong fine-tuned on ILSVRC2012 with a "
            "resolution of 384 pixels",
            pretraining=_IN21K + _FT_1K,
            img_size=384,
            num_classes=1000,
            representation_size=None,
            moe=_routing(2, 1.5),
            eval_capacity_factor=1.5,
            accuracy=(
                ("ILSVRC2012 train[99%:] (held out)", 89.2),
                (_IN1K_ACC, 85.6),
                ("ILSVRC2012 ReaL", 84.1),
                ("ImageNet V2", 76.1),
            ),
            config=_CONFIGS + "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py",
            fine_tuned_from="vmoe_b16_imagenet21k_randaug_strong",
            crop_pct=1.0,
        ),
        OfficialCheckpoint(
            name="eee_s32_last2_ilsvrc2012",
            data="ILSVRC2012, 300 epochs",
            model="",
            tag="",
            summary="E^3 S/32, 8 experts on the last two odd blocks, with two ensemble members, "
            "trained from scratch on ILSVRC2012 with RandAugment for 300 epochs",
            pretraining="ILSVRC2012, from scratch, 300 epochs, RandAugment",
            img_size=224,
            num_classes=1000,
            representation_size=512,
            moe={},
            eval_capacity_factor=1.5,
            unsupported=_E3,
            notes="its fine-tuning config routes with K=1, capacity factor 1.5",
        ),
        OfficialCheckpoint(
            name="eee_s32_last2_ilsvrc2012_ft_cifar100",
            data="ILSVRC2012 300 epochs, then CIFAR-100 at 128 px",
            model="",
            tag="",
            summary="eee_s32_last2_ilsvrc2012 fine-tuned on CIFAR100",
            pretraining="eee_s32_last2_ilsvrc2012; fine-tuned on CIFAR-100 train[:98%] at "
            "128 px, 2k steps, SGD momentum 0.9",
            img_size=128,
            num_classes=100,
            representation_size=512,
            moe=dict(num_selected=1, capacity_factor=1.5, batch_priority=False),
            eval_capacity_factor=1.5,
            accuracy=(("CIFAR-100 test", 81.31),),
            config="vmoe/configs/eee_paper/eee_s32_last2_ilsvrc2012_ft_cifar100.py",
            fine_tuned_from="eee_s32_last2_ilsvrc2012",
            unsupported=_E3,
        ),
    )
}
_STATIC = frozenset(CATALOGUE)


def timm_pretrained_cfg(entry: OfficialCheckpoint) -> dict:
    """The timm pretrained cfg of ``entry``'s tag: the untagged model's (V-MoE inputs, mean =
    std = 0.5) with the entry's resolution, classes and crop; ``url`` is the official index file
    (the weights are fetched and converted by vmoe's factories, not by timm's URL loader)."""
    from .variants import _default_cfg  # variants imports this module at its top

    accuracy = ", ".join(f"{k}: {v}%" for k, v in entry.accuracy)
    return {
        **_default_cfg(entry.img_size),
        "url": f"{DEFAULT_BASE_URL}/{entry.name}.index",
        "num_classes": entry.num_classes,
        "crop_pct": entry.crop_pct,
        "origin_url": README_URL,
        "description": entry.summary,
        "notes": (entry.pretraining, *((accuracy,) if accuracy else ()), entry.notes),
    }


def find_official_checkpoint(name: str) -> Optional[OfficialCheckpoint]:
    """The entry ``name`` names (a checkpoint name, or its ``MODEL.TAG``), else None."""
    if not isinstance(name, str):
        return None
    if name in CATALOGUE:
        return CATALOGUE[name]
    return next((e for e in CATALOGUE.values() if e.timm_name and e.timm_name == name), None)


def official_checkpoint(name: str) -> OfficialCheckpoint:
    """The entry ``name`` names; ValueError listing the catalogue otherwise, or saying why an
    entry cannot be built."""
    entry = find_official_checkpoint(name)
    if entry is None:
        known = ", ".join(e.timm_name or e.name for e in CATALOGUE.values())
        raise ValueError(f"{name!r} is not a released V-MoE checkpoint (known: {known})")
    if entry.unsupported:
        raise ValueError(f"{entry.name}: not supported: {entry.unsupported}")
    return entry


def entry_for_tag(model: str, pretrained_cfg) -> Optional[OfficialCheckpoint]:
    """The catalogue entry of ``timm.create_model("MODEL.TAG")`` (timm hands the factory the
    tag as ``pretrained_cfg``), else None."""
    if not isinstance(pretrained_cfg, str) or not pretrained_cfg:
        return None
    return find_official_checkpoint(f"{model}.{pretrained_cfg}")


def cache_dir(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where converted checkpoints are kept: ``path``, else ``$VMOE_CACHE_DIR``, else ``vmoe``
    in torch's hub folder (``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``, where timm
    keeps the weights it downloads by URL)."""
    if path is None:
        path = os.environ.get(CACHE_ENV)
    if path is None:
        xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
        torch_home = os.environ.get("TORCH_HOME", os.path.join(xdg, "torch"))
        path = os.path.join(torch_home, "hub", "vmoe")
    return Path(path).expanduser()


def _complete(directory: Path) -> bool:
    return all((directory / n).is_file() for n in ("config.json", "model.safetensors", SOURCE_NAME))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (processes of one machine, e.g. DDP ranks, fetch a
    checkpoint once; the others wait, then find it in the cache)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def by_hand(entry: OfficialCheckpoint, base: Optional[str] = None) -> str:
    """How to fetch ``entry``'s files without vmoe, in one line."""
    root = base_url(base)
    gs = f" (or gsutil -m cp 'gs://vmoe_checkpoints/{entry.name}.*' DIR)"
    return (
        f"fetch the files by hand: {root}/{entry.name}.index and the "
        f"{entry.name}.data-*-of-* shards it lists{gs if root == DEFAULT_BASE_URL else ''}, "
        f"then vmoe convert DIR/{entry.name} --out OUT, or pass "
        f"pretrained_cfg_overlay=dict(file='DIR/{entry.name}.index')"
    )


def _check_architecture(entry: OfficialCheckpoint, prefix: Path) -> None:
    """The files hold the model the catalogue says (compared on the meta device)."""
    import timm
    import torch

    from .config_checks import shape_mismatches
    from .official import _build_empty, infer_vmoe_architecture

    arch = infer_vmoe_architecture(str(prefix))
    with torch.device("meta"):
        expected = timm.create_model(entry.model, **entry.model_kwargs())
    found = _build_empty(arch, entry.routing_options())
    problems = shape_mismatches(
        {k: tuple(v.shape) for k, v in expected.state_dict().items()},
        {k: tuple(v.shape) for k, v in found.state_dict().items()},
        expected_as=entry.timm_name,
        found_as=f"{prefix}.index",
    )
    if problems:
        raise ValueError(
            f"{prefix}.index is not the {entry.timm_name} model the catalogue lists for "
            f"{entry.name}: {problems}"
        )


def _convert_into(entry: OfficialCheckpoint, prefix: Path, target: Path, source: dict) -> None:
    """Convert the official files at ``prefix`` into the cache entry ``target``, which appears
    at once when complete (a directory renamed into place) or not at all."""
    from .official import convert_vmoe_checkpoint

    _check_architecture(entry, prefix)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=target.parent))
    try:
        out = convert_vmoe_checkpoint(str(prefix), tmp / "out", **entry.routing_options())
        (out / SOURCE_NAME).write_text(json.dumps(source, indent=1))
        if target.exists():  # an incomplete entry left by an older failure
            shutil.rmtree(target)
        os.rename(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_pretrained(
    name: Union[str, OfficialCheckpoint],
    *,
    cache: Optional[Union[str, os.PathLike]] = None,
    url: Optional[str] = None,
    progress: bool = True,
    keep_download: bool = False,
) -> Path:
    """The converted cache entry (``config.json`` + ``model.safetensors``) of the released
    checkpoint ``name`` (its name or ``MODEL.TAG``): read from the cache when there, otherwise
    fetched from ``url`` (default ``$VMOE_CHECKPOINT_BASE_URL`` or the public bucket),
    verified, converted and cached.

    Args:
        name: e.g. ``"vmoe_s32_last2_ilsvrc2012_randaug_light1"`` or
            ``"vmoe_s32_e8_k2_last2.ilsvrc2012_randaug_light1"``.
        cache: the cache folder (default ``cache_dir()``).
        url: the base URL the checkpoint files are under.
        progress: progress bars while downloading.
        keep_download: keep the official files (``CACHE/downloads/NAME/``) after converting.

    Raises:
        vmoe.checkpoints.download.DownloadError: offline, not found, corrupted twice (one line
            saying how to fetch the files by hand).
        vmoe.writes.WriteError: the disk filled up (the cache is left as it was).
    """
    entry = name if isinstance(name, OfficialCheckpoint) else official_checkpoint(name)
    root = cache_dir(cache)
    target = root / entry.name
    if _complete(target):
        return target
    with _locked(root / f".{entry.name}.lock"):
        if _complete(target):  # another process fetched it meanwhile
            return target
        downloads = root / "downloads" / entry.name
        if progress:
            print(
                f"vmoe: fetching {entry.name} from {base_url(url)} into {root}",
                file=sys.stderr,
                flush=True,
            )
        prefix = fetch_official_checkpoint(
            entry.name, downloads, url=url, progress=progress, by_hand=by_hand(entry, url)
        )
        _convert_into(entry, prefix, target, dict(name=entry.name, url=entry.url(url)))
        if not keep_download:
            shutil.rmtree(downloads, ignore_errors=True)
    return target


def convert_local_checkpoint(
    name: Union[str, OfficialCheckpoint],
    prefix: Union[str, os.PathLike],
    *,
    cache: Optional[Union[str, os.PathLike]] = None,
) -> Path:
    """The cache entry of ``name`` made from official files fetched by hand (``prefix``: the
    path without ``.index``, or the ``.index`` file itself); reused when already there."""
    entry = name if isinstance(name, OfficialCheckpoint) else official_checkpoint(name)
    prefix = Path(os.fspath(prefix).removesuffix(".index"))
    target = cache_dir(cache) / entry.name
    if _complete(target):
        return target
    with _locked(cache_dir(cache) / f".{entry.name}.lock"):
        if not _complete(target):
            _convert_into(entry, prefix, target, dict(name=entry.name, prefix=str(prefix)))
    return target


def register_official_checkpoint(entry: OfficialCheckpoint) -> None:
    """Add ``entry`` to the catalogue and its ``MODEL.TAG`` to timm's registry: a checkpoint
    in the official format that you serve yourself (a mirror, your own JAX-trained model) gets
    the same fetching, caching and ``timm.create_model(..., pretrained=True)``."""
    import timm
    from timm.models import _registry
    from timm.models._pretrained import PretrainedCfg

    if entry.name in _STATIC:
        raise ValueError(f"{entry.name} is a released checkpoint already in the catalogue")
    if not timm.is_model(entry.model):
        raise ValueError(f"{entry.name}: model {entry.model!r} is not a registered timm model")
    clash = find_official_checkpoint(entry.timm_name)
    if clash is not None and clash.name != entry.name:
        raise ValueError(f"{entry.timm_name} is already {clash.name}")
    CATALOGUE[entry.name] = entry
    full = entry.timm_name
    cfg = PretrainedCfg(**timm_pretrained_cfg(entry), architecture=entry.model, tag=entry.tag)
    default = _registry._model_default_cfgs[entry.model]
    if entry.tag not in default.tags:
        default.tags.append(entry.tag)
    default.cfgs[entry.tag] = cfg
    _registry._model_pretrained_cfgs[full] = cfg
    _registry._model_has_pretrained.add(full)
    if full not in _registry._model_with_tags[entry.model]:
        _registry._model_with_tags[entry.model].append(full)


def unregister_official_checkpoint(name: str) -> None:
    """Undo ``register_official_checkpoint`` (released checkpoints stay)."""
    from timm.models import _registry

    entry = CATALOGUE.get(name)
    if entry is None or name in _STATIC:
        return
    del CATALOGUE[name]
    full = entry.timm_name
    default = _registry._model_default_cfgs.get(entry.model)
    if default is not None and entry.tag in default.tags:
        default.tags.remove(entry.tag)
        default.cfgs.pop(entry.tag, None)
    _registry._model_pretrained_cfgs.pop(full, None)
    _registry._model_has_pretrained.discard(full)
    with contextlib.suppress(ValueError):
        _registry._model_with_tags[entry.model].remove(full)


def approx_size_mb(entry: OfficialCheckpoint) -> float:
    """The converted ``model.safetensors`` in MB (float32 parameters; the download is about as
    large if the official files hold float32, as the released ones are read to)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(entry.model, **entry.model_kwargs())
    return 4 * sum(p.numel() for p in model.parameters()) / 1e6


def catalogue_markdown() -> str:
    """The catalogue as the Markdown table of ``docs/guides/official-checkpoints.md`` (a test
    keeps the two equal)."""
    rows = [
        "| timm name (`MODEL.TAG`) | checkpoint (`gs://vmoe_checkpoints/...`) | pretraining | "
        "px | classes | K, capacity factor (train / eval), group | published top-1 | size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in CATALOGUE.values():
        if e.name not in _STATIC:
            continue
        top1 = "; ".join(f"{v}% {k}" for k, v in e.accuracy) or "not published"
        routing = "-"
        if e.timm_name:
            routing = (
                f"K={e.moe['num_selected']}, {e.moe['capacity_factor']} / "
                f"{e.eval_capacity_factor}, {e.moe['group_size_images']} images"
            )
        name = f"`{e.timm_name}`" if e.timm_name else "not supported (E³)"
        size = f"~{approx_size_mb(e):,.0f} MB" if e.timm_name else "-"
        rows.append(
            f"| {name} | `{e.name}` | {e.data} | {e.img_size} | {e.num_classes} | {routing} | "
            f"{top1} | {size} |"
        )
    return "\n".join(rows) + "\n"
