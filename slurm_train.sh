#!/usr/bin/env bash
# train.py on SLURM: N nodes x G GPUs under torchrun, requeued by itself when pre-empted or out of time, so a long
# pre-training continues job after job from output_dir/checkpoint.pth (README, "GPU and cluster recipes").
#   sbatch --nodes 4 --gpus-per-node 8 slurm_train.sh --preset imagenet --data_path /data/imagenet --output_dir /ckpt/a
# SLURM sends SIGTERM to this script 5 minutes before the time limit (--signal=B:TERM@300) or on pre-emption; it is
# forwarded to torchrun's workers, which finish their step, write the checkpoint and exit 75 (checkpoint.py,
# PREEMPTED_EXIT_CODE); the job is then requeued (scontrol requeue) and the next one resumes where this one stopped.
#SBATCH --job-name=sop
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
if [ $# -eq 0 ]; then
  echo "usage: sbatch [--nodes N] [--gpus-per-node G] slurm_train.sh TRAIN_PY_FLAGS... (with --output_dir)" >&2
  exit 2
fi
case " $* " in
  *" --output_dir "*) ;;
  *) echo "error: pass --output_dir: a requeued job resumes from output_dir/checkpoint.pth" >&2; exit 2 ;;
esac
: "${SLURM_JOB_ID:?error: run this script with sbatch (SLURM_JOB_ID is not set)}"
GPUS=${SLURM_GPUS_ON_NODE:-8}
MASTER=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
srun --kill-on-bad-exit=1 torchrun --nnodes "${SLURM_NNODES:-1}" --nproc_per_node "$GPUS" --rdzv_backend c10d \
  --rdzv_endpoint "$MASTER:${MASTER_PORT:-29500}" --rdzv_id "$SLURM_JOB_ID" train.py "$@" &
RUN=$!
PREEMPTED=0
trap 'PREEMPTED=1; kill -TERM "$RUN" 2>/dev/null' TERM  # srun passes it on to torchrun, torchrun to the workers
wait "$RUN"; STATUS=$?
while kill -0 "$RUN" 2>/dev/null; do
  wait "$RUN"; STATUS=$?  # a trapped signal ends wait early: wait again until the workers have saved
done
# torchrun reports a worker's 75 as its own failure (1), so the signal this script received counts too.
if [ "$STATUS" -eq 75 ] || { [ "$PREEMPTED" -eq 1 ] && [ "$STATUS" -ne 0 ]; }; then
  echo "pre-empted or out of time (status $STATUS): requeueing job $SLURM_JOB_ID to resume from the checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$STATUS"
