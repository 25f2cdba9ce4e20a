# The recipe probes behind the README's table: six `mixnet train` runs side by side on one GPU, on the
# data written by shrink_imagenette.py.   Usage: bash scripts/recipe_probes/run_probes.sh DATA_DIR [OUT_DIR]
# (the small-data recipe of the time had lr_base 0.01, RandAugment 2 ops m5 std 0.5, train 128 / eval 160:
# the "base" probe sets those explicitly, so the table stays reproducible after the recipe changed).
set -u
DATA=$1; OUT=${2:-/tmp/probe-runs}
common="--recipe small-data --data $DATA --epochs 30 --eval-every 5 --eval-crop-pct 1.0 --eval-size 160
  --device cuda --workers 2 --threads 1 --checkpoint-minutes 0 --no-progress --max-minutes 7.3"
old="--lr-base 0.01 --randaugment-ops 2 --randaugment-magnitude 5 --randaugment-std 0.5 --train-size 128"
declare -A P
P[base]="$old"
P[lr3]="$old --lr-base 0.03"
P[lr3_nora]="$old --lr-base 0.03 --randaugment-ops 0"
P[lr3_lightreg]="$old --lr-base 0.03 --drop-rate 0.1 --drop-path-rate 0 --weight-decay 0.01"
P[sgd]="$old --opt sgd --lr-base 0.4 --weight-decay 5e-5"
P[lr3_112]="$old --lr-base 0.03 --train-size 112"
pids=()
for name in "${!P[@]}"; do
  python3 -m mixnet train $common ${P[$name]} --output "$OUT/$name" > "$OUT.$name.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
for name in "${!P[@]}"; do echo "== $name"; cat "$OUT/$name/metrics.csv"; done
