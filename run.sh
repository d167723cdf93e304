#!/usr/bin/env bash
# The paper's comparison, end to end: task-oriented knowledge transfer from a vision foundation model to a
# small model, against its baselines (Vemulapalli et al., ICML 2024, arXiv 2311.18237):
#
#   labeled budget ──> teacher.py (finetune VFM) ─────────────┐
#   (split.json)                                              v
#   unlabeled images ─> transfer_set.py ─> transfer list ─> distill.py ──────────┐
#                       (target | generic | retrieval)  └─> distill_agnostic.py ─┤ (frozen VFM's embedding)
#                                          student.py (init) ───────────────────>├─> finetune.py ─> evaluate.py
#                                                 baselines: scratch, ImageNet ──┘
#
# Rows of the table: teacher (the finetuned VFM), kt_target / kt_generic / kt_retrieval (task-oriented
# transfer on the task's unlabeled images / a generic pool / images retrieved from the pool), agnostic
# (task-agnostic distillation of the frozen VFM's embedding on the target transfer set, same budget),
# scratch and imagenet (the student finetuned on the labels from random / ImageNet weights).
#
# Usage: bash run.sh [DATASET] [--shots N] [--seed S] [--seeds "0 1 2"] [--teacher MODEL]
#                    [--student MODEL] [--img-size N] [--pool POOL] [--out DIR] [--force]
#   DATASET  demo (default: offline, generated images, a stand-in VFM pretrained on the CPU, 5-6 minutes
#            on 2 cores; it sets its own tiny models and schedules),
#            eurosat, flowers102, dtd, pets, food101, cifar10, cifar100, stl10, or folder:PATH.
#   --seed   the label budget (which images are labeled) and the teacher's seed.
#   --seeds  repeats every student row once per seed (init, distillation, finetuning); the table then
#            shows mean ± std. Default: --seed alone. The teacher is trained once.
#   --pool   a generic image pool (folder, list file, tar shards, or DATASET:SPLIT such as stl10:unlabeled)
#            adds the kt_generic and kt_retrieval rows. The demo uses demo:unlabeled for kt_generic by
#            default; `--pool demo:unlabeled` adds kt_retrieval too (a minute more).
#   --out    the run's directory (default runs/NAME). It holds one configuration (DIR/run.cfg): asking
#            for other --shots, --seed, models or pool there is refused, since finished steps would be
#            skipped and their stale outputs reported; use another --out (or --force).
#   --force  redo every step, from scratch (resumable .state files are deleted). Without it a step whose
#            output exists is skipped, so a rerun continues (and a step that was killed resumes from its
#            .state file, which is refused if it was saved by another configuration).
# Outputs go to runs/NAME/ (student runs in runs/NAME/sSEED/); the table to runs/NAME/results.md, .json
# and .png; the exported kt_target student to runs/NAME/export/. Environment: PY (python), DATA_ROOT.
set -euo pipefail
cd "$(dirname "$0")"

DATASET=demo
if [[ $# -gt 0 && $1 != --* ]]; then DATASET=$1; shift; fi
SHOTS=10 SEED=0 SEEDS="" POOL="" OUT="" FORCE=0 IMG_SIZE="" RETRIEVAL=1 VFM_PID=""
TEACHER=vit_large_patch14_dinov2.lvd142m STUDENT=fastvit_t8
while [[ $# -gt 0 ]]; do
  if [[ $1 == --* && $1 != --force && $# -lt 2 ]]; then
    echo "run.sh: $1 needs a value (see the header of run.sh)" >&2; exit 2
  fi
  case $1 in
    --shots) SHOTS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --teacher) TEACHER=$2; shift 2 ;;
    --student) STUDENT=$2; shift 2 ;;
    --img-size) IMG_SIZE=$2; shift 2 ;;
    --pool) POOL=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    *) echo "run.sh: unknown argument '$1' (see the header of run.sh)" >&2; exit 2 ;;
  esac
done
SEEDS=${SEEDS:-$SEED}

