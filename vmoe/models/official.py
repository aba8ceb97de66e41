"""Google's released V-MoE and Soft MoE checkpoints -> our timm-based ``VisionTransformerMoe``:
the key mapping of the official parameter tree (the file format is read by
``vmoe.checkpoints``).

The architecture is read from the checkpoint's index (hidden size, depth, heads, MLP size,
patch size, MoE blocks and experts, class token or global pooling, representation size,
classes). What a checkpoint does not store (K, capacity factor, group size, BPR, loss weights)
comes from arguments with the paper's defaults (``PAPER_MOE_DEFAULTS``, the defaults of
``TopKRouterConfig``, with K=2).

The imported model computes what the official one does: tanh-approximate GELU, LayerNorm eps
1e-6, the NHWC-trained HWIO patch kernel turned into a conv OIHW kernel (feed NCHW images as
usual), per-head q/k/v kernels fused into timm's ``qkv``, Flax ``(in, out)`` kernels transposed
to ``nn.Linear`` weights, expert kernels kept as ``[E, in, out]``.

Parameter mapping (official name -> torch key, layout):
    embedding/kernel (ph,pw,C,d)                   -> patch_embed.proj.weight (d,C,ph,pw)
    cls (1,1,d)                                    -> cls_token
    Encoder/posembed_input/pos_embedding (1,N,d)   -> pos_embed
    Encoder/encoderblock_i/LayerNorm_{0,1}         -> blocks.i.norm{1,2} (scale -> weight)
    .../SelfAttention/{query,key,value}/kernel (d,H,hd) -> blocks.i.attn.qkv.weight (3d, d)
    .../SelfAttention/out/kernel (H,hd,d)          -> blocks.i.attn.proj.weight (d, d)
    .../Mlp/Dense_{0,1}/kernel (in,out)            -> blocks.i.mlp.fc{1,2}.weight (out,in)
    .../Moe/Router/dense/kernel (d,E)              -> blocks.i.mlp.router.weight (E,d)
    .../Moe/Router/mu (d,E,P), Router/scale ()     -> blocks.i.mlp.router.{mu,scale} (Soft MoE)
    .../SelfAttention/{query,key}_ln/scale (hd,)   -> blocks.i.attn.{q,k}_norm.weight (qk-norm)
    .../Moe/Mlp/Dense_{0,1}/{kernel,bias}          -> blocks.i.mlp.experts.fc{1,2}_{weight,bias}
    Encoder/encoder_norm, pre_logits, head         -> norm, pre_logits.fc, head
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import timm
import torch
import torch.nn as nn

from vmoe.checkpoints import (
    CheckpointFormatError,
    SafetensorsStreamWriter,
    iter_checkpoint_arrays,
    read_checkpoint_index,
)

from ..moe.config import ROUTER_CONFIGS, MoeLayerConfig
from .moeify import MOEIFY_KEYS, merge_moe_options
from .pretrained import CONFIG_NAME, WEIGHTS_NAME, check_target_dir, staged_save_dir, write_config

__all__ = [
    "infer_vmoe_architecture",
    "architecture_from_shapes",
    "from_vmoe_checkpoint",
    "from_vmoe_params",
    "convert_vmoe_checkpoint",
    "iter_converted_tensors",
]

_QKV = ("query", "key", "value")


def _official_shapes(a: dict) -> dict[str, tuple]:
    """The parameter names and shapes an official V-MoE with architecture ``a`` has."""
    d, m, H, E = a["embed_dim"], a["mlp_dim"], a["num_heads"], a["num_experts"]
    ph, pw = a["patch"]
    s = {
        "embedding/kernel": (ph, pw, a["in_chans"], d),
        "embedding/bias": (d,),
        "Encoder/posembed_input/pos_embedding": (1, a["num_tokens"], d),
        "Encoder/encoder_norm/scale": (d,),
        "Encoder/encoder_norm/bias": (d,),
    }
    if a["class_token"]:
        s["cls"] = (1, 1, d)
    for i in range(a["depth"]):
        b = f"Encoder/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            s[f"{b}/{ln}/scale"] = s[f"{b}/{ln}/bias"] = (d,)
        for q in _QKV:
            s[f"{b}/SelfAttention/{q}/kernel"], s[f"{b}/SelfAttention/{q}/bias"] = (
                (d, H, d // H),
                (H, d // H),
            )
        s[f"{b}/SelfAttention/out/kernel"], s[f"{b}/SelfAttention/out/bias"] = (H, d // H, d), (d,)
        if a.get("qk_norm"):
            for q in ("query_ln", "key_ln"):
                s[f"{b}/SelfAttention/{q}/scale"] = (d // H,)
        if i in a["moe_blocks"] and a.get("router") == "soft":
            s[f"{b}/Moe/Router/mu"], s[f"{b}/Moe/Router/scale"] = (d, E, a["num_slots"]), ()
        elif i in a["moe_blocks"]:
            s[f"{b}/Moe/Router/dense/kernel"] = (d, E)
        if i in a["moe_blocks"]:
            s[f"{b}/Moe/Mlp/Dense_0/kernel"], s[f"{b}/Moe/Mlp/Dense_0/bias"] = (E, d, m), (E, m)
            s[f"{b}/Moe/Mlp/Dense_1/kernel"], s[f"{b}/Moe/Mlp/Dense_1/bias"] = (E, m, d), (E, d)
        else:
            s[f"{b}/Mlp/Dense_0/kernel"], s[f"{b}/Mlp/Dense_0/bias"] = (d, m), (m,)
            s[f"{b}/Mlp/Dense_1/kernel"], s[f"{b}/Mlp/Dense_1/bias"] = (m, d), (d,)
    width = d
    if a["representation_size"]:
        width = a["representation_size"]
        s["pre_logits/kernel"], s["pre_logits/bias"] = (d, width), (width,)
    if a["num_classes"]:
        s["head/kernel"], s["head/bias"] = (width, a["num_classes"]), (a["num_classes"],)
    return s


def infer_vmoe_architecture(prefix: str) -> dict:
    """Reads ``prefix.index`` and returns the architecture it stores (a dict of plain values).

    Raises CheckpointFormatError naming the index file when the tree is not a (V-MoE) ViT.
    """
    prefix = os.fspath(prefix).removesuffix(".index")
    shapes = {n: i.shape for n, i in read_checkpoint_index(prefix).items()}
    return architecture_from_shapes(shapes, f"{prefix}.index")


def architecture_from_shapes(shapes: dict, where: str = "the parameters") -> dict:
    """The architecture an official parameter tree (``/``-joined name -> shape) describes:
    V-MoE (``Router/dense/kernel``) or Soft MoE (``Router/mu`` [d, E, P] + ``Router/scale``)
    blocks, qk-norm attention, class token or global pooling. CheckpointFormatError naming
    ``where`` when the tree is not such a ViT."""

    def get(name: str, ndim: int) -> tuple:
        if name not in shapes or len(shapes[name]) != ndim:
            top = sorted({n.split("/")[0] for n in shapes})
            raise CheckpointFormatError(
                f"{where}: not a V-MoE / ViT checkpoint: expected a {ndim}-d parameter '{name}' "
                f"(found {shapes.get(name, 'nothing')}; top-level entries: {top})"
            )
        return shapes[name]

    ph, pw, in_chans, d = get("embedding/kernel", 4)
    blocks = {int(m.group(1)) for n in shapes if (m := re.match(r"Encoder/encoderblock_(\d+)/", n))}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise CheckpointFormatError(
            f"{where}: expected transformer blocks "
            f"Encoder/encoderblock_0..N-1, found {sorted(blocks)}"
        )
    _, heads, head_dim = get("Encoder/encoderblock_0/SelfAttention/query/kernel", 3)
    soft = any(re.fullmatch(r"Encoder/encoderblock_\d+/Moe/Router/mu", n) for n in shapes)
    router_param = "Router/mu" if soft else "Router/dense/kernel"
    moe_blocks = sorted(
        i for i in blocks if f"Encoder/encoderblock_{i}/Moe/{router_param}" in shapes
    )
    first_mlp = (
        "Encoder/encoderblock_0/Moe/Mlp/Dense_0/kernel"
        if 0 in moe_blocks
        else "Encoder/encoderblock_0/Mlp/Dense_0/kernel"
    )
    mlp_dim = get(first_mlp, 3 if 0 in moe_blocks else 2)[-1]
    router_shape = (
        get(f"Encoder/encoderblock_{moe_blocks[0]}/Moe/{router_param}", 3 if soft else 2)
        if moe_blocks
        else (0, 0, 0)
    )
    num_experts = router_shape[1]
    num_tokens = get("Encoder/posembed_input/pos_embedding", 3)[1]
    class_token = "cls" in shapes
    grid = math.isqrt(max(num_tokens - class_token, 0))
    if grid * grid != num_tokens - class_token or grid == 0:
        raise CheckpointFormatError(
            f"{where}: {num_tokens} position embeddings "
            f"({'with' if class_token else 'without'} a class token) "
            "are not a square grid of patches"
        )
    arch = dict(
        patch=(ph, pw),
        in_chans=in_chans,
        embed_dim=d,
        depth=len(blocks),
        num_heads=heads,
        mlp_dim=mlp_dim,
        moe_blocks=moe_blocks,
        num_experts=num_experts,
        grid=grid,
        num_tokens=num_tokens,
        class_token=class_token,
        representation_size=shapes["pre_logits/kernel"][-1]
        if "pre_logits/kernel" in shapes
        else None,
        num_classes=shapes["head/kernel"][-1] if "head/kernel" in shapes else 0,
        qk_norm="Encoder/encoderblock_0/SelfAttention/query_ln/scale" in shapes,
        router="soft" if soft else "top_k",
        num_slots=router_shape[2] if soft else None,
    )
    if heads * head_dim != d or int(d * (mlp_dim / d)) != mlp_dim:
        raise CheckpointFormatError(
            f"{where}: heads x head_dim = {heads} x {head_dim} != hidden "
            f"{d}, or MLP size {mlp_dim} is not expressible as a ratio"
        )
    expected = _official_shapes(arch)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        f"{n}: {list(shapes[n])} (expected {list(expected[n])})"
        for n in expected
        if n in shapes and tuple(shapes[n]) != expected[n]
    ]
    if missing or unexpected or wrong:
        raise CheckpointFormatError(
            f"{where}: the parameter tree is not the V-MoE ViT that its embedding, blocks and "
            f"heads describe: missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shapes "
            f"{wrong[:8]} ({len(missing)}/{len(unexpected)}/{len(wrong)} in all)"
        )
    return arch


def _timm_kwargs(arch: dict, moe_options: dict) -> dict:
    ph, pw = arch["patch"]
    img = (arch["grid"] * ph, arch["grid"] * pw)
    kwargs = dict(
        img_size=img[0] if img[0] == img[1] else list(img),
        patch_size=ph if ph == pw else [ph, pw],
        in_chans=arch["in_chans"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_dim"] / arch["embed_dim"],
        num_classes=arch["num_classes"],
        class_token=arch["class_token"],
        global_pool="token" if arch["class_token"] else "avg",
        fc_norm=False,  # official 'gap': final LayerNorm on tokens, then the mean
        representation_size=arch["representation_size"],
        act_layer="gelu_tanh",
    )
    if arch.get("qk_norm"):
        kwargs.update(qk_norm=True, qk_norm_bias=False)  # official normalize_qk: LayerNorm, no bias
    if arch["moe_blocks"]:
        kwargs["moe"] = dict(
            blocks=list(arch["moe_blocks"]), **{**moe_options, "num_experts": arch["num_experts"]}
        )
    return kwargs


def _mapping(arch: dict) -> list[tuple[str, tuple[str, ...], Callable]]:
    """(torch key, official source names, fn(*arrays) -> array in the torch layout)."""
    same, lin = (lambda a: a), (lambda k: k.T)
    m = [
        ("patch_embed.proj.weight", ("embedding/kernel",), lambda k: k.transpose(3, 2, 0, 1)),
        ("patch_embed.proj.bias", ("embedding/bias",), same),
        ("pos_embed", ("Encoder/posembed_input/pos_embedding",), same),
        ("norm.weight", ("Encoder/encoder_norm/scale",), same),
        ("norm.bias", ("Encoder/encoder_norm/bias",), same),
    ]
    if arch["class_token"]:
        m.append(("cls_token", ("cls",), same))
    for i in range(arch["depth"]):
        b, t = f"Encoder/encoderblock_{i}", f"blocks.{i}"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            m += [
                (f"{t}.{norm}.weight", (f"{b}/{ln}/scale",), same),
                (f"{t}.{norm}.bias", (f"{b}/{ln}/bias",), same),
            ]
        att = f"{b}/SelfAttention"
        m += [
            (
                f"{t}.attn.qkv.weight",
                tuple(f"{att}/{q}/kernel" for q in _QKV),
                lambda *ks: np.concatenate([k.reshape(k.shape[0], -1).T for k in ks]),
            ),
            (
                f"{t}.attn.qkv.bias",
                tuple(f"{att}/{q}/bias" for q in _QKV),
                lambda *bs: np.concatenate([x.reshape(-1) for x in bs]),
            ),
            (
                f"{t}.attn.proj.weight",
                (f"{att}/out/kernel",),
                lambda k: k.reshape(-1, k.shape[-1]).T,
            ),
            (f"{t}.attn.proj.bias", (f"{att}/out/bias",), same),
        ]
        if arch.get("qk_norm"):
            m += [
                (f"{t}.attn.q_norm.weight", (f"{att}/query_ln/scale",), same),
                (f"{t}.attn.k_norm.weight", (f"{att}/key_ln/scale",), same),
            ]
        if i in arch["moe_blocks"] and arch.get("router") == "soft":
            m += [
                (f"{t}.mlp.router.mu", (f"{b}/Moe/Router/mu",), same),
                (f"{t}.mlp.router.scale", (f"{b}/Moe/Router/scale",), lambda v: np.reshape(v, ())),
            ]
        elif i in arch["moe_blocks"]:
            m.append((f"{t}.mlp.router.weight", (f"{b}/Moe/Router/dense/kernel",), lin))
        if i in arch["moe_blocks"]:
            for j in (0, 1):
                m += [
                    (f"{t}.mlp.experts.fc{j + 1}_weight", (f"{b}/Moe/Mlp/Dense_{j}/kernel",), same),
                    (f"{t}.mlp.experts.fc{j + 1}_bias", (f"{b}/Moe/Mlp/Dense_{j}/bias",), same),
                ]
        else:
            for j in (0, 1):
                m += [
                    (f"{t}.mlp.fc{j + 1}.weight", (f"{b}/Mlp/Dense_{j}/kernel",), lin),
                    (f"{t}.mlp.fc{j + 1}.bias", (f"{b}/Mlp/Dense_{j}/bias",), same),
                ]
    if arch["representation_size"]:
        m += [
            ("pre_logits.fc.weight", ("pre_logits/kernel",), lin),
            ("pre_logits.fc.bias", ("pre_logits/bias",), same),
        ]
    if arch["num_classes"]:
        m += [("head.weight", ("head/kernel",), lin), ("head.bias", ("head/bias",), same)]
    return m


def iter_converted_tensors(
    prefix: str, arch: Optional[dict] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams ``(torch key, float32 tensor)`` pairs; holds at most one block's q/k/v at once.
    Every shard is checked when this is called (see ``iter_checkpoint_arrays``)."""
    arch = arch or infer_vmoe_architecture(prefix)
    mapping = _mapping(arch)
    by_source = {src: (key, srcs, fn) for key, srcs, fn in mapping for src in srcs}
    return _convert(iter_checkpoint_arrays(prefix, names=list(by_source)), by_source)


