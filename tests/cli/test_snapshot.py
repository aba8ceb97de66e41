"""The parser snapshot (``vmoe.cli.snapshot``): ``vmoe fit --help`` rendered from it is the live
parser's help at every width; with it, the help and a misspelt option answer without importing
Lightning or torch, in the same words as the live parser; what it cannot judge goes to the live
parser; a stale, corrupt or unwritable snapshot costs only time."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import QUICKSTART, ROOT, last_stderr_line
from vmoe.cli import main, snapshot
from vmoe.cli import training as cli_training

HEAVY = ("torch", "lightning", "timm", "jsonargparse")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """{subcommand: (snapshot, live subcommand parser)}, recorded by ``vmoe fit --help`` and
    ``vmoe predict --help`` run as a user runs them, into an empty cache."""
    folder = tmp_path_factory.mktemp("cli-cache")
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VMOE_CLI_CACHE", str(folder))
        real = cli_training.record_snapshot

        def spy(parser):
            found["parser"] = parser
            return real(parser)

        patch.setattr(cli_training, "record_snapshot", spy)
        out = {}
        for subcommand in ("fit", "predict"):
            assert snapshot.load(subcommand) is None
            assert main([subcommand, "--help"]) == 0
            kept = snapshot.load(subcommand)
            assert kept is not None, os.listdir(folder)
            out[subcommand] = (kept, found.pop("parser"))
        yield out


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
@pytest.mark.parametrize("width", [40, 80, 123, 200])
def test_the_snapshot_renders_the_live_help_at_every_width(
    recorded, monkeypatch, subcommand, width
):
    kept, parser = recorded[subcommand]
    monkeypatch.setenv("COLUMNS", str(width))
    live = parser.format_help()
    assert snapshot.render_help(kept, f"vmoe {subcommand}") == live
    assert len(live.splitlines()) > 100 and "--trainer.max_steps" in live


def test_every_option_of_the_live_parser_passes_the_snapshot(recorded):
    kept, parser = recorded["fit"]
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                assert snapshot.refusal([option, "1"], kept, "vmoe fit") is None, option


@pytest.mark.parametrize(
    "argv",
    [
        ["--trainer.max_step", "5"],  # an abbreviation: the live parser takes it
        ["--trainer.callbacks+=lightning.pytorch.callbacks.RichModelSummary"],
        ["--trainer.logger.init_args.save_dir", "x"],
        ["--model.moe.router.num_selected", "1"],
        ["--model.model_kwargs.drop_path_rate", "0.1"],
        ["--model.model_kwargs.moe.num_experts", "8"],
        ["--data", "DigitsDataModule", "--data.init_args.batch_size", "3"],
        ["--data", "vmoe.data.ShardDataModule", "--data.storage_options.anon", "true"],
        ["--data.help", "DigitsDataModule"],
        ["--print_config"],
        ["--data", "my_package.MyData", "--data.anything", "1"],  # a user's class: not judged
        ["--data", "data.yaml", "--data.anything", "1"],  # not a class name: not judged
        ["--config", "does/not/exist.yaml", "--data.anything", "1"],  # unreadable: not judged
        ["--", "--not-an-option"],
    ],
)
def test_what_the_snapshot_cannot_refuse_goes_to_the_live_parser(recorded, argv):
    assert snapshot.refusal(argv, recorded["fit"][0], "vmoe fit") is None


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_pass_the_snapshot(recorded, config):
    assert snapshot.refusal(["--config", str(config)], recorded["fit"][0], "vmoe fit") is None


def test_a_config_file_chooses_the_data_module_whose_options_are_judged(recorded, tmp_path):
    kept = recorded["fit"][0]
    shards = tmp_path / "shards.yaml"
    shards.write_text("data:\n  class_path: vmoe.data.ShardDataModule\n  init_args: {path: x}\n")
    argv = ["--config", QUICKSTART, "--config", str(shards), "--data.img_siz", "8"]
    message = snapshot.refusal(argv, kept, "vmoe fit")
    assert message.startswith("--data.img_siz: not an option of ShardDataModule; did you mean "
                              "--data.img_size?")  # fmt: skip
    # a later --data changes it; the quickstart's is DigitsDataModule, which has no `path`
    assert snapshot.refusal(["-c", QUICKSTART, "--data.path", "x"], kept, "vmoe fit")
    assert snapshot.refusal(["-c", str(shards), "--data.path", "x"], kept, "vmoe fit") is None


# each: argv after "fit", a pattern of the one-line error (the same from both parsers)
MISTAKES = [
    (
        ["--config", QUICKSTART, "--model.lrr", "5"],
        r"^--model\.lrr: not an option of vmoe fit; did you mean --model\.lr ",
    ),
    (
        ["--trainer.max_stepz=5", "--frobnicate", "1"],
        r"^--trainer\.max_stepz: .*did you mean --trainer\.max_steps .*; --frobnicate: not an "
        r"option of vmoe fit \('vmoe fit --help' lists them\)$",
    ),
    (
        ["--config", QUICKSTART, "--data.batch_sz", "3"],
        r"^--data\.batch_sz: not an option of DigitsDataModule; did you mean --data\.batch_size",
    ),
    (
        ["--data", "ShardDataModule", "--data.init_args.pth", "x"],
        r"^--data\.pth: not an option of ShardDataModule; did you mean --data\.path\? "
        r"\('vmoe fit --data\.help ShardDataModule' lists them\)$",
    ),
    (
        ["--data", "FooModule"],
        r"^--data FooModule: not a data module vmoe knows \(.*DigitsDataModule.*\) nor an import",
    ),
]


def _probe(cases, env):
    """Runs ``main`` on each argv in one fresh interpreter: [exit code, heavy modules loaded
    after it, its output] each."""
    script = (
        "import contextlib, io, json, sys\n"
        "from vmoe.cli import main\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    text = io.StringIO()\n"
        "    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):\n"
        "        code = main(argv)\n"
        f"    heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "    out.append([code, heavy, text.getvalue()])\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# each: a --config file's text, a pattern of the one-line error
CONFIG_MISTAKES = [
    ("model:\n  lrr: 0.1\n", r"^model\.lrr \(in a --config file\): .*did you mean model\.lr "),
    (
        "trainer:\n  max_epoch: 3\n",
        r"^trainer\.max_epoch \(in a .*did you mean trainer\.max_epochs",
    ),
    (
        "trainerr:\n  max_epochs: 3\n",
        r"^trainerr\.max_epochs \(in .*did you mean trainer\.max_epochs",
    ),
    (
        "data:\n  class_path: vmoe.data.DigitsDataModule\n  init_args: {batch_sz: 3}\n",
        r"^data\.batch_sz \(in a --config file\): not an option of DigitsDataModule; did you "
        r"mean data\.batch_size",
    ),
]


def test_with_a_snapshot_help_and_mistakes_import_nothing_heavy_and_say_the_same(
    tmp_path, capsys, monkeypatch
):
    env = dict(os.environ, VMOE_CLI_CACHE=str(tmp_path / "cache"), COLUMNS="100")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    [(code, heavy, live_help)] = _probe([["fit", "--help"]], env)  # no snapshot yet: live
    assert code == 0 and "lightning" in heavy
    mistakes = list(MISTAKES)
    for i, (text, pattern) in enumerate(CONFIG_MISTAKES):
        (tmp_path / f"bad{i}.yaml").write_text(text)
        mistakes.append((["--config", str(tmp_path / f"bad{i}.yaml")], pattern))
    results = _probe([["fit", "--help"], *(["fit", *argv] for argv, _ in mistakes)], env)
    assert results[0] == [0, [], live_help]
    monkeypatch.setenv("VMOE_CLI_CACHE", "off")  # the live parser, for the same words
    for (argv, pattern), (code, heavy, text) in zip(mistakes, results[1:]):
        assert (code, heavy) == (2, []), (argv, text)
        fast = text.strip().splitlines()[-1]
        assert main(["fit", *argv]) == 2
        assert last_stderr_line(capsys) == fast, argv
        message = re.sub(r"^vmoe fit: error: (.*)  \[ArgumentError; .*$", r"\1", fast)
        assert re.search(pattern, message), (argv, message)


def test_the_fingerprint_follows_vmoes_sources_and_installs(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    source = package / "sub" / "m.py"
    source.write_text("x = 1\n")
    (package / "notes.txt").write_text("not source")
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    first = snapshot.fingerprint("fit", package=str(package))
    assert snapshot.fingerprint("fit", package=str(package)) == first
    assert snapshot.fingerprint("test", package=str(package)) != first
    (package / "notes.txt").write_text("changed, but not source")
    assert snapshot.fingerprint("fit", package=str(package)) == first
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))  # an edit
    edited = snapshot.fingerprint("fit", package=str(package))
    assert edited != first
    monkeypatch.chdir(tmp_path)  # the working directory ("" in sys.path) does not count
    monkeypatch.setattr(sys, "path", [*sys.path, ""])
    assert snapshot.fingerprint("fit", package=str(package)) == edited
    (tmp_path / "a-new-file").write_text("")
    os.utime(tmp_path, ns=(1, 10**18))
    assert snapshot.fingerprint("fit", package=str(package)) == edited
    (site / "my_module.py").write_text("")  # a file of a folder on the path: no install
    assert snapshot.fingerprint("fit", package=str(package)) == edited
    (site / "new_dist-1.0.dist-info").mkdir()  # pip installed something
    installed = snapshot.fingerprint("fit", package=str(package))
    assert installed != edited
    (site / "new_dist-1.0.dist-info").rename(site / "new_dist-1.1.dist-info")  # upgraded
    assert snapshot.fingerprint("fit", package=str(package)) not in (edited, installed)


def test_a_corrupt_stale_or_unwritable_snapshot_costs_only_time(tmp_path, monkeypatch):
    monkeypatch.setenv("VMOE_CLI_CACHE", str(tmp_path / "cache"))
    good = {"help": [["usage", "usage: vmoe fit\n\n"]], "options": ["--a"], "open": []}
    written = snapshot.save("fit", good)
    assert written and snapshot.load("fit") == {**good, "format": snapshot.FORMAT}
    assert snapshot.render_help(snapshot.load("fit"), "vmoe fit") == "usage: vmoe fit\n"
    with open(written, "w") as f:
        f.write('{"format": 1, "help": [')  # cut short
    assert snapshot.load("fit") is None
    stale = tmp_path / "cache" / "fit-0123456789abcdef01234567.json"
    stale.write_text(json.dumps({**good, "format": snapshot.FORMAT}))
    mine = tmp_path / "cache" / "fit-results.json"  # not a snapshot: kept
    mine.write_text("{}")
    assert snapshot.save("fit", good) == written and not stale.exists()  # the old one goes
    assert mine.read_text() == "{}"
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("VMOE_CLI_CACHE", str(tmp_path / "a-file" / "cache"))
    assert snapshot.save("fit", good) is None and snapshot.load("fit") is None
    monkeypatch.setenv("VMOE_CLI_CACHE", "off")
    assert snapshot.cache_folder() is None and snapshot.save("fit", good) is None


def test_data_modules_are_known_by_name(capsys):
    """``--data DigitsDataModule`` (vmoe's data modules imported before parsing; it failed
    without a --config naming one)."""
    assert main(["fit", "--data", "DigitsDataModule", "--print_config"]) == 0
    assert "class_path: vmoe.data.DigitsDataModule" in capsys.readouterr().out
