"""How long ``vmoe`` takes to answer help, usage errors, a misspelt option and a missing --config
file, and what it imports to do so.

Each case runs ``python -m vmoe.cli ARGS`` in a fresh interpreter ``--repeat`` times (wall time,
min and median), then once more under ``python -X importtime`` to list the top-level imports
that cost the most (cumulative microseconds, as ``-X importtime`` reports them) and whether
torch / Lightning / timm / transformers / onnx were loaded. The goal: <= 2 s for every case on
an idle machine but the first ``vmoe fit --help`` of an installation: that one builds
LightningCLI's parser (Lightning, torch: seconds) and keeps the parser's snapshot
(``vmoe.cli.snapshot``) that answers the later ``fit`` cases; it runs on an empty snapshot
folder each repeat, and its time is reported, not held to the goal.

    python3 benchmarks/cli_startup.py [--repeat 3] [--top 5] [--skip-fit]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "lightning", "timm", "transformers", "onnx")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
FIRST = "vmoe fit --help (first: no snapshot)"
CASES = [
    ("vmoe --help", ["--help"]),
    ("vmoe export --help", ["export", "--help"]),
    ("vmoe routing-report --help", ["routing-report", "--help"]),
    ("vmoe frobnicate (unknown command)", ["frobnicate"]),
    ("vmoe export --model x (missing --out)", ["export", "--model", "x"]),
    ("vmoe fit --config missing.yaml", ["fit", "--config", "missing.yaml"]),
    (FIRST, ["fit", "--help"]),
    ("vmoe fit --help", ["fit", "--help"]),
    ("vmoe fit -c quickstart --model.lrr 5", ["fit", "-c", QUICKSTART, "--model.lrr", "5"]),
    ("vmoe fit -c quickstart --data.batch_sz 3", ["fit", "-c", QUICKSTART, "--data.batch_sz", "3"]),
]
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def run(args, env, extra=()):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *extra, "-m", "vmoe.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # missing.yaml is missing there
    )
    return time.perf_counter() - start, done


def top_imports(stderr: str, top: int):
    """(cumulative us, module) of the imports made directly by the entry point, largest first,
    and the set of top-level packages loaded."""
    direct, loaded = [], set()
    for line in stderr.splitlines():
        found = _LINE.match(line)
        if not found:
            continue
        _, cumulative, indent, name = found.groups()
        loaded.add(name.split(".")[0])
        if len(indent) == 1:
            direct.append((int(cumulative), name))
    return sorted(direct, reverse=True)[:top], loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--skip-fit", action="store_true", help="skip vmoe fit --help (slow)")
    opts = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    snapshots = tempfile.mkdtemp(prefix="vmoe-cli-snapshots-")
    env["VMOE_CLI_CACHE"] = snapshots
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"{'case':<44} {'exit':>4} {'min s':>6} {'median s':>8}  heavy imports")
    details = []
    for label, args in CASES:
        if opts.skip_fit and args[0] == "fit" and "missing.yaml" not in args:
            continue
        times = []
        for _ in range(opts.repeat):
            if label == FIRST:
                shutil.rmtree(snapshots, ignore_errors=True)
            seconds, done = run(args, env)
            times.append(seconds)
        if label == FIRST:
            shutil.rmtree(snapshots, ignore_errors=True)
        _, traced = run(args, env, ("-X", "importtime"))
        top, loaded = top_imports(traced.stderr, opts.top)
        heavy = sorted(loaded & set(HEAVY)) or ["none"]
        print(
            f"{label:<44} {done.returncode:>4} {min(times):>6.2f} {statistics.median(times):>8.2f}"
            f"  {', '.join(heavy)}"
        )
        details.append((label, top))
    shutil.rmtree(snapshots, ignore_errors=True)
    print("\nlargest direct imports (cumulative, python -X importtime):")
    for label, top in details:
        shown = ", ".join(f"{name} {us / 1e6:.2f}s" for us, name in top)
        print(f"  {label}: {shown}")


if __name__ == "__main__":
    main()
