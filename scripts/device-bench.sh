#!/usr/bin/env bash
# The GPU-speed benchmark, on a lent GPU host (the device tool), in one call:
#   here:   bash scripts/device-wheels.sh
#   device: run(command="bash scripts/device-bench.sh", carry=[".whl"], timeout_s=570)
# then, here, with the files it brought back:
#   .venv/bin/python benchmarks/engine.py --mode render --render FILES/engine-bench.jsonl \
#       --docs docs/benchmarks.md
# Extra arguments go to benchmarks/engine.py (e.g. --skip static mixed). BUDGET_S bounds
# the stages started (the default leaves the call time to write its files); MODEL_ARGS
# chooses the model (default: the random full-size GLM-4.6V-Flash; the tests use the tiny one).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-test-output/device-bench}
mkdir -p "$out"
wheels=${WHEELS-.whl}  # WHEELS= (empty) uses the installed packages as they are
if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c 'import sys, torch, transformers, msgspec, PIL
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "msgspec", msgspec.__version__, "pillow", PIL.__version__)' \
  | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem \
  --format=csv > "$out/gpu.txt" 2>&1 || true
# shellcheck disable=SC2086  # MODEL_ARGS is a list of words
python3 benchmarks/engine.py --mode suite ${MODEL_ARGS---full-size} --out "$out" \
  --budget-s "${BUDGET_S:-450}" --scratch /tmp "$@" 2>&1 | tee "$out/engine-bench.log"
