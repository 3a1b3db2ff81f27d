#!/usr/bin/env bash
# One-shot GPU validation: the whole test suite (CUDA tests and kernel-path tests run on
# the GPU), then the benchmarks at GPU shapes, then the planner against the real step
# (bench/plan_validation.py --device cuda: peak and step time, measured vs predicted).
#   bash bench/gpu_suite.sh [pytest paths...]
#   BENCH="thinking_residual:90 grpo_loss" bash bench/gpu_suite.sh   (pick benchmarks, optional per-bench timeout)
# Logs and bench JSON land in $OUT when set (the device tool), else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # optional baselines (liger-kernel) carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider "${@:-tests}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
for entry in ${BENCH:-thinking_residual grpo_loss attention_importance hrpo_step kv_distill_step}; do
  b=${entry%%:*}; t=${entry#*:}; [ "$t" = "$entry" ] && t=${BENCH_TIMEOUT:-150}
  timeout "$t" python3 bench/run.py --only "$b" --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | grep -E "^\[|^\| "
done
# per-kernel time of the thinking residual (fused / eager / GEMMs alone): where to look next
timeout "${PROFILE_TIMEOUT:-90}" python3 bench/profile_thinking_residual.py --out "$OUT" 2>&1 | tail -5
# the planner against the real step: torch.cuda.max_memory_allocated and step time vs predicted
timeout "${PLAN_TIMEOUT:-300}" python3 bench/plan_validation.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/plan_validation.log" | tail -20
