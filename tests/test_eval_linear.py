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
import eval_retrieval
from conftest import run_single_and_torchrun
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
    result = eval_linear.linear_evaluate(eval_knn.Pixels(4), train, test, torch.device("cpu"), solver="sgd",
                                         steps=40, batch_size=64, lrs=(0.1, 1.0), weight_decays=(0.0,))
    assert result["top1"] == 100.0 and result["best_test_top1"] == 100.0
    assert result["val_top1"].shape == (2,) and result["val_top1"][result["selected"]] == 100.0
    result = eval_linear.linear_evaluate(eval_knn.Pixels(4), train, test, torch.device("cpu"),
                                         l2_strengths=(1e-2, 1e-4))
    assert result["solver"] == "lbfgs" and result["top1"] == 100.0 and result["refit"]["converged"]
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


# ----------------------------------------------------------------------------------------------------- convex probe
def badly_conditioned_problem(n: int, seed: int, teacher_on: str = "latent", sharpness: float = 1.5,
                              dim: int = 24, num_classes: int = 4):
    """float32 features that standardisation cannot fix, and labels that are not separable: x = z A, A = Q1 diag(s)
    Q2 with singular values s spanning 1e-3..1e3 (strongly correlated columns) and column scales spanning
    1e-3..1e3 on top; labels drawn from softmax(sharpness t T), t = z (teacher_on "latent": the labels depend on
    directions that x squeezes to a millionth of the others) or t = x with unit-variance columns ("features"; at a
    large sharpness nearly separable: the softmax saturates and the objective is flat along the separating
    directions). The same A and teacher T for every seed (one distribution)."""
    fixed = torch.Generator().manual_seed(99)
    q1, _ = torch.linalg.qr(torch.randn(dim, dim, generator=fixed, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(dim, dim, generator=fixed, dtype=torch.float64))
    mixing = q1 @ torch.diag(torch.logspace(-3, 3, dim, dtype=torch.float64)) @ q2
    mixing *= torch.logspace(3, -3, dim, dtype=torch.float64)[torch.randperm(dim, generator=fixed)]
    teacher = sharpness * torch.randn(dim, num_classes, generator=fixed, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    x = z @ mixing
    inputs = z if teacher_on == "latent" else x / mixing.norm(dim=0)  # columns of z A have std |A[:, j]|
    labels = torch.multinomial((inputs @ teacher).softmax(1), 1, generator=generator).squeeze(1)
    return x.float(), labels


def reference_objective(theta: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        l2: float) -> torch.Tensor:
    """mean CE + l2/2 ||W||^2 written with torch's cross_entropy; theta = (W flat (F C), b of the first C - 1
    classes): the last class's bias is fixed at 0 (the objective does not change when every bias moves together)."""
    dim = x.shape[1]
    weight = theta[:dim * num_classes].view(dim, num_classes)
    bias = torch.cat((theta[dim * num_classes:], theta.new_zeros(1)))
    return F.cross_entropy(x @ weight + bias, labels) + 0.5 * l2 * weight.square().sum()


def newton_reference(x: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float):
    """Damped Newton's method in float64 with the exact (autograd) Hessian and a backtracking line search, run until
    the Newton decrement is at rounding level: an independent solution of the probe's convex problem."""
    x = x.double()
    objective = lambda theta: reference_objective(theta, x, labels, num_classes, l2)
    theta = x.new_zeros(x.shape[1] * num_classes + num_classes - 1)
    for _ in range(100):
        grad = torch.autograd.functional.jacobian(objective, theta)
        hessian = torch.autograd.functional.hessian(objective, theta)
        step = torch.linalg.solve(hessian, grad)
        decrement = float(grad @ step)
        if decrement < 1e-20:
            break
        t, value = 1.0, objective(theta)
        while objective(theta - t * step) > value - 0.25 * t * decrement and t > 1e-10:
            t /= 2
        theta = theta - t * step
    dim = x.shape[1]
    weight = theta[:dim * num_classes].view(dim, num_classes)
    return weight, torch.cat((theta[dim * num_classes:], theta.new_zeros(1))), float(objective(theta)), decrement


@pytest.mark.parametrize("l2, teacher_on, sharpness", [(1e-2, "latent", 1.5), (1e-4, "latent", 1.5),
                                                       (1e-6, "latent", 1.5), (1e-4, "features", 3.0),
                                                       (1e-6, "features", 3.0)])
def test_lbfgs_reaches_the_optimum_on_badly_conditioned_features(l2, teacher_on, sharpness):
    # For scale, on ("latent", 1e-6): without its preconditioner, L-BFGS stops 2.6e-3 above the optimum after 1000
    # iterations; the previous probe's SGD grid (500 steps, its best lr) ends 0.13 above it (0.02 at l2 1e-4).
    x, labels = badly_conditioned_problem(2000, 0, teacher_on, sharpness)
    x_test, labels_test = badly_conditioned_problem(4000, 1, teacher_on, sharpness)
    mean, std = x.mean(0), x.std(0)
    fit_x, test_x = (eval_linear.standardise(v, mean, std).double() for v in (x, x_test))
    eigenvalues = torch.linalg.eigvalsh(fit_x.T @ fit_x / len(fit_x))
    assert eigenvalues.max() / eigenvalues.min() > 1e6  # standardised, and still badly conditioned
    ref_weight, ref_bias, ref_objective, decrement = newton_reference(fit_x, labels, 4, l2)
    assert decrement < 1e-20
    weight, bias, info = eval_linear.fit_logistic(fit_x, labels, 4, l2)
    assert info["converged"] and info["grad_max"] <= eval_linear.TOL
    assert abs(info["objective"] - ref_objective) < 1e-3
    assert abs(info["objective"] - ref_objective) < 1e-6  # what the default tolerance actually buys
    objective = float(eval_linear.softmax_objective(fit_x, labels, weight, bias, l2)[0])
    assert abs(objective - info["objective"]) < 1e-12 and objective >= ref_objective - 1e-9
    for features, y in ((fit_x, labels), (test_x, labels_test)):  # train and test accuracy, in points
        ours = eval_linear.classifier_top1(features, y, weight, bias)
        reference = eval_linear.classifier_top1(features, y, ref_weight, ref_bias)
        assert abs(ours - reference) <= 0.5
    # the objective and its gradient are the reference's (autograd of torch's cross_entropy), at another point too
    for point_weight, point_bias in ((weight, bias), (torch.randn(24, 4, generator=torch.Generator().manual_seed(5),
                                                                  dtype=torch.float64), torch.arange(4.0).double())):
        theta = torch.cat((point_weight.flatten(), point_bias[:3] - point_bias[3]))
        value, grad_weight, grad_bias = eval_linear.softmax_objective(fit_x, labels, point_weight, point_bias, l2)
        reference_grad = torch.autograd.functional.jacobian(
            lambda t: reference_objective(t, fit_x, labels, 4, l2), theta)
        torch.testing.assert_close(value, reference_objective(theta, fit_x, labels, 4, l2), rtol=1e-12, atol=0)
        torch.testing.assert_close(grad_weight.flatten(), reference_grad[:96], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grad_bias[:3], reference_grad[96:], rtol=1e-9, atol=1e-12)  # J(b) = J(b - b[3])


def test_warm_started_path_equals_cold_solves():
    x, labels = badly_conditioned_problem(1000, 2)
    x = eval_linear.standardise(x, x.mean(0), x.std(0)).double()
    path = eval_linear.l2_path(x[:800], labels[:800], x[800:], labels[800:], 4, (1e-5, 1e-2, 1e-3))
    assert path["l2_strengths"].tolist() == [1e-2, 1e-3, 1e-5]  # strongest first, whatever the order given
    for l2, info in zip(path["l2_strengths"].tolist(), path["path"]):
        cold = eval_linear.fit_logistic(x[:800], labels[:800], 4, l2)[2]
        assert info["converged"] and abs(info["objective"] - cold["objective"]) < 1e-6
    best = int(path["val_top1"].argmax())
    assert path["selected"] == best


def test_lbfgs_selection_reads_only_the_held_out_part():
    train, test = fabricated_dataset(400, 5, 70.0, 0), fabricated_dataset(100, 5, 70.0, 1)
    kwargs = dict(l2_strengths=(1e-1, 1e-2, 1e-3, 1e-4))
    first = eval_linear.linear_evaluate(eval_knn.Pixels(4), train, test, torch.device("cpu"), **kwargs)
    # another test split altogether (images and labels): selection, path and the held-out numbers do not move
    other = fabricated_dataset(100, 5, 70.0, 7)
    other = data.ImageDataset(other.images, other.labels.roll(1), 5)
    second = eval_linear.linear_evaluate(eval_knn.Pixels(4), train, other, torch.device("cpu"), **kwargs)
    assert first["selected"] == second["selected"] and first["l2"] == second["l2"]
    assert torch.equal(first["val_top1"], second["val_top1"]) and first["path"] == second["path"]
    assert first["refit"] == second["refit"] and first["top1"] != second["top1"]
    # the held-out numbers are the top-1 on exactly split_train's held-out part of the fit-part classifiers
    fit, held_out = eval_linear.split_train(len(train), 0.1, 0)
    features = eval_knn.Pixels(4)(data.normalize_images(train.images, None))[:, 0]  # float32, as extracted
    mean, std = features[fit].mean(0), features[fit].std(0)
    x = eval_linear.standardise(features, mean, std).double()  # the probe's default float64
    weight = bias = None
    for i, l2 in enumerate(first["l2_strengths"].tolist()):
        weight, bias, _ = eval_linear.fit_logistic(x[fit], train.labels[fit], 5, l2, weight, bias)
        assert abs(eval_linear.classifier_top1(x[held_out], train.labels[held_out], weight, bias)
                   - float(first["val_top1"][i])) < 1e-9
    # held-out labels do steer it: corrupting them changes the held-out numbers
    corrupted = train.labels.clone()
    corrupted[held_out] = (corrupted[held_out] + 1) % 5
    third = eval_linear.linear_evaluate(eval_knn.Pixels(4), data.ImageDataset(train.images, corrupted, 5), test,
                                        torch.device("cpu"), **kwargs)
    assert not torch.equal(first["val_top1"], third["val_top1"])


def test_selection_never_reads_test_labels():
    train, test = fabricated_dataset(300, 5, 60.0, 0), fabricated_dataset(100, 5, 60.0, 1)
    kwargs = dict(solver="sgd", steps=40, batch_size=64, lrs=(1e-3, 0.1, 10.0), weight_decays=(0.0, 1e-2))
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
    result = eval_linear.main(["--checkpoint", str(out / "checkpoint.pth"), "--device", "cpu", "--solver", "sgd",
                               "--steps", "20", "--lrs", "0.1", "1", "--weight_decays", "0"])
    assert 0 <= result["top1"] <= result["best_test_top1"] <= 100
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"linear top-1 {result['top1']:.2f} %"
    result = eval_linear.main(["--checkpoint", str(out / "checkpoint.pth"), "--device", "cpu", "--l2", "1e-2", "1e-3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert result["solver"] == "lbfgs" and 0 <= result["top1"] <= 100 and result["l2"] in (1e-2, 1e-3)
    assert lines[-1] == f"linear top-1 {result['top1']:.2f} %" and lines[-2].startswith("solve time ")
    assert "<- selected on held-out" in lines[1 + result["selected"]]
    assert lines[-3].startswith("refit on every training image used")
    result = eval_linear.main(["--pixels", "--dataset", "synthetic", "--synthetic_size", "200", "--device", "cpu",
                               "--augment", "--epochs", "2", "--batch_size", "64", "--lrs", "0.1"])
    assert 0 <= result["top1"] <= 100



def test_checkpoint_key_reaches_the_loader(tiny_run, monkeypatch):
    out, _ = tiny_run
    calls, load_backbone = [], eval_knn.load_backbone
    monkeypatch.setattr(eval_knn, "load_backbone", lambda *args: calls.append(args) or load_backbone(*args))
    eval_linear.main(["--checkpoint", str(out / "checkpoint.pth"), "--device", "cpu", "--l2", "1e-2",
                      "--checkpoint_key", "student"])
    assert calls[0][-1] == "student"

@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "error: --batch_size 0: must be a positive integer"),
    (["--val_fraction", "1.5"], "error: --val_fraction 1.5: must be in (0, 1)"),
    (["--lrs", "-1"], "error: --lrs [-1.0]: every lr must be positive and finite"),
    (["--dataset", "imagenet9"], "error: unknown dataset 'imagenet9'; valid names: "),
    (["--l2", "1e-3", "0"], "error: --l2 [0.001, 0.0]: every strength must be positive and finite"),
    (["--l2", "nan"], "error: --l2 [nan]: every strength must be positive and finite"),
    (["--tol=-1e-6"], "error: --tol -1e-06: must be positive and finite"),
    (["--tol", "inf"], "error: --tol inf: must be positive and finite"),
    (["--max_iter", "0"], "error: --max_iter 0: must be a positive integer"),
    (["--probe_dtype", "float16"], "error: --probe_dtype float16: valid: float64, float32"),
    (["--solver", "adam"], "error: --solver adam: valid: lbfgs (fixed features), sgd (the SGD grid)"),
    (["--solver", "lbfgs", "--augment"], "error: --solver lbfgs: --augment recomputes crops every epoch and trains "
                                         "the SGD grid; drop --augment or use --solver sgd"),
    (["--steps", "100"], "error: --steps: not a flag of --solver lbfgs; its flags are --l2/--tol/--max_iter/"),
    (["--lrs", "0.1"], "error: --lrs: not a flag of --solver lbfgs; its flags are --l2/--tol/--max_iter/"),
    (["--solver", "sgd", "--l2", "1e-3"], "error: --l2: not a flag of --solver sgd; its flags are --lrs/"),
    (["--augment", "--tol", "1e-3"], "error: --tol: not a flag of --solver sgd (--augment); its flags are --lrs/"),
    (["--train_fraction", "0"], "error: --train_fraction 0.0: valid: 0 < fraction <= 1"),
    (["--train_fraction=-0.1"], "error: --train_fraction -0.1: valid: 0 < fraction <= 1"),
    (["--train_fraction", "1.5"], "error: --train_fraction 1.5: valid: 0 < fraction <= 1"),
    (["--train_fraction", "nan"], "error: --train_fraction nan: valid: 0 < fraction <= 1"),
    (["--train_fraction", "0.01"], "error: --train_fraction 0.01: its 10 training images leave class "),
    (["--synthetic_size", "10"], "error: --val_fraction 0.1: holding out 1 of the 10 training images leaves class "),
    (["--seed=-1"], "error: --seed -1: valid: 0 to 2^63 - 1"),
    (["--seed", str(2 ** 63)], f"error: --seed {2 ** 63}: valid: 0 to 2^63 - 1"),
    (["--num_workers=-1"], "error: --num_workers -1: must be >= 0"),
    (["--image_size", "0"], "error: --image_size 0: valid: 1 to 4096"),
    (["--image_size", "100000"], "error: --image_size 100000: valid: 1 to 4096"),
    (["--synthetic_size", "0"], "error: --synthetic_size 0: valid: 1 to 1000000"),
    (["--synthetic_size", "100000000"], "error: --synthetic_size 100000000: valid: 1 to 1000000"),
    (["--interpolate_offset=-1"], "error: --interpolate_offset -1.0: valid: 0 <= offset < 1"),
    (["--interpolate_offset", "nan"], "error: --interpolate_offset nan: valid: 0 <= offset < 1"),
    (["--patch_size", "0"], "error: --patch_size 0: valid: 1 to 4096"),
    (["--extract_batch_size=-3"], "error: --extract_batch_size -3: must be a positive integer"),
    (["--augment", "--epochs", "0"], "error: --epochs 0: must be a positive integer"),
    (["--solver", "sgd", "--weight_decays", "nan"], "error: --weight_decays [nan]: every value must be >= 0 and"),
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


def wrong_kind_file(tmp_path, kind: str) -> str:
    """A path that is no checkpoint: missing, empty, text, a directory, or a torch file without a state dict."""
    path = tmp_path / f"{kind}.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    return str(path)


@pytest.mark.parametrize("kind, message", [("missing", "no such file"),
                                           ("empty", "not a file written by torch.save"),
                                           ("text", "not a file written by torch.save"),
                                           ("directory", "is a directory, not a checkpoint file"),
                                           ("tensor", "no state dict of tensors found")])
@pytest.mark.parametrize("script", [eval_linear, eval_retrieval])
def test_wrong_kind_checkpoint_files_are_one_line_errors(tmp_path, kind, message, script):
    path = wrong_kind_file(tmp_path, kind)
    with pytest.raises(SystemExit) as excinfo:
        script.main(["--checkpoint", path, "--device", "cpu"])
    assert str(excinfo.value).startswith(f"error: --checkpoint {path}: {message}")
    assert "\n" not in str(excinfo.value)


def test_checkpoint_flag_errors_name_the_backbone(tiny_run):
    checkpoint = str(tiny_run[0] / "checkpoint.pth")  # patch 4, 2 blocks
    for flags, message in ((["--image_size", "6"], "error: --image_size 6: must be a multiple of the patch size 4"),
                           (["--n_last_blocks", "3"], "error: --n_last_blocks 3: the backbone has 2 blocks")):
        with pytest.raises(SystemExit) as excinfo:
            eval_linear.main(["--checkpoint", checkpoint, "--device", "cpu"] + flags)
        assert str(excinfo.value) == message


def test_low_shot_probe_fits_the_eval_knn_subset_and_holds_out_from_it(tiny_run, capsys):
    checkpoint = str(tiny_run[0] / "checkpoint.pth")
    result = eval_linear.main(["--checkpoint", checkpoint, "--device", "cpu", "--train_fraction", "0.25",
                               "--l2", "1e-2", "1e-4"])
    # the reference: the probe on a training split that holds nothing but eval_knn's subset
    backbone, image_size, _ = eval_knn.load_backbone(checkpoint)
    train_set = data.load_dataset("synthetic", "data", "train", size=512, image_size=image_size, evaluation=True)
    test_set = data.load_dataset("synthetic", "data", "test", image_size=image_size)
    keep = eval_knn.low_shot_indices(train_set.labels, 0.25)
    assert 0 < len(keep) < 512 / 3 and torch.bincount(train_set.labels[keep]).min() >= 12  # fixed, balanced
    subset = data.ImageDataset(train_set.images[keep], train_set.labels[keep], train_set.num_classes)
    expected = eval_linear.linear_evaluate(backbone, subset, test_set, torch.device("cpu"), n_last_blocks=2,
                                           image_size=image_size, l2_strengths=(1e-2, 1e-4))
    assert f"low-shot: {len(keep)} training images (0.25 of each class" in capsys.readouterr().out
    assert result["n_train"] == expected["n_train"] == len(keep) and result["n_fit"] == expected["n_fit"]
    assert result["top1"] == expected["top1"] and torch.equal(result["val_top1"], expected["val_top1"])
    assert [p["objective"] for p in result["path"]] == [p["objective"] for p in expected["path"]]
    full = eval_linear.main(["--checkpoint", checkpoint, "--device", "cpu", "--l2", "1e-2", "1e-4"])
    assert full["n_train"] == 512 and full["path"][0]["objective"] != result["path"][0]["objective"]


@pytest.mark.parametrize("flags", [["--l2", "1e-2", "1e-4", "--train_fraction", "0.5", "--extract_batch_size", "64"],
                                   ["--augment", "--epochs", "2", "--lrs", "0.1", "1", "--weight_decays", "0",
                                    "--batch_size", "64", "--extract_batch_size", "64"]])
def test_torchrun_two_processes_print_the_single_process_numbers(tiny_run, flags):
    checkpoint = str(tiny_run[0] / "checkpoint.pth")
    single, multi = run_single_and_torchrun("eval_linear.py", ["--checkpoint", checkpoint, "--device", "cpu", *flags])
    single = [line for line in single if not line.startswith("solve time")]  # a wall time
    multi = [line for line in multi if not line.startswith("solve time")]
    assert single[-1].startswith("linear top-1") and multi == single  # the same numbers, printed once
