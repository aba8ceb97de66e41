"""``vmoe list-pretrained`` and ``vmoe convert NAME``: Google's released checkpoints
(``vmoe.models.catalogue``) from the command line. ``vmoe.cli.commands`` registers them; the
work is here, imported only when one of them runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["list_arguments", "list_pretrained", "is_catalogue_name", "convert_named"]


def list_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint")


def _size(path: Path) -> str:
    nbytes = (path / "model.safetensors").stat().st_size
    return f"cached ({nbytes / 1e6:,.0f} MB)"


def list_pretrained(args) -> int:
    """Print the catalogue: timm name, resolution, converted size, published top-1 on the
    official ILSVRC2012 validation set (else the first one published), cache state."""
    from vmoe.models.catalogue import CATALOGUE, _complete, approx_size_mb, cache_dir

    root = cache_dir()
    rows = []
    for e in CATALOGUE.values():
        cached = _complete(root / e.name)
        if args.json:
            print(
                json.dumps(
                    dict(
                        timm_name=e.timm_name,
                        name=e.name,
                        url=e.url(),
                        img_size=e.img_size,
                        num_classes=e.num_classes,
                        moe=e.moe,
                        eval_capacity_factor=e.eval_capacity_factor,
                        pretraining=e.pretraining,
                        accuracy=dict(e.accuracy),
                        cached=str(root / e.name) if cached else None,
                        unsupported=e.unsupported or None,
                    )
                )
            )
            continue
        top1 = "; ".join(f"{v}% {k}" for k, v in e.accuracy[1:2] or e.accuracy[:1]) or "-"
        state = _size(root / e.name) if cached else ("not supported" if e.unsupported else "")
        size = f"~{approx_size_mb(e):,.0f} MB" if e.timm_name else "-"
        rows.append((e.timm_name or f"({e.name})", f"{e.img_size}px", size, top1, state))
    if not args.json:
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        print(
            f"\ncache: {root} (${'VMOE_CACHE_DIR'}); create with "
            "timm.create_model(NAME, pretrained=True) or vmoe convert NAME --out DIR"
        )
    return 0


def is_catalogue_name(text: str) -> bool:
    """Whether ``text`` names a released checkpoint (and no local file of that prefix exists).
    ValueError with the closest names when it is neither a local prefix nor a released name
    but looks like a misspelt one."""
    if os.path.exists(text + ".index") or text.endswith(".index"):
        return False
    import difflib

    from vmoe.models.catalogue import CATALOGUE, find_official_checkpoint

    if find_official_checkpoint(text) is not None:
        return True
    names = [n for e in CATALOGUE.values() for n in (e.name, e.timm_name) if n]
    close = difflib.get_close_matches(os.path.basename(text), names, n=3, cutoff=0.75)
    if close and os.sep not in text:
        raise ValueError(
            f"{text}: no {text}.index here, and not a released checkpoint; did you mean "
            f"{' or '.join(close)}? (vmoe list-pretrained)"
        )
    return False


def convert_named(args, given: dict) -> int:
    """``vmoe convert NAME --out DIR``: the cached conversion of the released checkpoint NAME
    (fetched on first use) written to DIR; routing options given on the command line replace
    the catalogue's in DIR's config.json (the weights do not depend on them)."""
    from vmoe.models.catalogue import fetch_pretrained, official_checkpoint
    from vmoe.models.moeify import merge_moe_options
    from vmoe.models.pretrained import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        _build_on_meta,
        _read_config,
        staged_save_dir,
        write_config,
    )

    entry = official_checkpoint(args.prefix)
    cached = fetch_pretrained(entry, progress=True)
    with staged_save_dir(Path(args.out), overwrite=args.overwrite) as tmp:
        # a copy, not a hard link: a later in-place write to DIR must not change the cache
        shutil.copyfile(cached / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        if given:
            config = _read_config(cached)
            model_args = {k: v for k, v in config["model_args"].items() if k != "routing"}
            model_args.setdefault("num_classes", config["num_classes"])  # top level in timm's
            model_args["moe"] = merge_moe_options(model_args["moe"], given, where="convert")
            meta = _build_on_meta(config, model_args, cached / CONFIG_NAME)
            write_config(meta, tmp / CONFIG_NAME)
        else:
            shutil.copyfile(cached / CONFIG_NAME, tmp / CONFIG_NAME)
    print(f"wrote {args.out} ({entry.timm_name}; cached in {cached})")
    return 0
