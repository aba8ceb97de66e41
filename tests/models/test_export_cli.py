"""``vmoe export`` and the writer / checker of vmoe/models/export.py (issue 30, item 4): the
runtime chosen by the format, never the file's suffix; ``--max-batch`` honoured by both formats;
a failed check or write leaves no file; a full disk, a read-only file system and a folder without
write permission are one line each, exit code 2, nothing left behind.

The file-system tests run the command in a subprocess (torch's writer used to abort the process,
exit code 134): a full disk is a real 64 kB tmpfs and a read-only folder a real read-only tmpfs,
mounted in a private mount namespace (``unshare``; root, or a user namespace otherwise) so that
the mount vanishes with the process; where no namespace can be made, a 64 kB file-size limit
(RLIMIT_FSIZE, a real EFBIG) stands for the full disk and ``os.access`` / ``os.statvfs`` answer
as on a read-only mount. Root bypasses a folder's permissions: its subprocess drops
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (``setpriv``)."""

import errno
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import timm
import torch

import vmoe.models as vm
from tests.helpers import ROOT, needs_onnx
from vmoe.cli import main
from vmoe.models import export as ex
from vmoe.writes import NotWritableError

ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_cli") / "model"
    torch.manual_seed(0)
    vm.save_pretrained(timm.create_model("vmoe_tiny_e4_k2"), d)
    return d


def _export(model_dir, out, *options):
    return main(["export", "--model", str(model_dir), "--out", str(out), *options])


