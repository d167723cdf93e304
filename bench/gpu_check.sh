#!/usr/bin/env bash
# GPU check for distillation at speed (issue 4): on one CUDA machine, run the CUDA tests and bench/speed.py with a
# vit_large_patch14_dinov2 teacher and a fastvit_t8 student at 224px (random weights: nothing is downloaded;
# open_clip is not needed), and write everything to gpu_check/ (results.md, bench_*.json, logs).
#
# Usage: bash bench/gpu_check.sh [OUTDIR]        (~5-8 minutes on an H100; each part has its own time limit)
# Targets (H100): d/a >= 0.70, d/c >= 3, e/b >= 0.80 (see docs/speed.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT"
PY=${PY:-python}
[[ -x .venv/bin/python && $PY == python ]] && PY=.venv/bin/python
REPORT=$OUT/results.md
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}

{
  echo "# GPU check $(date -u +%FT%TZ)"
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__,
    'bf16', torch.cuda.is_bf16_supported())" 2>&1
  echo '```'
} > "$REPORT"

# 1. the tests of this issue, CUDA ones included (the CPU ones are fast; nothing needs open_clip)
timeout 300 $PY -m pytest -q -rs test_all.py -k "cuda or torchrun or cache or topk or ranks or reads_nothing or recipe or compiled or precision" > "$OUT/tests_speed.log" 2>&1
echo "CUDA tests (test_all.py -k ...): exit $? ($(tail -1 "$OUT/tests_speed.log"))" >> "$REPORT"

# 2. the benchmark: eager first (always gives a table), then with torch.compile (slower to start)
BENCH=(--teacher vit_large_patch14_dinov2 --student fastvit_t8 --img-size 224 --batch-size 128
       --classes 100 --steps 20 --warmup 5)
for mode in eager compile; do
  extra=(); [[ $mode == compile ]] && extra=(--compile --warmup 10)
  timeout 420 $PY -m bench.speed "${BENCH[@]}" "${extra[@]}" --out "$OUT/bench_$mode.json" > "$OUT/bench_$mode.log" 2>&1
  rc=$?
  { echo; echo "## bench/speed.py ($mode, exit $rc)"; echo '```'; grep -v "^\s*$" "$OUT/bench_$mode.log" | tail -14
    echo '```'; } >> "$REPORT"
done
cat "$REPORT"
