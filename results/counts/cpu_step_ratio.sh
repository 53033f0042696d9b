#!/usr/bin/env bash
# CPU step time of this tree against an older one (default commit 6f0c386, before the issue's changes), alternating
# tree by tree for ROUNDS rounds with the same bench.py command, so the machine's drift hits both alike:
#   bash results/counts/cpu_step_ratio.sh [BEFORE_COMMIT] > results/counts/cpu_step_ratio.txt
set -euo pipefail
cd "$(dirname "$0")/../.."
BEFORE=${1:-6f0c386}
ROUNDS=${ROUNDS:-4}
git worktree remove --force /tmp/before_tree 2> /dev/null || true
git worktree add -f /tmp/before_tree "$BEFORE" > /dev/null
trap 'git worktree remove --force /tmp/before_tree' EXIT
FLAGS=(--configs cpu_demo --custom "t4_b32=--preset cifar --arch vit_tiny --batch_size_per_gpu 32 --dataset synthetic"
       --compile false --steps 8 --warmup 2 --device cpu)
echo "# ms per step (bench.py median of 8 after 2 warm-up), $BEFORE (before) and $(git rev-parse --short HEAD) (after),"
echo "# alternating, $ROUNDS rounds; $(nproc) cores, torch $(python3 -c 'import torch; print(torch.__version__)'), $(date -u '+%F %H:%M UTC')"
for ((r = 1; r <= ROUNDS; r++)); do
  for tree in before after; do
    dir=$([ $tree = before ] && echo /tmp/before_tree || pwd)
    (cd "$dir" && python3 bench.py "${FLAGS[@]}" --json /tmp/ratio_$tree.json > /dev/null 2>&1)
    python3 - "$tree" <<'PY'
import json, sys
for r in json.load(open(f"/tmp/ratio_{sys.argv[1]}.json")):
    print(sys.argv[1], r["config"], round(r["ms_per_step"], 1))
PY
  done
done | tee /tmp/ratio_rows.txt
python3 - <<'PY'
import collections, statistics
rows = collections.defaultdict(list)
for line in open("/tmp/ratio_rows.txt"):
    tree, config, ms = line.split()
    rows[tree, config].append(float(ms))
for config in sorted({c for _, c in rows}):
    before, after = rows["before", config], rows["after", config]
    ratios = [a / b for a, b in zip(after, before)]
    print(f"{config}: after/before per round {[round(x, 3) for x in ratios]}, median {statistics.median(ratios):.3f}")
PY
