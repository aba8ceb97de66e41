"""Save and load V-MoE models (config.json + model.safetensors), and sparse upcycling of dense
timm ViTs from pretrained weights. Nothing here unpickles a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models._hub import save_config_for_hf  # the config half of timm.models.save_for_hf

from vmoe.checkpoints import read_safetensors_header

from ..jsonable import to_jsonable
from ..moe import moe_layers, read_routing, restore_routing
from ..moe.parallel import expert_parallel_layers
from ..writes import failed_write
from .config_checks import (
    FORMAT_VERSION,
    check_config_against_header,
    check_shapes,
    shape_mismatches,
    validate_config,
)
from .model_card import VMOE_FACTORY_PREFIXES
from .model_card import model_card as make_model_card
from .moeify import MOEIFIED_ARCHITECTURE, MOEIFIED_ARGS, moeify, nested_moe_options, recipe_layer

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "load_state_dict_checked",
    "adapt_for_fine_tuning",
    "upcycle",
    "check_saved_dir",
    "check_target_dir",
    "model_config",
    "write_config",
    "resolve_model_dir",
    "push_to_hub",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


def model_config(model: nn.Module) -> dict:
    """Everything needed to rebuild ``model``: its timm architecture and arguments, the MoE
    placement/options added by ``moeify``, and each MoE layer's current routing settings."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture")
    if not architecture or architecture not in timm.list_models():
        raise ValueError(
            f"cannot save {type(model).__name__}: it was not built by "
            "timm.create_model (no registered architecture name)"
        )
    args = dict(getattr(model, "_model_args", {}) or {})
    if args.get("moe") is not None:  # a vmoe factory's MoE options, as given: stored nested
        args["moe"] = nested_moe_options(args["moe"])
    args["num_classes"] = getattr(model, "num_classes", args.get("num_classes"))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        args["img_size"] = list(img_size)
    try:
        args = to_jsonable(args, strict=True)
    except TypeError as err:
        raise TypeError(
            f"model argument not storable: {err}; build the model with plain "
            "arguments (names instead of classes)"
        ) from None
    built_moe = architecture.startswith(VMOE_FACTORY_PREFIXES)
    moe = None if built_moe else getattr(model, "vmoe_moe", None)
    if moe and moe.get("mixed"):
        raise ValueError(
            f"cannot save {type(model).__name__}: moeify was called more than once "
            f"with different MoE options (blocks {moe['mixed']} and others), and "
            "config.json replays one layer config; moeify once with one config"
        )
    routing = {name: s.to_dict() for name, s in read_routing(moe_layers(model)).items()}
    for key in MOEIFIED_ARGS:  # a model rebuilt by vmoe_moeified: its args are regenerated
        args.pop(key, None)
    if moe:
        # timm's local-dir/hf-hub loaders build the architecture named in config.json: for a
        # moeified timm model that is the vmoe_moeified factory, which builds the dense base
        # model and replays the recipe. vmoe's loader reads the top-level 'moeify' entry.
        args.update(base_architecture=architecture, moeify=moe, routing=routing)
        architecture = MOEIFIED_ARCHITECTURE
    elif built_moe:
        args["routing"] = routing  # the vmoe factories apply it: timm's local-dir/hf-hub loaders
    return {
        "format": "vmoe",
        "version": FORMAT_VERSION,
        "architecture": architecture,
        "model_args": args,
        "moeify": moe,
        "routing": routing,
    }


def write_config(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model``'s ``config.json``: what timm's ``save_for_hf`` writes (architecture,
    num_classes, model_args, pretrained_cfg: ``timm.create_model("local-dir:DIR")`` reads it)
    plus the vmoe entries of ``model_config`` (format, version, moeify, routing).

    ``num_classes`` is written at the top level (and in ``pretrained_cfg``), not in
    ``model_args``: transformers' ``TimmWrapper`` passes its own ``num_classes`` (the config's
    ``num_labels``) next to ``model_args`` ("got multiple values for keyword argument"), and
    timm's loaders read it from the pretrained cfg. ``from_pretrained`` reads it from either."""
    config = model_config(model)
    vmoe_entries = {
        k: config[k] for k in ("format", "version", "architecture", "moeify", "routing")
    }
    save_config_for_hf(model, path, model_config=vmoe_entries, model_args=config["model_args"])
    written = json.loads(Path(path).read_text())
    written["model_args"].pop("num_classes", None)  # timm's get_model_args puts it back
    Path(path).write_text(json.dumps(written, indent=2))