def _convert(
    arrays: Iterator[tuple[str, np.ndarray]], by_source: dict
) -> Iterator[tuple[str, torch.Tensor]]:
    pending: dict[str, np.ndarray] = {}
    for name, array in arrays:
        pending[name] = array
        key, srcs, fn = by_source[name]
        if all(s in pending for s in srcs):
            out = fn(*(pending.pop(s) for s in srcs))
            # (ascontiguousarray makes 0-d arrays 1-d: keep the shape, e.g. Router/scale ())
            yield (
                key,
                torch.from_numpy(
                    np.ascontiguousarray(out, dtype=np.float32).reshape(np.shape(out))
                ),
            )


def _checkpoint_layer_options(arch: dict, moe_options: dict) -> dict:
    """The MoE layer options (nested form) of the model ``arch`` describes: what the checkpoint
    stores (E; P of a Soft MoE) under the user's ``moe_options`` (flat or nested), over the
    router's defaults (the paper's: ``TopKRouterConfig`` with K=2; ``SoftRouterConfig``: one
    image per group, no router noise), every value written out (``config.json`` keeps them)."""
    soft = arch.get("router") == "soft"
    name, router = (
        ("soft", dict(num_slots=arch["num_slots"])) if soft else ("top_k", dict(num_selected=2))
    )
    if isinstance(moe_options.get("router"), Mapping):  # nested
        options = merge_moe_options(
            dict(num_experts=arch["num_experts"], router=dict(name=name, **router)),
            moe_options,
            where="moe",
        )
        name = options["router"].get("name", "top_k")
    else:  # flat: read as such (a sparse option given to a Soft MoE is named so)
        given = moe_options.get("router", name)
        options = {
            **(router if given == name else {}),
            **moe_options,
            "router": given,
            "num_experts": arch["num_experts"],
        }
        name = given
    if name in ROUTER_CONFIGS and ROUTER_CONFIGS[name].is_soft != soft:
        raise ValueError(
            f"moe router={name!r} does not fit the checkpoint: its MoE layers are "
            f"{'Soft MoE' if soft else 'sparse'} layers (router parameters "
            f"{'Router/mu' if soft else 'Router/dense/kernel'})"
        )
    layer = {k: v for k, v in options.items() if k not in MOEIFY_KEYS}
    return {
        **{k: v for k, v in options.items() if k in MOEIFY_KEYS},
        **MoeLayerConfig.from_dict(layer, where="moe").to_dict(),
    }


