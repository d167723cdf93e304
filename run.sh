#!/usr/bin/env bash
# Task-oriented knowledge transfer from a vision foundation model to a small model, end to end
# (Vemulapalli et al., ICML 2024, arXiv 2311.18237):
#
#   labeled budget ──> teacher.py (finetune VFM) ─────────────┐
#   (split.json)                                              v
#   unlabeled images ─> transfer_set.py ─> transfer list ─> distill.py ─> finetune.py ─> evaluate.py
#                                          student.py (init) ─┘       baselines: scratch, ImageNet ─┘
#
# Usage: bash run.sh [DATASET] [--shots N] [--seed S] [--teacher MODEL] [--student MODEL]
#                    [--img-size N] [--pool POOL] [--force]
#   DATASET  demo (default: offline, tiny models, CPU, minutes), eurosat, flowers102, dtd, pets, food101,
#            cifar10, cifar100, stl10, or folder:PATH.
#   --pool   a generic image pool (folder, list file, tar shards, or DATASET:SPLIT such as stl10:unlabeled)
#            adds a row distilled on it.
#   --force  redo every step. Without it a step whose output exists is skipped, so a rerun continues
#            (and a step that was killed resumes from its .state file).
# Outputs go to runs/NAME/; the table to runs/NAME/results.md. Environment: PY (python), DATA_ROOT.
set -euo pipefail
cd "$(dirname "$0")"

DATASET=demo
if [[ $# -gt 0 && $1 != --* ]]; then DATASET=$1; shift; fi
SHOTS=10 SEED=0 POOL="" FORCE=0 IMG_SIZE=""
TEACHER=vit_large_patch14_dinov2.lvd142m STUDENT=fastvit_t8
while [[ $# -gt 0 ]]; do
  case $1 in
    --shots) SHOTS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --teacher) TEACHER=$2; shift 2 ;;
    --student) STUDENT=$2; shift 2 ;;
    --img-size) IMG_SIZE=$2; shift 2 ;;
    --pool) POOL=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    *) echo "run.sh: unknown argument '$1' (see the header of run.sh)" >&2; exit 2 ;;
  esac
done

PY=${PY:-python}
[[ -x .venv/bin/python && $PY == python ]] && PY=.venv/bin/python
NAME=${DATASET#folder:}; NAME=$(basename "$NAME")
OUT=runs/$NAME
mkdir -p "$OUT"
TASK=(--dataset "$DATASET" --shots "$SHOTS" --seed "$SEED" --split "$OUT/split.json"
      --data-root "${DATA_ROOT:-data}")

if [[ $DATASET == demo ]]; then
  # Offline plumbing check: tiny random-init timm test models at 32px, short schedules, on the CPU.
  TEACHER=test_vit STUDENT=test_resnet IMG_SIZE=32
  T_ARGS=(--weights none --epochs 30 --lr 1e-3 --layer-decay 1.0 --workers 0)
  S_WEIGHTS=none  # no ImageNet weights offline: the 'imagenet' row is a second scratch init
  D_ARGS=(--epochs 15 --batch-size 64 --workers 0)
  F_ARGS=(--epochs 30 --workers 0)
  E_ARGS=(--workers 0)
  POOL=${POOL:-demo:unlabeled}
else
  T_ARGS=(--img-size "${IMG_SIZE:-224}")
  S_WEIGHTS=hub
  D_ARGS=() F_ARGS=() E_ARGS=()
fi
SIZE=(); [[ -n $IMG_SIZE ]] && SIZE=(--img-size "$IMG_SIZE")

# step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists (and --force was not given).
step() {
  local out=$1; shift
  if [[ -e $out && $FORCE == 0 ]]; then echo "== skip: $out exists"; return; fi
  echo "== $*"
  "$@"
}

step "$OUT/teacher.pt" $PY teacher.py "${TASK[@]}" --model "$TEACHER" "${SIZE[@]}" "${T_ARGS[@]}" \
  --out "$OUT/teacher.pt" --resume
step "$OUT/student_scratch.pt" $PY student.py "${TASK[@]}" --model "$STUDENT" "${SIZE[@]}" \
  --weights none --out "$OUT/student_scratch.pt"
step "$OUT/student_imagenet.pt" $PY student.py "${TASK[@]}" --model "$STUDENT" "${SIZE[@]}" \
  --weights "$S_WEIGHTS" --out "$OUT/student_imagenet.pt"

step "$OUT/transfer_target.txt" $PY transfer_set.py "${TASK[@]}" --source target \
  --out "$OUT/transfer_target.txt"
SETS=(target)
if [[ -n $POOL ]]; then
  step "$OUT/transfer_generic.txt" $PY transfer_set.py "${TASK[@]}" --source generic --pool "$POOL" \
    --out "$OUT/transfer_generic.txt"
  SETS+=(generic)
fi

ROWS=("teacher=$OUT/teacher.pt")
for set in "${SETS[@]}"; do
  step "$OUT/student_kt_$set.pt" $PY distill.py --teacher "$OUT/teacher.pt" \
    --student "$OUT/student_scratch.pt" --transfer "$OUT/transfer_$set.txt" --seed "$SEED" \
    "${D_ARGS[@]}" --out "$OUT/student_kt_$set.pt" --resume
  step "$OUT/student_kt_${set}_ft.pt" $PY finetune.py "${TASK[@]}" --student "$OUT/student_kt_$set.pt" \
    "${F_ARGS[@]}" --out "$OUT/student_kt_${set}_ft.pt" --resume
  ROWS+=("kt_$set=$OUT/student_kt_${set}_ft.pt")
done
for init in scratch imagenet; do
  step "$OUT/student_${init}_ft.pt" $PY finetune.py "${TASK[@]}" --student "$OUT/student_$init.pt" \
    "${F_ARGS[@]}" --lr 1e-3 --out "$OUT/student_${init}_ft.pt" --resume
  ROWS+=("$init=$OUT/student_${init}_ft.pt")
done

$PY evaluate.py --dataset "$DATASET" --data-root "${DATA_ROOT:-data}" "${E_ARGS[@]}" \
  --out "$OUT/results.json" "${ROWS[@]}"
