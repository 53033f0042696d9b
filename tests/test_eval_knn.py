import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eval_knn
from model import build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trivially_separable_features_give_100():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(5, 16), dim=1)
    train_labels, test_labels = torch.arange(5).repeat(40), torch.arange(5).repeat(8)
    train = F.normalize(centres[train_labels] + 0.01 * torch.randn(200, 16), dim=1)
    test = F.normalize(centres[test_labels] + 0.01 * torch.randn(40, 16), dim=1)
    result = eval_knn.knn_classify(train, train_labels, test, test_labels, 5, ks=(10, 20), chunk_size=7)
    assert result == {10: (100.0, 100.0), 20: (100.0, 100.0)}


def test_knn_matches_a_loop_reference():
    torch.manual_seed(1)
    train, test = F.normalize(torch.randn(60, 8), dim=1), F.normalize(torch.randn(25, 8), dim=1)
    train_labels, test_labels = torch.randint(0, 6, (60,)), torch.randint(0, 6, (25,))
    result = eval_knn.knn_classify(train, train_labels, test, test_labels, 6, ks=(10,), chunk_size=4)
    top1 = top5 = 0
    for i in range(25):
        sims = train @ test[i]
        idx = sims.argsort(descending=True)[:10]
        scores = torch.zeros(6)
        for j in idx:
            scores[train_labels[j]] += torch.exp(sims[j] / 0.07)
        ranked = scores.argsort(descending=True)
        top1 += int(ranked[0] == test_labels[i])
        top5 += int(test_labels[i] in ranked[:5] and scores[test_labels[i]] > 0)
    assert result[10] == pytest.approx((100 * top1 / 25, 100 * top5 / 25))


def test_eval_cli_on_a_training_checkpoint(tiny_run, capsys):
    out, _ = tiny_run
    result = eval_knn.main(["--checkpoint", str(out / "checkpoint.pth"), "--device", "cpu"])
    assert set(result) == {10, 20, 100, 200}
    for top1, top5 in result.values():
        assert 0 <= top1 <= top5 <= 100
    assert "20-NN: top-1" in capsys.readouterr().out


def test_checkpoint_backbone_is_the_teacher(tiny_run):
    out, trainer = tiny_run
    backbone, size, config = eval_knn.load_backbone(str(out / "checkpoint.pth"))
    assert size == 16 and config["embed_dim"] == 32
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, trainer.teacher.backbone.state_dict()[key]), key


def test_plain_dino_layout_state_dict_loads_with_arch(tmp_path):
    vit = build_backbone("vit_tiny", 32, 16, use_mask_token=False)  # a 2 x 2 grid of learnt positions
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "dino.pth")
    backbone, _, config = eval_knn.load_backbone(str(tmp_path / "dino.pth"), "vit_tiny", 16)
    assert config is None
    for key, value in vit.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value)
    with pytest.raises(SystemExit, match="pass --arch"):
        eval_knn.load_backbone(str(tmp_path / "dino.pth"))
    with pytest.raises(SystemExit, match="does not fit the backbone"):
        eval_knn.load_backbone(str(tmp_path / "dino.pth"), "vit_small", 16)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"teacher": Exploit(str(marker)), "config": {}}, path)
    with pytest.raises(SystemExit, match="refused or unreadable"):
        eval_knn.load_backbone(str(path))
    assert not marker.exists()
    # train.py --resume refuses it too, before any compute.
    import train
    from conftest import TINY
    os.rename(path, tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match="cannot resume"):
        train.main(TINY + ["--output_dir", str(tmp_path)])
    assert not marker.exists()


def test_cli_errors_are_one_line():
    result = subprocess.run([sys.executable, "eval_knn.py", "--checkpoint", "/nonexistent.pth"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip() == "error: --checkpoint /nonexistent.pth: no such file"


def test_dump_load_low_shot_and_dino_aliases(tiny_run, tmp_path, capsys):
    ckpt = str(tiny_run[0] / "checkpoint.pth")
    full = eval_knn.main(["--pretrained_weights", ckpt, "--checkpoint_key", "teacher", "--device", "cpu",
                          "--dump_features", str(tmp_path / "f")])
    assert full == eval_knn.main(["--checkpoint", ckpt, "--device", "cpu"])
    assert eval_knn.main(["--load_features", str(tmp_path / "f")]) == full  # no checkpoint read, same numbers
    student = eval_knn.main(["--checkpoint", ckpt, "--checkpoint_key", "student", "--device", "cpu"])
    assert student != full  # the student's backbone is another network
    low = eval_knn.main(["--load_features", str(tmp_path / "f"), "--train_fraction", "0.1"])
    assert "low-shot: 50 training images" in capsys.readouterr().out  # 512 images of 10 classes, 10 % of each
    assert low != full
    labels = torch.arange(100) % 4
    a, b = eval_knn.low_shot_indices(labels, 0.1), eval_knn.low_shot_indices(labels, 0.1)
    assert torch.equal(a, b) and torch.bincount(labels[a]).tolist() == [2, 2, 2, 2]  # fixed, class-balanced
    for flags, message in ((["--load_features", str(tmp_path)], "must be a directory holding trainfeat.pth"),
                           (["--load_features", str(tmp_path / "f"), "--train_fraction", "0"], "0 < fraction <= 1"),
                           (["--load_features", str(tmp_path / "f"), "--checkpoint", ckpt], "exactly one of")):
        with pytest.raises(SystemExit) as info:
            eval_knn.main(flags)
        assert str(info.value).startswith("error: ") and message in str(info.value), str(info.value)


def test_torchrun_two_processes_give_the_single_process_numbers(tiny_run, tmp_path):
    ckpt = str(tiny_run[0] / "checkpoint.pth")
    single = subprocess.run([sys.executable, "eval_knn.py", "--checkpoint", ckpt, "--device", "cpu",
                             "--batch_size", "64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    port = str(29500 + os.getpid() % 1000)
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            port, "eval_knn.py", "--checkpoint", ckpt, "--device", "cpu", "--batch_size", "64"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0 and multi.returncode == 0, multi.stderr[-2000:]
    lines = [line for line in single.stdout.splitlines() if "-NN:" in line]
    assert len(lines) == 4 and [line for line in multi.stdout.splitlines() if "-NN:" in line] == lines  # printed once




@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0.01"], "error: --temperature 0.01: must be a finite number >= 0.015 (below it the vote "),
    (["--temperature", "inf"], "error: --temperature inf: must be a finite number >= 0.015"),
    (["--patch_size", "0"], "error: --patch_size 0: valid: 1 to 4096"),
    (["--image_size", "100000"], "error: --image_size 100000: valid: 1 to 4096"),
    (["--num_workers=-1"], "error: --num_workers -1: must be >= 0"),
])
def test_bad_knn_flags_are_one_line_errors(flags, message):
    with pytest.raises(SystemExit) as excinfo:
        eval_knn.main(["--pixels", "--dataset", "synthetic", "--synthetic_size", "100", "--device", "cpu"] + flags)
    assert str(excinfo.value).startswith(message) and "\n" not in str(excinfo.value)


def test_dump_features_below_a_file_is_refused_before_any_compute(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as excinfo:
        eval_knn.main(["--pixels", "--dataset", "synthetic", "--device", "cpu", "--dump_features",
                       str(tmp_path / "file" / "features")])
    assert str(excinfo.value) == f"error: --dump_features {tmp_path / 'file' / 'features'}: cannot be created or " \
                                 f"written here"
