"""Values -> plain JSON types, for config.json (model arguments, MoE options) and report.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["to_jsonable"]

_SCALARS = (bool, int, float, str, type(None))


def to_jsonable(value, strict: bool = False):
    """A copy of ``value`` made of dicts, lists and scalars (None, bool, int, float, str).

    Tuples become lists; dict keys become strings (a tuple key is joined as ``"a@b"``).
    ``strict=False`` also converts tensors and numpy arrays (to nested lists), numpy scalars
    (to Python numbers) and paths (to strings), and leaves any other object as it is.
    ``strict=True`` accepts plain Python values only and raises TypeError naming anything else
    (config.json must rebuild exactly what was saved).
    """
    if isinstance(value, _SCALARS):
        return value.item() if isinstance(value, np.generic) else value  # np.float64 is a float
    if isinstance(value, dict):
        return {
            ("@".join(map(str, k)) if isinstance(k, tuple) else str(k)): to_jsonable(v, strict)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, strict) for v in value]
    if strict:
        raise TypeError(
            f"{value!r} ({type(value).__name__}) is not a plain JSON value "
            "(None, bool, int, float, str, or lists and dicts of them)"
        )
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
