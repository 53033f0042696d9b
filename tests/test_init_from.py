"""--init_from: a new run (step 0, fresh optimiser and schedules) from another run's networks or from a published
ViT state dict, refused in one line before any compute when the file cannot fit (README, "Resuming")."""
import copy
import json
import os

import pytest
import torch

import hubconf
import methods
import train
from conftest import TINY, one_line_error

QUIET = TINY + ["--knn_every", "0"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def watch_first_step(monkeypatch) -> dict:
    """The trainer as its first train_step finds it (filled in when the run takes that step)."""
    seen, original = {}, train.Trainer.train_step

    def capture(self, images, step, *args, **kwargs):
        if not seen:
            seen.update(step=step, student=copy.deepcopy(self.student.state_dict()),
                        teacher=copy.deepcopy(self.teacher.state_dict()),
                        method=copy.deepcopy(self.method.state_dict()), optimizer=self.optimizer.state_dict())
            seen["optimizer"] = copy.deepcopy(seen["optimizer"])
        return original(self, images, step, *args, **kwargs)
    monkeypatch.setattr(train.Trainer, "train_step", capture)
    return seen


def flags_for(method: str, flags: list[str]) -> list[str]:
    """flags without the values (TINY's memory sizes, anchors) that have no meaning for method."""
    foreign = methods.METHOD_FIELDS - methods.FIELDS[method]
    drop = {i + j for i, flag in enumerate(flags) if flag.startswith("--") and flag[2:] in foreign for j in (0, 1)}
    return [flag for i, flag in enumerate(flags) if i not in drop] + ["--method", method]


def fresh_trainer(flags) -> train.Trainer:
    """The trainer a run with these flags builds before anything is loaded into it (same seed, same init)."""
    return train.Trainer(train.parse_config(flags), torch.device("cpu"), 1, 16)


def assert_equal_states(a: dict, b: dict):
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


@pytest.mark.parametrize("init_memories", [False, True])
def test_a_checkpoints_networks_start_a_new_run_with_a_fresh_optimiser_at_step_0(tiny_run, tmp_path, monkeypatch,
                                                                                  init_memories):
    source_path = str(tiny_run[0] / "checkpoint.pth")
    source = torch.load(source_path, weights_only=True)
    assert source["step"] == 32 and source["optimizer"]["state"]
    seen = watch_first_step(monkeypatch)
    flags = QUIET + ["--output_dir", str(tmp_path), "--init_from", source_path, "--max_steps", "1"]
    trainer = train.main(flags + ["--init_memories", str(init_memories).lower()])
    assert seen["step"] == 0 and trainer.step == 1 and seen["optimizer"]["state"] == {}
    assert_equal_states(seen["student"], source["student"])
    assert_equal_states(seen["teacher"], source["teacher"])
    memories = {f"{name}.{k}": v for name in ("class_memory", "patch_memory") for k, v in source[name].items()}
    expected = memories if init_memories else fresh_trainer(QUIET).method.state_dict()
    assert_equal_states(seen["method"], expected)
    assert not torch.equal(source["class_memory"]["memory"], fresh_trainer(QUIET).method.class_memory.memory)
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert saved["step"] == 1  # one AdamW step: its step count restarted
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {1}
    header = read_log(tmp_path)[0]
    assert header["config"]["init_from"] == source_path
    assert header["derived"]["initialised"]["loaded"] == ["student", "teacher"] + (
        ["class_memory", "patch_memory"] if init_memories else [])
    assert "step 32" in header["derived"]["initialised"]["file"]


@pytest.mark.parametrize("layout", ["plain", "dino_full_checkpoint"])
def test_a_published_style_backbone_goes_into_both_backbones_and_the_heads_stay_fresh(tiny_run, tmp_path,
                                                                                      monkeypatch, layout):
    backbone = hubconf.export_backbone(str(tiny_run[0] / "checkpoint.pth"), str(tmp_path / "backbone.pth"))
    if layout == "dino_full_checkpoint":  # facebookresearch/dino main_dino.py save_dict: DDP student, heads
        head = {"head.last_layer.weight_g": torch.ones(7, 1)}
        torch.save({"teacher": {**{f"backbone.{k}": v for k, v in backbone.items()}, **head},
                    "student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in backbone.items()},
                    "epoch": 100}, tmp_path / "backbone.pth")
    seen = watch_first_step(monkeypatch)
    out = tmp_path / "run"
    train.main(QUIET + ["--output_dir", str(out), "--init_from", str(tmp_path / "backbone.pth"), "--max_steps", "1"])
    fresh = fresh_trainer(QUIET)
    for name, fresh_network in (("student", fresh.student), ("teacher", fresh.teacher)):
        state = seen[name]
        assert_equal_states({k.removeprefix("backbone."): v for k, v in state.items()
                             if k.startswith("backbone.") and k != "backbone.masked_embed"}, backbone)
        fresh_state = fresh_network.state_dict()
        assert_equal_states({k: v for k, v in state.items() if not k.startswith("backbone.")},
                            {k: v for k, v in fresh_state.items() if not k.startswith("backbone.")})
    assert torch.equal(seen["student"]["backbone.masked_embed"], fresh.student.state_dict()["backbone.masked_embed"])
    assert read_log(out)[0]["derived"]["initialised"]["loaded"] == ["student.backbone", "teacher.backbone"]


def test_a_shape_mismatch_is_refused_in_one_line_naming_the_key_and_both_shapes(tiny_run, tmp_path):
    source_path = str(tiny_run[0] / "checkpoint.pth")
    out = tmp_path / "run"
    one_line_error(QUIET + ["--output_dir", str(out), "--init_from", source_path, "--global_crops_size", "32"],
                   f"--init_from {source_path}: student.backbone.pos_embed has shape (1, 17, 32) in the file and "
                   f"(1, 65, 32) in this run")
    assert not (out / "log.jsonl").exists() and not (out / "checkpoint.pth").exists()  # no compute, no log
    # another method's networks differ in their parts: the message says how to take the backbone alone
    one_line_error(flags_for("dino", QUIET) + ["--output_dir", str(out), "--init_from", source_path,
                                               "--num_prototypes", "64"],
                   "student.backbone.masked_embed is in the file but not in this run (the file is a --method sop "
                   "run: export its backbone with hubconf.py")
    backbone = str(tmp_path / "backbone.pth")
    hubconf.export_backbone(source_path, backbone)
    one_line_error(QUIET + ["--output_dir", str(out), "--init_from", backbone, "--embed_dim", "48", "--num_heads", "3"],
                   "student.backbone.cls_token has shape (1, 1, 32) in the file and (1, 1, 48) in this run")
    one_line_error(QUIET + ["--output_dir", str(out), "--init_from", backbone, "--init_memories", "true"],
                   "is a plain ViT state dict, which holds no memories or centres")
    one_line_error(flags_for("carp", QUIET) + ["--output_dir", str(out), "--init_from", source_path,
                                               "--num_prototypes", "64", "--partition_size", "16",
                                               "--init_memories", "true"],
                   "--init_memories true: --method carp keeps no memories or centres; valid: false")


def test_missing_and_wrong_kind_files_are_refused_before_compute(tmp_path):
    out = str(tmp_path / "run")
    one_line_error(QUIET + ["--output_dir", out, "--init_from", str(tmp_path / "missing.pth")],
                   f"--init_from '{tmp_path / 'missing.pth'}': no such file")
    one_line_error(QUIET + ["--output_dir", out, "--init_from", str(tmp_path)], "a directory")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    one_line_error(QUIET + ["--output_dir", out, "--init_from", str(tmp_path / "notes.txt")],
                   "not a file written by torch.save")
    torch.save({"epoch": 3, "args": "lr=0.1"}, tmp_path / "numbers.pth")
    one_line_error(QUIET + ["--output_dir", out, "--init_from", str(tmp_path / "numbers.pth")],
                   "neither a train.py checkpoint nor a ViT state dict of tensors")
    one_line_error(QUIET + ["--output_dir", out, "--init_memories", "true"], "needs --init_from")
    assert not os.path.exists(os.path.join(out, "log.jsonl"))


def test_an_existing_checkpoint_is_resumed_only_by_the_run_that_init_from_started(tiny_run, tmp_path, capsys):
    """The same command again (a requeued cluster job) resumes; any other --init_from on that directory is refused,
    as is --init_from on a directory of a run that did not start from it; --resume false starts over."""
    source_path, out = str(tiny_run[0] / "checkpoint.pth"), str(tmp_path / "run")
    command = QUIET + ["--output_dir", out, "--init_from", source_path, "--max_steps", "1"]
    train.main(command)
    assert train.main(command).step == 2  # resumed at 1, not initialised again
    assert "started this run; resuming its checkpoint (step 1)" in capsys.readouterr().out
    backbone = str(tmp_path / "backbone.pth")
    hubconf.export_backbone(source_path, backbone)
    one_line_error(QUIET + ["--output_dir", out, "--init_from", backbone],
                   f"already holds a checkpoint (step 2) of a run started from {source_path}; --resume would "
                   f"continue that run, --init_from is for new runs")
    other = str(tmp_path / "plain_run")
    train.main(QUIET + ["--output_dir", other, "--max_steps", "1"])
    one_line_error(QUIET + ["--output_dir", other, "--init_from", source_path], "of a run not started from it")
    assert train.main(QUIET + ["--output_dir", other, "--init_from", source_path, "--resume", "false",
                               "--max_steps", "1"]).step == 1
    assert read_log(other)[0]["derived"]["initialised"]["init_from"] == source_path
