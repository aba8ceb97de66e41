#!/usr/bin/env bash
# The built package, not the checkout: build the sdist and the wheel, install the wheel (no
# extras) into a fresh virtual environment, and from a folder outside the checkout run the
# quickstart config for a few steps and `vmoe routing-report` on the model it exported.
# Fails when the wheel misses a file the package needs at run time (e.g. the report's HTML
# template) or a dependency that pyproject.toml does not declare.
#
#   bash .ci/wheel_check.sh            # from the repository root (or anywhere)
#   KEEP=1 bash .ci/wheel_check.sh     # keep the temporary folder (its path is printed)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/vmoe-wheel-check.XXXXXX")"
if [[ -z "${KEEP:-}" ]]; then trap 'rm -rf "$work"' EXIT; else echo "keeping $work"; fi
export WANDB_MODE=offline PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS=1
start=$SECONDS
step() { echo "[wheel-check +$((SECONDS - start))s] $*"; }

step "build sdist + wheel"
"$python" -c "import build" 2>/dev/null || "$python" -m pip install -q build
"$python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 || {
    cat "$work/build.log"
    exit 1
}
wheel=("$work"/dist/vmoe-*.whl)
sdist=("$work"/dist/vmoe-*.tar.gz)
[[ -f "${wheel[0]}" && -f "${sdist[0]}" ]] || { echo "build made no wheel/sdist"; exit 1; }

step "check the archives' contents"
"$python" - "${wheel[0]}" "${sdist[0]}" <<'EOF'
import sys, tarfile, zipfile

wheel = set(zipfile.ZipFile(sys.argv[1]).namelist())
with tarfile.open(sys.argv[2]) as tar:
    root = tar.getnames()[0].split("/")[0]
    sdist = {n[len(root) + 1 :] for n in tar.getnames()}
missing = [f for f in ("vmoe/viz/templates/report.html", "vmoe/cli/__init__.py") if f not in wheel]
stray = sorted({n.split("/")[0] for n in wheel if not n.split("/")[0].endswith(".dist-info")})
stray = [n for n in stray if n != "vmoe"]
need = ["README.md", "pyproject.toml", "mkdocs.yml", "configs/quickstart.yaml", "docs/index.md",
        "tests/conftest.py", "tests/fixtures", "vmoe/viz/templates/report.html"]
missing += [f"sdist:{f}" for f in need if not any(n == f or n.startswith(f + "/") for n in sdist)]
if missing or stray:
    sys.exit(f"missing from the archives: {missing}; not vmoe in the wheel: {stray}")
print(f"wheel: {len(wheel)} files, sdist: {len(sdist)} files")
EOF

step "fresh virtual environment + pip install the wheel"
"$python" -m venv "$work/venv"
# --no-compile: no .pyc for torch's thousands of modules (a minute of the install), none needed
"$work/venv/bin/python" -m pip install --no-compile "${wheel[0]}" >"$work/install.log" 2>&1 || {
    cat "$work/install.log"
    exit 1
}
grep -E "^Successfully installed" "$work/install.log" | cut -c1-300

# Outside the checkout, with nothing of it on the path: the config is a copied file, as a
# user who downloaded configs/quickstart.yaml would have it.
run="$work/run"
mkdir -p "$run"
cp "$repo/configs/quickstart.yaml" "$run/"
cd "$run"
unset PYTHONPATH
where="$("$work/venv/bin/python" -c 'import vmoe; print(vmoe.__file__)')"
case "$where" in
    "$work/venv/"*) ;;
    *) echo "import vmoe resolved to $where, not the fresh venv"; exit 1 ;;
esac

step "vmoe fit --config quickstart.yaml (3 steps)"
"$work/venv/bin/vmoe" fit --config quickstart.yaml --trainer.max_steps 3 \
    --trainer.default_root_dir runs/quickstart --trainer.enable_progress_bar false \
    --trainer.limit_val_batches 2 >"$work/fit.log" 2>&1 || { cat "$work/fit.log"; exit 1; }
tail -n 6 "$work/fit.log"
for f in runs/quickstart/config.yaml runs/quickstart/checkpoints/last.ckpt \
    runs/quickstart/export/config.json runs/quickstart/export/model.safetensors; do
    [[ -s "$f" ]] || { echo "vmoe fit did not write $f"; exit 1; }
done

step "vmoe routing-report on the export"
"$work/venv/bin/vmoe" routing-report --model runs/quickstart/export --data digits --out report \
    --max-images 64 --capacity-factors 1.0 4.0 --no-progress
for f in report/index.html report/report.json report/expert_load.png; do
    [[ -s "$f" ]] || { echo "vmoe routing-report did not write $f"; exit 1; }
done
grep -q "<html" report/index.html || { echo "report/index.html is not the HTML page"; exit 1; }
step "ok"
