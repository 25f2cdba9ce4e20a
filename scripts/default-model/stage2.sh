#!/usr/bin/env bash
# Stage 2: a second cosine cycle of 56 epochs at half the peak learning rate, from stage 1's final
# weights (docs/default-model.md). Run from the repository root after stage1.sh; resumes if interrupted.
set -euo pipefail
RUNS=${RUNS:-runs}
DATA=${DATA:-../shared/data/imagenette2-224}
RUN="$RUNS/imagenette-s-112-stage2"
if [ -f "$RUN/last.pth" ]; then exec mixnet train --resume "$RUN"; fi
exec mixnet train --recipe small-data --data "$DATA" --epochs 56 --lr-base 0.015 --warmup-epochs 1 \
    --eval-every 4 --output "$RUN" --pretrained "$RUNS/imagenette-s-112/final/model.safetensors"
