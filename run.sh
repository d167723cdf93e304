#!/usr/bin/env bash
# The paper's comparison end to end (Vemulapalli et al., ICML 2024): task-oriented knowledge transfer from a
# vision foundation model to a small model, against its baselines, as one table (runs/NAME/results.md).
#
#   bash run.sh [DATASET] [flags]        DATASET: demo (default, offline, ~3-5 min on 2 CPU cores), demo-seg,
#                                        demo-clutter (harder, offline), eurosat, flowers102, ..., ade20k,
#                                        folder:PATH, hf:NAME   (flags: see settings())
#
# Every step is a script that reads and writes files in $OUT; a step whose output exists (and is newer than
# the files of $OUT it reads) is skipped, so a rerun resumes. Presets (presets/*.sh) set the demo's, the
# segmentation and the smoke-test models and schedules.
set -euo pipefail
cd "$(dirname "$0")"

pipeline() {
  [[ $DATASET == demo* ]] && standins                                    # the demo's stand-in VFM (presets/demo.sh)
  make_split                                                             # split.py: the label budget
  step "$OUT/transfer_target.txt" $PY transfer_set.py "${TASK[@]}" --source target --out "$OUT/transfer_target.txt"
  [[ -n $POOL && $POOL != emb:* ]] && SETS+=(generic) && step "$OUT/transfer_generic.txt" $PY transfer_set.py \
    "${TASK[@]}" --source generic --pool "$POOL" --out "$OUT/transfer_generic.txt"  # (a web pool has no pixels)
  for s in $SEEDS; do baselines "$s"; done                               # student.py + finetune.py, every --init
  wait_for standins
  if [[ $DATASET == demo* ]]; then                                       # 2 CPU cores: beside the teacher
    (for s in $SEEDS; do agnostic "$s"; done) > "$OUT/agnostic.log" 2>&1 & AGNOSTIC=$!
  fi
  step "$OUT/teacher.pt" $PY teacher.py "${TASK[@]}" --train-seed 0 --model "$TEACHER" --img-size "$T_SIZE" \
    --weights "$VFM_WEIGHTS" "${T_ARGS[@]}" --out "$OUT/teacher.pt" --resume  # finetune the VFM on the labels
  [[ -n $POOL && $RETRIEVAL == 1 ]] && SETS+=(retrieval) && step "$OUT/transfer_retrieval.txt" $PY transfer_set.py \
    "${TASK[@]}" --source "$RET_SOURCE" --pool "$POOL" "${R_ARGS[@]}" --cache-dir "$OUT/embeddings" \
    --out "$OUT/transfer_retrieval.txt"
  for s in $SEEDS; do
    for set in "${SETS[@]}"; do kt "$s" "$set"; done                     # distill.py + finetune.py
    [[ -z $AGNOSTIC ]] && agnostic "$s"                                   # distill_agnostic.py + finetune.py
  done
  wait_for agnostic
  mapfile -t ROWS < <(rows)
  $PY evaluate.py "${TASK[@]}" "${E_ARGS[@]}" --out "$OUT/results.json" "${ROWS[@]}"
  step "$OUT/export/student_kt_target" $PY export.py "${TASK[@]}" --student \
    "$OUT/s${SEEDS%% *}/student_kt_target_ft.pt" --results="$OUT/results.json" "${X_ARGS[@]}" \
    --out "$OUT/export/student_kt_target"  # (--results=: its table row for the model card; not redone for it)
}
rows() {  # the table's rows, NAME@SEED=CHECKPOINT: the teacher, task-oriented transfer, agnostic, the inits
  echo "teacher=$OUT/teacher.pt"
  for s in $SEEDS; do for set in "${SETS[@]}"; do  # distilled, then finetuned (on labels + the teacher's soft targets)
    echo "kt_${set}_distilled@$s=$OUT/s$s/student_kt_${set}.pt"; echo "kt_$set@$s=$OUT/s$s/student_kt_${set}_ft.pt"
  done; done
  for s in $SEEDS; do echo "agnostic@$s=$OUT/s$s/student_agnostic_ft.pt"; done
  for s in $SEEDS; do for init in "${INIT_NAMES[@]}"; do echo "$init@$s=$OUT/s$s/student_${init}_ft.pt"; done; done
}

