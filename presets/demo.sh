# The offline demo (sourced by run.sh): generated 32px images (kt/demo.py), tiny timm models, short schedules,
# on the CPU. The VFM is a stand-in that kt/demo.py pretrains here on its broad pool (classes that are not
# the task's); the 'imagenet' init likewise, with a fifth of the images and half the epochs (ImageNet is
# the smaller dataset). Both are the student's tiny architecture: here the VFM's edge is its pretraining alone.
TEACHER=test_resnet STUDENT=test_resnet T_SIZE=32 S_SIZE=32 VFM_WEIGHTS=$OUT/standin_vfm.pth
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny tensors: one thread per process is the fastest
T_ARGS=(--epochs 30 --lr 1e-3 --head-lr 3e-3 --layer-decay 0.75 --workers 1)
D_EPOCHS=15 D_ARGS=(--batch-size 64 --min-scale 0.25 --workers 1)  # 32px: tiny crops show no shape
F_ARGS=(--epochs 20 --min-scale 0.25 --workers 1) KT_LR=2e-4  # the same crops (docs/last_step.md)
R_ARGS=(--embed "teacher:$OUT/teacher.pt" --k 10 --workers 0)
E_ARGS=(--workers 0)
[[ -z $POOL ]] && POOL=demo:unlabeled RETRIEVAL=0  # the generic row; retrieval only on request (--pool)
for k in "${!INIT_NAMES[@]}"; do  # imagenet=hub is the demo's stand-in ImageNet
  [[ ${INIT_NAMES[$k]} == imagenet && ${INIT_SPECS[$k]} == hub ]] && INIT_SPECS[$k]=$OUT/standin_imagenet.pth
done

standins() {  # the stand-in VFM pretrains on one core while the steps that do not need it run on the other
  echo "== stand-in VFM: pretraining in the background, log in $OUT/standins.log"
  step "$OUT/standin_vfm.pth" $PY -m kt.demo --arch "$TEACHER" --img-size 32 --per-class 100 --epochs 15 \
    --out "$OUT/standin_vfm.pth" > "$OUT/standins.log" 2>&1 &
  STANDINS=$!
  step "$OUT/standin_imagenet.pth" $PY -m kt.demo --arch "$STUDENT" --img-size 32 --per-class 20 --epochs 8 \
    --out "$OUT/standin_imagenet.pth"
}
