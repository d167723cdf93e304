# The harder offline task (sourced by run.sh): kt/clutter.py's 20 classes of shapes, patterns and glyphs on
# cluttered backgrounds, a ResNet-18 student at 32px (BatchNorm), and a ResNet-18 stand-in VFM pretrained on the
# demo's broad classes (none a task class) drawn on the same clutter; otherwise the demo's schedules. It is where
# bench/last_step.py measures what the demo cannot (docs/last_step.md).
GIVEN_POOL=$POOL
source presets/demo.sh
TEACHER=resnet18 STUDENT=resnet18
[[ -z $GIVEN_POOL ]] && POOL=demo-clutter:unlabeled  # its generic pool: the broad kinds and clutter

standins() {  # as the demo's (presets/demo.sh), from kt/clutter.py's pools; the VFM pretrains for ~3 minutes
  echo "== stand-in VFM: pretraining in the background, log in $OUT/standins.log"
  step "$OUT/standin_vfm.pth" $PY -m kt.clutter --arch "$TEACHER" --per-class 100 --epochs 30 \
    --out "$OUT/standin_vfm.pth" > "$OUT/standins.log" 2>&1 &
  STANDINS=$!
  step "$OUT/standin_imagenet.pth" $PY -m kt.clutter --arch "$STUDENT" --per-class 20 --epochs 15 \
    --out "$OUT/standin_imagenet.pth"
}
