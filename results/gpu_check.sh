#!/usr/bin/env bash
# The first GPU session's measurements, in one call under 9 minutes; everything it prints and measures lands in
# OUTDIR as it goes, so a run cut at its limit still leaves what it had.
#   bash results/gpu_check.sh OUTDIR            # on the GPU machine (H100/H200, torch 2.11 there)
#   DRY=1 bash results/gpu_check.sh OUTDIR      # a dry run of every stage on a CPU (cpu_demo, SOP_TEST_DEVICE=cpu)
# Stages (each with its own time limit, so one stuck stage cannot eat the others):
#   1. tests/test_cuda.py (bf16/fp16 steps, fp32 probabilities, the neighbour search, compile without recompiles),
#      then the whole suite on this machine's torch;
#   2. bench.py eager and compiled for imagenet_vit_s16, cifar_vit_s4, cifar_vit_t4, with the timm peer ratio;
#   3. torch.profiler tables (top kernels, GPU-busy share) of the compiled ImageNet and CIFAR steps;
#   4. the neighbour search at the ImageNet draw, with and without the group-max prefilter (results/search_check.py).
set -uo pipefail
OUTDIR=${1:?usage: bash results/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
START=$(date +%s)
stage() {  # stage NAME SECONDS COMMAND...: run, tee to OUTDIR/NAME.txt, note its status and duration
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s, at +$((t0 - START))s): $*" | tee -a "$OUTDIR/summary.txt"
  timeout --signal=INT --kill-after=15 "$limit" "$@" > >(tee "$OUTDIR/$name.txt") 2>&1
  echo "   $name: exit $? after $(( $(date +%s) - t0 ))s" | tee -a "$OUTDIR/summary.txt"
}
if [ -n "${DRY:-}" ]; then
  export SOP_TEST_DEVICE=cpu
  CONFIGS=(cpu_demo); PROFILE=(cpu_demo); STEPS=(--steps 3 --warmup 1); PEER=(); REPEATS=1
else
  CONFIGS=(imagenet_vit_s16 cifar_vit_s4 cifar_vit_t4); PROFILE=(imagenet_vit_s16 cifar_vit_s4)
  STEPS=(--steps 10 --warmup 3); PEER=(--peer); REPEATS=10
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --oneline 2>/dev/null; } > "$OUTDIR/machine.txt" 2>&1
stage cuda_tests 120 python -m pytest -q -rs -s -p no:cacheprovider tests/test_cuda.py
stage suite 80 python -m pytest -q -x -rs -p no:cacheprovider tests --ignore tests/test_cuda.py
stage bench_eager 80 python bench.py --configs "${CONFIGS[@]}" --compile false "${STEPS[@]}" \
  --json "$OUTDIR/bench_eager.json"
stage bench_compiled 130 python bench.py --configs "${CONFIGS[@]}" --compile true "${STEPS[@]}" "${PEER[@]}" \
  --json "$OUTDIR/bench_compiled.json"
for config in "${PROFILE[@]}"; do
  stage "profile_$config" 45 python bench.py --configs "$config" --compile true --steps 3 --warmup 2 --profile
done
stage search 40 python results/search_check.py --time --repeats "$REPEATS"
echo "total $(( $(date +%s) - START ))s" | tee -a "$OUTDIR/summary.txt"
