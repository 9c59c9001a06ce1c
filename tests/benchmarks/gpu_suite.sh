#!/usr/bin/env bash
# Every GPU measurement of the speed work in one device call, each under its own timeout (seconds, first argument
# of `run`). JSON lines go to stdout and $OUT/results.jsonl; full logs and profiler tables to $OUT/log.txt.
# Optional: .bench_base/ (an older checkout, run as the baseline in the same call), .bench_store/books (a token
# store for the real-loader measurement), .whl/ (wheels missing on the device image, e.g. ml_collections).
set -u
OUT=${OUT:-/tmp/colorjax-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
BENCH="python3 tests/benchmarks/bench_throughput.py"
STORE=""; [ -f .bench_store/books/manifest.json ] && STORE="--store .bench_store/books"
START=$(date +%s); BUDGET=${BUDGET:-100000}  # seconds for all runs: a run is cut to what is left, or skipped
run() {
  local limit=$1; shift
  local left=$((BUDGET - ($(date +%s) - START) - 10))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then echo "=== skipped (budget): $*" | tee -a "$OUT/log.txt"; return; fi
  echo "=== $* (limit ${limit}s, XLA_FLAGS=${XLA_FLAGS:-})" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1; echo "rc=$?" >>"$OUT/log.txt"
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
case "${1:-full}" in
quick)  # the default step and the 1.2B
  run 80 $BENCH --size 150m --micro 128 --steps 5 --tag quick
  run 100 $BENCH --size 1.2b --micro 32 --what train --steps 3 --tag quick
  ;;
probe)  # fp8 scoring (variants.py: trunk, trunk + head) against this code, the 1.2B profile, cuDNN GEMM fusions
  run 120 $BENCH --size 150m --what score --steps 8 --variants base,fp8,fp8+fp8_head --profile /tmp/prof \
    --hlo "$OUT/hlo" --tag probe
  run 150 $BENCH --size 1.2b --micro 32 --what train --steps 3 --profile /tmp/prof --tag probe
  XLA_FLAGS="--xla_gpu_cudnn_gemm_fusion_level=2" run 100 $BENCH --size 150m --micro 128 --steps 5 \
    --tag cudnn_fusion2
  run 80 $BENCH --size 150m --micro 128 --what train --steps 5 --tag probe
  for f in "$OUT"/hlo/score-*.txt; do python3 tests/benchmarks/hlo_summary.py "$f" | head -4 | tee -a "$OUT/log.txt"; done
  gzip -f "$OUT"/hlo/*.txt 2>/dev/null
  ;;
issue24)  # issue 24's targets in one call: 150M scoring bf16 (whole and vocabulary-tiled head) and the fp8 opt-in
  # (variant fp8 = the product's score.fp8 path), 150M training at micro 128 and 256, the 1.2B with its first profile,
  # and tokamax's LayerNorm and attention kernels and qwix's fp8 when their wheels are carried in .whl/ (`pip download --no-deps -d
  # .whl tokamax==0.0.12 qwix==0.1.8 einshape jaxtyping wadler_lindig typeguard==2.13.3 immutabledict tensorboardx
  # tqdm`, plus pydantic if the image lacks it)
  run 100 $BENCH --size 150m --what score --steps 8 --variants base,fp8 --tag issue24
  run 60 $BENCH --size 150m --what score --steps 8 --score-vocab-tile 8192 --tag vocab_tile
  run 80 $BENCH --size 150m --micro 128 --what train --steps 5 --tag issue24
  run 80 $BENCH --size 150m --micro 256 --what train --steps 5 --tag issue24
  run 140 $BENCH --size 1.2b --micro 32 --what train --steps 3 --profile /tmp/prof --tag issue24
  python3 -c "import tokamax, qwix" 2>/dev/null && run 120 $BENCH --size 150m --what score --steps 8 \
    --variants base,tokamax_ln,tokamax_attn,tokamax_ln+tokamax_attn,qwix_fp8 --tag tokamax
  ;;
*)
run "${T_NEW:-110}" $BENCH --size 150m --micro 128 --steps 5 $STORE --profile /tmp/prof --tag new
[ -d .bench_base ] && (cd .bench_base && run "${T_BASE:-100}" python3 tests/benchmarks/bench_throughput.py \
  --size 150m --batch 256 --micro 128 --steps 5)
run "${T_BIG:-130}" $BENCH --size 1.2b --micro 32 --what train --steps 3 --tag new
run "${T_M256:-75}" $BENCH --size 150m --micro 256 --steps 5 --score-models 1 --tag micro256
run "${T_FP32:-75}" $BENCH --size 150m --micro 128 --steps 5 --precision fp32_residual --tag fp32_residual
XLA_FLAGS="--xla_gpu_enable_triton_gemm=true" run "${T_FLAGS:-75}" $BENCH --size 150m --micro 128 --steps 5 \
  --tag triton_gemm
  ;;
esac
grep -h '^{' "$OUT/log.txt" > "$OUT/results.jsonl"
grep -h -E '^(train|score)' "$OUT/log.txt" | sed 's/^/baseline /'
grep -h -E '^\{' "$OUT/log.txt" | python3 -c '
import json, sys
for line in sys.stdin:
  r = json.loads(line)
  keep = ("measure", "variant", "ms", "max_bf16_ulps", "tag", "size", "precision", "micro", "ms_per_step", "tokens_per_s", "pool_tokens_per_s", "mfu",
          "peak_memory_gib", "compile_s", "ms_per_step")
  print({k: r[k] for k in keep if k in r})'
grep -h -E 'Error|error:|rc=[1-9]' "$OUT/log.txt" | sort | uniq -c | head -20
