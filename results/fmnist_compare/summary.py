"""The BENCHMARKS table of the comparison runs: per run, k-NN by epoch, minutes, and the collapse monitors (README,
"Reading the diagnostics") as means over the last epoch's per-step records, and distinct_prototypes at the end;
then each method's mean over seeds.

    python results/fmnist_compare/summary.py results/fmnist_compare/logs/*.jsonl
"""
import json
import statistics
import sys

MONITORS = ("teacher_entropy", "teacher_image_entropy", "kl_teacher_student", "effective_prototypes", "se_cosine")

rows, finals = [], {}
for path in sys.argv[1:]:
    records = [json.loads(line) for line in open(path) if line.strip()]
    config = records[0]["config"]
    epochs = [r for r in records[1:] if r.get("kind") != "step" and "knn_top1" in r]
    steps = [r for r in records[1:] if r.get("kind") == "step"]
    last_epoch = [r for r in steps if r["epoch"] > config["epochs"] - 1]
    monitors = [f"{statistics.mean(r[m] for r in last_epoch):.3f}" if last_epoch and m in last_epoch[0] else "–"
                for m in MONITORS]
    name = path.rsplit("/", 1)[-1].removesuffix(".jsonl")
    knn = " / ".join(f"{r['knn_top1']:.2f}" for r in epochs)
    distinct = f"{epochs[-1]['distinct_prototypes']:.0f}" if "distinct_prototypes" in epochs[-1] else "–"
    rows.append(f"| {name} | {knn} | {epochs[-1]['elapsed_s'] / 60:.1f} | " + " | ".join(monitors) + f" | {distinct} |")
    finals.setdefault(config["method"], []).append(epochs[-1]["knn_top1"])
print("| run | k-NN by epoch (" + " / ".join(str(r["epoch"]) for r in epochs) + ") | minutes | "
      + " | ".join(MONITORS) + " | distinct_prototypes |")
print("| --- | --- | ---: |" + " ---: |" * (len(MONITORS) + 1))
print("\n".join(rows))
print()
for method, values in finals.items():
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    print(f"{method}: final k-NN {statistics.mean(values):.2f}{spread} over {len(values)} seeds ({values})")
