"""The pictures of the routing visualization guide: every one it shows is on disk, and
``scripts/routing_figures.py`` (which made them from the quickstart) still writes every one of
them from the current report (run here with ``--fast``: an untrained model on 32 images)."""

import os
import re
import subprocess
import sys

from tests.helpers import ROOT

GUIDE = ROOT / "docs" / "guides" / "routing-visualization.md"


def shown():
    return re.findall(r"!\[[^\]]*\]\((\.\./images/routing/[^)]+)\)", GUIDE.read_text())


def test_the_guide_shows_the_figures_it_has():
    pictures = shown()
    assert len(pictures) >= 2, pictures
    for link in pictures:
        assert (GUIDE.parent / link).resolve().is_file(), link


def test_the_script_writes_every_figure_the_guide_shows(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "routing_figures.py"),
            "--fast",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = {p.name for p in tmp_path.iterdir()}
    assert {link.rsplit("/", 1)[1] for link in shown()} <= written, written
