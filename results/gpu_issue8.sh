#!/usr/bin/env bash
# GPU checks (the test suite with the CUDA tests; bench.py eager and compiled) on one H100/H200, in two calls of
# under 10 minutes each; every file lands in $OUT (default results/gpu).
#   bash results/gpu_issue8.sh tests      # the whole suite on the GPU machine, then tests/test_cuda.py with its prints
#   bash results/gpu_issue8.sh bench      # bench.py, three configurations eager, then compiled with the timm peer and
#                                         # a torch.profiler table of each compiled step (JSON + text); run it alone
#   CONFIG=cifar_vit_s4 bash results/gpu_issue8.sh profile   # one compiled configuration again, after a fix
# These checks share a session's device budget (30 minutes) with the tuning runs of gpu_runs.sh. The test stage needs
# no clean timing, so it can share its call with a tuning round:
#   bash results/gpu_runs.sh results/issue9_tune.txt & bash results/gpu_issue8.sh tests; wait
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
    python bench.py --compile true --peer --profile --json "$OUT/bench_compiled.json" 2>&1 \
      | tee "$OUT/bench_compiled.txt" ;;
  profile)
    python bench.py --configs "${CONFIG:-imagenet_vit_s16}" --compile true --steps 10 --profile 2>&1 \
      | tee "$OUT/profile_${CONFIG:-imagenet_vit_s16}.txt" ;;
  *) echo "usage: bash results/gpu_issue8.sh tests|bench|profile" >&2; exit 2 ;;
esac