def _error_line(text):
    """The one ``vmoe export: error:`` line of a command's stderr (torch's warnings aside); it is
    the last line and no traceback or C++ abort came with it."""
    lines = text.strip().splitlines()
    errors = [line for line in lines if line.startswith("vmoe export: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-12:]
    assert not any(m in text for m in ("Traceback", "terminate called", "c10::Error")), text[-2000:]
    return errors[0]


def _images(model, b, seed=0):
    C, H, W = ex._input_shape(model)
    return torch.randn(b, C, H, W, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ format, not the file's name


def test_pt2_named_dot_onnx_is_written_and_checked_as_pt2(model_dir, tmp_path, capsys):
    """--format pt2 --out model.onnx: a torch.export archive, checked with torch (on main:
    ONNX Runtime 'INVALID_PROTOBUF'); the checker tells the formats apart by the file's content."""
    out = tmp_path / "model.onnx"
    assert _export(model_dir, out, "--format", "pt2") == 0
    assert f"wrote {out} (pt2); max |exported - eager| batch 1:" in capsys.readouterr().out
    assert zipfile.is_zipfile(out) and sorted(os.listdir(tmp_path)) == ["model.onnx"]
    model = vm.from_pretrained(model_dir)
    assert max(vm.check_export(out, model, (2,)).values()) < 1e-5  # told by content: pt2
    with pytest.raises(ValueError, match=r"model\.onnx is not a onnx file: it is a zip archive"):
        vm.check_export(out, model, format="onnx")


@needs_onnx
def test_onnx_without_suffix_honours_max_batch(model_dir, tmp_path, capsys):
    """--format onnx --max-batch 4 --out model (no suffix): written and checked with ONNX Runtime
    at batches 1 and 4 (on main: BadZipFile, and the file was left); the graph refuses batch 5
    (on main it ran any batch) and records the bound; the checker refuses batch 5 in one line."""
    import onnxruntime as ort

    out = tmp_path / "model"
    assert _export(model_dir, out, "--format", "onnx", "--max-batch", "4") == 0
    printed = capsys.readouterr().out
    assert "batch 1:" in printed and "batch 4:" in printed and "batch 5" not in printed
    assert sorted(os.listdir(tmp_path)) == ["model"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["vmoe.max_batch"] == "4"
    model = vm.from_pretrained(model_dir)
    assert max(vm.check_export(out, model, (1, 2, 3, 4)).values()) < 1e-4  # the guard adds 0
    with pytest.raises(Exception, match=r"batch_above_max_batch_4.*out of data bounds"):
        session.run(None, {"images": _images(model, 5).numpy()})
    with pytest.raises(ValueError, match=r"batch sizes \[5\]: .* takes batches of 1 to 4 images"):
        vm.check_export(out, model, (5,), format="onnx")


# ------------------------------------------------------------------------------- --max-batch


@pytest.mark.parametrize("max_batch", [1, 2, 4])
def test_pt2_max_batch(max_batch, model_dir, tmp_path, capsys):
    """--max-batch 1 (on main: 'Dim with inconsistent min=1, max=1'), 2 (on main: the example
    batch 3 is out of range) and 4 (on main: written, then its own check failed at batch 5 and
    left the file): written, checked at batches inside [1, max], and the program refuses a
    bigger batch."""
    out = tmp_path / "m.pt2"
    assert _export(model_dir, out, "--format", "pt2", "--max-batch", str(max_batch)) == 0
    printed = capsys.readouterr().out
    checked = [int(b) for b in re.findall(r"batch (\d+):", printed)]
    assert checked == sorted({1, min(5, max_batch)}), printed
    assert sorted(os.listdir(tmp_path)) == ["m.pt2"]
    model = vm.from_pretrained(model_dir)
    program = torch.export.load(str(out))
    assert ex._batch_range(program) == (1, max_batch)
    x = _images(model, max_batch + 1)
    with ex.inference_routing(model), torch.no_grad():
        want = model.eval()(x[:max_batch])
    torch.testing.assert_close(program.module()(x[:max_batch]), want, atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="Guard failed"):
        program.module()(x)
    with pytest.raises(ValueError, match=rf"takes batches of .*{max_batch} images"):
        vm.check_export(program, model, (max_batch + 1,))


def test_check_batch_sizes_above_max_batch_are_refused_first(model_dir, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    options = ["--format", "pt2", "--max-batch", "4", "--check-batch-sizes", "1", "5"]
    assert _export(model_dir, out, *options) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--check-batch-sizes 1 5: at most --max-batch 4" in line
    assert not os.listdir(tmp_path)


def test_api_max_batch_and_example(tmp_path):
    """export_program: max_batch 1 is a static batch; an example bigger than max_batch and a
    bad max_batch are one-line ValueErrors."""
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2")
    assert ex._batch_range(vm.export_program(model, max_batch=1)) == (1, 1)
    assert ex._batch_range(vm.export_program(model)) == (1, None)
    with pytest.raises(ValueError, match="example has 3 images, more than max_batch=2"):
        vm.export_program(model, _images(model, 3), max_batch=2)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="max_batch must be a positive int"):
            vm.export_program(model, max_batch=bad)
    assert ex._check_batch_sizes(1, None) == (1, 5)
    assert ex._check_batch_sizes(1, 4) == (1, 4) and ex._check_batch_sizes(1, 1) == (1,)
    assert ex._check_batch_sizes(8, 8) == (8,)


# ----------------------------------------------------------------- a failed check writes nothing


def test_failed_check_leaves_no_file_and_the_old_one_as_it_was(
    model_dir, tmp_path, capsys, monkeypatch
):
    """The check runs on the written temporary file before it replaces --out (on main the file
    was written first: a failing check left it, and --overwrite had replaced the old one)."""

    def failing_check(*args, **kwargs):
        raise ValueError("the check failed")

    monkeypatch.setattr(ex, "check_export", failing_check)
    out = tmp_path / "m.pt2"
    assert _export(model_dir, out, "--format", "pt2") == 2
    assert "the check failed" in _error_line(capsys.readouterr().err)
    assert not os.listdir(tmp_path)
    out.write_bytes(b"keep")
    assert _export(model_dir, out, "--format", "pt2", "--overwrite") == 2
    assert out.read_bytes() == b"keep" and os.listdir(tmp_path) == ["m.pt2"]


# ---------------------------------------------------------------------------- the file system


def _export_command(model_dir, out):
    return [sys.executable, "-m", "vmoe.cli", "export", "--model", str(model_dir)] + [
        "--format",
        "pt2",
        "--out",
        str(out),
    ]


def _mount_namespace(tmp_path):
    """The argv prefix that runs a command in a private mount namespace where it may mount a
    tmpfs (gone with the process), or None where this machine allows none."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix[1:1] = ["--user", "--map-root-user"]
    probe = tmp_path / "probe"
    probe.mkdir()
    mount = subprocess.run(
        [*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
        capture_output=True,
    )
    probe.rmdir()
    return prefix if mount.returncode == 0 else None


def _on_tmpfs(prefix, options, folder, command):
    """``command`` run with a fresh tmpfs (mount ``options``) on ``folder``; (result, the names
    left in ``folder`` afterwards, as seen inside the namespace)."""
    script = (
        'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; shift 2; "$@"; rc=$?; ls -A "$0"; exit $rc'
    )
    result = subprocess.run(
        [*prefix, "sh", "-c", script, str(folder), options, str(folder), *command],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 99, result.stderr
    return result, result.stdout.split()


def test_pt2_on_a_full_disk_is_one_line_exit_2_and_leaves_nothing(model_dir, tmp_path):
    """On main: the right line, then 'terminate called after throwing an instance of
    c10::Error' and exit code 134 (torch's zip writer was destroyed unfinished)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = _export_command(model_dir, disk / "m.pt2")
    prefix = _mount_namespace(tmp_path)
    if prefix is not None:  # a real full disk: 64 kB (the tiny model's .pt2 is about 2 MB)
        result, left = _on_tmpfs(prefix, "size=64k", disk, command)
        reason = r"disk full \(No space left on device\)"
    else:  # a real file-size limit of 64 kB
        import resource

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

        result = subprocess.run(
            command, env=ENV, capture_output=True, text=True, timeout=600, preexec_fn=limit
        )
        left, reason = os.listdir(disk), r"file too large .*\(File too large\)"
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result.stderr)
    assert re.search(
        rf"could not write exported program {re.escape(str(disk / 'm.pt2'))}: {reason}; "
        "nothing was changed",
        line,
    ), line
    assert left == []


def test_read_only_file_system_is_reported_as_such(model_dir, tmp_path, monkeypatch, capsys):
    """On main: 'the write failed part-way (disk full or file too large?)'. Refused before the
    model is loaded."""
    folder = tmp_path / "ro"
    folder.mkdir()
    out = folder / "m.pt2"
    want = f"cannot write {out}: the directory {folder} is on a read-only file system"
    prefix = _mount_namespace(tmp_path)
    if prefix is not None:
        result, left = _on_tmpfs(prefix, "ro,size=64k", folder, _export_command(model_dir, out))
        assert result.returncode == 2 and want in _error_line(result.stderr), result.stderr
        assert left == []
        return
    access, statvfs = os.access, os.statvfs  # no mount namespace: answer as a read-only mount
    monkeypatch.setattr(os, "access", lambda p, *a, **k: str(p) != str(folder) and access(p, *a))
    monkeypatch.setattr(
        os,
        "statvfs",
        lambda p: (
            os.statvfs_result((0,) * 8 + (os.ST_RDONLY, 255))
            if str(p) == str(folder)
            else statvfs(p)
        ),
    )
    assert _export(model_dir, out, "--format", "pt2") == 2
    assert want in _error_line(capsys.readouterr().err) and not os.listdir(folder)


def _without_permission_override():
    """The argv prefix that runs a command without root's permission to write anywhere."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    drop = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", drop, "--inh-caps", drop]


def test_folder_without_write_permission_is_reported_as_such(
    model_dir, tmp_path, monkeypatch, capsys
):
    """On main: 'the write failed part-way (disk full or file too large?)'. The command refuses
    before loading the model; past that check (a folder made read-only meanwhile), the write
    itself is reported the same way, naming the file."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    out = folder / "m.pt2"
    want = f"cannot write {out}: permission denied on the directory {folder}"
    prefix = _without_permission_override()
    try:
        if prefix is None:  # root without setpriv: os.access answers as for another user
            access = os.access
            monkeypatch.setattr(
                os, "access", lambda p, *a, **k: str(p) != str(folder) and access(p, *a)
            )
            assert _export(model_dir, out, "--format", "pt2") == 2
            assert want in _error_line(capsys.readouterr().err)
            return
        run = dict(env=ENV, capture_output=True, text=True, timeout=600)
        result = subprocess.run([*prefix, *_export_command(model_dir, out)], **run)
        assert result.returncode == 2, result.stderr[-3000:]
        line = _error_line(result.stderr)
        assert want in line and "[NotWritableError;" in line
        skip_check = (
            "import sys, vmoe.writes; from vmoe.models import export; "
            "vmoe.writes.require_writable_dir = export.require_writable_dir = lambda path: None; "
            "from vmoe.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        command = [sys.executable, "-c", skip_check, *_export_command(model_dir, out)[3:]]
        result = subprocess.run([*prefix, *command], **run)
        assert result.returncode == 2, result.stderr[-3000:]
        line = _error_line(result.stderr)
        assert f"could not write exported program {out}: permission denied" in line
        assert not os.listdir(folder)
    finally:
        folder.chmod(0o755)


def test_not_writable_error_is_a_permission_error():
    err = NotWritableError(errno.EACCES, "cannot write x: permission denied")
    assert isinstance(err, PermissionError) and isinstance(err, OSError)
    assert str(err) == "cannot write x: permission denied" and err.errno == errno.EACCES


class _FailingFile:
    """A real file whose writes raise ``error`` once ``budget`` bytes are written."""

    def __init__(self, file, budget, error):
        self.file, self.budget, self.error = file, budget, error

    def write(self, data):
        self.budget -= memoryview(data).nbytes
        if self.budget < 0:
            raise self.error
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
)
def test_save_program_whose_write_fails_finishes_torch_writer(error, tmp_path, monkeypatch):
    """A write that fails inside torch.export.save (disk full; Ctrl-C) is raised once torch's
    zip writer has finished its archive, so nothing aborts when the writer is freed (on main the
    writer was left unfinished: its destructor threw from C++, exit code 134); no file is left."""
    import gc

    torch.manual_seed(0)
    program = vm.export_program(timm.create_model("vmoe_tiny_e4_k2"))

    def failing_open(path, mode="r", *args, **kwargs):
        return _FailingFile(open(path, mode, *args, **kwargs), 50_000, error)

    monkeypatch.setattr(ex, "open", failing_open, raising=False)
    out = tmp_path / "m.pt2"
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            vm.save_program(program, out)
    else:
        with pytest.raises(OSError, match=r"m\.pt2: disk full \(No space left on device\); noth"):
            vm.save_program(program, out)
    gc.collect()  # frees the writer: no C++ exception from its destructor
    assert not os.listdir(tmp_path)
    monkeypatch.undo()
    assert zipfile.is_zipfile(vm.save_program(program, out))  # the same save, with room
