"""``vmoe.checkpoints.download`` against a real HTTP server on the loopback
(``tests/checkpoints/bucket_server.py``) serving the tiny official checkpoints under the bucket's
layout: resume with Range after a dropped connection, checksums (md5, crc32c), 404 / offline as
one line, a server that ignores Range, a file-size limit mid-download, Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.checkpoints.bucket_server import BucketServer, crc32c_reference
from tests.helpers import ROOT, VMOE_REFERENCE
from vmoe.checkpoints import read_checkpoint
from vmoe.checkpoints.crc32c import Crc32c, crc32c
from vmoe.checkpoints.download import (
    DownloadError,
    download_file,
    fetch_official_checkpoint,
    parse_goog_hash,
)
from vmoe.writes import WriteError

SHARD = "vmoe_tiny_a.data-00000-of-00001"


@pytest.fixture
def server():
    srv = BucketServer.serving(
        VMOE_REFERENCE / "vmoe_tiny_a", VMOE_REFERENCE / "vmoe_tiny_a_3shards"
    ).start()
    yield srv
    srv.stop()


def fetch(srv, dest, name=SHARD, **kw):
    return download_file(f"{srv.base_url}/{name}", dest, progress=False, backoff=0.01, **kw)


def test_crc32c_matches_the_reference_on_blocks_and_tails():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 123, dtype=np.uint8).tobytes()
    c = Crc32c()
    for piece in (data[:5000], data[5000:5001], data[5001:]):
        c.update(piece)
    assert c.value == crc32c(data) == crc32c_reference(data)
    assert parse_goog_hash(["crc32c=n03x6A==, md5=abc=="]) == {"crc32c": "n03x6A==", "md5": "abc=="}


def test_first_download_is_whole_and_verified(server, tmp_path):
    prefix = fetch_official_checkpoint(
        "vmoe_tiny_a_3shards", tmp_path, url=server.base_url, progress=False
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"vmoe_tiny_a_3shards.data-0000{i}-of-00003" for i in range(3)] + [
        "vmoe_tiny_a_3shards.index"
    ]  # no .part left
    for name in names:
        assert (tmp_path / name).read_bytes() == server.files[name]
    assert all(r is None for _, r in server.requests)
    official = read_checkpoint(VMOE_REFERENCE / "vmoe_tiny_a_3shards")
    assert all(np.array_equal(official[k], v) for k, v in read_checkpoint(prefix).items())


def test_a_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    server.drop_after[SHARD] = (100_000, 2)  # twice
    path = fetch(server, tmp_path / SHARD)
    assert path.read_bytes() == server.files[SHARD]
    assert server.ranges(SHARD) == [None, "bytes=100000-", "bytes=100000-"]


def test_a_corrupted_byte_is_caught_and_fetched_again(server, tmp_path):
    server.corrupt[SHARD] = (1234, 1)
    assert fetch(server, tmp_path / SHARD).read_bytes() == server.files[SHARD]
    assert server.ranges(SHARD) == [None, None]  # fetched anew from the start


@pytest.mark.parametrize("kinds", [("crc32c", "md5"), ("crc32c",)])
def test_a_file_corrupted_twice_is_refused_and_nothing_kept(server, tmp_path, kinds):
    server.hash_kinds = kinds  # ("crc32c",): a composite object, which has no md5
    server.corrupt[SHARD] = (200_000, 2)
    with pytest.raises(DownloadError) as err:
        fetch(server, tmp_path / SHARD, by_hand="fetch it by hand")
    message = str(err.value)
    assert "\n" not in message and f"{server.base_url}/{SHARD}" in message
    assert "corrupted" in message and kinds[-1] in message and "fetch it by hand" in message
    assert list(tmp_path.iterdir()) == []


def test_without_checksums_the_size_is_still_checked(server, tmp_path):
    server.hash_kinds = ()
    server.drop_after[SHARD] = (5000, 1)
    assert fetch(server, tmp_path / SHARD).read_bytes() == server.files[SHARD]


def test_hashes_of_a_transcoded_object_are_not_used(server, tmp_path):
    """GCS serves a gzip-stored object decompressed; its x-goog-hash is of the stored bytes."""
    server._digests[SHARD] = dict(crc32c="AAAAAA==", md5="AAAAAAAAAAAAAAAAAAAAAA==")
    server.extra_headers = {"x-goog-stored-content-encoding": "gzip"}
    assert fetch(server, tmp_path / SHARD).read_bytes() == server.files[SHARD]
    server.extra_headers = {}
    with pytest.raises(DownloadError, match="corrupted"):
        fetch(server, tmp_path / "again")  # the same hashes without it: refused


def test_not_found_is_one_line_naming_the_url(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        fetch(server, tmp_path / "x", name="nope.index", by_hand="get it with gsutil")
    assert str(err.value) == (
        f"could not download {server.base_url}/nope.index (HTTP 404 Not Found); get it with gsutil"
    )
    assert list(tmp_path.iterdir()) == []


def test_offline_is_one_line_naming_the_url(tmp_path):
    srv = BucketServer({})
    url = srv.base_url
    srv.server_close()  # nothing listens there any more
    with pytest.raises(DownloadError) as err:
        download_file(f"{url}/{SHARD}", tmp_path / SHARD, progress=False)
    message = str(err.value)
    assert message.startswith(f"could not download {url}/{SHARD} (ConnectionRefusedError")
    assert "offline?" in message and "\n" not in message


def test_a_server_that_ignores_range_is_read_from_the_start(server, tmp_path):
    server.drop_after[SHARD] = (70_000, 1)
    server.ignore_range = True
    assert fetch(server, tmp_path / SHARD).read_bytes() == server.files[SHARD]
    assert server.ranges(SHARD) == [None, "bytes=70000-", None]


def test_an_object_replaced_meanwhile_is_fetched_anew(server, tmp_path):
    server.drop_after[SHARD] = (70_000, 1)
    with pytest.raises(DownloadError):
        fetch(server, tmp_path / SHARD, retries=0)  # leaves 70,000 bytes in the .part
    assert (tmp_path / (SHARD + ".part")).stat().st_size == 70_000
    new = bytes(reversed(server.files[SHARD]))
    server.files[SHARD] = new
    server._digests.clear()
    assert fetch(server, tmp_path / SHARD).read_bytes() == new
    assert server.ranges(SHARD) == [None, "bytes=70000-", None]


@pytest.fixture
def file_size_limit():
    """A real file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with EFBIG)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_mid_download_leaves_the_files_as_they_were(server, tmp_path, file_size_limit):
    server.drop_after[SHARD] = (50_000, 1)
    with pytest.raises(DownloadError):
        fetch(server, tmp_path / SHARD, retries=0)
    part, meta = tmp_path / (SHARD + ".part"), tmp_path / (SHARD + ".part.json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == sorted([part.name, meta.name]) and len(before[part.name]) == 50_000
    file_size_limit(120_000)
    with pytest.raises(WriteError) as err:
        fetch(server, tmp_path / SHARD)
    file_size_limit(2**62)
    assert str(err.value).startswith(f"could not write download {tmp_path / SHARD}: file too")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # as it was
    assert fetch(server, tmp_path / SHARD).read_bytes() == server.files[SHARD]  # resumes


def test_a_full_disk_on_a_new_download_leaves_nothing(server, tmp_path, file_size_limit):
    file_size_limit(100_000)
    with pytest.raises(WriteError):
        fetch(server, tmp_path / SHARD)
    file_size_limit(2**62)
    assert list(tmp_path.iterdir()) == []


_CHILD = """
import signal, sys
# Ctrl-C as a terminal delivers it, even when this test runs as a shell's background job (which
# starts every program with SIGINT ignored, so Python would never raise KeyboardInterrupt)
signal.signal(signal.SIGINT, signal.default_int_handler)
from vmoe.checkpoints.download import download_file
download_file(sys.argv[1], sys.argv[2], progress=False)
"""


def test_ctrl_c_mid_download_leaves_a_part_that_the_next_call_resumes(server, tmp_path):
    # 48 kB, then 3 s before each next piece: the SIGINT lands mid-download however late this
    # process sees the part grow
    server.delay, server.chunk = 3.0, 48 * 1024
    dest = tmp_path / SHARD
    part = tmp_path / (SHARD + ".part")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, f"{server.base_url}/{SHARD}", str(dest)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= 40_000):
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert not dest.exists()
    held = part.stat().st_size
    assert 40_000 <= held < len(server.files[SHARD])
    server.delay = 0.0
    assert fetch(server, dest).read_bytes() == server.files[SHARD]
    assert server.ranges(SHARD)[-1] == f"bytes={held}-"
    assert not part.exists()
