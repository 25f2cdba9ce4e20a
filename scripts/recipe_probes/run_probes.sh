# The GPU probes behind the README's tables: `mixnet train` runs side by side on one GPU, on the data
# written by shrink_imagenette.py.
#   Usage: bash scripts/recipe_probes/run_probes.sh DATA_DIR [OUT_DIR]
#          [recipe | stage2 PREV_DIR | stage3 PREV_DIR]
# recipe: six 30-epoch variants from random weights. The small-data recipe of the time had lr_base 0.01,
#   RandAugment 2 ops m5 std 0.5, train 128 / eval 160: the probes set those explicitly, so the table stays
#   reproducible after the recipe changed.
# stage2: the stage-1 default model's score on the val subset, then four 44-epoch second cycles from it.
# stage3: the stage-2 default model's score at 144 and 160 px, then four 30-epoch third cycles from it at
#   112-144 px, one with mixup/cutmix.
#   PREV_DIR: the model shipped before that stage as a hub folder (COMMIT b5d7e41 for stage2, cc6f131 for
#   stage3), made by
#   git show COMMIT:src/mixnet/weights/mixnet_s.imagenette.safetensors > PREV_DIR/model.safetensors
#   git show COMMIT:src/mixnet/weights/mixnet_s.imagenette.json > PREV_DIR/config.json
set -u
DATA=$1; OUT=${2:-/tmp/probe-runs}; SET=${3:-recipe}
common="--recipe small-data --data $DATA --eval-crop-pct 1.0 --device cuda --threads 1 --checkpoint-minutes 0
  --no-progress"
declare -A P
if [ "$SET" = recipe ]; then
  common="$common --epochs 30 --eval-every 5 --eval-size 160 --workers 2 --max-minutes 7.3"
  old="--lr-base 0.01 --randaugment-ops 2 --randaugment-magnitude 5 --randaugment-std 0.5 --train-size 128"
  P[base]="$old"
  P[lr3]="$old --lr-base 0.03"
  P[lr3_nora]="$old --lr-base 0.03 --randaugment-ops 0"
  P[lr3_lightreg]="$old --lr-base 0.03 --drop-rate 0.1 --drop-path-rate 0 --weight-decay 0.01"
  P[sgd]="$old --opt sgd --lr-base 0.4 --weight-decay 5e-5"
  P[lr3_112]="$old --lr-base 0.03 --train-size 112"
else
  # the probes evaluate at crop 1.0 (val is pre-cropped to 160 px): score the previous stage the same way
  python3 -c "import sys, mixnet
for size in map(int, sys.argv[3:]):
    m = mixnet.load_model(sys.argv[1])
    m.pretrained_cfg.update(crop_pct=1.0, input_size=(3, size, size))
    report = mixnet.validate(m, sys.argv[2], workers=2, progress=False)
    print('previous stage at', size, 'px:', report.summary())
" "$4" "$DATA/val" 144 $([ "$SET" = stage3 ] && echo 160)
  common="$common --workers 3 --warmup-epochs 1 --pretrained $4"
  if [ "$SET" = stage2 ]; then
    common="$common --epochs 44 --eval-every 4 --max-minutes 8"
    P[lr15]="--lr-base 0.015"
    P[lr15_mix]="--lr-base 0.015 --mixup 0.2 --cutmix 1.0 --mix-prob 0.5"
    P[lr30]="--lr-base 0.03"
    P[lr075]="--lr-base 0.0075"
  else
    common="$common --epochs 30 --eval-every 5 --max-minutes 7.5 --lr-base 0.0075"
    P[s3_112]="--train-size 112 --eval-size 144"
    P[s3_112_mix]="--train-size 112 --eval-size 144 --mixup 0.2 --cutmix 1.0 --mix-prob 0.5"
    P[s3_128]="--train-size 128 --eval-size 160"
    P[s3_144]="--train-size 144 --eval-size 160"
  fi
fi
pids=()
for name in "${!P[@]}"; do
  python3 -m mixnet train $common ${P[$name]} --output "$OUT/$name" > "$OUT.$name.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
for name in "${!P[@]}"; do echo "== $name"; cat "$OUT/$name/metrics.csv"; done