PY=${PY:-python}
[[ -x .venv/bin/python && $PY == python ]] && PY=.venv/bin/python
NAME=${DATASET#folder:}; NAME=$(basename "$NAME")
OUT=${OUT:-runs/$NAME}
for n in $SHOTS $SEED $SEEDS; do
  [[ $n =~ ^[0-9]+$ ]] || { echo "run.sh: --shots, --seed and --seeds take whole numbers, not '$n'" >&2; exit 2; }
done
# One directory, one configuration: a finished step is skipped, so other settings would be answered
# with the old outputs. (--seeds may change: each seed has its own sSEED/ directory.)
CONFIG="dataset=$DATASET shots=$SHOTS seed=$SEED teacher=$TEACHER student=$STUDENT img_size=$IMG_SIZE pool=$POOL"
[[ $DATASET == demo ]] && CONFIG="dataset=demo shots=$SHOTS seed=$SEED pool=${POOL:-demo:unlabeled}"
HAVE=$(cat "$OUT/run.cfg" 2>/dev/null || true)
if [[ -n $HAVE && $HAVE != "$CONFIG" ]]; then
  if [[ $FORCE == 0 ]]; then
    echo "run.sh: $OUT holds a run of: $HAVE" >&2
    echo "run.sh: this one asks for:    $CONFIG; use --out DIR for it, or --force to redo $OUT" >&2
    exit 2
  fi
  rm -f "$OUT/split.json"  # --force: the label budget is made again too
fi
if [[ $FORCE == 1 && -d $OUT ]]; then  # --force: no step may resume a state of an earlier run
  find "$OUT" -name '*.state' -delete
fi
mkdir -p "$OUT"
echo "$CONFIG" > "$OUT/run.cfg"
TASK=(--dataset "$DATASET" --shots "$SHOTS" --seed "$SEED" --split "$OUT/split.json"
      --data-root "${DATA_ROOT:-data}")

# step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists (and --force was not given).
step() {
  local out=$1; shift
  if [[ -e $out && $FORCE == 0 ]]; then echo "== skip: $out exists"; return; fi
  echo "== $*"
  "$@"
}

if [[ $DATASET == demo ]]; then
  # Offline and on the CPU: generated 32px images (demo.py), tiny timm models, short schedules. The VFM
  # is a stand-in that demo.py pretrains here on its broad pool (classes that are not the task's); the
  # 'imagenet' init likewise, with a fifth of the images and half the epochs (ImageNet is the smaller
  # dataset). Both are the student's tiny architecture: here the VFM's edge is its pretraining alone.
  TEACHER=test_resnet STUDENT=test_resnet T_SIZE=32 S_SIZE=32
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny tensors: one thread per process is the fastest
  # The stand-in VFM pretrains on one core while the steps that do not need it run on the other.
  echo "== stand-in VFM: pretraining in the background, log in $OUT/standin_vfm.log"
  step "$OUT/standin_vfm.pth" $PY demo.py --arch "$TEACHER" --img-size "$T_SIZE" --per-class 100 \
    --epochs 15 --out "$OUT/standin_vfm.pth" > "$OUT/standin_vfm.log" 2>&1 &
  VFM_PID=$!
  step "$OUT/standin_imagenet.pth" $PY demo.py --arch "$STUDENT" --img-size "$S_SIZE" --per-class 20 \
    --epochs 8 --out "$OUT/standin_imagenet.pth"
  VFM_WEIGHTS=$OUT/standin_vfm.pth S_WEIGHTS=$OUT/standin_imagenet.pth
  T_ARGS=(--epochs 30 --lr 1e-3 --head-lr 3e-3 --layer-decay 0.75 --workers 1)
  D_EPOCHS=15 D_ARGS=(--batch-size 64 --min-scale 0.25 --workers 1)  # 32px: tiny crops show no shape
  F_ARGS=(--epochs 20 --workers 1) KT_LR=2e-4
  R_ARGS=(--embed "teacher:$OUT/teacher.pt" --k 10 --workers 0)
  E_ARGS=(--workers 0)
  [[ -z $POOL ]] && POOL=demo:unlabeled RETRIEVAL=0  # the generic row; retrieval only on request
else
  T_SIZE=${IMG_SIZE:-224} S_SIZE=$IMG_SIZE
  VFM_WEIGHTS=hub S_WEIGHTS=hub
  T_ARGS=() D_ARGS=() F_ARGS=() R_ARGS=() E_ARGS=() D_EPOCHS=20 KT_LR=1e-4
fi
S_SIZE_ARG=(); [[ -n $S_SIZE ]] && S_SIZE_ARG=(--img-size "$S_SIZE")
# --seed picks the labeled images in every step; --train-seed seeds initialisation and training, so that
# --seeds varies those and nothing else.

step "$OUT/transfer_target.txt" $PY transfer_set.py "${TASK[@]}" --source target \
  --out "$OUT/transfer_target.txt"
SETS=(target)
if [[ -n $POOL ]]; then
  step "$OUT/transfer_generic.txt" $PY transfer_set.py "${TASK[@]}" --source generic --pool "$POOL" \
    --out "$OUT/transfer_generic.txt"
  SETS+=(generic)
fi
# The same distillation budget for every transfer set: epochs scaled so that each run sees as many images
# as D_EPOCHS passes over the target set.
epochs_for() {
  local n e; n=$(wc -l < "$OUT/transfer_$1.txt")
  e=$(( n > 0 ? (D_EPOCHS * N_TARGET + n / 2) / n : D_EPOCHS )); echo $(( e > 0 ? e : 1 ))
}
N_TARGET=$(wc -l < "$OUT/transfer_target.txt")

# Baselines first (they need no VFM): the student from random or ImageNet weights, finetuned on the labels.
BASE_ROWS=()
for s in $SEEDS; do
  D=$OUT/s$s
  mkdir -p "$D"
  for init in scratch imagenet; do
    weights=none; [[ $init == imagenet ]] && weights=$S_WEIGHTS
    step "$D/student_$init.pt" $PY student.py "${TASK[@]}" --train-seed "$s" \
      --model "$STUDENT" "${S_SIZE_ARG[@]}" --weights "$weights" --out "$D/student_$init.pt"
    step "$D/student_${init}_ft.pt" $PY finetune.py "${TASK[@]}" --train-seed "$s" \
      "${F_ARGS[@]}" --student "$D/student_$init.pt" --lr 1e-3 --out "$D/student_${init}_ft.pt" --resume
    BASE_ROWS+=("$init@$s=$D/student_${init}_ft.pt")
  done
done

if [[ -n $VFM_PID ]] && ! wait "$VFM_PID"; then
  tail -5 "$OUT/standin_vfm.log" >&2; exit 1
fi

# The task-agnostic row: the student matches the frozen (not finetuned) VFM's embedding, on the same
# transfer set with the same budget, then is finetuned. It needs no teacher, so on the demo's two CPU cores
# it trains in the background, beside the teacher and the task-oriented rows.
agnostic() {
  local s=$1 D=$OUT/s$1
  step "$D/student_agnostic.pt" $PY distill_agnostic.py --vfm "$TEACHER" --vfm-weights "$VFM_WEIGHTS" \
    --img-size "$T_SIZE" --student "$D/student_scratch.pt" --transfer "$OUT/transfer_target.txt" \
    --train-seed "$s" --epochs "$D_EPOCHS" "${D_ARGS[@]}" --out "$D/student_agnostic.pt" --resume
  step "$D/student_agnostic_ft.pt" $PY finetune.py "${TASK[@]}" --train-seed "$s" "${F_ARGS[@]}" \
    --student "$D/student_agnostic.pt" --lr 1e-3 --out "$D/student_agnostic_ft.pt" --resume
}
AGNOSTIC_PID=""
if [[ $DATASET == demo ]]; then
  echo "== agnostic rows: in the background, log in $OUT/agnostic.log"
  (for s in $SEEDS; do agnostic "$s"; done) > "$OUT/agnostic.log" 2>&1 &
  AGNOSTIC_PID=$!
fi
step "$OUT/teacher.pt" $PY teacher.py "${TASK[@]}" --train-seed "$SEED" --model "$TEACHER" --img-size "$T_SIZE" \
  --weights "$VFM_WEIGHTS" "${T_ARGS[@]}" --out "$OUT/teacher.pt" --resume
if [[ -n $POOL && $RETRIEVAL == 1 ]]; then  # the pool's images nearest the labeled ones
  step "$OUT/transfer_retrieval.txt" $PY transfer_set.py "${TASK[@]}" --source retrieval --pool "$POOL" \
    "${R_ARGS[@]}" --cache-dir "$OUT/embeddings" --out "$OUT/transfer_retrieval.txt"
  SETS+=(retrieval)
fi

ROWS=("teacher=$OUT/teacher.pt")
for s in $SEEDS; do
  D=$OUT/s$s
  FT=("${TASK[@]}" --train-seed "$s" "${F_ARGS[@]}")
  for set in "${SETS[@]}"; do  # task-oriented transfer: match the finetuned teacher's predictions
    step "$D/student_kt_$set.pt" $PY distill.py --teacher "$OUT/teacher.pt" --student "$D/student_scratch.pt" \
      --transfer "$OUT/transfer_$set.txt" --train-seed "$s" --epochs "$(epochs_for "$set")" "${D_ARGS[@]}" \
      --out "$D/student_kt_$set.pt" --resume
    step "$D/student_kt_${set}_ft.pt" $PY finetune.py "${FT[@]}" --student "$D/student_kt_$set.pt" \
      --lr "$KT_LR" --out "$D/student_kt_${set}_ft.pt" --resume
    ROWS+=("kt_$set@$s=$D/student_kt_${set}_ft.pt")
  done
  if [[ -z $AGNOSTIC_PID ]]; then agnostic "$s"; fi  # on a GPU machine: one training at a time
done
if [[ -n $AGNOSTIC_PID ]] && ! wait "$AGNOSTIC_PID"; then
  tail -5 "$OUT/agnostic.log" >&2; exit 1
fi
for s in $SEEDS; do ROWS+=("agnostic@$s=$OUT/s$s/student_agnostic_ft.pt"); done

$PY evaluate.py --dataset "$DATASET" --data-root "${DATA_ROOT:-data}" "${E_ARGS[@]}" \
  --out "$OUT/results.json" "${ROWS[@]}" "${BASE_ROWS[@]}"

# The small model as it ships: reparameterised, exported (torch.export; ONNX when onnx is installed),
# checked against PyTorch on test images, and timed at batch 1 and 64.
FIRST=${SEEDS%% *}
step "$OUT/export/student_kt_target.pt2" $PY export.py --dataset "$DATASET" --data-root "${DATA_ROOT:-data}" \
  --student "$OUT/s$FIRST/student_kt_target_ft.pt" --out "$OUT/export/student_kt_target.pt2"
