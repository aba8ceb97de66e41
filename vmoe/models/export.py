"""Deploy a vmoe model: ``torch.export`` and ONNX with a dynamic batch dimension.

    program = export_program(model)                   # torch.export.ExportedProgram, any batch
    save_program(program, "model.pt2")                # torch.export.save (+ the routing used)
    export_onnx(model, "model.onnx")                  # ONNX (dynamo exporter), batch axis dynamic
    check_export("model.onnx", model)                 # {batch size: max |artifact - eager|}

Routing: by default the artifact runs the dropless path of the top-K layers (every token on
its K experts, each expert on exactly its rows: no capacity, no padding to a routing group,
batch-independent), as ``model.eval()`` does; ``capacity_factor=X`` exports the capacity path
at X instead (``EVAL_CAPACITY_FACTOR`` = 4.0 is the paper's evaluation). Expert-choice layers
keep their capacity, Soft MoE layers have fixed slots. The settings used, with each layer's
``"path"`` ('dropless', 'capacity' or 'soft'), are stored in the artifact
(``extra_files["vmoe_routing.json"]`` of the .pt2, the ONNX ``metadata_props``).

Tracing: the dropless path's per-expert row counts are data-dependent (unbacked sizes bounded
with ``torch._check``: one dynamic slice per expert, E static); the capacity path keeps its
grouping and padding symbolic at every batch size. ``MoeMlp.forward`` traces size-obliviously
under ``torch.export`` and orders by pairwise comparisons (``vmoe.moe.routing``), so a bare
``torch.export.export`` / ``torch.onnx.export(..., dynamo=True)`` of a vmoe model works too;
orderings over axes longer than ``PAIRWISE_ORDER_MAX`` keep ``aten.sort.stable``, which
``export_onnx`` lowers to ONNX ``TopK`` (ties: lower index first, as the stable sort).

Batch dependence (the capacity path; dropless layers have none): a sparse layer's routing
groups span ``group_size_images`` consecutive images (default 8) that compete for buffer
places, so an image's output depends on the other images of its group whenever a place is
contested (a token dropped or not), and on the batch's size through the padding of the last
group. ``batch_independent=True`` routes one image per group (``group_size_images=1``): the
output of an image then depends on that image alone. Soft MoE layers with one image per group
(the default) are batch-independent already.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..moe import require_moe_layers, restore_routing, set_routing
from ..moe.parallel import expert_parallel_layers
from ..moe.settings import read_routing
from ..writes import NotWritableError, failed_write, require_writable_dir

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_EXTRA",
    "MissingExtraError",
    "inference_routing",
    "export_program",
    "save_program",
    "export_onnx",
    "export_model",
    "check_export",
]

EXPORT_FORMATS = ("onnx", "pt2")
EXPORT_EXTRA = 'pip install -e ".[export]"'
ROUTING_FILE = "vmoe_routing.json"


class MissingExtraError(ImportError):
    """onnx / onnxscript / onnxruntime are not installed (the ``export`` extra)."""


def require_onnx() -> None:
    """ImportError naming the ``export`` extra when onnx, onnxscript or onnxruntime is missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"ONNX export needs {', '.join(missing)} (not installed): "
            f"install the export extra, {EXPORT_EXTRA}"
        )


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sharded = list(expert_parallel_layers(model))
    if sharded:
        raise ValueError(
            f"cannot export a model whose experts are sharded over processes "
            f"(expert-parallel layers {sharded}): gather them first with "
            "vmoe.moe.parallel.unshard_experts(model)"
        )


def _input_shape(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) of the images the model takes, from its patch embedding."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    proj = getattr(embed, "proj", None)
    if size is None or proj is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.img_size/proj: pass example=")
    return proj.in_channels, int(size[0]), int(size[1])


def _path(layer) -> str:
    """Which forward ``layer`` (eval mode) runs: 'dropless', 'capacity' or 'soft'."""
    if layer.is_soft:
        return "soft"
    return "dropless" if layer.dropless else "capacity"


