"""A stand-in for the public bucket: the standard library's threading HTTP server on 127.0.0.1,
serving files under ``/vmoe_checkpoints/NAME`` as Google Cloud Storage does (``Range`` requests
answered with 206 and ``Content-Range``, ``x-goog-hash: crc32c=...,md5=...``, an ``ETag``), with
knobs to make it misbehave. Every request is logged as ``(path, Range header)``."""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BUCKET = "/vmoe_checkpoints"


def crc32c_reference(data: bytes) -> int:
    """Bit-by-bit CRC-32C (independent of vmoe's implementation)."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class _Handler(BaseHTTPRequestHandler):
    server: "BucketServer"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        srv = self.server
        name = self.path.removeprefix(BUCKET + "/")
        srv.requests.append((name, self.headers.get("Range")))
        if not self.path.startswith(BUCKET + "/") or name not in srv.files or name in srv.missing:
            self.send_error(404, "Not Found")
            return
        data = srv.files[name]
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not srv.ignore_range:
            start, status = int(match.group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = bytearray(data[start:])
        corrupt = srv.corrupt.get(name)
        if corrupt is not None and corrupt[1] > 0 and start <= corrupt[0] < len(data):
            body[corrupt[0] - start] ^= 0xFF
            srv.corrupt[name] = (corrupt[0], corrupt[1] - 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        hashes = srv.hashes(name)
        if hashes:
            self.send_header("x-goog-hash", hashes)
        self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        for key, value in srv.extra_headers.items():
            self.send_header(key, value)
        self.end_headers()
        drop = srv.drop_after.get(name)
        sent = 0
        for i in range(0, len(body), srv.chunk):
            piece = bytes(body[i : i + srv.chunk])
            if drop is not None and drop[1] > 0 and start + sent + len(piece) > drop[0]:
                self.wfile.write(piece[: max(drop[0] - start - sent, 0)])
                self.wfile.flush()
                srv.drop_after[name] = (drop[0], drop[1] - 1)
                self.close_connection = True
                return  # the connection closes with the body short of Content-Length
            self.wfile.write(piece)
            sent += len(piece)
            if srv.delay:
                self.wfile.flush()
                time.sleep(srv.delay)


class BucketServer(ThreadingHTTPServer):
    """``BucketServer({"NAME.index": b"...", ...})``: ``base_url`` is what
    ``VMOE_CHECKPOINT_BASE_URL`` takes. Knobs (change them at any time):

    * ``drop_after[NAME] = (n, times)``: the next ``times`` responses close the connection once
      byte ``n`` of the file was sent;
    * ``corrupt[NAME] = (i, times)``: byte ``i`` is flipped in the next ``times`` responses;
    * ``missing``: names answered with 404; ``ignore_range``: answer Range with the whole file;
    * ``hash_kinds``: which checksums ``x-goog-hash`` carries (``("crc32c", "md5")``,
      ``("crc32c",)`` as for a composite object, or ``()``);
    * ``delay``: seconds to wait after each ``chunk`` bytes (a slow network);
    * ``extra_headers``: more headers on every file answer.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, files: dict) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.requests: list = []
        self.drop_after: dict = {}
        self.corrupt: dict = {}
        self.missing: set = set()
        self.ignore_range = False
        self.hash_kinds = ("crc32c", "md5")
        self.delay = 0.0
        self.extra_headers: dict = {}
        self.chunk = 16 * 1024
        self._digests = {}
        self._thread = None

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up: normal
            super().handle_error(request, client_address)

    @classmethod
    def serving(cls, *prefixes: Path, rename: dict | None = None) -> "BucketServer":
        """A server of the official checkpoints at ``prefixes`` (``.index`` + shards), each
        under its own name or ``rename[name]``."""
        files = {}
        for prefix in prefixes:
            prefix = Path(prefix)
            new = (rename or {}).get(prefix.name, prefix.name)
            for path in prefix.parent.glob(prefix.name + ".*"):
                suffix = path.name[len(prefix.name) :]
                if suffix == ".index" or re.fullmatch(r"\.data-\d{5}-of-\d{5}", suffix):
                    files[new + suffix] = path.read_bytes()
        return cls(files)

    def hashes(self, name: str) -> str:
        if name not in self._digests:
            data = self.files[name]
            self._digests[name] = dict(
                crc32c=base64.b64encode(crc32c_reference(data).to_bytes(4, "big")).decode(),
                md5=base64.b64encode(hashlib.md5(data).digest()).decode(),
            )
        return ",".join(f"{k}={self._digests[name][k]}" for k in self.hash_kinds)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{BUCKET}"

    def start(self) -> "BucketServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def ranges(self, name: str) -> list:
        """The Range headers of the requests for ``name``, in order (None: no Range)."""
        return [r for n, r in self.requests if n == name]
