# --smoke (sourced by run.sh): the whole path in minutes, one short epoch a step, tiny batches, no workers; it
# checks a setup end to end before the real run (the numbers mean nothing).
T_ARGS+=(--epochs 1 --batch-size 4 --workers 0) F_ARGS+=(--epochs 1 --batch-size 4 --workers 0)
D_EPOCHS=1 D_ARGS+=(--batch-size 4 --workers 0) R_ARGS+=(--batch-size 8 --workers 0)
E_ARGS+=(--workers 0 --speed-batch 2) X_ARGS=(--images 2 --repeats 1)
