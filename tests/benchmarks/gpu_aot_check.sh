#!/usr/bin/env bash
# One device call (issue 30's GPU question, and issue 24's unmeasured fp8 speed): on a real H200, what XLA's own
# compile of colorjax's steps says they need (compile_for=local) beside what the steps take when they run
# (bench_throughput: peak device memory, tokens/s), and the fp8 scoring opt-in against bf16. The same steps compiled
# on a CPU machine for h200 (compile_for=h200, the CUDA PJRT plugin, no GPU) are the third column, run there:
#   python -m colorjax.main --config configs/pretrain.py:150m --config.compile_for=h200 ...
# Each measurement under its own timeout; JSON lines and logs go to $OUT. Carry .whl/ (ml_collections).
set -u
OUT=${OUT:-/tmp/colorjax-gpu-aot}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
START=$(date +%s); BUDGET=${BUDGET:-480}
run() {  # run <limit> <name> <command...>: output to $OUT/<name>.log, cut to what is left of the budget
  local limit=$1 name=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START) - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "=== skipped (budget): $name"; return; fi
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? $name"
  grep -E "^\{|memory/chip|peak|tokens/s|: fits|does not fit|estimate" "$OUT/$name.log" | tail -12
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import jax; d = jax.devices()[0]; print('jax', jax.__version__, d.device_kind, 'bytes_limit', \
d.memory_stats().get('bytes_limit'))"
M="python3 -m colorjax.main"
BENCH="python3 tests/benchmarks/bench_throughput.py"
# 1. XLA's compile of the real steps on this GPU: per-device memory, and the roofline estimate
run 120 aot_train150m $M --config configs/pretrain.py:150m --config.compile_for=local \
  --config.train.micro_batch_size=128
run 90 aot_score150m $M --config configs/score.py:150m --config.compile_for=local
run 150 aot_train1.2b $M --config configs/pretrain.py:1.2b --config.compile_for=local \
  --config.train.micro_batch_size=32 --config.compile_estimate=False
# 2. the same steps run: tokens/s and peak device memory (bench_throughput's JSON lines)
run 90 bench_train150m $BENCH --size 150m --micro 128 --what train --steps 5 --tag issue30
run 100 bench_score150m $BENCH --size 150m --what score --steps 8 --variants base,fp8 --tag issue24
run 120 bench_train1.2b $BENCH --size 1.2b --micro 32 --what train --steps 3 --tag issue30
grep -h '^{' "$OUT"/bench_*.log > "$OUT/results.jsonl" 2>/dev/null
echo "done in $(( $(date +%s) - START ))s"
