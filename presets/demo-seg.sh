# The segmentation demo (sourced by run.sh): the demo's stand-ins and rows, segmenting 64px scenes of its shapes,
# 40 labeled scenes. The stand-in VFM is a CNN (its last map is 1/32): LR-ASPP on it, not a linear head.
source presets/demo.sh
source presets/segmentation.sh
SHOTS=${SHOTS:-40} T_SIZE=64 S_SIZE=64 D_EPOCHS=12
T_ARGS+=(--decoder lraspp --epochs 60 --batch-size 16 --lr 2e-3 --head-lr 5e-3 --layer-decay 0.9)
