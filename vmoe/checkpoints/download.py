"""Fetch files over HTTP(S), resumable and verified: the official V-MoE checkpoints from Google
Cloud Storage's public HTTPS endpoint (or any mirror that serves the bucket's layout).

``download_file(url, dest)`` writes ``dest.part`` (with a small ``dest.part.json`` beside it
recording the remote size, checksums and ETag from the first response) and renames it to
``dest`` only once it is complete and verified:

* a dropped connection, a timeout or a 5xx answer is retried with ``Range: bytes=N-`` from what
  ``dest.part`` holds (a server that ignores the Range header is re-read from the start; a
  remote object whose size or ETag changed since the ``.part`` was started is re-fetched);
* the size is checked against ``Content-Length`` / ``Content-Range``, and the checksums the
  server sends (GCS: ``x-goog-hash: crc32c=...,md5=...``) against the whole file; a mismatch
  discards the file and fetches it once more, a second mismatch is refused
  (``DownloadError``): a corrupted file is never renamed into place;
* Ctrl-C leaves ``dest.part`` and its ``.json``: the next call resumes from there;
* a write that fails (disk full, quota, file-size limit) truncates ``dest.part`` back to what
  it held when the call started (removes it if it was new) and raises ``vmoe.writes.WriteError``:
  the cache is as it was;
* no network, a 404 and the like are one-line ``DownloadError`` (a ``ConnectionError``) naming
  the URL and how to fetch the files by hand.

``fetch_official_checkpoint(base_url, name, folder)`` fetches ``NAME.index``, reads its shard
count and fetches ``NAME.data-0000i-of-0000N``. Standard library only (``urllib``), plus tqdm
for the progress bar.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Union

from ..writes import failed_write, write_errno
from .crc32c import Crc32c
from .official_format import shard_path

__all__ = [
    "DEFAULT_BASE_URL",
    "BASE_URL_ENV",
    "DownloadError",
    "RemoteFile",
    "base_url",
    "download_file",
    "fetch_official_checkpoint",
    "official_file_names",
    "parse_goog_hash",
]

DEFAULT_BASE_URL = "https://storage.googleapis.com/vmoe_checkpoints"
BASE_URL_ENV = "VMOE_CHECKPOINT_BASE_URL"
_CHUNK = 1 << 20
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_TRANSIENT = (
    ConnectionError,  # ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ...
    http.client.IncompleteRead,
    http.client.RemoteDisconnected,
    http.client.BadStatusLine,
    socket.timeout,
    TimeoutError,
)


class DownloadError(ConnectionError):
    """A file that could not be fetched (offline, refused, not found, corrupted twice): the
    message is one line naming the URL and what to do."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """What the server says about a file: its size in bytes, base64 checksums (None when not
    served) and ETag (GCS: changes when the object is rewritten)."""

    size: int
    md5: Optional[str] = None
    crc32c: Optional[str] = None
    etag: Optional[str] = None


def base_url(url: Optional[str] = None) -> str:
    """``url``, else ``$VMOE_CHECKPOINT_BASE_URL``, else the public bucket's HTTPS address
    (``gs://vmoe_checkpoints/X`` is ``https://storage.googleapis.com/vmoe_checkpoints/X``)."""
    return (url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def parse_goog_hash(values) -> dict:
    """``x-goog-hash`` header values (``crc32c=AAAAAA==,md5=...``, possibly repeated) ->
    ``{"crc32c": ..., "md5": ...}`` (base64 strings)."""
    out = {}
    for value in values or ():
        for part in value.split(","):
            key, sep, digest = part.strip().partition("=")
            if sep and key.strip().lower() in ("crc32c", "md5"):
                out[key.strip().lower()] = digest.strip()
    return out


def _remote(response, offset: int, url: str) -> Optional[RemoteFile]:
    """The file the response describes, or None when a Range request got the whole file
    (status 200: the caller starts over). DownloadError for a Content-Range that does not
    start where we asked."""
    headers = response.headers
    hashes = parse_goog_hash(headers.get_all("x-goog-hash"))
    if headers.get("x-goog-stored-content-encoding", "identity") != "identity":
        hashes = {}  # served decompressed: the hashes are of the stored (compressed) bytes
    etag = headers.get("ETag") or headers.get("x-goog-generation")
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != offset:
            raise DownloadError(
                f"{url}: the server answered a Range request from byte {offset} with "
                f"Content-Range {headers.get('Content-Range')!r}"
            )
        size = int(match.group(3))
    else:
        if offset:
            return None
        length = headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise DownloadError(f"{url}: the server did not say the file's size (Content-Length)")
        size = int(length)
    return RemoteFile(size, hashes.get("md5"), hashes.get("crc32c"), etag)


def _same_object(a: RemoteFile, b: RemoteFile) -> bool:
    """The same size, and the same ETag and checksums where both responses carry them (a
    Range answer may leave some out)."""
    fields = ("etag", "md5", "crc32c")
    return a.size == b.size and all(
        getattr(a, k) is None or getattr(b, k) is None or getattr(a, k) == getattr(b, k)
        for k in fields
    )


def _read_meta(path: Path) -> Optional[RemoteFile]:
    try:
        return RemoteFile(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_meta(path: Path, remote: RemoteFile) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(dataclasses.asdict(remote)))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_checks(path: Path, remote: RemoteFile) -> list[str]:
    """What does not match in the complete file at ``path``: size, md5, crc32c."""
    size = path.stat().st_size
    if size != remote.size:
        return [f"{size} bytes instead of {remote.size}"]
    md5 = hashlib.md5() if remote.md5 else None
    crc = Crc32c() if remote.crc32c and not remote.md5 else None  # md5 suffices when served
    if md5 or crc:
        with open(path, "rb") as f:
            while block := f.read(8 * _CHUNK):
                if md5:
                    md5.update(block)
                if crc:
                    crc.update(block)
    problems = []
    if md5 and base64.b64encode(md5.digest()).decode() != remote.md5:
        problems.append(f"md5 {base64.b64encode(md5.digest()).decode()} != {remote.md5}")
    if crc and crc.base64() != remote.crc32c:
        problems.append(f"crc32c {crc.base64()} != {remote.crc32c}")
    return problems


def _open(url: str, offset: int, timeout: float):
    headers = {"Accept-Encoding": "identity", "User-Agent": "vmoe-download/1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"{type(err.reason).__name__}: {err.reason}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


class _Restore:
    """Puts ``part`` back to its size at the start of the call (or removes it and its meta
    when it was new) after a failed write."""

    def __init__(self, part: Path, meta: Path) -> None:
        self.part, self.meta = part, meta
        self.size = part.stat().st_size if part.exists() else None
        self.had_meta = meta.exists()

    def __call__(self) -> None:
        with contextlib.suppress(OSError):
            if self.size is None:
                self.part.unlink(missing_ok=True)
            else:
                os.truncate(self.part, self.size)
            if not self.had_meta:
                self.meta.unlink(missing_ok=True)


def download_file(
    url: str,
    dest: Union[str, os.PathLike],
    *,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    by_hand: str = "",
) -> Path:
    """Fetch ``url`` into ``dest`` (resumable, verified; see the module docstring) and return
    ``dest``. An existing ``dest`` is taken as it is (only verified files are renamed there).

    Args:
        url: the file's http(s) URL.
        dest: where it goes; ``dest.part`` and ``dest.part.json`` beside it while in progress.
        progress: show a tqdm bar on stderr.
        retries: attempts in a row that bring no new byte before giving up.
        timeout: seconds a connect or a read may wait.
        backoff: seconds before the first retry (doubled each time, at most 30).
        by_hand: appended to the one-line error: how to fetch the file without vmoe.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    meta_path = dest.with_name(dest.name + ".part.json")
    hint = f"; {by_hand}" if by_hand else ""
    with failed_write(dest, "download"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        restore = _Restore(part, meta_path)
        try:
            return _download(url, dest, part, meta_path, progress, retries, timeout, backoff, hint)
        except Exception as err:
            if write_errno(err) is not None:
                restore()  # the cache as it was
            raise


def _download(url, dest, part, meta_path, progress, retries, timeout, backoff, hint):
    from tqdm import tqdm

    remote = _read_meta(meta_path) if part.exists() else None
    if part.exists() and remote is None:
        part.unlink()  # no record of what it belongs to: start over
    failures, refetched, delay = 0, False, backoff
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if remote is not None and offset >= remote.size:
            problems = _file_checks(part, remote)
            if not problems:
                os.replace(part, dest)
                meta_path.unlink(missing_ok=True)
                return dest
            part.unlink()
            meta_path.unlink(missing_ok=True)
            if refetched:
                raise DownloadError(
                    f"{url}: the downloaded file is corrupted ({'; '.join(problems)}) again after "
                    f"fetching it anew; nothing was kept{hint}"
                )
            refetched, remote = True, None
            continue
        try:
            response = _open(url, offset, timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # our .part is longer than the file: start over
                part.unlink()
                meta_path.unlink(missing_ok=True)
                remote = None
                continue
            if err.code not in _RETRY_STATUS:
                raise DownloadError(f"could not download {url} ({_reason(err)}){hint}") from None
            failure = err
        except urllib.error.URLError as err:  # no connection: offline, no such host, refused
            if not isinstance(err.reason, (TimeoutError, ConnectionResetError)):
                raise DownloadError(
                    f"could not download {url} ({_reason(err)}): offline?{hint}"
                ) from None
            failure = err
        except _TRANSIENT as err:
            failure = err
        else:
            failure = None
            with response:
                found = _remote(response, offset, url)
                if found is None or (remote is not None and not _same_object(found, remote)):
                    # the server ignored Range, or the object changed since the .part began
                    part.unlink(missing_ok=True)
                    meta_path.unlink(missing_ok=True)
                    remote = None
                    continue
                if remote is None:
                    remote = found
                    _write_meta(meta_path, remote)
                before = offset
                try:
                    with (
                        open(part, "ab") as f,
                        tqdm(
                            total=remote.size,
                            initial=offset,
                            unit="B",
                            unit_scale=True,
                            unit_divisor=1024,
                            desc=dest.name,
                            disable=not progress,
                            file=sys.stderr,
                            leave=False,
                        ) as bar,
                    ):
                        while block := response.read1(_CHUNK):
                            f.write(block)
                            offset += len(block)
                            bar.update(len(block))
                except _TRANSIENT as err:
                    failure = err
                if offset > before:
                    failures, delay = 0, backoff  # progress: the retry budget starts again
                if failure is None and offset < remote.size:
                    failure = http.client.IncompleteRead(b"", remote.size - offset)
        if failure is None:
            continue  # complete (or longer): checked at the top of the loop
        failures += 1
        if failures > retries:
            raise DownloadError(
                f"could not download {url} ({_reason(failure)}; {failures} attempts){hint}"
            ) from None
        time.sleep(delay)
        delay = min(2 * delay, 30.0)


def official_file_names(name: str, shard_count: int) -> list[str]:
    """``NAME.index`` and the shard names of a checkpoint with ``shard_count`` shards."""
    return [f"{name}.index"] + [
        os.path.basename(shard_path(name, i, shard_count)) for i in range(shard_count)
    ]


def fetch_official_checkpoint(
    name: str,
    folder: Union[str, os.PathLike],
    *,
    url: Optional[str] = None,
    progress: bool = True,
    by_hand: str = "",
    **download_options,
) -> Path:
    """Fetch the official checkpoint ``NAME`` (``NAME.index`` first, then the shard count it
    declares) from ``url`` (default ``base_url()``) into ``folder``; returns the local prefix
    ``folder/NAME`` (for ``vmoe.checkpoints.read_checkpoint`` / ``vmoe convert``)."""
    from .official_reader import _load_index

    root = base_url(url)
    folder = Path(folder)
    prefix = folder / name
    index = download_file(
        f"{root}/{name}.index", f"{prefix}.index", progress=progress, by_hand=by_hand,
        **download_options,
    )  # fmt: skip
    try:
        _, shard_count = _load_index(str(prefix))
    except ValueError:
        index.unlink(missing_ok=True)  # a corrupted index is fetched anew next time
        raise
    for shard in official_file_names(name, shard_count)[1:]:
        download_file(
            f"{root}/{shard}", folder / shard, progress=progress, by_hand=by_hand,
            **download_options,
        )  # fmt: skip
    return prefix
