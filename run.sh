#!/usr/bin/env bash
# The paper's comparison, end to end: task-oriented knowledge transfer from a vision foundation model to a
# small model, against its baselines (Vemulapalli et al., ICML 2024, arXiv 2311.18237):
#
#   split.py ────────> teacher.py (finetune VFM) ─────────────┐
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
# Usage: bash run.sh [DATASET] [--shots N|P%] [--seed S] [--split-files DIR --budget NAME] [--seeds "0 1 2"]
#                    [--teacher MODEL] [--teacher-weights FILE] [--student MODEL] [--img-size N]
#                    [--init NAME=WEIGHTS ...] [--kt-init NAME] [--pool POOL] [--embed SPEC]
#                    [--embed-weights FILE] [--out DIR] [--force]
#   DATASET  demo (default: offline, generated images, a stand-in VFM pretrained on the CPU, about 5
#            minutes on 2 cores; it sets its own tiny models and schedules),
#            eurosat, flowers102, dtd, pets, food101, cifar10, cifar100, stl10, or folder:PATH;
#            segmentation (mIoU): demo-seg (offline, like demo), ade20k, or folder:PATH with masks.
#   --shots  labeled images per class (10), or a percentage of each class (1%); segmentation: images in
#            all (demo-seg: 40), or a percentage of them.
#   --seed   the label budget (which images are labeled) and the teacher's seed.
#   --split-files DIR --budget NAME
#            the paper's subsets instead (apple/ml-vfm-kt datasplits/<Task>/, e.g. --budget
#            train_10img_per_class): labeled, unlabeled, val and test images as the files name them.
#   --teacher-weights FILE   the VFM's weights from a local file (offline machines) instead of the hub.
#   --init NAME=WEIGHTS      one more baseline row (repeatable): the student from WEIGHTS, finetuned on the
#            labels. WEIGHTS: none, hub (the student's ImageNet weights), a local weights file for the
#            student, or another timm model with its pretrained tag (fastvit_mci0.apple_mclip: a CLIP-
#            pretrained FastViT). Rows scratch=none and imagenet=hub are always there (NAME=... replaces).
#   --kt-init NAME           the init the kt_* and agnostic rows start from (default scratch: the method
#            needs no pretraining of the student).
#   --embed SPEC --embed-weights FILE   the retrieval encoder (transfer_set.py --embed), from a local file.
#   --smoke  one short epoch per step, tiny batches: checks a setup end to end in minutes (the numbers
#            mean nothing) before the real run.
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
SHOTS="" SEED=0 SEEDS="" POOL="" OUT="" FORCE=0 IMG_SIZE="" RETRIEVAL=1 VFM_PID=""
TEACHER=vit_large_patch14_dinov2.lvd142m STUDENT=fastvit_t8 T_WEIGHTS="" KT_INIT=scratch INITS=()
SPLIT_FILES="" BUDGET="" EMBED="" EMBED_WEIGHTS="" SMOKE=0
while [[ $# -gt 0 ]]; do
  if [[ $1 == --* && $1 != --force && $1 != --smoke && $# -lt 2 ]]; then
    echo "run.sh: $1 needs a value (see the header of run.sh)" >&2; exit 2
  fi
  case $1 in
    --shots) SHOTS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --teacher) TEACHER=$2; shift 2 ;;
    --teacher-weights) T_WEIGHTS=$2; shift 2 ;;
    --init) INITS+=("$2"); shift 2 ;;
    --kt-init) KT_INIT=$2; shift 2 ;;
    --split-files) SPLIT_FILES=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --embed) EMBED=$2; shift 2 ;;
    --embed-weights) EMBED_WEIGHTS=$2; shift 2 ;;
    --student) STUDENT=$2; shift 2 ;;
    --img-size) IMG_SIZE=$2; shift 2 ;;
    --pool) POOL=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    *) echo "run.sh: unknown argument '$1' (see the header of run.sh)" >&2; exit 2 ;;
  esac
