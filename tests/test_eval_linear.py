import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import eval_knn
import eval_linear
from model import build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fabricated_dataset(n: int, num_classes: int, noise: float, seed: int) -> data.ImageDataset:
    """Tiny 4 x 4 images: a random pixel pattern per class (the same for every split) plus per-image noise."""
    centres = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(123)) * 200 + 28
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = centres[labels] + noise * torch.randn(n, 3, 4, 4, generator=generator)
    return data.ImageDataset(images.clamp(0, 255).round().to(torch.uint8), labels, num_classes)


def test_linearly_separable_features_give_100():
    train, test = fabricated_dataset(300, 5, 3.0, 0), fabricated_dataset(100, 5, 3.0, 1)
    result = eval_linear.linear_evaluate(eval_knn.Pixels(4), train, test, torch.device("cpu"), steps=40,
                                         batch_size=64, lrs=(0.1, 1.0), weight_decays=(0.0,))
    assert result["top1"] == 100.0 and result["best_test_top1"] == 100.0
    assert result["val_top1"].shape == (2,) and result["val_top1"][result["selected"]] == 100.0


def test_batched_grid_equals_classifiers_trained_alone():
    torch.manual_seed(0)
    features, labels = torch.randn(200, 12), torch.randint(0, 4, (200,))
    lrs, wds, steps, batch = (0.1, 2.0), (0.0, 1e-2), 20, 32
    grid = eval_linear.train_grid(features, labels, 4, lrs, wds, steps, batch, seed=7)
    order = eval_linear.batch_order(200, batch, steps, seed=7)
    for g, (lr, wd) in enumerate((lr, wd) for lr in lrs for wd in wds):
        # the reference: one nn.Linear with torch's SGD, DINO's N(0, 0.01) init from the same seed
        linear = torch.nn.Linear(12, 4)
        with torch.no_grad():
            linear.weight.copy_(0.01 * torch.randn(4, 12, generator=torch.Generator().manual_seed(7)))
            linear.bias.zero_()
        optimizer = torch.optim.SGD(linear.parameters(), lr=lr * batch / 256, momentum=0.9, weight_decay=wd)
        for step in range(steps):
            optimizer.param_groups[0]["lr"] = lr * batch / 256 * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(linear(features[order[step]]), labels[order[step]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.testing.assert_close(grid.weight[g], linear.weight.detach().T, atol=1e-5, rtol=0)
        torch.testing.assert_close(grid.bias[g], linear.bias.detach(), atol=1e-5, rtol=0)
    alone = eval_linear.train_grid(features, labels, 4, (lr,), (wd,), steps, batch, seed=7)  # the last grid point
    torch.testing.assert_close(alone.weight[0], grid.weight[-1], atol=1e-5, rtol=0)


def test_selection_never_reads_test_labels():
    train, test = fabricated_dataset(300, 5, 60.0, 0), fabricated_dataset(100, 5, 60.0, 1)
    kwargs = dict(steps=40, batch_size=64, lrs=(1e-3, 0.1, 10.0), weight_decays=(0.0, 1e-2))
    first = eval_linear.linear_evaluate(eval_knn.Pixels(4), train, test, torch.device("cpu"), **kwargs)
    shuffled = data.ImageDataset(test.images, test.labels[torch.randperm(100, generator=torch.Generator()
                                                                         .manual_seed(3))], 5)
    second = eval_linear.linear_evaluate(eval_knn.Pixels(4), train, shuffled, torch.device("cpu"), **kwargs)
    assert first["selected"] == second["selected"]
    assert torch.equal(first["val_top1"], second["val_top1"])
    assert not torch.equal(first["test_top1"], second["test_top1"])  # the shuffle did change the test side


def test_features_are_the_last_cls_tokens_and_the_mean_patch():
    vit = build_backbone("custom", 16, 4, use_mask_token=False, embed_dim=8, depth=3, num_heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    layers = vit.get_intermediate_layers(x, 3)
    features = eval_linear.probe_features(vit, x, n_last_blocks=2, avgpool=True)
    expected = torch.cat((layers[1][:, 0], layers[2][:, 0], layers[2][:, 1:].mean(1)), 1)
    torch.testing.assert_close(features, expected)
    assert torch.equal(eval_linear.probe_features(vit, x, 1)[:, :8], vit(x)[:, 0])


def test_cli_on_a_training_checkpoint_and_augment(tiny_run, capsys):
    out, _ = tiny_run
    result = eval_linear.main(["--checkpoint", str(out / "checkpoint.pth"), "--device", "cpu", "--steps", "20",
                               "--lrs", "0.1", "1", "--weight_decays", "0"])
    assert 0 <= result["top1"] <= result["best_test_top1"] <= 100
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"linear top-1 {result['top1']:.2f} %"
    result = eval_linear.main(["--pixels", "--dataset", "synthetic", "--synthetic_size", "200", "--device", "cpu",
                               "--augment", "--epochs", "2", "--batch_size", "64", "--lrs", "0.1"])
    assert 0 <= result["top1"] <= 100


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "error: --batch_size 0: must be a positive integer"),
    (["--val_fraction", "1.5"], "error: --val_fraction 1.5: must be in (0, 1)"),
    (["--lrs", "-1"], "error: --lrs [-1.0]: every lr must be positive and finite"),
    (["--dataset", "imagenet9"], "error: unknown dataset 'imagenet9'; valid names: "),
])
def test_bad_flags_are_one_line_errors(flags, message):
    argv = ["--pixels", "--dataset", "synthetic", "--synthetic_size", "100", "--device", "cpu"] + flags
    with pytest.raises(SystemExit) as excinfo:
        eval_linear.main(argv)
    assert str(excinfo.value).startswith(message) and "\n" not in str(excinfo.value)


def test_cli_error_has_no_traceback():
    result = subprocess.run([sys.executable, "eval_linear.py", "--pixels", "--dataset", "synthetic",
                             "--val_fraction", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip() == "error: --val_fraction 0.0: must be in (0, 1)"


def test_augment_on_an_image_folder_crops_whole_images_from_their_canvases(tmp_path, monkeypatch):
    from test_data import write_jpeg_tree

    monkeypatch.setattr(data, "FOLDER_LONG_SIDE", 40)  # small canvases keep the CPU test fast
    write_jpeg_tree(tmp_path, sizes=[(60 - 3 * i, 45 + 2 * i) for i in range(6)])
    plain = data.load_dataset("folder", str(tmp_path), "train", image_size=16, evaluation=True)
    canvases = data.load_dataset("folder", str(tmp_path), "train", image_size=16)
    assert len(canvases[0]) == 4  # (canvas, valid size, label, index): the training items the --augment crops come from
    test_set = data.load_dataset("folder", str(tmp_path), "test", image_size=16)
    backbone = build_backbone("custom", 16, 4, embed_dim=32, depth=2, num_heads=2, use_mask_token=False)
    result = eval_linear.linear_evaluate(backbone, plain, test_set, torch.device("cpu"), image_size=16, lrs=(0.1,),
                                         weight_decays=(0.0,), batch_size=4, augment_epochs=2, augment_set=canvases,
                                         val_fraction=0.25)
    assert 0 <= result["top1"] <= 100 and math.isfinite(result["val_top1"][0])
