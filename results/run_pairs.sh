#!/usr/bin/env bash
# Runs of train.py listed in a file, one "NAME FLAGS..." per line, two at a time with one thread each (both cores
# of the project's machine), from the repository root; logs in $OUT/NAME (default runs/pairs), then a summary of
# each run's k-NN and minutes. $BASE flags go before every line's (default: none); JOBS=1 runs one at a time (one
# thread, leaving the other core to something else).
#   OUT=runs/fmnist_tune BASE="--dataset fashion_mnist --data_path /usr/share/datasets/fashion-mnist" \
#     bash results/run_pairs.sh results/fmnist_cpu/round1.txt
set -u
LIST=$1
OUT=${OUT:-runs/pairs}
BASE=${BASE:-}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1
run() {
  local name=$1; shift
  python3 train.py $BASE --resume false --output_dir "$OUT/$name" "$@" > "$OUT/$name.out" 2>&1
}
mkdir -p "$OUT"
mapfile -t LINES < <(grep -v '^#' "$LIST" | grep -v '^$')
for ((i = 0; i < ${#LINES[@]}; i += JOBS)); do
  run ${LINES[i]} &
  if ((JOBS > 1 && i + 1 < ${#LINES[@]})); then run ${LINES[i + 1]} & fi
  wait
done
for line in "${LINES[@]}"; do
  name=${line%% *}
  python3 - "$OUT/$name/log.jsonl" "$name" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])][1:]
knn = [r["knn_top1"] for r in records if "knn_top1" in r]
print(sys.argv[2], "k-NN", knn, "minutes", round(records[-1].get("elapsed_s", 0) / 60, 1))
PY
done