done
SEEDS=${SEEDS:-$SEED}
DENSE=0  # segmentation: the same steps, per pixel
[[ $DATASET == demo-seg || $DATASET == ade20k || ( $DATASET == folder:* && -d ${DATASET#folder:}/train/masks ) ]] && DENSE=1
[[ -z $SHOTS && $DATASET == demo-seg ]] && SHOTS=40
SHOTS=${SHOTS:-10}

PY=${PY:-python}
[[ -x .venv/bin/python && $PY == python ]] && PY=.venv/bin/python
NAME=${DATASET#folder:}; NAME=$(basename "$NAME")
OUT=${OUT:-runs/$NAME}
bad() { echo "run.sh: $*" >&2; exit 2; }
for n in $SEED $SEEDS; do
  [[ $n =~ ^[0-9]+$ ]] || bad "--seed and --seeds take whole numbers, not '$n'"
done
if [[ $SHOTS =~ ^[0-9]+(\.[0-9]+)?%$ ]]; then
  awk -v p="${SHOTS%\%}" 'BEGIN { exit !(p > 0 && p <= 100) }' || bad "--shots $SHOTS: a percentage above 0 and at most 100"
else
  [[ $SHOTS =~ ^[1-9][0-9]*$ ]] || bad "--shots takes a whole number of images per class (10) or a percentage (1%), not '$SHOTS'"
fi
if [[ -n $SPLIT_FILES ]]; then
  [[ -d $SPLIT_FILES ]] || bad "--split-files $SPLIT_FILES is not a folder"
  [[ -n $BUDGET ]] || bad "--split-files needs --budget NAME, one of: $(cd "$SPLIT_FILES" && ls train_*.txt 2>/dev/null | sed 's/\.txt$//' | tr '\n' ' ')"
fi
for f in "$T_WEIGHTS" "$EMBED_WEIGHTS"; do [[ -z $f || -f $f ]] || bad "no such weights file: $f"; done
# Baseline rows, NAME=WEIGHTS: scratch and imagenet always (a NAME given again replaces its WEIGHTS).
INIT_NAMES=(scratch imagenet) INIT_SPECS=(none hub)
for i in "${INITS[@]}"; do
  name=${i%%=*} spec=${i#*=}
  [[ $i == *=* && $name =~ ^[A-Za-z][A-Za-z0-9_]*$ && -n $spec ]] || bad "--init takes NAME=WEIGHTS, not '$i'"
  [[ $name == teacher || $name == agnostic || $name == kt_* ]] && bad "--init $name: that name is another row's"
  if [[ $spec != none && $spec != hub && ! -f $spec ]]; then
    [[ $spec =~ ^[a-z0-9_]+(\.[A-Za-z0-9_]+)?$ ]] || bad "--init $i: WEIGHTS is none, hub, a weights file or a timm model[.tag]"
  fi
  for k in "${!INIT_NAMES[@]}"; do [[ ${INIT_NAMES[$k]} == "$name" ]] && unset "INIT_NAMES[$k]" "INIT_SPECS[$k]"; done
  INIT_NAMES+=("$name") INIT_SPECS+=("$spec")
done
INIT_NAMES=("${INIT_NAMES[@]}") INIT_SPECS=("${INIT_SPECS[@]}")
[[ " ${INIT_NAMES[*]} " == *" $KT_INIT "* ]] || bad "--kt-init $KT_INIT: not one of the inits (${INIT_NAMES[*]})"
# One directory, one configuration: a finished step is skipped, so other settings would be answered
# with the old outputs. (--seeds may change: each seed has its own sSEED/ directory.)
CONFIG="dataset=$DATASET shots=$SHOTS seed=$SEED teacher=$TEACHER student=$STUDENT img_size=$IMG_SIZE pool=$POOL"
[[ $DATASET == demo* ]] && CONFIG="dataset=$DATASET shots=$SHOTS seed=$SEED pool=${POOL:-demo:unlabeled}"
for setting in "split_files=$SPLIT_FILES" "budget=$BUDGET" "teacher_weights=$T_WEIGHTS" "inits=${INITS[*]}" \
               "kt_init=${KT_INIT#scratch}" "embed=$EMBED" "embed_weights=$EMBED_WEIGHTS" "smoke=${SMOKE#0}"; do
  [[ -n ${setting#*=} ]] && CONFIG="$CONFIG $setting"  # only what is not the default
done
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
BUDGET_ARGS=(--shots "$SHOTS" --seed "$SEED")
[[ -n $SPLIT_FILES ]] && BUDGET_ARGS=(--split-files "$SPLIT_FILES" --budget "$BUDGET")
TASK=(--split "$OUT/split.json" --data-root "${DATA_ROOT:-data}")  # every step reads the task from split.json

# step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists (and --force was not given).
step() {
  local out=$1; shift
  if [[ -e $out && $FORCE == 0 ]]; then echo "== skip: $out exists"; return; fi
  echo "== $*"
  "$@"
}

if [[ $DATASET == demo* ]]; then
  # Offline and on the CPU: generated 32px images (demo.py), tiny timm models, short schedules. The VFM
  # is a stand-in that demo.py pretrains here on its broad pool (classes that are not the task's); the
  # 'imagenet' init likewise, with a fifth of the images and half the epochs (ImageNet is the smaller
  # dataset). Both are the student's tiny architecture: here the VFM's edge is its pretraining alone.
  # demo-seg: the same stand-ins, segmenting 64px scenes of the task's shapes.
  TEACHER=test_resnet STUDENT=test_resnet T_SIZE=32 S_SIZE=32 P_SIZE=32
  [[ $DATASET == demo-seg ]] && T_SIZE=64 S_SIZE=64
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny tensors: one thread per process is the fastest
  # The stand-in VFM pretrains on one core while the steps that do not need it run on the other.
  echo "== stand-in VFM: pretraining in the background, log in $OUT/standin_vfm.log"
  step "$OUT/standin_vfm.pth" $PY -m kt.demo --arch "$TEACHER" --img-size "$P_SIZE" --per-class 100 \
    --epochs 15 --out "$OUT/standin_vfm.pth" > "$OUT/standin_vfm.log" 2>&1 &
  VFM_PID=$!
  step "$OUT/standin_imagenet.pth" $PY -m kt.demo --arch "$STUDENT" --img-size "$P_SIZE" --per-class 20 \
    --epochs 8 --out "$OUT/standin_imagenet.pth"
  VFM_WEIGHTS=$OUT/standin_vfm.pth
  for k in "${!INIT_NAMES[@]}"; do  # imagenet=hub is the demo's stand-in ImageNet
    if [[ ${INIT_NAMES[$k]} == imagenet && ${INIT_SPECS[$k]} == hub ]]; then INIT_SPECS[$k]=$OUT/standin_imagenet.pth; fi
  done
  T_ARGS=(--epochs 30 --lr 1e-3 --head-lr 3e-3 --layer-decay 0.75 --workers 1)
  D_EPOCHS=15 D_ARGS=(--batch-size 64 --min-scale 0.25 --workers 1)  # 32px: tiny crops show no shape
  F_ARGS=(--epochs 20 --workers 1) KT_LR=2e-4
  R_ARGS=(--embed "teacher:$OUT/teacher.pt" --k 10 --workers 0)
  E_ARGS=(--workers 0)
  [[ -z $POOL ]] && POOL=demo:unlabeled RETRIEVAL=0  # the generic row; retrieval only on request
else
  T_SIZE=${IMG_SIZE:-224} S_SIZE=$IMG_SIZE
  VFM_WEIGHTS=${T_WEIGHTS:-hub}
  T_ARGS=() D_ARGS=() F_ARGS=() R_ARGS=() E_ARGS=() D_EPOCHS=20 KT_LR=1e-4
  [[ $DENSE == 1 ]] && T_SIZE=${IMG_SIZE:-448} S_SIZE=${IMG_SIZE:-448}  # masks need resolution
fi
RET_SOURCE=retrieval
if [[ $DENSE == 1 ]]; then  # segmentation: no label smoothing, as mmsegmentation's recipes
  T_ARGS+=(--smoothing 0) F_ARGS+=(--smoothing 0)
  if [[ $DATASET == demo-seg ]]; then  # the stand-in VFM is a CNN (its last map is 1/32): LR-ASPP, not linear
    T_ARGS+=(--decoder lraspp --epochs 60 --batch-size 16 --lr 2e-3 --head-lr 5e-3 --layer-decay 0.9) D_EPOCHS=12
  fi
  # the paper's ADE20K transfer sets: the labeled images plus an equal number retrieved for each, 153.6K in all
  [[ $DATASET == ade20k ]] && RET_SOURCE=labeled,retrieval R_ARGS+=(--total 153600)
fi
X_ARGS=()
if [[ $SMOKE == 1 ]]; then  # the whole path in minutes: one short epoch a step, tiny batches, no workers
  T_ARGS+=(--epochs 1 --batch-size 4 --workers 0) F_ARGS+=(--epochs 1 --batch-size 4 --workers 0)
  D_EPOCHS=1 D_ARGS+=(--batch-size 4 --workers 0) R_ARGS+=(--batch-size 8 --workers 0)
  E_ARGS+=(--workers 0 --speed-batch 2) X_ARGS=(--images 2 --repeats 1)
fi
S_SIZE_ARG=(); [[ -n $S_SIZE ]] && S_SIZE_ARG=(--img-size "$S_SIZE")
[[ -n $EMBED ]] && R_ARGS+=(--embed "$EMBED")
[[ -n $EMBED_WEIGHTS ]] && R_ARGS+=(--embed-weights "$EMBED_WEIGHTS")
# --seed picks the labeled images (split.py); --train-seed seeds initialisation and training, so that
# --seeds varies those and nothing else.
step "$OUT/split.json" $PY split.py --dataset "$DATASET" "${BUDGET_ARGS[@]}" --data-root "${DATA_ROOT:-data}" \
  --out "$OUT/split.json"
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

# Baselines first (they need no VFM): the student from each init (random, ImageNet, CLIP, DINO, ...
# weights), finetuned on the labels.
BASE_ROWS=()
for s in $SEEDS; do
  D=$OUT/s$s
  mkdir -p "$D"
  for k in "${!INIT_NAMES[@]}"; do
    init=${INIT_NAMES[$k]} model=$STUDENT weights=${INIT_SPECS[$k]}
    if [[ $weights != none && $weights != hub && ! -f $weights ]]; then  # another timm model.tag: its own arch
      model=$weights weights=hub
    fi
    step "$D/student_$init.pt" $PY student.py --split "$OUT/split.json" --train-seed "$s" \
      --model "$model" "${S_SIZE_ARG[@]}" --weights "$weights" --out "$D/student_$init.pt"
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
    --img-size "$T_SIZE" --student "$D/student_$KT_INIT.pt" --transfer "$OUT/transfer_target.txt" \
    --train-seed "$s" --epochs "$D_EPOCHS" "${D_ARGS[@]}" --out "$D/student_agnostic.pt" --resume
  step "$D/student_agnostic_ft.pt" $PY finetune.py "${TASK[@]}" --train-seed "$s" "${F_ARGS[@]}" \
    --student "$D/student_agnostic.pt" --lr 1e-3 --out "$D/student_agnostic_ft.pt" --resume
}
AGNOSTIC_PID=""
if [[ $DATASET == demo* ]]; then
  echo "== agnostic rows: in the background, log in $OUT/agnostic.log"
  (for s in $SEEDS; do agnostic "$s"; done) > "$OUT/agnostic.log" 2>&1 &
  AGNOSTIC_PID=$!
fi
step "$OUT/teacher.pt" $PY teacher.py "${TASK[@]}" --train-seed "$SEED" --model "$TEACHER" --img-size "$T_SIZE" \
  --weights "$VFM_WEIGHTS" "${T_ARGS[@]}" --out "$OUT/teacher.pt" --resume
if [[ -n $POOL && $RETRIEVAL == 1 ]]; then  # the pool's images nearest the labeled ones
  step "$OUT/transfer_retrieval.txt" $PY transfer_set.py "${TASK[@]}" --source "$RET_SOURCE" --pool "$POOL" \
    "${R_ARGS[@]}" --cache-dir "$OUT/embeddings" --out "$OUT/transfer_retrieval.txt"
  SETS+=(retrieval)
fi

ROWS=("teacher=$OUT/teacher.pt")
for s in $SEEDS; do
  D=$OUT/s$s
  FT=("${TASK[@]}" --train-seed "$s" "${F_ARGS[@]}")
  for set in "${SETS[@]}"; do  # task-oriented transfer: match the finetuned teacher's predictions
    step "$D/student_kt_$set.pt" $PY distill.py --teacher "$OUT/teacher.pt" --student "$D/student_$KT_INIT.pt" \
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

$PY evaluate.py "${TASK[@]}" "${E_ARGS[@]}" \
  --out "$OUT/results.json" "${ROWS[@]}" "${BASE_ROWS[@]}"

# The small model as it ships: reparameterised, exported (torch.export; ONNX when onnx is installed),
# checked against PyTorch on test images, and timed at batch 1 and 64.
FIRST=${SEEDS%% *}
step "$OUT/export/student_kt_target.pt2" $PY export.py "${TASK[@]}" \
  --student "$OUT/s$FIRST/student_kt_target_ft.pt" "${X_ARGS[@]}" --out "$OUT/export/student_kt_target.pt2"
