import os
import subprocess
import sys

import pytest

# A training configuration small enough for a CPU test: 16 px crops, a 2-block ViT, 16 steps per epoch.
TINY = ["--dataset", "synthetic", "--synthetic_size", "512", "--global_crops_size", "16", "--local_crops_size", "8",
        "--local_crops_number", "2", "--blur_sigma", "0.1", "0.5", "--arch", "custom", "--patch_size", "4",
        "--embed_dim", "32", "--depth", "2", "--num_heads", "2", "--drop_path_rate", "0.1",
        "--head_hidden_dim", "64", "--bottleneck_dim", "32", "--class_memory_size", "256", "--patch_memory_size", "128",
        "--class_anchors", "32", "--class_neighbors", "2", "--class_draws", "2", "--patch_anchors", "16",
        "--batch_size_per_gpu", "32", "--epochs", "2", "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1",
        "--lr", "1e-3", "--log_every", "4", "--knn_every", "1", "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Output directory of one finished 2-epoch tiny run (shared by the end-to-end and evaluation tests)."""
    import train
    out = tmp_path_factory.mktemp("tiny_run")
    trainer = train.main(TINY + ["--output_dir", str(out)])
    return out, trainer


def one_line_error(flags, match):
    """train.main(flags) must stop with one line starting "error: " and containing match; returns it."""
    import train
    with pytest.raises(SystemExit) as info:
        train.main(flags)
    text = str(info.value)
    assert text.startswith("error: ") and "\n" not in text and match in text, text
    return text


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A local port for torchrun's rendezvous; the test is skipped where none can be bound."""
    import socket
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"torchrun needs a local port: {e}")


def run_single_and_torchrun(script: str, flags: list[str]) -> tuple[list[str], list[str]]:
    """stdout lines of `script flags` run alone and under torchrun with 2 gloo processes (one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                            "127.0.0.1", "--master_port", str(free_port()), script, *flags], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env)
    if multi.returncode != 0 and "address already in use" in multi.stderr.lower():
        pytest.skip("torchrun could not bind its port")
    assert multi.returncode == 0, multi.stderr[-2000:]
    return single.stdout.splitlines(), multi.stdout.splitlines()