@contextlib.contextmanager
def inference_routing(
    model: nn.Module,
    capacity_factor: Optional[float] = None,
    batch_priority: Optional[bool] = None,
    batch_independent: bool = False,
) -> Iterator[Dict[str, dict]]:
    """Route the ``with`` body as an exported model will. ``capacity_factor=None`` (default):
    top-K layers run dropless (every token on its K experts, no capacity, no padding:
    batch-independent), expert-choice layers keep their settings; a number: every sparse layer
    runs the capacity path at that factor (e.g. ``EVAL_CAPACITY_FACTOR``, the paper's 4.0).
    ``batch_priority`` (None: keep) applies to the capacity path; Soft MoE layers have fixed
    slots. ``batch_independent``: one image per routing group in every layer. Yields
    ``{layer: settings}`` as used, each with ``"path"``: 'dropless', 'capacity' or 'soft';
    everything is put back on exit."""
    layers = require_moe_layers(model)
    sparse = [name for name, layer in layers.items() if not layer.is_soft]
    top_k = [name for name in sparse if layers[name].router.config.name == "top_k"]
    if batch_independent:
        grouped = [n for n, m in layers.items() if m.is_soft and m.group_size_images != 1]
        if grouped:
            raise ValueError(
                f"batch_independent=True: Soft MoE layers {grouped} have slots sized "
                "for groups of several images; their group size cannot change"
            )
    groups = {name: (m.group_size, m.group_size_images) for name, m in layers.items()}
    previous = read_routing(layers)
    try:
        if sparse and (capacity_factor is not None or batch_priority is not None):
            set_routing(model, capacity_factor, batch_priority, layers=sparse)
        if capacity_factor is None and top_k:
            set_routing(model, dropless=True, layers=top_k)
        if batch_independent:
            for m in layers.values():
                m.group_size, m.group_size_images = None, 1
        used = {
            name: {
                **s.to_dict(),
                "path": _path(layers[name]),
                "group_size": layers[name].group_size,
                "group_size_images": layers[name].group_size_images,
            }
            for name, s in read_routing(layers).items()
        }
        yield used
    finally:
        for name, (size, images) in groups.items():
            layers[name].group_size, layers[name].group_size_images = size, images
        restore_routing(model, previous)


def _sort_stable_to_onnx():
    """The ONNX translation of ``aten.sort.stable``: ``TopK`` over the whole axis (ties: lower
    index first by the ONNX spec, as a stable sort)."""
    from onnxscript import opset18 as op

    def sort_stable(self, *, stable=None, dim=-1, descending=False):
        n = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
        return op.TopK(self, n, axis=dim, largest=descending, sorted=True)

    return {torch.ops.aten.sort.stable: sort_stable}


def _export(model: nn.Module, example: Optional[torch.Tensor], max_batch: Optional[int]):
    from torch.export import Dim
    from torch.fx.experimental import _config as shape_config

    if max_batch is not None and (
        not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1
    ):
        raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
    if example is None:  # 3 images, or max_batch when fewer are allowed
        example = torch.randn(min(3, max_batch or 3), *_input_shape(model))
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError(
            f"example must be an image batch [B, C, H, W], got "
            f"{getattr(example, 'shape', type(example).__name__)}"
        )
    if max_batch is not None and len(example) > max_batch:
        raise ValueError(f"example has {len(example)} images, more than max_batch={max_batch}")
    # max_batch 1: a static batch of 1 (torch.export has no dynamic dimension with min == max)
    shapes = None if max_batch == 1 else ({0: Dim("batch", min=1, max=max_batch)},)
    device = next(model.parameters()).device
    # Sizes derived from the batch (groups G, padding) are traced size-obliviously: torch's
    # layout checks would otherwise specialize the program on whether G == 1.
    with shape_config.patch(backed_size_oblivious=True):
        return torch.export.export(model, (example.to(device),), dynamic_shapes=shapes)


