# ADE20K (sourced by run.sh): the paper's transfer sets, the labeled images plus an equal number retrieved for
# each, 153.6K in all (1,200 queries x 128).
source presets/segmentation.sh
RET_SOURCE=labeled,retrieval R_ARGS+=(--total 153600)
