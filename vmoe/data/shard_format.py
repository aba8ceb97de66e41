"""The on-disk format of vmoe's streaming shards and its checks, shared by the writer
(``vmoe.data.shard_writer``) and the reader (``vmoe.data.shards``).

A shard folder holds litdata chunks (``chunk-*.bin`` + ``index.json``) of items
``{"image": encoded bytes (the source file's, not re-encoded, unless ``max_size`` resized it),
"label": int, "key": str}`` and
``vmoe_shards.json``, the manifest: format name and version, the vmoe version that wrote it,
the class names and the image count. The manifest is written last, so a folder without one is
not a complete shard set; a folder of another format version is refused.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "MANIFEST",
    "FORMAT",
    "FORMAT_VERSION",
    "read_manifest",
    "check_chunks",
    "shard_identity",
    "check_resume_shards",
]

MANIFEST = "vmoe_shards.json"
FORMAT = "vmoe-shards"
FORMAT_VERSION = 1


def _vmoe_version() -> str:
    from vmoe import __version__

    return __version__


def _is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _check_manifest(manifest: Any, where: str) -> dict:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where} is not a vmoe shard manifest (format {FORMAT!r} expected)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} was written by vmoe {manifest.get('vmoe_version')} in shard format version "
            f"{manifest.get('format_version')}; this vmoe ({_vmoe_version()}) reads version "
            f"{FORMAT_VERSION}: rewrite the shards with this version's `vmoe make-shards`"
        )
    if not isinstance(manifest.get("num_classes"), int) or manifest["num_classes"] < 1:
        raise ValueError(
            f"{where}: num_classes={manifest.get('num_classes')!r} must be a positive int"
        )
    if not manifest.get("num_images"):
        raise ValueError(
            f"{where}: the shard folder holds no image (num_images={manifest.get('num_images')!r})"
        )
    return manifest


def check_chunks(folder: Path) -> None:
    """A ValueError naming the file at fault when the local shard folder's ``index.json`` does
    not parse or does not list chunks, or a chunk it lists is missing, has another size than
    the index says (truncated, partly copied) or a header that does not match it (its first
    uint32, the item count, and the item offsets that follow). Reads only the headers."""
    import struct

    from litdata.streaming.framed_zstd import is_framed_chunk, parse_framed_header

    index_file = folder / "index.json"
    rewrite = f"; rewrite the shards with `vmoe make-shards --overwrite --out {folder}`"
    try:
        chunks = json.loads(index_file.read_text())["chunks"]
        listed = [(c["filename"], int(c["chunk_size"]), int(c["chunk_bytes"])) for c in chunks]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{index_file} is not a litdata chunk index ({type(err).__name__}: {err}){rewrite}"
        ) from None
    if not listed:
        raise ValueError(f"{index_file} lists no chunk{rewrite}")
    for name, items, size in listed:
        chunk = folder / name
        if not chunk.is_file():
            raise ValueError(f"shard chunk {chunk} listed in index.json is missing{rewrite}")
        actual = chunk.stat().st_size
        if actual != size:
            raise ValueError(
                f"shard chunk {chunk} is {actual} bytes, index.json says {size}: truncated or "
                f"partly copied{rewrite}"
            )
        with open(chunk, "rb") as f:
            head = f.read(min(size, 4 * (items + 2)))
        problem = None
        if is_framed_chunk(head):
            try:
                with open(chunk, "rb") as f:
                    found = parse_framed_header(f.read()).num_items
            except Exception as err:  # litdata's own RuntimeError on a bad directory
                problem = f"its header does not parse ({err})"
            else:
                problem = None if found == items else f"its header says {found} items"
        elif len(head) < 4 * (items + 2):
            problem = "it is shorter than its header"
        else:
            found = struct.unpack_from("<I", head)[0]
            offsets = struct.unpack_from(f"<{items + 1}I", head, 4)
            if found != items:
                problem = f"its header says {found} items"
            elif any(a > b for a, b in zip(offsets, offsets[1:])) or offsets[-1] > size:
                problem = "its header's item offsets are out of order or past its end"
        if problem:
            raise ValueError(
                f"shard chunk {chunk} is damaged: {problem}, index.json says {items}{rewrite}"
            )


def _fetch_remote(url: str, storage_options: Optional[dict], local: str) -> None:
    from litdata.streaming.downloader import get_downloader

    get_downloader(url, os.path.dirname(local), [], storage_options).download_file(
        url.rstrip("/") + "/" + MANIFEST, local
    )


def read_manifest(
    path: str, storage_options: Optional[dict] = None, timeout_s: float = 30.0
) -> dict:
    """The checked manifest of a shard folder or URL; a URL that does not answer within
    ``timeout_s`` is a ConnectionError naming it."""
    if not _is_url(path):
        folder = Path(str(path).removeprefix("file://")).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"shard folder '{folder}' does not exist or is not a directory")
        file = folder / MANIFEST
        if not file.is_file():
            if not any(folder.iterdir()):
                raise ValueError(
                    f"shard folder '{folder}' is empty: write shards with `vmoe make-shards "
                    f"--source DIR --out {folder}`"
                )
            raise ValueError(
                f"shard folder '{folder}' has no {MANIFEST}: not written by `vmoe make-shards`, "
                "or its writing did not finish"
            )
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not valid JSON ({err})") from None
        if not (folder / "index.json").is_file():
            raise ValueError(f"shard folder '{folder}' has no index.json (litdata's chunk index)")
        manifest = _check_manifest(manifest, str(file))
        check_chunks(folder)
        return manifest
    import tempfile

    local = os.path.join(tempfile.mkdtemp(prefix="vmoe-shards-"), MANIFEST)
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(_fetch_remote, path, storage_options, local)
    try:
        future.result(timeout=timeout_s)
    except FutureTimeout:
        raise ConnectionError(
            f"shard URL {path} did not answer within {timeout_s:g} s (reading "
            f"{MANIFEST}); check the URL, the network and the credentials"
        ) from None
    except Exception as err:
        raise ConnectionError(
            f"cannot read {path.rstrip('/')}/{MANIFEST}: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}"
        ) from err
    finally:
        pool.shutdown(wait=False)
    with open(local) as f:
        return _check_manifest(json.load(f), f"{path.rstrip('/')}/{MANIFEST}")


def shard_identity(manifest: dict) -> dict:
    """What a checkpoint's stream position depends on: the training shards' image and class
    counts (saved with the position, compared on resume by ``check_resume_shards``)."""
    return {"num_images": int(manifest["num_images"]), "num_classes": int(manifest["num_classes"])}


def check_resume_shards(saved: Optional[dict], manifest: dict, path: str) -> None:
    """A ValueError when a checkpoint's stream position was saved on shards other than those
    at ``path`` now (another image or class count: rewritten since); ``saved`` None (a
    checkpoint from before this check) is accepted."""
    if not saved:
        return
    now = shard_identity(manifest)
    if saved != now:
        raise ValueError(
            f"the checkpoint's position in the training stream is for shards of "
            f"{saved.get('num_images')} images / {saved.get('num_classes')} classes, but "
            f"{path} now holds {now['num_images']} / {now['num_classes']} (rewritten since?): "
            "resume on the shards it was trained on, or start a new run without --ckpt_path"
        )
