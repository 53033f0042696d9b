import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import launch
import train
from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_losses_finite_and_falling_checkpoint_and_log(tiny_run):
    out, trainer = tiny_run
    header, *lines = read_log(out)
    assert header["config"]["dataset"] == "synthetic" and "torch" in header["environment"]
    records = [r for r in lines if r.get("kind") != "step"]
    assert set(records[0]) == {"epoch", "step", "knn_top1", "elapsed_s"} and records[0]["step"] == 0  # k-NN first
    assert [r["epoch"] for r in records] == [0, 1, 2]
    stats = ("loss", "loss_cls", "loss_patch", "teacher_entropy", "teacher_image_entropy", "kl_teacher_student",
             "effective_prototypes", "se_cosine", "se_distinct_rows", "se_age", "teacher_cls_std")
    for r in records[1:]:
        for key in ("step", *stats, "lr", "images_per_s", "knn_top1", "distinct_prototypes", "elapsed_s"):
            assert key in r and math.isfinite(r[key]), key
        assert 0 <= r["knn_top1"] <= 100 and 0 < r["distinct_prototypes"] <= 256  # of the 256 memory rows
        assert 0 <= r["teacher_image_entropy"] <= r["teacher_entropy"] + 1e-4  # mean of entropies <= entropy of mean
    # Per-step records every log_every = 4 steps, 16 steps per epoch: the window's means and the schedules
    steps = [r for r in lines if r.get("kind") == "step"]
    assert [r["step"] for r in steps] == list(range(4, 33, 4))
    for r in steps:
        for key in (*stats, "lr", "weight_decay", "teacher_temp", "momentum_teacher", "step_time_s", "images_per_s"):
            assert key in r and math.isfinite(r[key]), key
    assert steps[-1]["lr"] == records[-1]["lr"] and steps[0]["teacher_temp"] < steps[-1]["teacher_temp"]
    torch.testing.assert_close(sum(r["loss"] for r in steps[4:]) / 4, records[2]["loss"])  # epoch = its windows
    assert [r["elapsed_s"] for r in lines] == sorted(r["elapsed_s"] for r in lines)  # a clock that only grows
    # A student that predicts nothing scores log M per term (uniform over the M SOPs of a draw: 32 [CLS], 16 patch
    # SOPs in TINY); both epochs' means are well below it. (Epoch 2's mean need not be below epoch 1's: the teacher
    # temperature warms up 0.04 -> 0.07 over epoch 1, which flattens the targets and raises the loss floor.)
    for r in records[1:]:
        assert r["loss_cls"] < math.log(32) and r["loss"] < 0.85 * (math.log(32) + math.log(16)), r
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["step"] == 32 and ckpt["epoch"] == 2
    assert set(ckpt) >= {"student", "teacher", "optimizer", "scaler", "class_memory", "patch_memory", "config"}
    assert torch.equal(ckpt["class_memory"]["memory"], trainer.method.class_memory.memory)


def test_step_losses_fall_on_a_fixed_batch():
    """Repeating one batch and one step index (same crops, same SOPs): the loss must go down."""
    cfg = train.parse_config(TINY)
    trainer = train.Trainer(cfg, torch.device("cpu"), 1, steps_per_epoch=100)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    for _ in range(12):  # fill the memories with real teacher embeddings first
        trainer.train_step(images, 50)
    losses = [trainer.train_step(images, 50) for _ in range(15)]
    assert all(torch.isfinite(l).all() for l in losses)
    assert losses[-1][1] < losses[0][1] and losses[-1][2] < losses[0][2]  # loss_cls and loss_patch


def state_of(trainer):
    return {**{f"student.{k}": v for k, v in trainer.student.state_dict().items()},
            **{f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()},
            "class_memory": trainer.method.class_memory.memory, "patch_memory": trainer.method.patch_memory.memory,
            "class_ptr": trainer.method.class_memory.ptr}


