#!/usr/bin/env bash
# SOP vs iBOT vs DINO vs MaSSL vs CARP on the CPU at the cpu_demo budget (12 epochs, equal steps), k-NN at epoch 0
# and at the end only. One run at a time, niced. Commits only the logs: results/$NAME/<method>-seed<s>.
#   bash results/compare_cpu.sh               # 3 seeds x 5 methods, synthetic data
#   SEEDS="0" METHODS="sop ibot" bash results/compare_cpu.sh
#   NAME=cpu_demo_fashion_mnist_10k DATASET_FLAGS="--dataset fashion_mnist --data_path \
#     /usr/share/datasets/fashion-mnist --train_subset 10000" bash results/compare_cpu.sh
#   bash results/compare_cpu.sh summary       # mean +- std of the final k-NN top-1 over the finished runs
#   SEEDS=0 EXTRA="--max_steps 78 --knn_every 1" NAME=cpu_demo_synthetic_epoch1 bash results/compare_cpu.sh
#                                             # smoke test: the first epoch of the same runs
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"sop ibot dino massl carp"}
DATASET_FLAGS=${DATASET_FLAGS:-""}  # e.g. "--dataset fashion_mnist --data_path /usr/share/datasets/fashion-mnist
                                   #        --train_subset 10000" (the synthetic runs' 10000 images, 936 steps)
NAME=${NAME:-cpu_demo_synthetic}
EXTRA=${EXTRA:-""}  # more flags for every run
if [ "${1:-}" != "summary" ]; then
  for seed in $SEEDS; do
    for method in $METHODS; do
      run="$NAME/$method-seed$seed"
      [ -f "results/$run/log.jsonl" ] && continue  # finished before
      nice -n 10 python train.py --preset cpu_demo --method "$method" --seed "$seed" --knn_every 100 \
        $DATASET_FLAGS $EXTRA --output_dir "runs/compare/$run"
      mkdir -p "results/$run" && cp "runs/compare/$run/log.jsonl" "results/$run/log.jsonl"
    done
  done
fi
python - "$NAME" <<'PY'
import glob, json, statistics, sys
rows = {}
for path in sorted(glob.glob(f"results/{sys.argv[1]}/*/log.jsonl")):
    method = path.split("/")[-2].rsplit("-seed", 1)[0]
    records = [json.loads(line) for line in open(path)][1:]
    last = records[-1]
    if "knn_top1" in last:
        rows.setdefault(method, []).append((last["knn_top1"], records[0]["knn_top1"],
                                            statistics.mean(r["images_per_s"] for r in records if "images_per_s" in r),
                                            last["elapsed_s"], last["teacher_entropy"], last["teacher_cls_std"]))
print("| method | runs | k-NN top-1 at the end (%) | at epoch 0 | images/s | wall-clock (s) | teacher entropy | teacher [CLS] std |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for method, r in rows.items():
    def fmt(i, digits=1):
        values = [x[i] for x in r]
        spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{spread}"
    print(f"| {method} | {len(r)} | {fmt(0)} | {fmt(1)} | {fmt(2, 0)} | {fmt(3, 0)} | {fmt(4, 2)} | {fmt(5, 3)} |")
PY