# The rows: a student from each init, finetuned on the labels; task-oriented transfer (distilled from the
# finetuned teacher on a transfer set, then finetuned); task-agnostic (matching the frozen VFM's embedding on
# the target set, the same budget, then finetuned).
baselines() {  # every init's student first: a weight that cannot be had (offline) stops the run before training
  local s=$1 D=$OUT/s$1 k
  mkdir -p "$D"
  for k in "${!INIT_NAMES[@]}"; do
    local init=${INIT_NAMES[$k]} model=$STUDENT weights=${INIT_SPECS[$k]}
    if [[ $weights != none && $weights != hub && ! -f $weights ]]; then model=$weights weights=hub; fi  # a timm model.tag
    step "$D/student_$init.pt" $PY student.py --split "$OUT/split.json" --train-seed "$s" --model "$model" \
      "${S_SIZE_ARG[@]}" --weights "$weights" --out "$D/student_$init.pt"
  done
  for init in "${INIT_NAMES[@]}"; do finetuned "$s" "$D/student_$init.pt" 1e-3; done
}
kt() {  # the same budget for every transfer set: as many images as D_EPOCHS passes over the target set
  local s=$1 set=$2 D=$OUT/s$1 n target e
  n=$(wc -l < "$OUT/transfer_$set.txt") target=$(wc -l < "$OUT/transfer_target.txt")
  e=$(( n > 0 ? (D_EPOCHS * target + n / 2) / n : D_EPOCHS )); (( e > 0 )) || e=1
  step "$D/student_kt_$set.pt" $PY distill.py --teacher "$OUT/teacher.pt" --student "$D/student_$KT_INIT.pt" \
    --transfer "$OUT/transfer_$set.txt" --train-seed "$s" --epochs "$e" "${D_ARGS[@]}" --out "$D/student_kt_$set.pt" \
    --resume
  finetuned "$s" "$D/student_kt_$set.pt" "$KT_LR" "${KT_FT[@]}"
}
agnostic() {
  local s=$1 D=$OUT/s$1
  step "$D/student_agnostic.pt" $PY distill_agnostic.py --vfm "$TEACHER" --vfm-weights "$VFM_WEIGHTS" \
    --img-size "$T_SIZE" --student "$D/student_$KT_INIT.pt" --transfer "$OUT/transfer_target.txt" \
    --train-seed "$s" --epochs "$D_EPOCHS" "${D_ARGS[@]}" --out "$D/student_agnostic.pt" --resume
  finetuned "$s" "$D/student_agnostic.pt" 1e-3
}
finetuned() {  # finetuned SEED STUDENT LR [FLAGS...]: STUDENT_ft.pt
  step "${2%.pt}_ft.pt" $PY finetune.py "${TASK[@]}" --train-seed "$1" "${F_ARGS[@]}" --student "$2" --lr "$3" \
    "${@:4}" --out "${2%.pt}_ft.pt" --resume
}

