"""What a long run meets: diverging updates, corrupt or incompatible checkpoints, signals, a second run on the same
directory, a full disk, and flag values that must fail in one line before any compute (README, "Failure behaviour")."""
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import eval_knn
import train
from conftest import TINY, one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = TINY + ["--knn_every", "0"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def flip_a_tensor_byte(path):
    """Flip one bit inside the largest tensor record of a torch.save zip (a silent-corruption stand-in)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(open(path, "rb").read())
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2] ^= 0x10
    open(path, "wb").write(bytes(raw))


# ---------------------------------------------------------------------------------------------- non-finite state
def test_a_diverged_last_update_is_never_saved_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    out = str(tmp_path)
    train.main(QUIET + ["--output_dir", out, "--max_steps", "16"])  # epoch 1 and its checkpoint
    saved = (tmp_path / "checkpoint.pth").read_bytes()
    original = train.Trainer.train_step

    def diverge_at_the_epochs_last_step(self, images, step, *args, **kwargs):
        stats = original(self, images, step, *args, **kwargs)  # the loss came before the update: finite
        if step == 31:
            with torch.no_grad():
                for p in self.student.parameters():
                    p.fill_(float("nan"))
        return stats
    monkeypatch.setattr(train.Trainer, "train_step", diverge_at_the_epochs_last_step)
    one_line_error(QUIET + ["--output_dir", out], "non-finite weights or memories after step 32")
    assert (tmp_path / "checkpoint.pth").read_bytes() == saved
    assert not (tmp_path / "checkpoint.pth.tmp").exists()


@pytest.mark.parametrize("flags,match", [
    (["--lr", "inf"], "--lr inf: must be finite"),
    (["--teacher_temp", "nan"], "--teacher_temp nan: must be finite"),
    (["--blur_sigma", "0.1", "inf"], "--blur_sigma 0.1 inf: must be finite"),
    (["--patch_size", "0"], "--patch_size 0: must be > 0"),
    (["--global_crops_size", "0"], "--global_crops_size 0: must be > 0"),
    (["--global_crops_size", "-16"], "--global_crops_size -16: must be > 0"),
    (["--pred_ratio_var", "0", "-0.1"], "--pred_ratio_var 0.0 -0.1: every value must be >= 0"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--arch", "vit_tiny", "--depth", "-2"], "--depth -2: must be >= 0"),
    (["--arch", "vit_tiny", "--num_heads", "-3"], "--num_heads -3: must be >= 0"),
    (["--epochs", "1000000000000"], "--epochs 1000000000000: valid: 1 to 100000"),
    (["--synthetic_size", "1000000000000"], "--synthetic_size 1000000000000: valid: 1 to 2000000 images"),
    (["--synthetic_size", "1e12"], "invalid int value: '1e12'"),
    (["--resume_changes", "maybe"], "--resume_changes 'maybe': valid: refuse, ok"),
    (["--interpolate_offset", "-0.1"], "--interpolate_offset -0.1"),
    # huge sizes: they used to fail allocating (or building for hours) with a traceback
    (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999: valid: at most 9223372036854775807"),
    (["--class_memory_size", "1000000000000"], "--class_memory_size 1000000000000: valid: at most 16777216"),
    (["--head_hidden_dim", "1000000000"], "--head_hidden_dim 1000000000: valid: at most 65536"),
    (["--global_crops_size", "1000000"], "--global_crops_size 1000000: valid: at most 4096"),
    (["--local_crops_number", "100000"], "--local_crops_number 100000: valid: at most 64"),
    (["--depth", "100000"], "--depth 100000: valid: at most 128"),
    (["--class_draws", "100000"], "--class_draws 100000: valid: at most 64"),
    (["--num_workers", "100000"], "--num_workers 100000: valid: at most 256"),
    (["--cls_loss_weight", "-1"], "--cls_loss_weight -1.0: must be >= 0"),
])
def test_flags_that_used_to_end_in_tracebacks(flags, match):
    one_line_error(TINY + flags, match)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_rotation_keeps_the_previous_checkpoint_and_a_corrupt_one_falls_back_to_it(tmp_path, capsys):
    out = str(tmp_path)
    train.main(QUIET + ["--output_dir", out, "--max_steps", "20"])  # saves at step 16, then at step 20
    assert torch.load(tmp_path / "checkpoint.prev.pth", weights_only=True)["step"] == 16
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] == 20
    flip_a_tensor_byte(tmp_path / "checkpoint.pth")  # loads fine with torch.load: only the CRC tells
    with pytest.raises(ValueError, match="CRC"):
        eval_knn.read_checkpoint(str(tmp_path / "checkpoint.pth"))
    trainer = train.main(QUIET + ["--output_dir", out, "--max_steps", "4"])
    assert trainer.step == 20  # resumed from step 16, not from the corrupt step-20 file
    assert "resuming from the previous checkpoint" in capsys.readouterr().out
    assert any(r.get("resumed_from_previous_checkpoint") for r in read_log(out))


def test_a_corrupt_checkpoint_without_a_good_previous_one_is_refused(tmp_path):
    out = str(tmp_path)
    train.main(QUIET + ["--output_dir", out, "--max_steps", "16"])
    flip_a_tensor_byte(tmp_path / "checkpoint.pth")
    one_line_error(QUIET + ["--output_dir", out], "CRC")
    eval_error = subprocess.run([sys.executable, "eval_knn.py", "--checkpoint", str(tmp_path / "checkpoint.pth")],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert eval_error.returncode != 0 and "CRC" in eval_error.stderr and len(eval_error.stderr.splitlines()) == 1


@pytest.mark.parametrize("damage,match", [
    (lambda c: c.pop("step"), "'step' must be an integer >= 0, got None"),
    (lambda c: c.update(step=-3), "'step' must be an integer >= 0, got -3"),
    (lambda c: c.pop("optimizer"), "lacks optimizer"),
    (lambda c: c["student"].pop("backbone.pos_embed"), "does not fit this run's networks"),
    (lambda c: c["teacher"].update({"backbone.cls_token": torch.zeros(1, 1, 7)}), "does not fit this run's"),
    (lambda c: c.update(config=[1, 2]), "not a train.py checkpoint"),
])
def test_damaged_checkpoints_are_refused_in_one_line(tiny_run, tmp_path, damage, match):
    ckpt = torch.load(os.path.join(tiny_run[0], "checkpoint.pth"), weights_only=True)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    one_line_error(TINY + ["--output_dir", str(tmp_path)], match)


def test_resume_with_changed_settings_is_refused_unless_accepted(tmp_path):
    out = str(tmp_path)
    train.main(QUIET + ["--output_dir", out, "--max_steps", "5"])
    text = one_line_error(QUIET + ["--output_dir", out, "--lr", "2e-3", "--seed", "3"], "--resume_changes ok")
    assert "lr 0.001 -> 0.002" in text and "seed 0 -> 3" in text
    # reporting and placement flags may change freely
    train.main(QUIET + ["--output_dir", out, "--max_steps", "1", "--log_every", "2"])
    trainer = train.main(QUIET + ["--output_dir", out, "--lr", "2e-3", "--resume_changes", "ok", "--max_steps", "1"])
    assert trainer.step == 7
    assert [r for r in read_log(out) if "resume_changes" in r][-1]["resume_changes"] == {"lr": [1e-3, 2e-3]}


def test_a_full_disk_leaves_no_temp_file_and_says_so(tmp_path, monkeypatch):
    out = str(tmp_path)
    train.main(QUIET + ["--output_dir", out, "--max_steps", "16"])
    saved = (tmp_path / "checkpoint.pth").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train.torch, "save", full_disk)
    text = one_line_error(QUIET + ["--output_dir", out, "--max_steps", "4"], "disk full while saving")
    assert "is intact" in text
    assert (tmp_path / "checkpoint.pth").read_bytes() == saved
    assert not (tmp_path / "checkpoint.pth.tmp").exists()


def test_an_output_dir_that_cannot_be_written_fails_before_compute(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    one_line_error(TINY + ["--output_dir", str(blocker / "run")], "cannot be created or written to")


# ---------------------------------------------------------------------------------------------- runs and signals
def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path):
    with open(tmp_path / ".lock", "w") as holder:  # another process's lock, as a concurrent run would hold it
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242\n")
        holder.flush()
        one_line_error(QUIET + ["--output_dir", str(tmp_path)], "is in use by another run (pid 4242)")
    assert train.main(QUIET + ["--output_dir", str(tmp_path), "--max_steps", "1"]).step == 1  # free again


def test_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch):
    original = train.Trainer.train_step

    def two_ctrl_c(self, images, step, *args, **kwargs):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, images, step, *args, **kwargs)
    monkeypatch.setattr(train.Trainer, "train_step", two_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train.main(QUIET + ["--output_dir", str(tmp_path)])
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert not (tmp_path / "checkpoint.pth").exists()


def test_sigterm_on_the_command_line_saves_and_exits_with_the_preempted_status(tmp_path):
    flags = QUIET + ["--epochs", "50", "--log_every", "1000", "--output_dir", str(tmp_path)]
    process = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "log.jsonl").exists() and time.time() < deadline:  # the log starts when training does
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == train.PREEMPTED_EXIT_CODE, stderr[-2000:]
    step = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"]
    assert 0 < step < 50 * 16 and read_log(tmp_path)[-1]["stopped_by_signal"] and "SIGTERM" in stderr


# ---------------------------------------------------------------------------------------------- evaluation inputs
@pytest.mark.parametrize("flags,match", [
    (["--batch_size", "0"], "--batch_size 0: must be > 0"),
    (["--temperature", "0"], "--temperature 0.0: must be a finite number >= 0.015"),
    (["--image_size", "-8"], "--image_size -8: valid: 1 to 4096"),
])
def test_eval_knn_flag_errors(tiny_run, flags, match):
    with pytest.raises(SystemExit, match=match):
        eval_knn.main(["--checkpoint", os.path.join(tiny_run[0], "checkpoint.pth"), *flags])


def test_eval_knn_refuses_a_checkpoint_whose_config_is_not_a_dict(tiny_run, tmp_path):
    ckpt = torch.load(os.path.join(tiny_run[0], "checkpoint.pth"), weights_only=True)
    ckpt["config"] = "vit_small"
    torch.save(ckpt, tmp_path / "odd.pth")
    with pytest.raises(SystemExit, match="its 'config' is not a train.py config"):
        eval_knn.main(["--checkpoint", str(tmp_path / "odd.pth")])


def test_knn_with_fewer_training_images_than_k_votes_with_all_of_them():
    train_features = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    labels = torch.tensor([0, 1, 1, 1, 0])
    result = eval_knn.knn_classify(train_features, labels, train_features, labels, 2, ks=(20,))
    everyone = eval_knn.knn_classify(train_features, labels, train_features, labels, 2, ks=(5,))
    assert result[20] == everyone[5]
    with pytest.raises(ValueError, match="temperature > 0"):
        eval_knn.knn_classify(train_features, labels, train_features, labels, 2, temperature=0.0)


def test_a_checkpoint_from_before_the_method_fields_resumes(tmp_path):
    """Checkpoints written before --method existed hold no method fields; a preset that sets them for other methods
    (cpu_demo: num_prototypes, partition_size) must still resume an SOP run."""
    out, flags = str(tmp_path), ["--preset", "cpu_demo"] + QUIET  # the preset's sizes, TINY's shapes
    train.main(flags + ["--output_dir", out, "--max_steps", "16"])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    for name in ("method", "num_prototypes", "partition_size", "norm_last_layer", "carp_cosine"):
        ckpt["config"].pop(name)
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    assert train.main(flags + ["--output_dir", out, "--max_steps", "1"]).step == 17


def test_a_renamed_flag_is_refused_naming_its_new_name_and_old_checkpoints_resume(tmp_path):
    one_line_error(QUIET + ["--out_dim", "32"], "--out_dim was renamed --bottleneck_dim")
    out = str(tmp_path)
    train.main(QUIET + ["--output_dir", out, "--max_steps", "16"])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    ckpt["config"]["out_dim"] = ckpt["config"].pop("bottleneck_dim")  # a checkpoint written before the rename
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    assert train.main(QUIET + ["--output_dir", out, "--max_steps", "1"]).step == 17
    ckpt["config"]["out_dim"] = 64  # ... whose embedding dim differs: refused under the new name
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    (tmp_path / "checkpoint.prev.pth").unlink(missing_ok=True)
    one_line_error(QUIET + ["--output_dir", out], "--bottleneck_dim 32: the checkpoint")


def test_a_resume_with_other_schedule_lengths_is_refused_unless_accepted_then_continues_in_place(tmp_path):
    """A checkpoint of a run on 2 GPUs (global batch 64, 8 steps per epoch) resumed on 1 (32, 16 steps): its
    schedules were built for other step counts. Refused in one line; with --resume_changes ok the run continues at
    the same point of its schedule (step 4 of 8 per epoch -> step 8 of 16) and ends after its 2 epochs."""
    out = str(tmp_path)
    train.main(QUIET + ["--output_dir", out, "--max_steps", "16"])  # one epoch on 1 process
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["schedule"] == {"world_size": 1, "global_batch": 32, "steps_per_epoch": 16, "train_images": 512}
    ckpt.update(step=4, schedule={"world_size": 2, "global_batch": 64, "steps_per_epoch": 8, "train_images": 512})
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    (tmp_path / "checkpoint.prev.pth").unlink(missing_ok=True)
    one_line_error(QUIET + ["--output_dir", out], "world_size 2 -> 1, global_batch 64 -> 32, steps_per_epoch 8 -> 16")
    trainer = train.main(QUIET + ["--output_dir", out, "--resume_changes", "ok", "--max_steps", "1"])
    assert trainer.step == 9  # resumed at 8
    assert train.main(QUIET + ["--output_dir", out]).step == 32  # the end of epoch 2
    changes = [r for r in read_log(out) if "resume_changes" in r][0]
    assert changes["step"] == 8 and changes["resume_changes"]["world_size"] == [2, 1]
    # Another training set behind the same --data_path: also refused.
    ckpt["schedule"] = {"world_size": 1, "global_batch": 32, "steps_per_epoch": 32, "train_images": 1024}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    (tmp_path / "checkpoint.prev.pth").unlink(missing_ok=True)
    one_line_error(QUIET + ["--output_dir", out], "steps_per_epoch 32 -> 16, train_images 1024 -> 512")


def test_saveckp_freq_keeps_numbered_checkpoints_of_whole_epochs(tmp_path):
    out = str(tmp_path)
    train.main(QUIET + ["--output_dir", out, "--epochs", "3", "--saveckp_freq", "2"])
    assert sorted(p.name for p in tmp_path.glob("checkpoint0*.pth")) == ["checkpoint0002.pth"]
    kept = torch.load(tmp_path / "checkpoint0002.pth", weights_only=True)
    assert kept["step"] == 32 and kept["epoch"] == 2 and not list(tmp_path.glob("*.tmp"))
    one_line_error(QUIET + ["--saveckp_freq", "-1"], "--saveckp_freq -1: must be >= 0")


@pytest.mark.parametrize("script,args", [
    ("eval_knn", []), ("eval_linear", []), ("eval_retrieval", []),
    ("visualize", ["sops", "--out", "OUT.png"]), ("hubconf", ["--out", "OUT.pth"])])
def test_every_script_refuses_a_text_file_as_checkpoint_in_one_line(tmp_path, script, args):
    """A small text file given as a checkpoint (it used to end in a KeyError traceback)."""
    import importlib
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    with pytest.raises(SystemExit) as info:
        importlib.import_module(script).main([*args, "--checkpoint", str(text)])
    message = str(info.value)
    assert message.startswith("error: --checkpoint") and "not a file written by torch.save" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("script,args,match", [
    ("bench", ["--configs", "cpu_demo", "--steps", "0"], "--steps 0: must be >= 1"),
    ("bench", ["--configs", "cpu_demo", "--steps", "100000000000"], "--steps 100000000000: valid: 1 to 10000"),
    ("bench", ["--configs", "cpu_demo", "--count", "--count_batch", "0"], "--count_batch 0: must be >= 1"),
    ("bench", ["--configs", "cpu_demo", "--count", "--count_batch", "10000000"], "--count_batch 10000000: valid"),
    ("bench", ["--configs", "cpu_demo", "--peak_tflops", "-5"], "--peak_tflops -5.0: must be > 0"),
    ("bench", ["--configs", "cpu_demo", "--peak_tflops", "inf"], "--peak_tflops inf: must be finite"),
    ("bench", ["--configs", "cpu_demo", "--json", "TMP"], "--json TMP: is a directory"),
    ("bench", ["--configs", "cpu_demo", "--json", "TMP/no/x.json"], "directory TMP/no does not exist"),
    ("bench", ["--custom", "x=--class_memory_size 1000000000000"], "configuration x: --class_memory_size"),
    ("bench_data", ["--num_images", "0"], "--num_images 0: valid: 1 to 20000"),
    ("bench_data", ["--num_images", "100000000000"], "--num_images 100000000000: valid: 1 to 20000"),
    ("bench_data", ["--batch", "-1"], "--batch -1: valid: 1 to 4096"),
    ("bench_data", ["--steps", "0"], "--steps 0: valid: 1 to 10000"),
    ("bench_data", ["--json", "TMP"], "--json TMP: is a directory"),
    ("visualize", ["attention", "--checkpoint", "TMP/c.pth", "--out", "TMP/d.png"], "--out TMP/d.png: is a directory"),
    ("visualize", ["attention", "--checkpoint", "TMP/c.pth", "--out", "TMP/o.png", "--patch_size", "0"],
     "--patch_size 0: valid: 1 to 4096"),
    ("visualize", ["attention", "--checkpoint", "TMP/c.pth", "--out", "TMP/o.png", "--seed", "-1"],
     "--seed -1: valid: 0 to"),
    ("visualize", ["attention", "--checkpoint", "TMP/c.pth", "--out", "TMP/o.png", "--seed", str(10 ** 30)],
     f"--seed {10 ** 30}: valid: 0 to"),
    ("visualize", ["neighbors", "--checkpoint", "TMP/c.pth", "--out", "TMP/o.png", "--num_workers", "-2"],
     "--num_workers -2: valid: 0 to 256"),
    ("visualize", ["attention", "--checkpoint", "TMP/c.pth", "--out", "TMP/o.png", "--images", "TMP"],
     "--images TMP: a directory"),
    ("plot_knn", ["TMP/log.jsonl", "--out", "TMP"], "--out TMP: is a directory"),
    ("plot_knn", ["TMP/log.jsonl", "--out", "TMP/no/knn.png"], "directory TMP/no does not exist"),
    ("plot_knn", ["TMP/log.jsonl", "--out", "TMP/knn.txt"], "--out TMP/knn.txt: unknown format; valid: a .png"),
    ("hubconf", ["--checkpoint", "TMP/c.pth", "--out", "TMP"], "--out TMP: is a directory"),
    ("hubconf", ["--checkpoint", "TMP/c.pth", "--out", "TMP/b.pth", "--patch_size", "0"], "--patch_size 0: valid"),
    ("hubconf", ["--checkpoint", "TMP/c.pth", "--out", "TMP/b.pth", "--patch_size", "-16"], "--patch_size -16"),
])
def test_script_flags_fail_in_one_line_before_anything_is_read(tmp_path, capsys, script, args, match):
    """Zero, negative and huge values, and output paths that are directories or in missing directories: one line
    naming the flag, before any file is read (the checkpoint and the log named here do not exist) or any compute.
    bench.py reports through its argument parser (the line on stderr, exit status 2), the others in SystemExit."""
    import importlib
    (tmp_path / "d.png").mkdir()
    with pytest.raises(SystemExit) as info:
        importlib.import_module(script).main([a.replace("TMP", str(tmp_path)) for a in args])
    message = str(info.value) if isinstance(info.value.code, str) else capsys.readouterr().err.removesuffix("\n")
    assert message.startswith("error: ") and "\n" not in message, message
    assert match.replace("TMP", str(tmp_path)) in message, message