def _build_empty(arch: dict, moe_options: dict) -> nn.Module:
    """The model on the meta device (no memory, no init time); filled from the checkpoint."""
    options = _checkpoint_layer_options(arch, moe_options)
    with torch.device("meta"):
        return timm.create_model("vmoe_vit", **_timm_kwargs(arch, options))


def from_vmoe_checkpoint(
    prefix: str,
    *,
    num_classes: Optional[int] = None,
    img_size: Optional[int] = None,
    **moe_options: Any,
) -> nn.Module:
    """Builds our V-MoE with the weights of an official checkpoint (``prefix.index`` + shards).

    Args:
        prefix: checkpoint path without ``.index``, e.g. ``~/vmoe/vmoe_s32_last2_ilsvrc2012``.
        num_classes: a new, freshly initialized head with this many classes (fine-tuning).
        img_size: a new input size; position embeddings are resampled (timm).
        **moe_options: MoE options the checkpoint does not store, flat as ``MoeMlp``'s keyword
            options or nested (``router=dict(name="top_k", num_selected=1)``; see
            ``vmoe.moe.config``): num_selected (K, default 2), capacity_factor (1.05),
            group_size_images (8) or group_size (tokens), batch_priority (False),
            capacity_multiple_of (4), ...
            A Soft MoE checkpoint (``Router/mu``) builds ``router='soft'`` layers with P from
            ``mu``'s shape, one image per group and no noise; ``bf16_dispatch=True``
            reproduces the official bf16 rounding of the mixed data (see ``MoeMlp``).
    Memory: the model plus about one checkpoint array.
    """
    arch = infer_vmoe_architecture(prefix)
    tensors = iter_converted_tensors(prefix, arch)  # checks every shard before any allocation
    return _fill(arch, tensors, num_classes, img_size, moe_options)