def test_resume_equals_uninterrupted(tmp_path):
    flags = TINY + ["--knn_every", "0"]
    whole = train.main(flags + ["--output_dir", str(tmp_path / "a")])
    first = train.main(flags + ["--output_dir", str(tmp_path / "b"), "--max_steps", "5"])  # stops mid-epoch 1
    assert first.step == 5
    resumed = train.main(flags + ["--output_dir", str(tmp_path / "b")])
    assert resumed.step == whole.step == 32
    a, b = state_of(whole), state_of(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a, opt_b = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in opt_a:
        assert torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"])


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path, monkeypatch):
    original = train.Trainer.train_step

    def step_then_signal(self, images, step, *args, **kwargs):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, images, step, *args, **kwargs)
    monkeypatch.setattr(train.Trainer, "train_step", step_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    trainer = train.main(TINY + ["--knn_every", "0", "--log_every", "1000", "--output_dir", str(tmp_path)])
    assert trainer.step == 6 and trainer.preempted  # acted on after the step it arrived in, whatever log_every
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] == 6
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is removed again


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    flags = TINY + ["--knn_every", "0", "--output_dir", str(tmp_path)]
    train.main(flags + ["--epochs", "2", "--max_steps", "16"])  # one good epoch and its checkpoint
    saved = (tmp_path / "checkpoint.pth").read_bytes()
    original, calls = train.methods.sop_mim_loss, []

    def poisoned(*args):  # the third step after resuming (step 18) gets a NaN loss
        calls.append(1)
        loss = original(*args)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(train.methods, "sop_mim_loss", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss at step 18"):
        train.main(flags)
    assert (tmp_path / "checkpoint.pth").read_bytes() == saved


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "-1"], "--epochs -1: must be > 0"),
    (["--class_neighbors", "300"], "--class_anchors 32: anchors + neighbours must not exceed --class_memory_size 256"),
    (["--pred_ratio", "0.9", "--pred_ratio_var", "0.2"], "--pred_ratio"),
    (["--dataset", "imagenet21k"], "--dataset 'imagenet21k': valid: synthetic, cifar10"),
    (["--arch", "vit_huge"], "--arch 'vit_huge': valid: vit_tiny, vit_small, vit_base, vit_large, custom"),
    (["--global_crops_size", "18"], "--global_crops_size 18: must be a multiple of --patch_size 4"),
    (["--batch_size_per_gpu", "512"], "--class_memory_size 256: must hold at least one global batch (512 images)"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    (["--dataset", "folder", "--data_path", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--precision", "fp16"], "fp16 needs a CUDA device"),
    (["--smoothing", "1.5"], "--smoothing 1.5"),
    (["--momentum_teacher_end", "1.2"], "--momentum_teacher_end 1.2: valid: 0 <= momentum <= 1"),
])
def test_bad_flags_give_one_clear_error(flags, message):
    with pytest.raises(SystemExit) as info:
        train.main(TINY + flags)
    text = str(info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text, text


def test_bad_flag_from_the_command_line_prints_one_line_without_traceback():
    result = subprocess.run([sys.executable, "train.py", "--preset", "cpu_demo", "--class_anchors", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: --class_anchors 0: must be > 0"
    assert result.stdout == ""


def test_help_lists_every_field_with_its_default():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for name in ("--class_anchors", "--teacher_temp", "--preset", "--compile"):
        assert name in result.stdout
    assert "(default 4096)" in result.stdout


def test_presets_and_overrides():
    cfg = train.parse_config(["--preset", "cifar", "--epochs", "3"])
    assert cfg.dataset == "cifar10" and cfg.patch_size == 4 and cfg.epochs == 3
    assert train.parse_config(["--preset", "imagenet"]) == train.Config(output_dir="runs/imagenet", compile=True)
    assert train.parse_config(["--compile", "true"]).compile is True


def test_fmnist_cpu_preset_schedules_barely_anneal():
    # README "Fashion-MNIST on a CPU": after the warm-up epoch the lr stays within 2.5e-3..3e-3 (at batch 128),
    # weight decay ends at 0.1 and the teacher momentum at 0.997; the four flags there give back the annealed preset
    cfg = train.parse_config(["--preset", "fmnist_cpu"])
    assert (cfg.dataset, cfg.epochs, cfg.class_memory_size, cfg.class_anchors) == ("fashion_mnist", 10, 8192, 512)
    s = train.build_schedules(cfg, steps_per_epoch=468, global_batch=cfg.batch_size_per_gpu)
    assert s["lr"][468:].max() == pytest.approx(3e-3) and s["lr"][-1] == pytest.approx(2.5e-3, rel=1e-3)
    assert s["weight_decay"][-1] == pytest.approx(0.1, rel=1e-3) and s["momentum"][-1] == pytest.approx(0.997)
    old = train.parse_config(["--preset", "fmnist_cpu", "--lr", "4e-3", "--min_lr", "1e-6", "--weight_decay_end",
                              "0.4", "--momentum_teacher_end", "1"])
    assert dataclasses.replace(old, lr=6e-3, min_lr=2.5e-3, weight_decay_end=0.1, momentum_teacher_end=0.997) == cfg
    assert train.parse_config(["--preset", "cpu_demo", "--dataset", "fashion_mnist"]).lr == old.lr


def test_resume_refuses_an_incompatible_checkpoint(tiny_run, tmp_path):
    out, _ = tiny_run
    with pytest.raises(SystemExit, match="--embed_dim 48: the checkpoint .* was trained with 32"):
        train.main(TINY + ["--output_dir", str(out), "--embed_dim", "48", "--num_heads", "2"])


def test_schedules():
    cfg = train.parse_config(TINY)
    s = train.build_schedules(cfg, steps_per_epoch=10, global_batch=512)
    assert len(s["lr"]) == 20
    assert s["lr"][0] == 0 and s["lr"][10] == pytest.approx(1e-3 * 512 / 256)  # warm-up ends at the peak
    assert np.all(np.diff(s["lr"][10:]) < 0) and s["lr"][-1] < 0.03 * s["lr"][10]  # cosine towards min_lr
    assert s["teacher_temp"][0] == pytest.approx(0.04) and s["teacher_temp"][10:].min() == pytest.approx(0.07)
    assert s["momentum"][0] == pytest.approx(0.996) and s["momentum"][-1] == pytest.approx(1.0, abs=1e-4)
    assert s["weight_decay"][0] == pytest.approx(0.04) and s["weight_decay"][-1] == pytest.approx(0.4, abs=0.01)
    assert np.all(np.diff(s["momentum"]) >= 0)
    # --min_lr, --weight_decay_end and --momentum_teacher_end set where the three cosines end
    ends = ["--min_lr", "5e-4", "--weight_decay_end", "0.1", "--momentum_teacher_end", "0.998"]
    e = train.build_schedules(train.parse_config(TINY + ends), steps_per_epoch=10, global_batch=512)
    assert e["momentum"][0] == pytest.approx(0.996) and e["momentum"][-1] == pytest.approx(0.998, abs=1e-4)
    assert e["lr"][-1] == pytest.approx(5e-4, rel=0.1) and e["weight_decay"][-1] == pytest.approx(0.1, abs=0.002)


def test_per_parameter_clipping():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    train.clip_gradients([a, b], 1.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8, 0.0]))  # norm 5 -> 1
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # norm 0.5 stays


def test_two_process_torchrun_keeps_identical_memories(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join("tests", "ddp_train.py"), *TINY, "--batch_size_per_gpu", "16", "--epochs", "1",
           "--knn_every", "1", "--output_dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert r0["class_ptr"].item() == 16 * 32 % 256  # 16 steps of 2 x 16 images
    log = read_log(tmp_path)
    assert log[-1]["step"] == 16 and 0 <= log[-1]["knn_top1"] <= 100


def torchrun(out, *launch, env=None):
    """A 2-process (or, with launch flags, one node's share of a) TINY run of 2 epochs under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, os.path.join("tests", "ddp_train.py"), *TINY,
           "--batch_size_per_gpu", "16", "--knn_every", "0", "--output_dir", str(out)]
    log = open(f"{out}-{launch[1].split('=')[-1]}.txt", "w")  # a file, not a pipe: four runs at once never block
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    process.log = log
    return process


def finish(process, returncode: int | None = 0) -> str:
    process.wait(timeout=300)
    process.log.close()
    output = open(process.log.name).read()
    assert process.returncode == returncode if returncode is not None else process.returncode != 0, output[-3000:]
    return output


def test_two_nodes_and_a_killed_worker_end_as_one(tmp_path):
    """Two torchrun "nodes" on one host (static rendezvous) end bit-identical to one node with two processes; so
    does a run whose rank 1 is killed with SIGKILL at step 20 (epoch 2) and which is then launched again, as a
    requeued cluster job is: it resumes from the epoch-1 checkpoint. (torchrun's own --max-restarts relaunch does
    the same, but its restarted gloo group is refused a connection about every other time on this 2-core machine,
    so the suite relaunches by hand; README, "Failure behaviour".)"""
    port = str(_free_port())
    runs = {"whole": torchrun(tmp_path / "whole", "--standalone", "--nproc_per_node=2"),
            "killed": torchrun(tmp_path / "killed", "--standalone", "--nproc_per_node=2",
                               env={"SOP_TEST_KILL_AT_STEP": "20"})}
    runs.update({f"node{r}": torchrun(tmp_path / "nodes", "--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
                                      "--master_addr=127.0.0.1", f"--master_port={port}") for r in range(2)})
    for name, process in runs.items():
        finish(process, None if name == "killed" else 0)  # the killed run fails
    assert torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)["step"] == 16
    finish(torchrun(tmp_path / "killed", "--standalone", "--nproc_per_node=2"))  # launched again: resumes
    whole = torch.load(tmp_path / "whole" / "rank0.pt", weights_only=True)
    for run in ("nodes", "killed"):
        for rank in range(2):
            other = torch.load(tmp_path / run / f"rank{rank}.pt", weights_only=True)
            for key in whole:
                assert torch.equal(whole[key], other[key]), (run, rank, key)
    assert read_log(tmp_path / "nodes")[-1]["step"] == 32


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cpu_demo_preset_runs_and_learns_a_batch(tmp_path):
    """The README quick start's own settings: a few steps of the real run, then losses falling on a repeated batch."""
    out = tmp_path / "demo"
    train.main(["--preset", "cpu_demo", "--max_steps", "4", "--log_every", "2", "--output_dir", str(out)])
    header, *records = read_log(out)
    assert header["config"]["patch_size"] == 8 and records[0]["step"] == 0 and 0 <= records[0]["knn_top1"] <= 100
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 4
    # A frozen teacher (momentum 1) on a repeated batch and step index gives fixed targets (same crops, anchors and,
    # once filled, memory), so the student's loss must fall; with a moving teacher, SOP's loss need not be monotone.
    cfg = train.parse_config(["--preset", "cpu_demo", "--momentum_teacher", "1.0"])
    trainer = train.Trainer(cfg, torch.device("cpu"), 1, steps_per_epoch=100)
    images = train.data.load_dataset("synthetic", "", "train", size=128).images
    for _ in range(cfg.class_memory_size // 128):  # fill the class memory with real teacher embeddings first
        trainer.train_step(images, 50)
    losses = [trainer.train_step(images, 50)[1] for _ in range(15)]  # loss_cls (SOP-MIM is off in this preset)
    assert all(torch.isfinite(l) for l in losses) and losses[-1] < losses[0]


def test_train_subset_trains_on_the_same_fixed_images_for_every_seed(tmp_path):
    """--train_subset: epochs over the subset only, the same images for every seed, indices into the whole split."""
    subset = train.data.subset_indices(512, 200)
    assert torch.equal(subset, train.data.subset_indices(512, 200)) and subset.unique().numel() == 200
    assert torch.equal(subset, subset.sort().values) and 0 <= subset.min() and subset.max() < 512
    assert not torch.equal(subset, torch.arange(200))  # random, not the first 200
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        trainer = train.main(TINY + ["--train_subset", "200", "--seed", str(seed), "--knn_every", "0",
                                     "--output_dir", str(out)])
        header, *records = read_log(out)
        assert records[-1]["step"] == 2 * (200 // 32)  # two epochs of the subset's 6 whole batches
        stored = trainer.method.class_memory.index  # the images the memory saw, as indices into the whole split
        assert (stored >= 0).all() and torch.isin(stored, subset).all()
    with pytest.raises(SystemExit, match=r"--train_subset 600: the training split has 512 images; valid: 0 \(all\) "
                                         r"to 512"):
        train.main(TINY + ["--train_subset", "600", "--output_dir", str(tmp_path / "too_many")])


def test_tensorboard_events_or_a_one_line_error(tmp_path, monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else
                        real_find_spec(name, *a))
    with pytest.raises(SystemExit, match="--tensorboard.*pip install tensorboard"):
        train.main(TINY + ["--tensorboard", "true", "--output_dir", str(tmp_path / "none")])
    assert not (tmp_path / "none" / "log.jsonl").exists()  # refused before anything ran
    monkeypatch.undo()
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    train.main(TINY + ["--tensorboard", "true", "--epochs", "1", "--knn_every", "0", "--output_dir", str(out)])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"step/loss", "step/teacher_image_entropy", "step/lr", "epoch/loss",
            "epoch/distinct_prototypes"} <= set(tags)
    steps = [r for r in read_log(out)[1:] if r.get("kind") == "step"]
    assert [e.step for e in events.Scalars("step/loss")] == [r["step"] for r in steps]
    assert [e.value for e in events.Scalars("step/loss")] == pytest.approx([r["loss"] for r in steps])


TUNE = "--dataset fashion_mnist"  # results/fmnist_cpu/tune.sh's BASE
RUN_LISTS = {"results/fmnist_gpu_tune.txt": "", "results/fmnist_gpu_ablate.txt": "", "results/diagnostics/runs.txt": "",
             "results/fmnist_compare/runs.txt": "", "results/fmnist_compare/runs_flat.txt": "",
             **{f"results/fmnist_cpu/{n}.txt": TUNE for n in ("round1", "round2", "probe1", "probe2", "probe3")},
             "results/fmnist_cpu/sched1.txt": "--preset fmnist_cpu --epochs 12 --knn_every 3",  # their BASE
             "results/fmnist_cpu/sched2.txt": "--preset fmnist_cpu --knn_every 2"}


@pytest.mark.parametrize("path", RUN_LISTS)
def test_committed_run_lists_are_valid_flags(path, tmp_path, monkeypatch):
    # every "NAME FLAGS" line of a list for results/run_pairs.sh (after its documented $BASE) or results/gpu_runs.sh
    # (whose "base" lines prefix the later ones) is a valid train.py command: a typo should not cost a GPU session
    monkeypatch.chdir(ROOT)
    gpu = os.path.basename(path).startswith("fmnist_gpu")
    base, names = RUN_LISTS[path].split(), []
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        name, *flags = line.split()
        if gpu and name == "base":
            base += flags
            continue
        cfg = train.parse_config(base + flags + ["--output_dir", str(tmp_path / name)])
        names.append(name)
        local = {"fashion_mnist": data.FASHION_MNIST_SYSTEM_DIR, "synthetic": cfg.data_path}[cfg.dataset]
        if os.path.isdir(local):  # the lists' data paths are those of the machine they ran on
            launch.validate(dataclasses.replace(cfg, data_path=local, compile=False), world_size=1)
    assert names and len(set(names)) == len(names)  # each run writes its own output_dir