def save_pretrained(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    overwrite: bool = False,
    model_card: Union[bool, Mapping] = False,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (timm's ``save_for_hf``
    layout, loadable with ``timm.create_model("local-dir:DIR", pretrained=True)``), and with
    ``model_card`` a ``README.md`` (architecture, routing, parameter counts; pass a dict with
    ``dataset``/``metrics``/``notes`` to add what training knows).

    An existing non-empty directory is never written over unless ``overwrite=True``; the files
    are written to a temporary directory first and moved into place only when complete (a full
    disk raises OSError naming ``directory`` and leaves it as it was).
    """
    model_config(model)  # refuses an unsaveable model before anything is written
    if expert_parallel_layers(model):
        raise ValueError(
            "cannot save an expert-parallel model (it holds E/ep experts per layer): "
            "call vmoe.moe.parallel.unshard_experts(model) on every rank first, "
            "then save on one"
        )
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with staged_save_dir(directory, overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_config(model, tmp / CONFIG_NAME)
        if model_card:
            info = model_card if isinstance(model_card, Mapping) else None
            (tmp / CARD_NAME).write_text(make_model_card(model, model_config(model), info))
    return Path(directory)


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (huggingface_hub's messages run to several lines)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    model_card: Union[bool, Mapping] = True,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Add V-MoE model",
) -> str:
    """Upload ``model`` as a ``save_pretrained`` directory (config.json, model.safetensors and,
    by default, the model card) to the Hugging Face Hub repository ``repo_id`` (created when
    missing). Returns the commit URL. Loading back: ``timm.create_model("hf-hub:" + repo_id,
    pretrained=True)`` or ``from_pretrained("hf-hub:" + repo_id)``. Offline, not logged in, or
    refused: RuntimeError saying so (the files are not kept)."""
    from huggingface_hub import HfApi  # only needed for uploads

    with tempfile.TemporaryDirectory(prefix="vmoe_push_") as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", model_card=model_card)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message
            )
        except (OSError, ValueError) as err:  # huggingface_hub: offline, auth, network, refused
            raise RuntimeError(
                f"could not push to the Hugging Face Hub repository {repo_id!r} "
                f"({_first_line(err)}). "
                "Offline or not logged in? Save with save_pretrained(model, DIR) and upload DIR "
                "later (huggingface-cli upload)"
            ) from err
    return str(getattr(info, "commit_url", info))


def check_target_dir(directory: Union[str, os.PathLike], overwrite: bool) -> None:
    """FileExistsError when ``directory`` exists, is not empty, and ``overwrite`` is false."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{directory} exists and is not empty; pass overwrite=True "
            "(--overwrite on the command line) to replace it"
        )


@contextlib.contextmanager
def staged_save_dir(directory: Union[str, os.PathLike], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``directory``; on success move its files into
    ``directory``. A non-empty ``directory`` is refused unless ``overwrite``; on error nothing
    in it changes, and a failed write (disk full, file too large, ...) is a
    ``vmoe.writes.WriteError`` naming it."""
    directory = Path(directory)
    check_target_dir(directory, overwrite)
    with failed_write(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            yield tmp
            directory.mkdir(exist_ok=True)
            for path in sorted(tmp.iterdir()):
                os.replace(path, directory / path.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: is {directory} a directory written by save_pretrained?"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    validate_config(config, path)
    if not timm.is_model(config["architecture"]):
        raise ValueError(
            f"{path}: entry 'architecture' names {config['architecture']!r}, which is "
            "not a registered timm model (import the package that registers it)"
        )
    return config


def check_saved_dir(directory: Union[str, os.PathLike], args: Mapping) -> None:
    """The checks ``from_pretrained`` runs before building, for the other loaders of a saved
    directory (timm's ``local-dir:``, which calls the vmoe factories): ``config.json``
    validated, then its size-deciding numbers, with ``args`` (the model arguments the factory
    will build with) over its ``model_args``, compared with the ``model.safetensors`` header.
    ValueError naming the file and the entry. Without a ``model.safetensors`` (a directory timm
    saved as ``pytorch_model.bin``) only the config is checked."""
    directory = Path(directory)
    config = _read_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if weights_path.is_file():
        header = read_safetensors_header(weights_path)
        check_config_against_header(
            config, {**config["model_args"], **args}, header, directory / CONFIG_NAME, weights_path
        )


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupted or truncated?): {err}"
        ) from None


def load_state_dict_checked(
    model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """``load_state_dict`` that lists every missing key, unexpected key and shape mismatch."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = shape_mismatches(
        own,
        {k: tuple(v.shape) for k, v in state_dict.items()},
        expected_as="model",
        found_as="checkpoint",
        limit=None,
    )
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state_dict)