def from_vmoe_params(
    params: Mapping[str, np.ndarray],
    *,
    num_classes: Optional[int] = None,
    img_size=None,
    **moe_options,
) -> nn.Module:
    """``from_vmoe_checkpoint`` for an official parameter tree already in memory: a mapping of
    ``/``-joined names to arrays (e.g. a flattened Flax params dict, or an ``.npz`` of it)."""
    params = {name: np.asarray(array) for name, array in params.items()}
    arch = architecture_from_shapes({n: a.shape for n, a in params.items()})
    by_source = {src: (key, srcs, fn) for key, srcs, fn in _mapping(arch) for src in srcs}
    return _fill(
        arch,
        _convert(((n, params[n]) for n in by_source), by_source),
        num_classes,
        img_size,
        moe_options,
    )


def _fill(
    arch: dict,
    tensors: Iterator[tuple[str, torch.Tensor]],
    num_classes,
    img_size,
    moe_options: dict,
) -> nn.Module:
    model = _build_empty(arch, moe_options).to_empty(device="cpu")
    state = model.state_dict()
    filled = set()
    with torch.no_grad():
        for key, tensor in tensors:
            if state[key].shape != tensor.shape:  # only a bug in the mapping could cause this
                raise RuntimeError(
                    f"{key}: converted shape {tuple(tensor.shape)} != model "
                    f"{tuple(state[key].shape)}"
                )
            state[key].copy_(tensor)
            filled.add(key)
    if filled != set(state):
        raise RuntimeError(f"not filled from the checkpoint: {sorted(set(state) - filled)}")
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    if img_size is not None:
        model.set_input_size(img_size=img_size)
    return model


def convert_vmoe_checkpoint(
    prefix: str, out_dir, *, overwrite: bool = False, **moe_options
) -> Path:
    """Writes a ``save_pretrained`` directory (config.json + model.safetensors) from an official
    checkpoint, streaming: peak memory is about one array, never the whole model."""
    out_dir = Path(out_dir)
    check_target_dir(out_dir, overwrite)  # before reading anything
    arch = infer_vmoe_architecture(prefix)
    tensors = iter_converted_tensors(prefix, arch)  # checks every shard before writing
    meta_model = _build_empty(arch, moe_options)
    specs = {k: (torch.float32, tuple(v.shape)) for k, v in meta_model.state_dict().items()}
    with staged_save_dir(out_dir, overwrite) as tmp:
        source = {"source": "vmoe official checkpoint", "prefix": os.fspath(prefix), "format": "pt"}
        with SafetensorsStreamWriter(tmp / WEIGHTS_NAME, specs, metadata=source) as writer:
            for key, tensor in tensors:
                writer.write(key, tensor)
        write_config(meta_model, tmp / CONFIG_NAME)
    return out_dir
