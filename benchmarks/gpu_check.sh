#!/usr/bin/env bash
# Every GPU check in one run, then one summary table. Each step is capped (150 + 110 + 100 s; the
# first includes inductor compiling) so that the whole fits one device call of a few minutes;
# whether it stays within 5 minutes is unknown until it has run on a GPU.
#   1. tests marked `cuda` (Triton kernels vs the portable path, determinism, torch.compile, no host
#      sync, CUDA-graph capture and replay, grouped_mm vs bmm);
#   2. benchmarks/moe_layer.py --device cuda --dtype bf16 (S/32 and B/16 layers, E=8 and E=32;
#      the floor_gmm/floor column says whether grouped_mm beats bmm for the experts);
#   3. benchmarks/train_throughput.py --device cuda (B/16 every-2 and S/32 last-2 vs dense);
#   4. benchmarks/moe_layer.py --soft --device cuda --dtype bf16 (Soft MoE S/32 layer, E=8 and
#      E=32, vs its essential matmuls; capped at 60 s).
# Usage: bash benchmarks/gpu_check.sh [--cpu-smoke] [output-dir]
#   logs go to output-dir (default $OUT/gpu_check or /tmp/gpu_check); --cpu-smoke runs the same
#   steps at toy sizes on the CPU, to check the script itself on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then smoke=1; shift; fi
out="${1:-${OUT:-/tmp}/gpu_check}"
mkdir -p "$out"
export WANDB_MODE=offline PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if (( smoke )); then
  tests=(-k cuda tests/moe/test_dispatch_fused.py tests/moe/test_layer_cuda.py tests/moe/test_soft_layer.py)
  layer=(--device cpu --repeats 1 --shapes "tiny E=4" --no-memory)
  train=(--device cpu --steps 1 --rounds 1 --warmup 0 --pairs s32)
  soft=(--soft --device cpu --repeats 1 --shapes "S/32 E=32")
else
  python3 -c '
import torch, triton
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
' || { echo "gpu_check: no usable CUDA device (try --cpu-smoke)"; exit 2; }
  tests=(-m cuda tests/moe/test_dispatch_fused.py tests/moe/test_dispatch_autograd.py tests/moe/test_layer_cuda.py
         tests/moe/test_soft_layer.py)
  layer=(--device cuda --dtype bf16 --repeats 15)
  train=(--device cuda --steps 5 --rounds 3)
  soft=(--soft --device cuda --dtype bf16 --repeats 15)
fi

run() {  # name, timeout (s), command...
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name|$rc|$((SECONDS - start))" >> "$out/status"
  tail -n 40 "$out/$name.log"
}
: > "$out/status"
run tests 150 python3 -m pytest -q "${tests[@]}"
run moe_layer 110 python3 benchmarks/moe_layer.py "${layer[@]}"
run train_throughput 100 python3 benchmarks/train_throughput.py "${train[@]}"
run moe_layer_soft 60 python3 benchmarks/moe_layer.py "${soft[@]}"

echo
echo "## GPU check summary"
echo
echo "| step | exit | seconds |"
echo "|---|---|---|"
while IFS='|' read -r name rc secs; do echo "| $name | $rc | $secs |"; done < "$out/status"
echo
echo "| check | result |"
echo "|---|---|"
grep -h -E "passed|failed|error|skipped" "$out/tests.log" | tail -n 1 | sed 's/^/| cuda tests | /; s/$/ |/'
grep -h -E "^\s*\[(PASS|FAIL)\]" "$out/moe_layer.log" "$out/train_throughput.log" "$out/moe_layer_soft.log" \
  | sed -E 's/^\s*\[(PASS|FAIL)\] (.*)$/| \2 | \1 |/'
echo
echo "Layer table:"
grep -h "^|" "$out/moe_layer.log"
echo
echo "Throughput table:"
grep -h "^|" "$out/train_throughput.log"
! grep -q -E "\|[1-9][0-9]*\|" "$out/status"