def adapt_for_fine_tuning(
    model: nn.Module, state: Dict[str, torch.Tensor], new_head: bool, new_size: bool
) -> Dict[str, torch.Tensor]:
    """A new head (``new_head``: freshly initialized, or none for ``num_classes=0``); position
    embeddings resampled to the new grid (``new_size``)."""
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if new_head and key in state and (key not in own or state[key].shape != own[key].shape):
            if key in own:
                state[key] = own[key]  # new head, freshly initialized
            else:
                del state[key]  # num_classes=0: no head
    if (
        new_size
        and "pos_embed" in state
        and "pos_embed" in own
        and state["pos_embed"].shape != own["pos_embed"].shape
    ):
        prefix = (
            0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        )
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
        )
    return state


def _build(config: dict, args: dict) -> nn.Module:
    """The model ``config`` describes (timm architecture, then the moeify recipe), on the
    current default device."""
    if config["architecture"] == MOEIFIED_ARCHITECTURE:
        # the factory replays the recipe: the top-level one, which the checks have read
        args = {**args, "moeify": config["moeify"]}
        return timm.create_model(MOEIFIED_ARCHITECTURE, pretrained=False, **args)
    model = timm.create_model(config["architecture"], pretrained=False, **args)
    if config.get("moeify"):
        blocks, layer, drop = recipe_layer(config["moeify"])
        moeify(model, blocks=blocks, config=layer, drop=drop)
    return model


def _build_on_meta(config: dict, args: dict, config_path: Path) -> Optional[nn.Module]:
    """``_build`` on the meta device (no memory, no init); any failure names the config. None
    for an architecture that cannot be built on the meta device at all (its init reads
    tensor values)."""
    try:
        with torch.device("meta"):
            return _build(config, args)
    except (
        TypeError,
        ValueError,
        AssertionError,
        RuntimeError,
        KeyError,
        NotImplementedError,
    ) as err:
        if isinstance(err, NotImplementedError) or "meta" in str(err):
            return None
        raise ValueError(
            f"{config_path}: cannot build {config['architecture']!r} from its "
            f"model_args/moeify entries ({type(err).__name__}: {err})"
        ) from None


def resolve_model_dir(source: Union[str, os.PathLike]) -> Path:
    """The local directory of ``source``: a path, ``local-dir:PATH``, ``hf-hub:ORG/NAME[@REV]``
    (config.json and model.safetensors downloaded into the Hugging Face cache; ConnectionError
    saying what to do when that fails: offline, no such repository, no access), or a released
    checkpoint's name or ``MODEL.TAG`` (``vmoe.models.catalogue.fetch_pretrained``: fetched and
    converted into the vmoe cache on first use)."""
    text = os.fspath(source)
    if text.startswith("local-dir:"):
        return Path(text[len("local-dir:") :])
    if not text.startswith("hf-hub:"):
        from .catalogue import fetch_pretrained, find_official_checkpoint

        if not Path(text).exists() and find_official_checkpoint(text) is not None:
            return fetch_pretrained(text)  # a released checkpoint: fetched, converted, cached
        return Path(text)
    repo_id, _, revision = text[len("hf-hub:") :].partition("@")
    from huggingface_hub import snapshot_download  # only needed for hub names

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision or None, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]
            )
        )
    except (OSError, ValueError) as err:  # huggingface_hub: offline, not found, auth, network
        raise ConnectionError(
            f"could not download {text!r} from the Hugging Face Hub ({_first_line(err)}). "
            "Offline? Download the repository "
            "elsewhere and load its directory: from_pretrained(DIR) or "
            "timm.create_model('local-dir:DIR', pretrained=True)"
        ) from err


