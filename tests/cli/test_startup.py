"""``vmoe --help``, ``vmoe <command> --help``, a usage error and a missing --config file answer
without importing torch, Lightning, timm, transformers or onnx (what they import is asserted,
not how long they take: benchmarks/cli_startup.py measures that); ``vmoe --help`` is vmoe's,
``vmoe fit --help`` puts vmoe's options first in plain text."""

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from vmoe.cli import COMMANDS, LIGHTNING_COMMANDS, main

HEAVY = ("torch", "lightning", "pytorch_lightning", "timm", "transformers", "onnx", "matplotlib")

# each: argv, expected exit code, a pattern of what it printed (stdout or stderr)
LIGHT_CASES = [
    (["--help"], 0, r"usage: vmoe <command>"),
    ([], 2, r"vmoe: error: choose a command"),
    (["frobnicate"], 2, r"'frobnicate' is not a vmoe command"),
    (["expotr", "--model", "x"], 2, r"did you mean export\?"),
    (["fit", "--config", "no/such.yaml"], 2, r"vmoe fit: error: --config no/such\.yaml: no such"),
    (["test", "-c", "no/such.yaml"], 2, r"vmoe test: error: --config no/such\.yaml: no such"),
    (["fit", "--config=no/such.yaml"], 2, r"--config no/such\.yaml: no such file"),
    (["export", "--model", "x"], 2, r"vmoe export: error: .*required.*out"),
    (["routing-report", "--model", "m", "--data", "d", "--out", "o", "--max-images", "-1"], 2, ""),
    (["capacity-sweep", "--no-such-option"], 2, r"vmoe capacity-sweep: error:"),
    (["convert"], 2, r"vmoe convert: error:"),
] + [([name, "--help"], 0, rf"usage: vmoe {name}") for name in COMMANDS]

PROBE = """
import contextlib, io, json, sys
from vmoe.cli import main
HEAVY = {heavy!r}
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(HEAVY))
    results.append([code, loaded, out.getvalue() + err.getvalue()])
print(json.dumps(results))
"""


def test_help_usage_errors_and_a_missing_config_import_nothing_heavy():
    """One fresh interpreter runs every case in turn and lists the heavy packages loaded after
    each (a case that imported one shows it, and so does every case after it)."""
    argvs = [argv for argv, _, _ in LIGHT_CASES]
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(argvs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (argv, code, pattern), (got_code, loaded, text) in zip(LIGHT_CASES, results):
        assert loaded == [], f"vmoe {' '.join(argv)} imported {loaded}"
        assert got_code == code, (argv, got_code, text)
        assert re.search(pattern, text), (argv, text)


def test_vmoe_help_lists_every_command_with_its_whole_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # wrapped, never cut
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Lightning Trainer command line tool" not in out
    text = " ".join(out.split())
    for name, line in [*LIGHTNING_COMMANDS.items(), *((n, c.help) for n, c in COMMANDS.items())]:
        assert re.search(rf"^  {re.escape(name)}  ", out, re.M), name
        assert " ".join(line.split()) in text, name
    assert max(len(line) for line in out.splitlines()) <= 100


def test_the_help_defaults_are_the_real_ones():
    from vmoe.cli import defaults
    from vmoe.moe.settings import EVAL_CAPACITY_FACTOR
    from vmoe.viz.report import DEFAULT_CAPACITY_FACTORS

    assert defaults.EVAL_CAPACITY_FACTOR == EVAL_CAPACITY_FACTOR
    assert defaults.DEFAULT_CAPACITY_FACTORS == DEFAULT_CAPACITY_FACTORS


@pytest.mark.parametrize(
    "text, plain",
    [
        ("Passed on to ``timm.create_model``.", "Passed on to timm.create_model."),
        (
            "a :class:`~lightning.pytorch.Trainer` and :func:`torch.compile`",
            "a Trainer and torch.compile",
        ),
        ("see `the notes <https://x.org/a>`_ here", "see the notes (https://x.org/a) here"),
        ("paths like `s3://bucket/path`", "paths like s3://bucket/path"),
        (".. warning:: In DDP", "Warning: In DDP"),
        ("Example:: # save", "Example: # save"),
    ],
)
def test_plain_text(text, plain):
    from vmoe.cli.help import plain_text

    assert plain_text(text) == plain


def test_fit_help_is_vmoes_options_first_in_plain_text(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("usage: vmoe fit ") and len(lines[0]) < 120
    assert LIGHTNING_COMMANDS["fit"].split(",")[0] in " ".join(out.split())
    assert "``" not in out and ":class:" not in out and ".. note::" not in out
    assert "--optimizer" not in out.replace("--model.optimizer", "")  # refused: not offered

    def first(pattern):
        return next(i for i, line in enumerate(lines) if re.match(pattern, line))

    own, model, data = first(r"  --test_after_fit"), first(r"  --model\."), first(r"  --data ")
    callbacks, trainer = first(r"  --checkpoint\."), first(r"  --trainer\.")
    assert own < model < data < callbacks < trainer, (own, model, data, callbacks, trainer)
    assert own < 40
    headings = [line for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[-1] == "trainer: Lightning's Trainer flags:", headings