def export_program(
    model: nn.Module,
    example: Optional[torch.Tensor] = None,
    *,
    capacity_factor: Optional[float] = None,
    batch_priority: Optional[bool] = None,
    batch_independent: bool = False,
    max_batch: Optional[int] = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (eval mode) with a dynamic batch dimension (1 .. max_batch,
    None: unbounded; 1: a static batch of one; a bigger batch is refused when the program runs).
    ``example``: an image batch [B, C, H, W], B <= max_batch (default: min(3, max_batch) random
    images at the model's input size); the program runs at every batch size. Routing: see
    ``inference_routing``; the settings used are in ``program.graph_module.meta["vmoe_routing"]``.
    The model's own settings and training mode are unchanged afterwards."""
    _check_model(model)
    was_training = model.training
    model.eval()
    try:
        with inference_routing(model, capacity_factor, batch_priority, batch_independent) as used:
            program = _export(model, example, max_batch)
    finally:
        model.train(was_training)
    program.graph_module.meta["vmoe_routing"] = used
    return program


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name for the exported model")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True (vmoe export: --overwrite) to "
            "replace it, or choose a new file name"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the directory {path.parent} does not exist")
    require_writable_dir(path)


@contextlib.contextmanager
def _atomic(
    path: Path, what: str, verify: Optional[Callable[[Path], object]] = None
) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write, ``verify(temporary file)``, then
    the file moved over ``path`` (a failed write or check leaves no file behind and the previous
    ``path`` as it was)."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    with failed_write(path, what):
        try:
            try:
                yield tmp
            except PermissionError as err:
                raise NotWritableError(
                    errno.EACCES,
                    f"could not write {what} {path}: permission denied ({err.strerror}: "
                    f"{err.filename}); nothing was changed",
                ) from err
            if verify is not None:
                verify(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


class _KeepFirstError(io.RawIOBase):
    """The binary file torch's zip writer writes a .pt2 through: the first failure of a write
    (OSError: disk full, file too large; or Ctrl-C) is kept in ``error`` and every later write is
    dropped, so that the writer still finishes its archive. (A write failing inside
    ``torch.export.save`` otherwise leaves torch's ``PyTorchFileWriter`` unfinished: its
    destructor then throws from C++ and the process aborts, exit code 134.)"""

    def __init__(self, file):
        super().__init__()
        self.file, self.error = file, None

    def _try(self, call, *args, otherwise=None):
        if self.error is None:
            try:
                return call(*args)
            except BaseException as err:  # noqa: B036 -- raised again once torch has finished
                self.error = err
        return otherwise

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self._try(self.file.write, data)
        return size

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._try(self.file.seek, offset, whence, otherwise=0)

    def tell(self) -> int:
        return self._try(self.file.tell, otherwise=0)

    def flush(self) -> None:
        self._try(self.file.flush)


def _save_pt2(program: torch.export.ExportedProgram, path: Path, extra_files: dict) -> None:
    """``torch.export.save(program, path)``, its failed writes raised as the OSError (or Ctrl-C)
    the file raised, after torch's writer has finished (see ``_KeepFirstError``)."""
    with open(path, "wb") as f:
        out = _KeepFirstError(f)
        torch.export.save(program, out, extra_files=extra_files)
        out.flush()
        if out.error is not None:
            raise out.error


def save_program(
    program: torch.export.ExportedProgram,
    path: Union[str, os.PathLike],
    *,
    overwrite: bool = False,
    verify: Optional[Callable[[Path], object]] = None,
) -> Path:
    """``torch.export.save`` to ``path`` (refused when it exists, unless ``overwrite``), with the
    routing settings as ``extra_files["vmoe_routing.json"]``; load with ``torch.export.load``.
    ``verify(file)``, e.g. a ``check_export``, runs on the written file before it replaces
    ``path``: when it raises, nothing is written."""
    path = Path(path)
    _refuse_existing(path, overwrite)
    routing = json.dumps(program.graph_module.meta.get("vmoe_routing", {}))
    with _atomic(path, "exported program", verify) as tmp:
        _save_pt2(program, tmp, {ROUTING_FILE: routing})
    return path


def _batch_range(program: torch.export.ExportedProgram) -> Tuple[int, Optional[int]]:
    """(smallest, largest) batch ``program`` accepts (largest None: unbounded), from its first
    input's leading dimension: a static size or the range of its symbol."""
    import sympy

    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    size = node.meta["val"].shape[0]
    if isinstance(size, int):
        return size, size
    bounds = program.range_constraints[size.node.expr]
    upper = int(bounds.upper) if isinstance(bounds.upper, sympy.Integer) else None
    return int(bounds.lower), upper


def _refuse_batches_above(graph, max_batch: int) -> None:
    """Make an ONNX graph (``onnx_ir``) fail at a batch above ``max_batch``, as the program it was
    made from does (an ONNX dimension has no bounds): ``logits`` becomes ``logits + zeros[B - 1]``
    with ``zeros`` of length ``max_batch``, exactly the logits where B <= max_batch, and ONNX
    Runtime's error 'Gather node. Name:'batch_above_max_batch_N' ... indices element out of data
    bounds' where B > max_batch."""
    import numpy as np
    from onnxscript import ir

    images, logits = graph.inputs[0], graph.outputs[0]

    def constant(name, array):
        return ir.node("Constant", [], {"value": ir.tensor(array, name=name)}, name=name)

    batch = ir.node("Shape", [images], {"start": 0, "end": 1}, name="vmoe_batch")  # [1] int64
    one = constant("vmoe_one", np.ones([1], dtype=np.int64))
    last = ir.node("Sub", [batch.outputs[0], one.outputs[0]], name="vmoe_last_image")
    zeros = constant("vmoe_max_batch", np.zeros([max_batch], dtype=logits.dtype.numpy()))
    guard = ir.node(
        "Gather",
        [zeros.outputs[0], last.outputs[0]],
        {"axis": 0},
        name=f"batch_above_max_batch_{max_batch}",
    )
    add = ir.node("Add", [logits, guard.outputs[0]], name="vmoe_max_batch_guard")
    for node in (batch, one, last, zeros, guard, add):
        graph.append(node)
    guarded = add.outputs[0]
    guarded.shape, guarded.dtype = logits.shape, logits.dtype
    name, logits.name = logits.name, f"{logits.name}_unguarded"
    guarded.name = name
    graph.outputs[0] = guarded


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    example: Optional[torch.Tensor] = None,
    *,
    overwrite: bool = False,
    verify: Optional[Callable[[Path], object]] = None,
    **routing,
) -> Path:
    """ONNX (``torch.onnx.export(..., dynamo=True)``) of ``export_program(model, example,
    **routing)`` to ``path``: input ``images`` [batch, C, H, W], output ``logits``, the batch
    axis dynamic; standard ONNX operators only. The routing settings are the model's
    ``metadata_props["vmoe.routing"]``. Refuses an existing ``path`` unless ``overwrite``.

    ``max_batch=N`` (in ``routing``): ``metadata_props["vmoe.max_batch"]``, and the graph fails
    in ONNX Runtime at a batch above N (node ``batch_above_max_batch_N``; an ONNX dimension has
    no bounds); N = 1 makes the batch axis static. ``verify(file)`` runs on the written file
    before it replaces ``path``: when it raises, nothing is written."""
    require_onnx()
    path = Path(path)
    _refuse_existing(path, overwrite)
    program = export_program(model, example, **routing)
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        verbose=False,
        input_names=["images"],
        output_names=["logits"],
        custom_translation_table=_sort_stable_to_onnx(),
    )
    onnx_program.model.metadata_props["vmoe.routing"] = json.dumps(
        program.graph_module.meta["vmoe_routing"]
    )
    low, high = _batch_range(program)
    if high is not None:
        onnx_program.model.metadata_props["vmoe.max_batch"] = str(high)
        if low != high:  # a static batch is refused by ONNX Runtime itself
            _refuse_batches_above(onnx_program.model.graph, high)
    with _atomic(path, "ONNX model", verify) as tmp:
        onnx_program.save(tmp, external_data=False)
    return path


def export_model(
    model: nn.Module,
    path: Union[str, os.PathLike],
    format: str = "onnx",
    *,
    overwrite: bool = False,
    verify: Optional[Callable[[Path], object]] = None,
    **routing,
) -> Path:
    """``export_onnx`` or ``export_program`` + ``save_program`` by ``format`` ('onnx', 'pt2'),
    whatever the suffix of ``path``; ``verify(file)`` runs on the written file before it
    replaces ``path`` (when it raises, nothing is written)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}: choose one of {EXPORT_FORMATS}")
    if format == "onnx":
        return export_onnx(model, path, overwrite=overwrite, verify=verify, **routing)
    _refuse_existing(Path(path), overwrite)  # before the (slow) export
    return save_program(export_program(model, **routing), path, overwrite=overwrite, verify=verify)


def _artifact_format(artifact, format: Optional[str] = None) -> str:
    """'program' for an ExportedProgram; for a file 'pt2' (a zip archive, as
    ``torch.export.save`` writes) or 'onnx', from its content, never its name. A ``format``
    given ('onnx', 'pt2') is checked against the content (ValueError when they differ)."""
    if isinstance(artifact, torch.export.ExportedProgram):
        return "program"
    if format is not None and format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}: choose one of {EXPORT_FORMATS}")
    path = Path(artifact)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an exported model: .onnx or .pt2)")
    found = "pt2" if zipfile.is_zipfile(path) else "onnx"
    if format is not None and format != found:
        why = "a zip archive, as .pt2 files are" if found == "pt2" else "not a .pt2 (zip) archive"
        raise ValueError(f"{path} is not a {format} file: it is {why}")
    return found


def _runner(artifact, format: Optional[str] = None):
    """(run, (smallest, largest batch)) for an exported artifact: an ExportedProgram, a .pt2
    file or an ONNX file (ONNX Runtime, CPU), told apart by ``_artifact_format``; ``run``: images
    [B, C, H, W] -> logits [B, classes] (tensor); largest None: unbounded."""
    if _artifact_format(artifact, format) == "onnx":
        require_onnx()
        import onnxruntime as ort

        session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
        first = session.get_inputs()[0]
        if isinstance(first.shape[0], int):
            batches = (first.shape[0], first.shape[0])
        else:
            high = session.get_modelmeta().custom_metadata_map.get("vmoe.max_batch")
            batches = (1, int(high) if high else None)

        def run(x):
            return torch.from_numpy(session.run(None, {first.name: x.cpu().numpy()})[0])

        return run, batches
    if isinstance(artifact, torch.export.ExportedProgram):
        program = artifact
    else:  # from a file object: torch warns about a file name that does not end in .pt2
        with open(artifact, "rb") as f:
            program = torch.export.load(f)
    module = program.module()
    return (lambda x: module(x)), _batch_range(program)


def _check_batch_sizes(low: int = 1, high: Optional[int] = None) -> Tuple[int, ...]:
    """The batch sizes an artifact accepting ``low`` .. ``high`` images (None: any) is checked at
    by default: 1 and 5 brought inside that range (e.g. 1 and 4 for ``max_batch=4``)."""
    inside = {max(b, low) if high is None else min(max(b, low), high) for b in (1, 5)}
    return tuple(sorted(inside))


def check_export(
    artifact,
    model: nn.Module,
    batch_sizes: Optional[Sequence[int]] = None,
    *,
    format: Optional[str] = None,
    seed: int = 0,
    **routing,
) -> Dict[int, float]:
    """``{batch size: max |artifact(x) - model(x)|}`` on random image batches, the eager model
    routing as ``export_program(**routing)`` does (use the same options as for the export).

    ``artifact``: an ExportedProgram, or a file of ``format`` 'onnx' / 'pt2' (default: told by
    its content, never by its name). ``batch_sizes``: default 1 and 5 brought within the
    batches the artifact accepts; a size outside them is refused (ValueError)."""
    run, (low, high) = _runner(artifact, format)
    if batch_sizes is None:
        batch_sizes = _check_batch_sizes(low, high)
    outside = [b for b in batch_sizes if b < low or (high is not None and b > high)]
    if outside:
        accepted = f"{low} to {high}" if high is not None else f"{low} or more"
        raise ValueError(
            f"batch sizes {outside}: the exported model takes batches of {accepted} images"
        )
    shape = _input_shape(model)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    diffs = {}
    try:
        with inference_routing(model, **routing), torch.no_grad():
            for b in batch_sizes:
                x = torch.randn(b, *shape, generator=generator).to(device)
                got = run(x)
                diffs[b] = float((got.to(device).float() - model(x).float()).abs().max())
    finally:
        model.train(was_training)
    return diffs
