#!/usr/bin/env bash
# Several train.py runs side by side on one GPU (hyper-parameter tuning), then a table of k-NN against minutes.
#   bash results/gpu_runs.sh results/fmnist_gpu_tune.txt          # every line "NAME FLAGS..." of the file, in parallel
#   ONLY=final bash results/gpu_runs.sh results/fmnist_gpu_tune.txt   # the lines named final* alone (clean timing)
#   MINUTES=5 bash results/gpu_runs.sh FILE                   # deadline (default 9): then SIGTERM, which train.py
#                                                             # answers by saving and stopping; the logs are kept
# Each run writes runs/gpu/NAME; its log is copied to $OUT/NAME.jsonl (default OUT=results/gpu) every 30 s and at the
# end, so a call cut short by the device's 10-minute limit still returns them; the table goes to $OUT/summary.txt.
# Fashion-MNIST is read from data/fashion-mnist, git-ignored: fill it once per checkout with
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
# and name it in the device tool's carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
MINUTES=${MINUTES:-9}
mkdir -p "$OUT" runs/gpu
export PYTHONUNBUFFERED=1
names=()
base=""  # lines "base FLAGS..." give flags that every later line starts with
while read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  [[ "$name" == base ]] && { base="$base $flags"; continue; }
  [[ -n "${ONLY:-}" && "$name" != ${ONLY}* ]] && continue
  [[ -z "${ONLY:-}" && "$name" == final* ]] && continue
  names+=("$name")
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=60 "${MINUTES}m" \
    python train.py $base $flags --output_dir "runs/gpu/$name" --resume false > "runs/gpu/$name.out" 2>&1 &
done < "$1"
[ ${#names[@]} -gt 0 ] || { echo "no runs in $1${ONLY:+ named $ONLY*}" >&2; exit 2; }
copy_logs() {
  for name in "${names[@]}"; do
    cp "runs/gpu/$name/log.jsonl" "$OUT/$name.jsonl" 2>/dev/null
  done
}
(while sleep 30; do copy_logs; done) &
copier=$!
wait $(jobs -p | grep -vx "$copier")
kill "$copier" 2>/dev/null
copy_logs
for name in "${names[@]}"; do
  [ -f "$OUT/$name.jsonl" ] || { echo "$name: no log; its output ends:"; tail -n 3 "runs/gpu/$name.out"; }
done
python - "$OUT" "${names[@]}" <<'PY' | tee "$OUT/summary.txt"
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print(f"{'run':<28}{'best k-NN':>10}{'at min':>8}{'last':>8}{'epochs':>8}{'minutes':>9}{'img/s':>8}")
for name in names:
    try:
        records = [json.loads(line) for line in open(f"{out}/{name}.jsonl")][1:]
    except OSError:
        print(f"{name:<28} no log"); continue
    knn = [(r["knn_top1"], r["elapsed_s"] / 60) for r in records if "knn_top1" in r]
    speed = [r["images_per_s"] for r in records if "images_per_s" in r]
    best = max(knn) if knn else (float("nan"), float("nan"))
    timed = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    cut = " (deadline)" if records and records[-1].get("stopped_by_signal") else ""
    print(f"{name:<28}{best[0]:>10.2f}{best[1]:>8.1f}{knn[-1][0] if knn else float('nan'):>8.2f}"
          f"{records[-1]['epoch'] if records else 0:>8.1f}{(timed[-1] if timed else 0) / 60:>9.1f}"
          f"{(sum(speed) / len(speed) if speed else 0):>8.0f}{cut}")
PY
