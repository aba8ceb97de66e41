"""The examples of README.md and of every docs/**/*.md page work when pasted.

Each page runs in its own temporary folder (the working directory), in page order. The folder
holds links to the repository's ``configs/`` and ``tests/`` (the fixtures), so that paths read as
they do from the repository root.

- ```python blocks are executed in process, each in a fresh namespace.
- ```bash blocks: each command (backslash continuations joined, comments dropped, ``a && b``
  taken as two commands) runs. ``vmoe ...`` runs in process through ``vmoe.cli.main`` (it must
  exit 0); ``vmoe fit`` / ``validate`` / ``test`` / ``predict`` get ``FAST`` appended (2 training
  steps, one validation and test batch, no logger or progress bar), so a pasted quickstart takes
  seconds here, not minutes. ``pip install ...`` is not run (CI installs the package with its
  extras), nor is ``python3 -m pytest`` (the suite this test is part of). Anything else runs
  with bash.
- ```yaml blocks must parse.

A block whose first line is ``# (needs ...)`` or ``# (takes ...)`` is shown, not run: downloads,
GPUs, several machines, your own data, benchmarks that take minutes. ``EXPECTED`` is the least
number of blocks each page must run, so that a marker cannot silently hide a page's examples, and
every page must be listed in it.
"""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", flags=re.S | re.M)
NOT_RUN = re.compile(r"# \((needs|takes) [^)]*\)")
FAST = [
    "--trainer.max_steps",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
    "--trainer.limit_predict_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.logger",
    "false",
]
LIGHTNING = {"fit", "validate", "test", "predict"}

# page -> least number of (python, bash, yaml) blocks it runs
EXPECTED = {
    "README.md": (1, 2, 0),
    "docs/index.md": (0, 1, 0),
    "docs/getting-started.md": (1, 2, 0),
    "docs/guides/moe-layer.md": (4, 0, 1),
    "docs/guides/cli.md": (0, 2, 0),
    "docs/guides/models.md": (4, 0, 0),
    "docs/guides/training.md": (1, 2, 1),
    "docs/guides/custom-loops.md": (2, 0, 0),
    "docs/guides/official-checkpoints.md": (2, 2, 0),
    "docs/guides/routing-visualization.md": (3, 1, 0),
    "docs/guides/scale-out.md": (0, 0, 1),
    "docs/guides/deploy.md": (3, 1, 0),
    "docs/guides/data-sources.md": (1, 1, 0),
    "docs/architecture.md": (0, 0, 0),
    "docs/benchmarks.md": (1, 0, 0),
    "docs/testing.md": (0, 0, 0),
    "docs/api/moe.md": (0, 0, 0),
    "docs/api/models.md": (0, 0, 0),
    "docs/api/train.md": (0, 0, 0),
    "docs/api/data.md": (0, 0, 0),
    "docs/api/viz.md": (0, 0, 0),
    "docs/api/checkpoints.md": (0, 0, 0),
}


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: Path):
    """(language, code) of each fenced block that runs here, in page order."""
    return [
        (lang, code) for lang, code in FENCE.findall(page.read_text()) if not NOT_RUN.match(code)
    ]


def commands(script: str):
    """The commands of a bash block: continuations joined, comments and blank lines dropped,
    ``a && b`` split in two."""
    joined = re.sub(r"\\\n", " ", script)
    for line in joined.splitlines():
        for command in line.split(" && "):
            words = shlex.split(command, comments=True)
            if words:
                yield command.strip(), words


def run_bash(code: str, where: str) -> int:
    """Runs the block's commands; returns how many ran."""
    from vmoe.cli import main

    ran = 0
    for line, words in commands(code):
        if words[:2] == ["pip", "install"] or words[:3] == ["python3", "-m", "pytest"]:
            continue
        if words[0] == "vmoe":
            argv = words[1:] + (FAST if words[1] in LIGHTNING else [])
            assert main(argv) == 0, f"{where}: {line}"
        else:
            done = subprocess.run(["bash", "-c", line], capture_output=True, text=True)
            assert done.returncode == 0, f"{where}: {line}\n{done.stdout}\n{done.stderr}"
        ran += 1
    return ran


def test_every_page_is_listed():
    assert sorted(map(name, PAGES)) == sorted(EXPECTED)


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    for folder in ("configs", "tests"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    ran = {"python": 0, "bash": 0, "yaml": 0}
    for i, (lang, code) in enumerate(blocks(page)):
        where = f"{name(page)} {lang} block {i}"
        if lang == "python":
            exec(compile(code, where, "exec"), {"__name__": f"docs_{i}"})
        elif lang == "bash":
            if not run_bash(code, where):  # only pip install / pytest lines
                continue
        elif lang == "yaml":
            yaml.safe_load(code)
        else:
            continue
        ran[lang] += 1
    least = dict(zip(("python", "bash", "yaml"), EXPECTED[name(page)]))
    assert all(ran[lang] >= least[lang] for lang in ran), (ran, least)


def test_api_docstrings_link_the_guides_they_name():
    """A guide named in a docstring the API reference renders is a Markdown link (relative to
    docs/api/, which mkdocs resolves), not a bare ``docs/guides/x.md`` path; each link's
    target exists."""
    import importlib

    names = re.findall(
        r"^::: ([\w.]+)", "".join(p.read_text() for p in (ROOT / "docs/api").glob("*.md")), re.M
    )
    assert names, "the API pages render no objects"
    bare, broken = [], []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError:
            obj = getattr(importlib.import_module(module), attr)
        doc = obj.__doc__ or ""
        bare += [name for _ in re.findall(r"``docs/[\w/-]+\.md``", doc)]
        for target in re.findall(r"\]\((\.\./[\w/-]+\.md)(?:#[\w-]+)?\)", doc):
            if not (ROOT / "docs/api" / target).resolve().is_file():
                broken.append(f"{name}: {target}")
    assert not bare, f"guides named as bare paths (write [title](../guides/x.md)): {bare}"
    assert not broken, f"links to missing pages: {broken}"
