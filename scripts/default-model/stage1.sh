#!/usr/bin/env bash
# Stage 1 of the built-in mixnet_s.imagenette: 48 epochs from random weights (docs/default-model.md).
# Run from the repository root; run directories go under $RUNS (default: runs/). Run it again after an
# interruption and it resumes. The original run was started with --epochs 50 and shortened to 44, then
# 48, at epoch boundaries; this is the same stage without those changes of length.
set -euo pipefail
RUNS=${RUNS:-runs}
DATA=${DATA:-../shared/data/imagenette2-224}
RUN="$RUNS/imagenette-s-112"
if [ -f "$RUN/last.pth" ]; then exec mixnet train --resume "$RUN"; fi
exec mixnet train --recipe small-data --data "$DATA" --lr-base 0.03 --randaugment-ops 0 \
    --train-size 112 --eval-size 144 --epochs 48 --eval-every 10 --checkpoint-minutes 5 --output "$RUN"
