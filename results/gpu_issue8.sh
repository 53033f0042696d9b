#!/usr/bin/env bash
# Issue 8 on one H100/H200, in three calls of under 10 minutes each; every file lands in $OUT (default results/gpu).
#   bash results/gpu_issue8.sh tests      # the whole suite on the GPU machine, then tests/test_cuda.py with its prints
#   bash results/gpu_issue8.sh bench      # bench.py, three configurations eager and compiled, + the timm peer (JSON)
#   bash results/gpu_issue8.sh profile    # torch.profiler tables of the compiled ViT-S/16 and ViT-S/4 steps
# Everything here runs on the CPU too (slowly, and bench/profile without MFU): try a stage there before a GPU session.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
 python -c "import torch; print(torch.__version__)") > "$OUT/machine.txt" 2>&1
case "${1:-}" in
  tests)
    python -m pytest -q -rs -p no:cacheprovider tests --ignore tests/test_cuda.py 2>&1 | tee "$OUT/pytest_suite.txt"
    python -m pytest -q -rs -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.txt" ;;
  bench)
    python bench.py --compile false --json "$OUT/bench_eager.json" 2>&1 | tee "$OUT/bench_eager.txt"
    python bench.py --compile true --peer --json "$OUT/bench_compiled.json" 2>&1 | tee "$OUT/bench_compiled.txt" ;;
  profile)
    for config in imagenet_vit_s16 cifar_vit_s4; do
      python bench.py --configs "$config" --compile true --steps 10 --profile 2>&1 | tee "$OUT/profile_$config.txt"
    done ;;
  *) echo "usage: bash results/gpu_issue8.sh tests|bench|profile" >&2; exit 2 ;;
esac