# step OUTPUT COMMAND...: run COMMAND, unless OUTPUT exists and no file of $OUT that COMMAND reads is newer
# (an interrupted --force leaves a new split.json: everything made from the old one is made again).
step() {
  local out=$1 arg file; shift
  if [[ -e $out && $FORCE == 0 ]]; then
    for arg in "$@"; do
      file=${arg#teacher:}
      if [[ $file == "$OUT"/* && -f $file && $file -nt $out ]]; then echo "== redo: $file is newer than $out"; break; fi
      file=""
    done
    [[ -z $file ]] && { echo "== skip: $out exists"; return; }
  fi
  echo "== $*"
  "$@"
}
stop_jobs() {  # on any exit: the demo's background jobs stop with run.sh, and so do the steps they run
  local pid
  for pid in ${STANDINS:-} ${AGNOSTIC:-}; do
    kill -STOP "$pid" 2>/dev/null || continue  # frozen, it starts no next step while its children go
    pkill -TERM -P "$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null; kill -CONT "$pid" 2>/dev/null
  done
  return 0
}
wait_for() {  # wait_for NAME: the demo's background job NAME; the tail of its log if it failed
  local pid; [[ $1 == standins ]] && pid=$STANDINS || pid=$AGNOSTIC
  [[ -z $pid ]] || wait "$pid" || { tail -5 "$OUT/$1.log" >&2; exit 1; }
}
# split.py, once per directory; with --force into a new file first, so that a failure loses nothing.
make_split() {
  local target=$OUT/split.json
  [[ $FORCE == 1 ]] && target=$OUT/split.next.json && rm -f "$target"
  step "$target" $PY split.py --dataset "$DATASET" "${BUDGET_ARGS[@]}" --data-root "$DATA_ROOT" --out "$target"
  if [[ $FORCE == 1 ]]; then
    find "$OUT" -name '*.state' -delete  # redo: no step may resume a state of the earlier run
    mv "$target" "$OUT/split.json"
  fi
  echo "$CONFIG" > "$OUT/run.cfg"
  if grep -qs '"dense": true' "$OUT/split.json"; then source presets/segmentation.sh; fi  # folder:PATH with masks
}

# -------------------------------------------------------------------------------------------- settings
# bash run.sh [DATASET] [--shots N|P%] [--seed S] [--split-files DIR --budget NAME] [--seeds "0 1 2"]
#   [--teacher MODEL] [--teacher-weights FILE] [--student MODEL] [--img-size N] [--init NAME=WEIGHTS ...]
#   [--kt-init NAME] [--pool POOL] [--embed SPEC] [--embed-weights FILE] [--log NAME] [--out DIR] [--force] [--smoke]
# --shots, --seed, --split-files, --budget: split.py's label budget. --seeds: every student row once per seed
# (the teacher is trained once). --init NAME=WEIGHTS: one more baseline row, the student from none, hub, a file
# or a timm model.tag (scratch=none and imagenet=hub are always there); --kt-init: the init of the kt_* and
# agnostic rows. --pool: a generic pool (kt_generic, and kt_retrieval by --embed; emb:DIR: LAION's or DataComp's
# embeddings, the kept images downloaded by img2dataset, $IMG2DATASET); --transfer-names FILE: kt_retrieval is the
# paper's list of the pool's images (its yfcc_retrieved_images_*.txt) instead. --out: the run's directory,
# one configuration (run.cfg). --log: tensorboard, wandb and/or mlflow too. --force: redo every step. --smoke:
# one short epoch a step. Environment: PY, DATA_ROOT. The README explains each; the steps' --help their flags.
settings() {
  DATASET=demo
  if [[ $# -gt 0 && $1 != --* ]]; then DATASET=$1; shift; fi
  SHOTS="" SEED=0 SEEDS="" POOL="" OUT="" FORCE=0 SMOKE=0 IMG_SIZE="" SPLIT_FILES="" BUDGET="" EMBED="" EMBED_WEIGHTS="" LOG="" NAMES=""
  TEACHER=vit_large_patch14_dinov2.lvd142m STUDENT=fastvit_t8 T_WEIGHTS="" KT_INIT=scratch INITS=() GIVEN=()
  while [[ $# -gt 0 ]]; do
    case $1 in --force) FORCE=1; shift; continue ;; --smoke) SMOKE=1; shift; continue ;; esac
    [[ $# -ge 2 ]] || bad "$1 needs a value"
    GIVEN+=("$1")
    case $1 in
      --shots) SHOTS=$2 ;; --seed) SEED=$2 ;; --seeds) SEEDS=$2 ;; --split-files) SPLIT_FILES=$2 ;;
      --budget) BUDGET=$2 ;; --teacher) TEACHER=$2 ;; --teacher-weights) T_WEIGHTS=$2 ;; --student) STUDENT=$2 ;;
      --img-size) IMG_SIZE=$2 ;; --init) INITS+=("$2") ;; --kt-init) KT_INIT=$2 ;; --pool) POOL=$2 ;;
      --embed) EMBED=$2 ;; --embed-weights) EMBED_WEIGHTS=$2 ;; --out) OUT=$2 ;; --log) LOG=$2 ;;
      --transfer-names) NAMES=$2 ;;
      *) bad "unknown argument '$1'" ;;
    esac
    shift 2
  done
  SEEDS=${SEEDS:-$SEED} PY=${PY:-python} DATA_ROOT=${DATA_ROOT:-data}
  [[ -x .venv/bin/python && $PY == python ]] && PY=.venv/bin/python
  check_inputs
  NAME=${DATASET#folder:}
  if [[ $NAME == hf:* ]]; then NAME=${NAME#hf:} && NAME=${NAME%%:*}; fi  # hf:OWNER/NAME:CONFIG -> runs/NAME
  OUT=${OUT:-runs/$(basename "$NAME")}
  for f in "$T_WEIGHTS" "$EMBED_WEIGHTS"; do [[ -z $f || -f $f ]] || bad "no such weights file: $f"; done
  inits
  # A real task's models and schedules; the presets change them for the demo, segmentation and --smoke.
  T_SIZE=${IMG_SIZE:-224} S_SIZE=$IMG_SIZE VFM_WEIGHTS=${T_WEIGHTS:-hub} D_EPOCHS=20 KT_LR=1e-4
  T_ARGS=() D_ARGS=() F_ARGS=() R_ARGS=() E_ARGS=() X_ARGS=() RET_SOURCE=retrieval RETRIEVAL=1
  SETS=(target) STANDINS="" AGNOSTIC="" KT_FT=(--teacher "$OUT/teacher.pt")  # keep the teacher in the kt finetune
  case $DATASET in demo|demo-seg|demo-clutter|ade20k) source "presets/$DATASET.sh" ;; esac
  SHOTS=${SHOTS:-10}
  one_configuration
  [[ $SMOKE == 1 ]] && source presets/smoke.sh
  if [[ -n $LOG ]]; then  # the curves in TensorBoard (--logdir $OUT), W&B, MLflow (one database for the run)
    T_ARGS+=(--log "$LOG") D_ARGS+=(--log "$LOG") F_ARGS+=(--log "$LOG")
    export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$(cd "$OUT" && pwd)/mlflow.db}
  fi
  [[ -n $NAMES ]] && RET_SOURCE=${RET_SOURCE/retrieval/named} R_ARGS+=(--names "$NAMES")  # the paper's own set
  [[ $POOL == emb:* ]] && R_ARGS+=(--download "$OUT/web_images" ${IMG2DATASET:+--img2dataset "$IMG2DATASET"})
  [[ -n $EMBED ]] && R_ARGS+=(--embed "$EMBED")
  [[ -n $EMBED_WEIGHTS ]] && R_ARGS+=(--embed-weights "$EMBED_WEIGHTS")
  S_SIZE_ARG=(); [[ -n $S_SIZE ]] && S_SIZE_ARG=(--img-size "$S_SIZE")
  BUDGET_ARGS=(--shots "$SHOTS" --seed "$SEED")
  [[ -n $SPLIT_FILES ]] && BUDGET_ARGS=(--split-files "$SPLIT_FILES" --budget "$BUDGET")
  TASK=(--split "$OUT/split.json" --data-root "$DATA_ROOT")  # every step reads the task from split.json
}
inits() {  # the baseline rows NAME=WEIGHTS: scratch and imagenet always (a NAME given again replaces its WEIGHTS)
  INIT_NAMES=(scratch imagenet) INIT_SPECS=(none hub)
  local i name spec k
  for i in "${INITS[@]}"; do
    name=${i%%=*} spec=${i#*=}
    [[ $i == *=* && $name =~ ^[A-Za-z][A-Za-z0-9_]*$ && -n $spec ]] || bad "--init takes NAME=WEIGHTS, not '$i'"
    [[ $name == teacher || $name == agnostic || $name == kt_* ]] && bad "--init $name: that name is another row's"
    [[ $spec == none || $spec == hub || -f $spec || $spec =~ ^[a-z0-9_]+(\.[A-Za-z0-9_]+)?$ ]] ||
      bad "--init $i: WEIGHTS is none, hub, a weights file or a timm model[.tag]"
    for k in "${!INIT_NAMES[@]}"; do [[ ${INIT_NAMES[$k]} == "$name" ]] && unset "INIT_NAMES[$k]" "INIT_SPECS[$k]"; done
    INIT_NAMES+=("$name") INIT_SPECS+=("$spec")
  done
  INIT_NAMES=("${INIT_NAMES[@]}") INIT_SPECS=("${INIT_SPECS[@]}")
  [[ " ${INIT_NAMES[*]} " == *" $KT_INIT "* ]] || bad "--kt-init $KT_INIT: not one of the inits (${INIT_NAMES[*]})"
}
# One directory, one configuration: a finished step is skipped, so other settings would be answered with the old
# outputs. (--seeds may change: each seed has its own sSEED/ directory.)
one_configuration() {
  CONFIG="dataset=$DATASET shots=$SHOTS seed=$SEED teacher=$TEACHER student=$STUDENT img_size=$IMG_SIZE pool=$POOL"
  [[ $DATASET == demo* ]] && CONFIG="dataset=$DATASET shots=$SHOTS seed=$SEED pool=$POOL"
  local setting have
  for setting in "split_files=$SPLIT_FILES" "budget=$BUDGET" "teacher_weights=$T_WEIGHTS" "inits=${INITS[*]}" \
                 "kt_init=${KT_INIT#scratch}" "embed=$EMBED" "embed_weights=$EMBED_WEIGHTS" "smoke=${SMOKE#0}" \
                 "names=$NAMES"; do
    [[ -n ${setting#*=} ]] && CONFIG="$CONFIG $setting"  # only what is not the default
  done
  have=$(cat "$OUT/run.cfg" 2>/dev/null || true)
  if [[ -n $have && $have != "$CONFIG" && $FORCE == 0 ]]; then
    echo "run.sh: $OUT holds a run of: $have" >&2
    bad "this one asks for:    $CONFIG; use --out DIR for it, or --force to redo $OUT"
  fi
  mkdir -p "$OUT"
}
# Bad input is one line before any work: flags the demo fixes, a list of names without its pool, a pool that
# is not there (a web pool's layout is checked by kt.web_pools, reading headers only).
check_inputs() {
  local flag
  if [[ $DATASET == demo* ]]; then
    for flag in --teacher --teacher-weights --student --img-size; do
      [[ " ${GIVEN[*]} " == *" $flag "* ]] && bad "$DATASET: $flag is fixed by the demo (its stand-in models at 32px, " \
        "presets/demo.sh); give a real dataset or folder:PATH for other models"
    done
  fi
  [[ -z $NAMES || -n $POOL ]] || bad "--transfer-names needs --pool, the local copy of the pool it names"
  [[ -z $NAMES || -f $NAMES ]] || bad "no such file: --transfer-names $NAMES"
  if [[ $POOL == emb:* ]]; then
    $PY -c 'import sys; from kt.web_pools import EmbeddingPool; EmbeddingPool(sys.argv[1])' "$POOL" || exit 2
  elif [[ -n $POOL && $POOL != *:* && $POOL != *[*?[]* && ! -e $POOL ]]; then
    bad "no such pool: --pool $POOL"
  fi
}
bad() { echo "run.sh: $*" >&2; exit 2; }

trap stop_jobs EXIT
settings "$@"
pipeline
