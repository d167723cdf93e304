# Any segmentation task (sourced by run.sh once its split.json says dense, and by the ade20k and demo-seg
# presets): masks need resolution, and no label smoothing (mmsegmentation's recipes).
if [[ -z ${SEGMENTATION:-} ]]; then
  SEGMENTATION=1
  [[ $DATASET != demo* ]] && T_SIZE=${IMG_SIZE:-448} S_SIZE=${IMG_SIZE:-448} && S_SIZE_ARG=(--img-size "$S_SIZE")
  T_ARGS+=(--smoothing 0) F_ARGS+=(--smoothing 0)
  KT_FT=()  # the finetune of a segmenter: its masks alone
fi
