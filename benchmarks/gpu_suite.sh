#!/usr/bin/env bash
# The GPU suite in one device call (issue 26): installs the carried wheels (benchmarks/gpu_wheels.sh made .whl/),
# then runs benchmarks/gpu_suite.py at the Qwen2.5-0.5B shape in bf16.
# Results: benchmarks/results/gpu_suite.json + .md (SUITE_OUT=path.json elsewhere; $OUT/gpu_suite.json
# where the device tool sets OUT). Extra arguments go to gpu_suite.py (the CPU test: --shape tiny --batches 8 --lengths 1 2).
#   device run: carry [".whl"], command: bash benchmarks/gpu_suite.sh, timeout_s 540
# Where the project's .venv runs it (no GPU here), the venv has every package and .whl/ is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && ! nvidia-smi >/dev/null 2>&1; then
  PY=.venv/bin/python
elif [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "ready in $(( $(date +%s) - start )) s: $($PY -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())')"
# Where the device tool sets OUT, results are written there after each part, so a run cut off still returns them.
result=${SUITE_OUT:-${OUT:+$OUT/gpu_suite.json}}
result=${result:-benchmarks/results/gpu_suite.json}
$PY benchmarks/gpu_suite.py --budget-s "${SUITE_BUDGET_S:-360}" --out "$result" "$@"
rc=$?
echo "suite done in $(( $(date +%s) - start )) s (exit $rc)"
exit $rc
