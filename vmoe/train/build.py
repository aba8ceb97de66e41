"""``build_model``: the network of ``VmoeClassifier`` from exactly one source (a timm name, a
``save_pretrained`` directory, or a dense ViT to upcycle), as a plain ``nn.Module``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import timm
import torch.nn as nn
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import vmoe.models as vm
from vmoe.checkpoints import read_safetensors_header
from vmoe.models.describe import describe_loading
from vmoe.models.moeify import MoeifyConfig
from vmoe.models.pretrained import WEIGHTS_NAME, resolve_model_dir

__all__ = ["build_model"]


def build_model(
    *,
    model_name: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    pretrained_dir: Optional[str] = None,
    upcycle_from: Optional[str] = None,
    checkpoint_path: Optional[str] = None,
    upcycle_pretrained: bool = True,
    moe: Optional[Union[MoeifyConfig, Mapping[str, Any]]] = None,
    num_classes: Optional[int] = None,
    img_size: Optional[int] = None,
    moe_dropout: Optional[float] = None,
) -> nn.Module:
    """Build the network from exactly one source.

    - ``model_name``: ``timm.create_model(model_name, num_classes, img_size, **model_kwargs)``
      (the ``vmoe_*`` variants carry their MoE layers; a dense timm ViT becomes MoE with ``moe``);
      a ``local-dir:DIR`` or ``hf-hub:ORG/NAME`` name is a ``pretrained_dir``;
    - ``pretrained_dir``: ``vmoe.models.from_pretrained`` (a directory, ``local-dir:`` or
      ``hf-hub:`` name; new head / resolution if given);
    - ``upcycle_from``: a dense timm ViT name whose weights (``checkpoint_path``, or timm's hub
      when ``upcycle_pretrained``) start every expert (``vmoe.models.upcycle``; ``moe`` gives
      the placement ``every``/``last``/``blocks`` and the MoE options).
    ``moe``: a ``MoeifyConfig`` or its dict (nested or flat router options).
    ``moe_dropout`` sets the experts' dropout (the paper's "MoE dropout").
    """
    moe = None if moe is None else MoeifyConfig.from_dict(moe, where="model.moe")
    if model_name and model_name.startswith(("local-dir:", "hf-hub:")) and not pretrained_dir:
        # timm's names of saved models: load them with their weights, checked (from_pretrained)
        model_name, pretrained_dir = None, model_name
    sources = [
        n
        for n, v in (
            ("model_name", model_name),
            ("pretrained_dir", pretrained_dir),
            ("upcycle_from", upcycle_from),
        )
        if v
    ]
    if len(sources) != 1:
        raise ValueError(
            "give exactly one of model.model_name, model.pretrained_dir, "
            f"model.upcycle_from (got {sources or 'none'})"
        )
    model_kwargs = dict(model_kwargs or {})
    size = {} if img_size is None else {"img_size": img_size}
    if model_name:
        if model_name not in timm.list_models():
            raise ValueError(
                f"model.model_name={model_name!r} is not a registered timm model "
                "(vmoe variants: timm.list_models('vmoe_*'))"
            )
        classes = {} if num_classes is None else {"num_classes": num_classes}
        model = timm.create_model(model_name, pretrained=False, **classes, **size, **model_kwargs)
        if moe:
            if vm.moe_layers(model):
                raise ValueError(
                    f"{model_name} already has MoE layers; change their options with "
                    "model.model_kwargs.moe instead of model.moe"
                )
            moe.apply(model)
    elif pretrained_dir:
        if moe:
            raise ValueError("model.moe applies to model_name/upcycle_from, not to pretrained_dir")
        local = resolve_model_dir(pretrained_dir)  # (a hub name is downloaded once)
        model = vm.from_pretrained(local, num_classes=num_classes, **size, **model_kwargs)
        rank_zero_info(f"model.pretrained_dir: {_what_was_loaded(model, local)}")
    else:
        if not moe:
            raise ValueError(
                "model.upcycle_from needs model.moe with a placement, e.g. "
                "{last: 2, num_experts: 8, router: {name: top_k, num_selected: 2}}"
            )
        if model_kwargs:
            raise ValueError(f"model.model_kwargs={model_kwargs} is not used with upcycle_from")
        model = vm.upcycle(
            upcycle_from,
            checkpoint_path=checkpoint_path,
            pretrained=upcycle_pretrained and checkpoint_path is None,
            num_classes=num_classes,
            img_size=img_size,
            every=moe.every,
            last=moe.last,
            blocks=None if moe.blocks is None else list(moe.blocks),
            router_init_std=moe.router_init_std,
            drop=moe.drop,
            config=moe.layer,
        )
    if moe_dropout is not None:
        if not 0.0 <= moe_dropout < 1.0:
            raise ValueError(f"model.moe_dropout={moe_dropout} must be in [0, 1)")
        for layer in vm.moe_layers(model).values():
            layer.experts.drop1.p = layer.experts.drop2.p = moe_dropout
    return model


def _what_was_loaded(model: nn.Module, directory: Path) -> str:
    """``loaded N of M tensors from DIR/model.safetensors; re-initialised head.weight, head.bias
    (a new head: C classes)``: the tensors whose shape in the file differs from the model's were
    not taken (a new head) or resampled (the position embeddings at a new image size)."""
    weights = Path(directory) / WEIGHTS_NAME
    shapes = {k: tuple(v.shape) for k, v in read_safetensors_header(weights).items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differ = [k for k in own if k in shapes and shapes[k] != own[k]]
    resampled = [k for k in differ if k == "pos_embed"]
    fresh = [k for k in own if k not in shapes] + [k for k in differ if k not in resampled]
    return describe_loading(model, shapes, weights, reinitialised=fresh, resampled=resampled)
