"""slurm_train.sh without SLURM: srun, scontrol and torchrun replaced by stubs on PATH. Argument handling, the
torchrun command it builds, and the requeue after a pre-empted run (exit 75, or the SIGTERM SLURM sends)."""
import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "slurm_train.sh")


def stubs(tmp_path, torchrun_body: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    scripts = {"srun": 'echo "srun $*" >> "$CALLS"; while [[ $1 == --* ]]; do shift; done; exec "$@"',
               "scontrol": 'echo "scontrol $*" >> "$CALLS"; [ "$1" = show ] && echo node-a && echo node-b; true',
               "torchrun": f'echo "torchrun $*" >> "$CALLS"; {torchrun_body}'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "SLURM_JOB_ID": "42",
            "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "node-[a-b]",
            "SLURM_SUBMIT_DIR": ROOT}


def calls(tmp_path) -> list[str]:
    return (tmp_path / "calls.txt").read_text().splitlines()


@pytest.mark.parametrize("status,requeued", [(0, False), (75, True), (1, False)])
def test_exit_75_requeues_and_other_statuses_pass_through(tmp_path, status, requeued):
    env = stubs(tmp_path, f"exit {status}")
    result = subprocess.run(["bash", SCRIPT, "--preset", "imagenet", "--output_dir", "/ckpt/a"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == (0 if requeued else status), result.stderr
    lines = calls(tmp_path)
    torchrun = next(line for line in lines if line.startswith("torchrun"))
    assert torchrun == ("torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node-a:29500 "
                        "--rdzv_id 42 train.py --preset imagenet --output_dir /ckpt/a")
    assert ("scontrol requeue 42" in lines) == requeued


def test_sigterm_before_the_time_limit_is_forwarded_and_the_job_requeued(tmp_path):
    # the workers' answer to SIGTERM: save, exit 75; torchrun reports it as 1
    env = stubs(tmp_path, "sleep 30 & trap 'kill $!; exit 1' TERM; wait")
    process = subprocess.Popen(["bash", SCRIPT, "--output_dir", "/ckpt/a"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for _ in range(100):  # until torchrun runs
        if (tmp_path / "calls.txt").exists() and any(c.startswith("torchrun") for c in calls(tmp_path)):
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "requeueing job 42" in out, err
    assert "scontrol requeue 42" in calls(tmp_path)


@pytest.mark.parametrize("args,message", [([], "usage: sbatch"), (["--preset", "imagenet"], "pass --output_dir")])
def test_bad_arguments_fail_in_one_line(tmp_path, args, message):
    result = subprocess.run(["bash", SCRIPT, *args], env=stubs(tmp_path, "exit 0"), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
