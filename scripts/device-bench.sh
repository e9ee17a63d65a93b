#!/usr/bin/env bash
# The GPU-speed benchmark on a lent GPU host (the device tool), in two calls that fit one
# session's device time (15 minutes, machine starts included):
#   here:   bash scripts/device-wheels.sh
#   device: run(command="BUDGET_S=500 bash scripts/device-bench.sh 1", carry=[".whl"],
#               timeout_s=590)
#           run(command="BUDGET_S=330 bash scripts/device-bench.sh 2", carry=[".whl"],
#               timeout_s=400)   # lower BUDGET_S to what status's budget_left_s allows
# then, here, with the files each call brought back:
#   .venv/bin/python benchmarks/engine.py --mode render \
#       --render CALL1/engine-bench.jsonl CALL2/engine-bench.jsonl --docs docs/benchmarks.md
# Part 1, the engine: its fast paths checked against the model's own forward, the prefill
# parts timed against the model's own, decode kernel variants beside the default (attention
# kernel x compiled or eager), the engine at its defaults (decode and engine steps, one
# request, TTFT by stage, requests at once, closed loops at 32 and 128 in flight), mixed
# load at several prefill budgets, and last a profile. Part 2, what does not depend on the
# engine's tuning: naive generate, the static cache at batch 32 (each batch size costs
# transformers a compile of a minute or two) and worker start to ready (cold and warm
# compile cache). Each part's stages are bounded by BUDGET_S (seconds from the benchmark's
# process start within which stages start). Extra arguments go to benchmarks/engine.py
# (a later --skip replaces the part's). MODEL_ARGS chooses the model (default: the random
# full-size GLM-4.6V-Flash; the tests use the tiny one); WHEELS= (empty) skips the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:-1}
[ $# -gt 0 ] && shift
case "$part" in
  1) part_args=(--skip naive static startup --variants flex:compiled grouped:eager
                --mixed-budgets 1024 2048 4096 off)
     budget=${BUDGET_S:-500} ;;
  2) part_args=(--skip check kernels variants engine mixed)
     budget=${BUDGET_S:-330} ;;
  all) part_args=(); budget=${BUDGET_S:-3600} ;;
  *) echo "usage: $0 [1|2|all] [benchmarks/engine.py arguments]" >&2; exit 2 ;;
esac
out=${OUT:-test-output/device-bench}
mkdir -p "$out"
wheels=${WHEELS-.whl}
if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Nothing is downloaded (the model is built on the GPU); a stray hub call must fail fast.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -c 'import sys, torch, transformers, msgspec, PIL
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "msgspec", msgspec.__version__, "pillow", PIL.__version__)' \
  | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem \
  --format=csv > "$out/gpu.txt" 2>&1 || true
df -h /tmp /dev/shm >> "$out/gpu.txt" 2>&1 || true  # where the start-to-ready checkpoint goes
# shellcheck disable=SC2086  # MODEL_ARGS is a list of words
python3 benchmarks/engine.py --mode suite ${MODEL_ARGS---full-size} --out "$out" \
  --budget-s "$budget" --scratch /tmp "${part_args[@]}" "$@" 2>&1 | tee "$out/engine-bench.log"