def from_pretrained(
    directory: Union[str, os.PathLike],
    num_classes: Optional[int] = None,
    img_size: Optional[Union[int, Sequence[int]]] = None,
    **model_overrides,
) -> nn.Module:
    """Rebuild a model written by ``save_pretrained`` (same logits). ``directory``: a path,
    ``local-dir:PATH`` or ``hf-hub:ORG/NAME`` (see ``resolve_model_dir``).

    ``num_classes`` (a new, freshly initialized head) and ``img_size`` (position embeddings
    resampled with timm's ``resample_abs_pos_embed``) prepare it for fine-tuning.

    The directory is untrusted input: ``config.json`` is validated, and compared with the
    header of ``model.safetensors`` (sizes first, then every parameter's shape on a meta-device
    build) before the model is built, so nothing larger than the weights file is allocated.
    """
    directory = resolve_model_dir(directory)
    config = _read_config(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    header = read_safetensors_header(weights_path)
    args = dict(config["model_args"])
    if "num_classes" not in args and isinstance(config.get("num_classes"), int):
        args["num_classes"] = config["num_classes"]  # the top-level entry (timm's layout)
    if num_classes is not None:
        args["num_classes"] = num_classes
    if img_size is not None:
        args["img_size"] = img_size
    args.update(model_overrides)
    check_config_against_header(config, args, header, config_path, weights_path)
    meta = _build_on_meta(config, args, config_path)
    if meta is not None:
        expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        may_differ = (["head.weight", "head.bias"] if num_classes is not None else []) + (
            ["pos_embed"] if img_size is not None else []
        )
        check_shapes(expected, header, config_path, weights_path, may_differ)
    model = _build(config, args)
    state = _read_weights(weights_path)
    state = adapt_for_fine_tuning(model, state, num_classes is not None, img_size is not None)
    load_state_dict_checked(model, state, source=str(weights_path))
    restore_routing(
        moe_layers(model), config.get("routing") or {}
    )  # names checked with the weights
    return model


def upcycle(
    model: Union[str, nn.Module],
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    img_size: Optional[Union[int, Sequence[int]]] = None,
    *,
    every: Optional[int] = None,
    last: Optional[int] = None,
    blocks: Optional[Sequence[int]] = None,
    **moe_options: Any,
) -> nn.Module:
    """Sparse upcycling: a dense timm ViT (with its pretrained weights) -> V-MoE.

    Args:
        model: a timm model name (e.g. ``"vit_small_patch16_224"``) or a built dense ViT.
        checkpoint_path: a local weights file for that architecture: ``.safetensors``/``.pth``
            in timm's layout, or Google's ViT ``.npz`` (read by timm's own loader).
        pretrained: load timm's hub weights by name (needs internet).
        num_classes: a new head with this many classes.
        img_size: a new resolution (timm resamples the position embeddings).
        every: MoE placement, as in ``moeify``.
        last: MoE placement, as in ``moeify``.
        blocks: MoE placement, as in ``moeify``.
        **moe_options: as in ``moeify`` (``config=`` a ``MoeLayerConfig``, ``router_init_std``,
            ``drop``, or the flat keyword options). Experts start as copies of the dense
            MLPs. With ``renormalize=True`` and a capacity that drops nothing, the upcycled model
            computes exactly what the dense model does, with shared experts too: then the dense
            output is split between the routed and the shared part, half each (the experts'
            fc2 halved; the shared MLP computing half the dense MLP, or gated all of it with
            its zero-init gate sigmoid(0) = 1/2), so routed + shared = dense.
    """
    if isinstance(model, str):
        kwargs = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if img_size is not None:
            kwargs["img_size"] = img_size
        if checkpoint_path is not None:
            path = Path(checkpoint_path)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint_path {path} does not exist")
            overlay = dict(file=str(path), custom_load=path.suffix == ".npz")
            kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        else:
            kwargs["pretrained"] = pretrained
        try:
            model = timm.create_model(model, **kwargs)
        except (OSError, ConnectionError, RuntimeError) as err:
            if kwargs.get("pretrained") and checkpoint_path is None:
                raise RuntimeError(
                    f"could not download pretrained weights for {model!r} ({type(err).__name__}: "
                    f"{err}). "
                    "Offline? Download the weights file elsewhere and pass checkpoint_path=..."
                ) from err
            raise
    return moeify(model, every=every, last=last, blocks=blocks, from_dense=True, **moe_options)
