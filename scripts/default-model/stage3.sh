#!/usr/bin/env bash
# Stage 3: 30 epochs at a quarter of the peak learning rate, training at 144 px and evaluating at 176,
# from stage 2's last-epoch EMA weights (a training checkpoint's EMA tensors are what --pretrained
# loads from last.pth); then packages the last-epoch EMA weights as the built-in model files.
# Run from the repository root after stage2.sh; resumes if interrupted.
set -euo pipefail
RUNS=${RUNS:-runs}
DATA=${DATA:-../shared/data/imagenette2-224}
RUN="$RUNS/imagenette-s-144-stage3"
if [ -f "$RUN/last.pth" ]; then
    mixnet train --resume "$RUN"
else
    mixnet train --recipe small-data --data "$DATA" --epochs 30 --lr-base 0.0075 --warmup-epochs 1 \
        --train-size 144 --eval-size 176 --eval-every 5 --output "$RUN" \
        --pretrained "$RUNS/imagenette-s-112-stage2/last.pth"
fi
python scripts/package_default_model.py "$RUN" --weights ema
