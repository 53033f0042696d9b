"""Linear probing of a frozen backbone: multinomial logistic regression on fixed features, solved to its optimum.

Features come from the frozen teacher backbone: the [CLS] tokens of the last 4 blocks concatenated (DINO's ViT-S
choice, `n_last_blocks` in facebookresearch/dino eval_linear.py; `--n_last_blocks`), plus the mean patch token of
the last block with `--avgpool` (DINO's `avgpool_patchtokens`, the ViT-B recipe). There is no batch norm; features
are standardised with the mean and std of the fit part of the training split, as sthalles/sop
evaluation/eval_logistic_regression.py does with a StandardScaler before its L2 logistic regression.

Default (`--solver lbfgs`): the features are extracted once, without augmentation, and the convex objective

    J(W, b) = mean over images of cross-entropy(softmax(x W + b), label) + l2 / 2 * ||W||^2     (b not penalised)

is minimised by full-batch L-BFGS (torch.optim.LBFGS, strong-Wolfe line search, float64 by default; run on
W = P U with P from the eigendecomposition of the features' second moment, the same objective in coordinates where
correlated features do not stall it) until the largest absolute entry of its gradient (with respect to W and b)
is <= `--tol`, for every strength of a log-spaced grid (`--l2`, default 10 down to 1e-7 in half decades; each
solve starts from the solution at the previous, stronger one, or from the secant prediction of the last two). It
is the kind of problem sthalles/sop evaluation/eval_logistic_regression.py solves (a StandardScaler, then
cyanure's L2 LogisticRegression at each given `lambd`, tol 1e-8), here with the strength selected on held-out
training images: 10 % of the training split (seeded) is held out, the strength with the best held-out top-1 is
selected (ties: the strongest), and the classifier is then refit at that strength on the whole training split
(fit + held-out, warm-started from the fit solution; same standardisation). Its top-1 on the test split is the
reported number; test labels are read only after the selection. A probe that stops before the optimum measures
the optimiser as much as the features, which is why the objective and gradient reached are printed with it.
A line per strength on stderr shows the progress of a solve that can take minutes (60,000 x 784 pixels on a CPU).

`--solver sgd` is the previous probe, kept for comparison: a grid of linear classifiers (learning rates x weight
decays; SGD, momentum 0.9, cosine schedule, `--steps` steps) trained as one batched computation, selected on the
same held-out part; the best test top-1 over the grid is printed as well (how DINO/iBOT report it: they select on
the validation set). `--augment` is the official protocol of facebookresearch/dino eval_linear.py (random-resized
crop + flip, features recomputed every epoch, SGD) with that grid; it is slow. For image folders the crops are then
cut from the whole training image (as in train.py); the held-out images, and the statistics that standardise the
features, use the evaluation transform (resize 256, centre crop 224).

`--train_fraction 0.01` / `0.1` probes the fixed class-balanced subset that eval_knn.py --train_fraction votes
with (eval_knn.low_shot_indices, the same images for every checkpoint); the held-out part is drawn from that subset
and the refit uses the whole subset, so no label outside it is read (DINO's low-shot rows use the SimCLR 1 % / 10 %
ImageNet split files instead).

Under torchrun every process extracts a shard of the features and rank 0 alone fits, selects and prints. The
--augment crops are sharded too: each batch draws from its own generator, seeded by (--seed, epoch, batch), so they
do not depend on the number of processes (they do on --extract_batch_size).

    python eval_linear.py --checkpoint runs/cpu_demo/checkpoint.pth
    python eval_linear.py --checkpoint runs/cpu_demo/checkpoint.pth --train_fraction 0.01     # low-shot: 1 %
    python eval_linear.py --pixels --dataset synthetic --synthetic_size 10000      # the raw-pixel baseline
    python eval_linear.py --checkpoint dino_vitbase16_pretrain.pth --arch vit_base --patch_size 16 --avgpool \\
        --n_last_blocks 1 --dataset folder --data_path /path/to/imagenet --augment --epochs 100
    torchrun --nproc_per_node=8 eval_linear.py --pretrained_weights CKPT --arch vit_small --dataset folder ...
"""
import argparse
import math
import sys
import time

import torch
import torch.distributed as dist

import augment
import data
import eval_knn

L2_STRENGTHS = tuple(10.0 ** (k / 2) for k in range(2, -15, -1))  # 10, 10^0.5, 1, ..., 1e-7: strongest first
TOL = 1e-5  # L-BFGS stops at max |gradient| <= TOL (the objective's, on standardised features)
MAX_ITER = 1000  # L-BFGS iterations per strength
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # SGD grid: base lrs, scaled by batch_size / 256 (DINO)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)
STEPS, BATCH_SIZE = 500, 1024  # SGD grid on fixed features (--solver sgd)


# ----------------------------------------------------------------------------------------------------- features
@torch.no_grad()
def probe_features(backbone: torch.nn.Module, images: torch.Tensor, n_last_blocks: int = 4,
                   avgpool: bool = False) -> torch.Tensor:
    """float (b, F) features of normalised images (b, 3, H, W): [CLS] of the last n blocks (+ mean patch token)."""
    if not hasattr(backbone, "get_intermediate_layers"):  # eval_knn.Pixels: the pixels are the feature
        return backbone(images)[:, 0].float()
    layers = backbone.get_intermediate_layers(images, n_last_blocks)  # n x (b, N, D), final-normed
    parts = [tokens[:, 0] for tokens in layers]  # concatenated [CLS] tokens (DINO's n_last_blocks)
    if avgpool:
        parts.append(layers[-1][:, 1:].mean(1))  # mean patch token of the last block
    return torch.cat(parts, dim=1).float()  # (b, n D [+ D])


def probe_dim(backbone, n_last_blocks: int = 4, avgpool: bool = False) -> int:
    """F, the width of probe_features (get_intermediate_layers returns every block when asked for more)."""
    if not hasattr(backbone, "get_intermediate_layers"):
        return backbone.embed_dim
    return (min(n_last_blocks, len(backbone.blocks)) + avgpool) * backbone.embed_dim


@torch.no_grad()
def extract(backbone, dataset, batch_size: int, device: torch.device, image_size: int | None,
            n_last_blocks: int = 4, avgpool: bool = False, indices: torch.Tensor | None = None,
            crop_seed: int | None = None, num_workers: int = 0) -> torch.Tensor:
    """Features (n, F) on `device` of dataset[indices] (default: all), in that order. With a crop_seed, every
    image is first cut by a random-resized crop (scale 0.08-1) and flipped with p 0.5 (the --augment protocol),
    batch j drawing from its own generator seeded by (crop_seed, j).

    Under torchrun each rank embeds every world_size-th batch and the features are all-gathered, as
    eval_knn.extract_features does; batch j's crops do not depend on which rank draws them, so every world size
    gives the same features."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = torch.arange(len(dataset)) if indices is None else indices.cpu()
    chunks = indices.split(batch_size)
    starts = [j * batch_size for j in range(len(chunks))]
    mine = list(range(rank, len(chunks), world))
    if isinstance(dataset, data.ImageDataset):
        batches = ((dataset.images[chunks[j]], None) for j in mine)
    else:  # folder items: (image, label) under the evaluation transform, (canvas, valid size, label, index) else
        loader = data.load_batches(dataset, [chunks[j].tolist() for j in mine], num_workers, device.type == "cuda")
        batches = ((items[0], items[1] if len(items) == 4 else None) for items in loader)
    was_training = backbone.training
    backbone.eval()
    features = torch.zeros(len(indices), probe_dim(backbone, n_last_blocks, avgpool), device=device)
    for j, (images, sizes) in zip(mine, batches):
        images = images.to(device, non_blocking=True)
        if crop_seed is not None:
            generator = torch.Generator().manual_seed(data.seed_for(crop_seed, j))
            b, _, H, W = images.shape
            if sizes is None:
                boxes = augment.sample_crop_boxes(b, H, W, (0.08, 1.0), generator).to(device)
            else:  # crops of the whole image, inside its valid region of the canvas (data.ImageFolder)
                images = augment.replicate_edges(images, sizes.to(device))
                boxes = augment.sample_crop_boxes(b, sizes[:, 0], sizes[:, 1], (0.08, 1.0), generator).to(device)
            flip = torch.rand(b, generator=generator) < 0.5
            x = augment.resized_crops(images.float().div_(255), boxes, flip.to(device), image_size or H,
                                      antialias=sizes is not None,
                                      sizes=None if sizes is None else sizes.to(device))
            mean = torch.tensor(data.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
            x = (x - mean) / torch.tensor(data.IMAGENET_STD, device=device).view(1, 3, 1, 1)
        else:
            x = data.normalize_images(images, image_size)  # (b, 3, S, S)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features[starts[j]:starts[j] + len(x)] = probe_features(backbone, x, n_last_blocks, avgpool)
    backbone.train(was_training)
    if world > 1:
        dist.all_reduce(features)  # disjoint batches, zeros elsewhere: the sum gathers them exactly
    return features


def split_train(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of n training indices into (fit, held-out) parts; held-out has round(n * fraction)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]


# ----------------------------------------------------------------------------------------------------- convex probe
def softmax_objective(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float,
                      chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """J = mean cross-entropy of softmax(x W + b) + l2 / 2 ||W||^2 and its exact gradient, in x's dtype:
    (J (), dJ/dW (F, C), dJ/db (C,)). Rows are processed in chunks, so the (n, C) logits never exist at once."""
    n = len(x)
    loss = x.new_zeros(())
    grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    for start in range(0, n, chunk_size):
        xc, yc = x[start:start + chunk_size], labels[start:start + chunk_size]
        log_p = torch.addmm(bias, xc, weight).log_softmax(1)  # (c, C)
        loss -= log_p.gather(1, yc[:, None]).sum()
        residual = log_p.exp_()  # softmax - one-hot = d(CE)/d logits
        residual[torch.arange(len(yc), device=x.device), yc] -= 1
        grad_weight.addmm_(xc.T, residual)
        grad_bias += residual.sum(0)
    loss = loss / n + 0.5 * l2 * weight.square().sum()
    return loss, grad_weight.div_(n).add_(weight, alpha=l2), grad_bias.div_(n)


def second_moment_eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (F,) and eigenvectors (F, F) of x^T x / n, the curvature of the data term (up to the softmax's)."""
    return torch.linalg.eigh(x.T @ x / len(x))


def fit_logistic(x: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, weight=None, bias=None,
                 tol: float = TOL, max_iter: int = MAX_ITER, eigh=None, history_size: int = 20, chunk: int = 25):
    """Minimise softmax_objective over (W (F, C), b (C,)) from (weight, bias) (default zeros), in x's dtype, until
    max |dJ/dW, dJ/db| <= tol or max_iter iterations. Full-batch L-BFGS with a strong-Wolfe line search, run on
    W = P U, P = V (Lambda + l2)^-1/2 with x^T x / n = V Lambda V^T (eigh: that decomposition, computed if None):
    the same objective in coordinates where its Hessian is close to the identity, so correlated features and small
    strengths do not stall it. Returns (weight, bias, info: objective, grad_max, iterations, converged, stop)."""
    eigenvalues, eigenvectors = second_moment_eigh(x) if eigh is None else eigh
    scale = (eigenvalues.clamp_min(0) + l2).rsqrt()
    precondition = eigenvectors * scale  # P (F, F): W = P U, and dJ/dU = P^T dJ/dW
    weight = x.new_zeros(x.shape[1], num_classes) if weight is None else weight.detach()
    u = (eigenvectors.T @ weight) / scale[:, None]  # P^-1 W
    bias = x.new_zeros(num_classes) if bias is None else bias.detach().clone()
    optimizer = torch.optim.LBFGS([u, bias], lr=1, tolerance_grad=0.0, tolerance_change=torch.finfo(x.dtype).eps,
                                  history_size=history_size, line_search_fn="strong_wolfe")

    def closure():
        loss, grad_weight, bias.grad = softmax_objective(x, labels, precondition @ u, bias, l2)
        u.grad = precondition.T @ grad_weight
        return loss

    iterations, previous = 0, math.inf
    while True:  # chunks of L-BFGS iterations (its state carries over), the true gradient checked in between
        steps = min(chunk, max_iter - iterations)
        optimizer.param_groups[0].update(max_iter=steps, max_eval=2 * steps)
        optimizer.step(closure)
        iterations = optimizer.state[u]["n_iter"]
        loss, grad_weight, grad_bias = softmax_objective(x, labels, precondition @ u, bias, l2)
        grad_max = max(float(grad_weight.abs().max()), float(grad_bias.abs().max()))
        if grad_max <= tol or iterations >= max_iter or not loss < previous:  # the last: no progress left to make
            break
        previous = float(loss)
    stop = "converged" if grad_max <= tol else "max_iter reached" if iterations >= max_iter else "stalled"
    info = dict(objective=float(loss), grad_max=grad_max, iterations=iterations, converged=grad_max <= tol,
                stop=stop)  # stalled: no decrease left at this precision (e.g. float32 with a small tol)
    return precondition @ u, bias, info


@torch.no_grad()
def classifier_top1(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    chunk_size: int = 65536) -> float:
    """Top-1 % of the linear classifier (W (F, C), b (C,)) on (n, F) features."""
    correct = sum(int((torch.addmm(bias, x[s:s + chunk_size], weight).argmax(1) == labels[s:s + chunk_size]).sum())
                  for s in range(0, len(x), chunk_size))
    return 100.0 * correct / len(x)


def l2_path(fit_x, fit_labels, val_x, val_labels, num_classes: int, l2_strengths=L2_STRENGTHS, tol: float = TOL,
            max_iter: int = MAX_ITER) -> dict:
    """fit_logistic at every strength, strongest first, each started from the previous solution or, when that is
    lower on the new objective, from the secant prediction of the last two (linear in log l2); held-out top-1 of
    each. Returns dict(l2_strengths (S,) strongest first, val_top1 (S,), path (S infos), selected (index of the
    best held-out top-1, ties to the strongest), weight, bias (the selected solution))."""
    strengths = sorted(l2_strengths, reverse=True)
    eigh = second_moment_eigh(fit_x)
    recent, val_top1, path, best = [], [], [], 0  # recent: the last two solutions (weight, bias)
    for i, l2 in enumerate(strengths):
        start = recent[-1] if recent else (None, None)
        if i >= 2 and strengths[i - 1] < strengths[i - 2]:
            ratio = math.log(strengths[i - 1] / l2) / math.log(strengths[i - 2] / strengths[i - 1])
            (w0, b0), (w1, b1) = recent
            predicted = (w1 + ratio * (w1 - w0), b1 + ratio * (b1 - b0))
            objective = lambda candidate: softmax_objective(fit_x, fit_labels, *candidate, l2)[0]
            start = predicted if objective(predicted) < objective(start) else start
        weight, bias, info = fit_logistic(fit_x, fit_labels, num_classes, l2, *start, tol, max_iter, eigh)
        recent = (recent + [(weight, bias)])[-2:]
        val_top1.append(classifier_top1(val_x, val_labels, weight, bias))
        path.append(info)
        print(f"L2 {l2:.3g} ({i + 1}/{len(strengths)}): held-out top-1 {val_top1[-1]:.2f} after {info['iterations']} "
              "iterations", file=sys.stderr, flush=True)  # progress of a solve that can take minutes
        if i == 0 or val_top1[-1] > val_top1[best]:
            best, selected = i, (weight, bias)
    return dict(l2_strengths=torch.tensor(strengths, dtype=torch.float64),
                val_top1=torch.tensor(val_top1, dtype=torch.float64), path=path, selected=best,
                weight=selected[0], bias=selected[1])


# ----------------------------------------------------------------------------------------------------- the SGD grid
class LinearGrid:
    """G = len(lrs) linear classifiers trained side by side: weight (G, F, C), bias (G, C), all from the same
    N(0, 0.01) initialisation (DINO's), each with its own lr and weight decay. Torch SGD semantics, momentum 0.9,
    weight decay added to the gradient of weight and bias alike (as SGD(weight_decay) on DINO's nn.Linear)."""

    def __init__(self, dim: int, num_classes: int, lrs, weight_decays, device, seed: int = 0, momentum: float = 0.9):
        generator = torch.Generator().manual_seed(seed)
        G = len(lrs)
        self.weight = (0.01 * torch.randn(num_classes, dim, generator=generator)).T.to(device).repeat(G, 1, 1)
        self.bias = torch.zeros(G, num_classes, device=device)  # (G, C)
        self.lr = torch.tensor(lrs, dtype=torch.float32, device=device)  # (G,)
        self.weight_decay = torch.tensor(weight_decays, dtype=torch.float32, device=device)  # (G,)
        self.momentum = momentum
        self.weight_buffer, self.bias_buffer = torch.zeros_like(self.weight), torch.zeros_like(self.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(b, F) features -> (G, b, C) logits of every classifier: one matmul against all G weights."""
        G, F_, C = self.weight.shape
        out = x @ self.weight.permute(1, 0, 2).reshape(F_, G * C)  # (b, G C)
        return out.view(-1, G, C).transpose(0, 1) + self.bias[:, None]  # (G, b, C)

    def step(self, x: torch.Tensor, labels: torch.Tensor, lr_factor: float) -> None:
        """One SGD step of every classifier on the mean cross-entropy of the batch (b, F), labels (b,)."""
        b = len(x)
        G, F_, C = self.weight.shape
        # d(mean CE)/d logits = (softmax - one-hot) / b; fp32 whatever the backbone ran in
        grad_logits = self.logits(x).softmax(-1)  # (G, b, C)
        grad_logits[:, torch.arange(b, device=x.device), labels] -= 1
        grad_logits /= b
        grad_weight = x.T @ grad_logits.transpose(0, 1).reshape(b, G * C)  # (F, G C): one matmul for the grid
        grad_weight = grad_weight.view(F_, G, C).transpose(0, 1)  # (G, F, C)
        grad_bias = grad_logits.sum(1)  # (G, C)
        wd = self.weight_decay
        self.weight_buffer.mul_(self.momentum).add_(grad_weight + wd[:, None, None] * self.weight)
        self.bias_buffer.mul_(self.momentum).add_(grad_bias + wd[:, None] * self.bias)
        lr = self.lr * lr_factor
        self.weight -= lr[:, None, None] * self.weight_buffer
        self.bias -= lr[:, None] * self.bias_buffer

    @torch.no_grad()
    def top1(self, x: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        """Top-1 % (G,) of every classifier on (n, F) features; -1 for a classifier whose weights diverged."""
        correct = torch.zeros(len(self.lr), device=x.device)
        for start in range(0, len(x), chunk_size):
            predictions = self.logits(x[start:start + chunk_size]).argmax(-1)  # (G, c)
            correct += (predictions == labels[start:start + chunk_size]).sum(1)
        finite = self.weight.isfinite().flatten(1).all(1) & self.bias.isfinite().all(1)
        return torch.where(finite, 100.0 * correct / len(x), -1.0)


def cosine_factor(step: int, total: int) -> float:
    """lr multiplier at `step` of `total`: cosine from 1 to 0 (DINO's CosineAnnealingLR, eta_min 0)."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """int64 (steps, batch_size) row indices: consecutive seeded permutations of n rows, cut into batches."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch_size)
    epochs = math.ceil(steps / per_epoch)
    order = torch.cat([torch.randperm(n, generator=generator)[:per_epoch * batch_size] for _ in range(epochs)])
    return order.view(-1, min(batch_size, n))[:steps]


def train_grid(features: torch.Tensor, labels: torch.Tensor, num_classes: int, lrs=LRS,
               weight_decays=WEIGHT_DECAYS, steps: int = 500, batch_size: int = 1024, seed: int = 0) -> LinearGrid:
    """Train the lrs x weight_decays grid (lr scaled by batch / 256) on fixed (n, F) features for `steps` steps."""
    pairs = [(lr * min(batch_size, len(features)) / 256, wd) for lr in lrs for wd in weight_decays]
    grid = LinearGrid(features.shape[1], num_classes, [p[0] for p in pairs], [p[1] for p in pairs],
                      features.device, seed)
    order = batch_order(len(features), batch_size, steps, seed).to(features.device)
    labels = labels.to(features.device)
    for step in range(steps):
        idx = order[step]
        grid.step(features[idx], labels[idx], cosine_factor(step, steps))
    return grid


def standardise(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per feature; statistics of the training part only."""
    return (features - mean) / std.clamp_min(1e-6)


def linear_evaluate(backbone, train_set, test_set, device, *, n_last_blocks=4, avgpool=False, image_size=None,
                    solver=None, l2_strengths=L2_STRENGTHS, tol=TOL, max_iter=MAX_ITER, probe_dtype=torch.float64,
                    lrs=LRS, weight_decays=WEIGHT_DECAYS, steps=STEPS, batch_size=BATCH_SIZE, val_fraction=0.1,
                    seed=0, augment_epochs=0, extract_batch_size=256, num_workers=0, augment_set=None,
                    train_indices=None) -> dict | None:
    """Held-out-selected linear probe. solver: "lbfgs" (default without augment_epochs) or "sgd" (the default, and
    the only choice, with augment_epochs > 0). Test labels are read only after the selection. augment_set: the
    training split as augment_epochs crops it (folder datasets: whole images on canvases; default train_set).
    train_indices: the training images to use (default all; eval_knn.low_shot_indices for --train_fraction): the
    held-out part is drawn from them, and the refit uses them all.

    Under torchrun every rank extracts a shard of the features (extract) and rank 0 alone fits, selects and
    returns; the other ranks return None.

    lbfgs returns dict(solver, top1 (test top-1 % of the refit classifier), l2 (selected strength), selected,
    l2_strengths (S,) strongest first, val_top1 (S,), path (per strength: objective, grad_max, iterations,
    converged, stop), refit (the same for the refit on the whole training split), solve_seconds, n_fit, n_train).
    sgd returns dict(solver, top1 (of the selected grid point), best_test_top1 (best over the grid, DINO/iBOT-style),
    val_top1 (G,), test_top1 (G,), lrs, weight_decays, selected (grid index), n_fit, n_train)."""
    solver = solver or ("sgd" if augment_epochs else "lbfgs")
    if solver not in ("lbfgs", "sgd") or (solver == "lbfgs" and augment_epochs):
        raise ValueError(f"solver {solver!r}: 'lbfgs' (fixed features) or 'sgd' (also the --augment protocol)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    num_classes = max(train_set.num_classes, test_set.num_classes)
    train_indices = torch.arange(len(train_set)) if train_indices is None else train_indices.cpu()
    fit, held_out = (train_indices[part] for part in split_train(len(train_indices), val_fraction, seed))
    train_labels = train_set.labels.to(device)
    fit_labels, val_labels = train_labels[fit.to(device)], train_labels[held_out.to(device)]
    sizes = dict(n_fit=len(fit), n_train=len(train_indices))
    extract_args = dict(batch_size=extract_batch_size, device=device, image_size=image_size,
                        n_last_blocks=n_last_blocks, avgpool=avgpool, num_workers=num_workers)
    val_features = extract(backbone, train_set, indices=held_out, **extract_args)
    fit_features = extract(backbone, train_set, indices=fit, **extract_args)  # un-augmented: the statistics
    mean, std = fit_features.mean(0), fit_features.std(0)
    val_features = standardise(val_features, mean, std)
    grid = None
    if solver == "sgd" and augment_epochs:
        del fit_features
        grid = train_augmented_grid(backbone, train_set if augment_set is None else augment_set, fit, fit_labels,
                                    mean, std, num_classes, lrs, weight_decays, batch_size, seed, augment_epochs,
                                    extract_args)
    test_features = standardise(extract(backbone, test_set, **extract_args), mean, std)  # the last extraction
    if rank != 0:
        return None
    if solver == "sgd":
        if grid is None:
            grid = train_grid(standardise(fit_features, mean, std), fit_labels, num_classes, lrs, weight_decays,
                              steps, batch_size, seed)
        val_top1 = grid.top1(val_features, val_labels)
        selected = int(val_top1.argmax())  # first of equal maxima: the smallest lr, then the smallest weight decay
        test_top1 = grid.top1(test_features, test_set.labels.to(device))
        return dict(solver="sgd", top1=float(test_top1[selected]), best_test_top1=float(test_top1.max()),
                    val_top1=val_top1.cpu(), test_top1=test_top1.cpu(), lrs=grid.lr.cpu(),
                    weight_decays=grid.weight_decay.cpu(), selected=selected, **sizes)
    fit_x, val_x = standardise(fit_features, mean, std).to(probe_dtype), val_features.to(probe_dtype)
    del fit_features
    start = time.perf_counter()
    result = l2_path(fit_x, fit_labels, val_x, val_labels, num_classes, l2_strengths, tol, max_iter)
    l2 = float(result["l2_strengths"][result["selected"]])
    # refit at the selected strength on the whole training split (or low-shot subset), from the fit-part solution
    train_x = torch.cat((fit_x, val_x))
    del fit_x, val_x
    weight, bias, refit = fit_logistic(train_x, torch.cat((fit_labels, val_labels)), num_classes, l2,
                                       result.pop("weight"), result.pop("bias"), tol, max_iter)
    solve_seconds = time.perf_counter() - start
    del train_x
    top1 = classifier_top1(test_features.to(probe_dtype), test_set.labels.to(device), weight, bias)
    return dict(solver="lbfgs", top1=top1, l2=l2, refit=refit, solve_seconds=solve_seconds, **sizes, **result)


def train_augmented_grid(backbone, dataset, fit, fit_labels, mean, std, num_classes, lrs, weight_decays,
                         batch_size, seed, augment_epochs, extract_args) -> LinearGrid | None:
    """The official protocol: each epoch embeds a fresh random-resized, flipped crop of every fit image of dataset
    and trains the SGD grid on it. Standardisation statistics (mean, std) come from the un-augmented fit images.
    Under torchrun every rank embeds its share of the crops and rank 0 alone trains (the others return None)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = fit_labels.device
    pairs = [(lr * min(batch_size, len(fit)) / 256, wd) for lr in lrs for wd in weight_decays]
    grid = LinearGrid(len(mean), num_classes, [p[0] for p in pairs], [p[1] for p in pairs], device, seed)
    per_epoch = max(1, len(fit) // batch_size)
    for epoch in range(augment_epochs):
        crops = extract(backbone, dataset, indices=fit, crop_seed=data.seed_for(seed, epoch), **extract_args)
        if rank != 0:
            continue
        features = standardise(crops, mean, std)
        order = batch_order(len(fit), batch_size, per_epoch, seed + 1 + epoch).to(device)
        for i, idx in enumerate(order):
            grid.step(features[idx], fit_labels[idx], cosine_factor(epoch * per_epoch + i, augment_epochs * per_epoch))
    return grid if rank == 0 else None


# ----------------------------------------------------------------------------------------------------- command
SGD_FLAGS = ("lrs", "weight_decays", "steps", "batch_size")
LBFGS_FLAGS = ("l2", "tol", "max_iter", "probe_dtype")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_knn.add_common_arguments(parser)
    parser.add_argument("--n_last_blocks", type=int, default=None,
                        help="[CLS] of the last n blocks (default 4, DINO's ViT-S choice, or all blocks if fewer)")
    parser.add_argument("--avgpool", action="store_true", help="add the last block's mean patch token (ViT-B recipe)")
    parser.add_argument("--solver", default=None,
                        help="lbfgs (default: logistic regression to its optimum) or sgd (the SGD grid; --augment)")
    parser.add_argument("--l2", type=float, nargs="+", default=None,
                        help="lbfgs: L2 strengths to select from (default 10 to 1e-7, half decades)")
    parser.add_argument("--tol", type=float, default=None, help=f"lbfgs: stop at max |gradient| <= tol ({TOL})")
    parser.add_argument("--max_iter", type=int, default=None, help=f"lbfgs: iterations per strength ({MAX_ITER})")
    parser.add_argument("--probe_dtype", default=None, help="lbfgs: float64 (default) or float32")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="sgd: base lrs, scaled by batch_size / 256")
    parser.add_argument("--weight_decays", type=float, nargs="+", default=None, help=f"sgd ({WEIGHT_DECAYS})")
    parser.add_argument("--steps", type=int, default=None, help=f"sgd: steps on fixed features ({STEPS})")
    parser.add_argument("--batch_size", type=int, default=None, help=f"sgd: classifier batch ({BATCH_SIZE})")
    parser.add_argument("--extract_batch_size", type=int, default=256, help="backbone batch")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="held-out part of the train split")
    parser.add_argument("--train_fraction", type=float, default=1.0,
                        help="low-shot: probe a fixed class-balanced fraction of the training images (0.01, 0.1), "
                             "the subset of eval_knn.py --train_fraction")
    parser.add_argument("--augment", action="store_true", help="official protocol: crops + flips, SGD, slow")
    parser.add_argument("--epochs", type=int, default=100, help="--augment only: epochs of recomputed features")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=8, help="folder datasets only")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser


def check_flags(args) -> None:
    """One-line SystemExit for a flag value that cannot work; fills the solver's defaults. Runs before any loading."""
    for flag in ("steps", "batch_size", "extract_batch_size", "n_last_blocks", "epochs", "max_iter"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise SystemExit(f"error: --{flag} {getattr(args, flag)}: must be a positive integer")
    eval_knn.check_common_flags(args)
    if not 0 < args.val_fraction < 1:
        raise SystemExit(f"error: --val_fraction {args.val_fraction}: must be in (0, 1)")
    if not 0 < args.train_fraction <= 1:
        raise SystemExit(f"error: --train_fraction {args.train_fraction}: valid: 0 < fraction <= 1")
    if not 0 <= args.seed < 2 ** 63:
        raise SystemExit(f"error: --seed {args.seed}: valid: 0 to 2^63 - 1")
    if args.lrs is not None and any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs):
        raise SystemExit(f"error: --lrs {args.lrs}: every lr must be positive and finite")
    if args.weight_decays is not None and any(not (wd >= 0 and math.isfinite(wd)) for wd in args.weight_decays):
        raise SystemExit(f"error: --weight_decays {args.weight_decays}: every value must be >= 0 and finite")
    if args.l2 is not None and any(not (l2 > 0 and math.isfinite(l2)) for l2 in args.l2):
        raise SystemExit(f"error: --l2 {args.l2}: every strength must be positive and finite")
    if args.tol is not None and not (args.tol > 0 and math.isfinite(args.tol)):
        raise SystemExit(f"error: --tol {args.tol}: must be positive and finite")
    if args.probe_dtype not in (None, "float64", "float32"):
        raise SystemExit(f"error: --probe_dtype {args.probe_dtype}: valid: float64, float32")
    if args.solver not in (None, "lbfgs", "sgd"):
        raise SystemExit(f"error: --solver {args.solver}: valid: lbfgs (fixed features), sgd (the SGD grid)")
    if args.solver == "lbfgs" and args.augment:
        raise SystemExit("error: --solver lbfgs: --augment recomputes crops every epoch and trains the SGD grid; "
                         "drop --augment or use --solver sgd")
    args.solver = args.solver or ("sgd" if args.augment else "lbfgs")
    unused, other = (LBFGS_FLAGS, "--lrs/--weight_decays/--steps/--batch_size") if args.solver == "sgd" else \
        (SGD_FLAGS, "--l2/--tol/--max_iter/--probe_dtype")
    for flag in unused:
        if getattr(args, flag) is not None:
            raise SystemExit(f"error: --{flag}: not a flag of --solver {args.solver}"
                             f"{' (--augment)' if args.augment else ''}; its flags are {other}")
    defaults = dict(l2=L2_STRENGTHS, tol=TOL, max_iter=MAX_ITER, probe_dtype="float64", lrs=LRS,
                    weight_decays=WEIGHT_DECAYS, steps=STEPS, batch_size=BATCH_SIZE)
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(args)
    device, rank = eval_knn.setup_distributed(args.device)  # before any loading: a missing GPU is a flag error
    if args.pixels:
        backbone, image_size, config = None, args.image_size, None
    else:
        backbone, image_size, config = eval_knn.load_backbone(args.checkpoint, args.arch, args.patch_size,
                                                              args.interpolate_offset, args.checkpoint_key)
        if (args.n_last_blocks or 0) > len(backbone.blocks):
            raise SystemExit(f"error: --n_last_blocks {args.n_last_blocks}: the backbone has "
                             f"{len(backbone.blocks)} blocks")
        args.n_last_blocks = args.n_last_blocks or min(4, len(backbone.blocks))
    dataset = args.dataset or (config or {}).get("dataset")
    data_path = args.data_path or (config or {}).get("data_path", "data")
    if dataset is None:
        raise SystemExit("error: --dataset is required with --pixels or a plain state dict; valid: "
                         + ", ".join(data.DATASETS))
    image_size = args.image_size or image_size
    try:
        data.check_dataset(dataset, data_path)
        size = args.synthetic_size or (config or {}).get("synthetic_size")
        train_set = data.load_dataset(dataset, data_path, "train", size=size, image_size=image_size or 224,
                                      evaluation=True)
        augment_set = (data.load_dataset(dataset, data_path, "train", image_size=image_size or 224)
                       if args.augment and dataset == "folder" else None)
        test_set = data.load_dataset(dataset, data_path, "test", image_size=image_size or 224)
    except data.DatasetError as e:
        raise SystemExit(f"error: {e}")
    train_indices = training_subset(train_set.labels, args.train_fraction, args.val_fraction, args.seed)
    if backbone is None:
        backbone = eval_knn.Pixels(image_size or train_set[0][0].shape[-1])
    eval_knn.check_image_size(image_size, backbone)
    if rank == 0 and args.train_fraction < 1:
        print(f"low-shot: {len(train_indices)} training images ({args.train_fraction:g} of each class; "
              f"the held-out part is drawn from them)")
    result = linear_evaluate(backbone.to(device), train_set, test_set, device, n_last_blocks=args.n_last_blocks or 1,
                             avgpool=args.avgpool, image_size=image_size, solver=args.solver, l2_strengths=args.l2,
                             tol=args.tol, max_iter=args.max_iter, probe_dtype=getattr(torch, args.probe_dtype),
                             lrs=args.lrs, weight_decays=args.weight_decays, steps=args.steps,
                             batch_size=args.batch_size, val_fraction=args.val_fraction, seed=args.seed,
                             augment_epochs=args.epochs if args.augment else 0,
                             extract_batch_size=args.extract_batch_size, num_workers=args.num_workers,
                             augment_set=augment_set, train_indices=train_indices)
    if rank != 0:
        return None
    (print_lbfgs if result["solver"] == "lbfgs" else print_sgd)(result)
    print(f"linear top-1 {result['top1']:.2f} %")
    return result


def training_subset(labels: torch.Tensor, train_fraction: float, val_fraction: float, seed: int) -> torch.Tensor:
    """Indices of the training images the probe uses: all of them, or, below 1, eval_knn.low_shot_indices (the
    same fixed class-balanced subset as eval_knn.py --train_fraction). SystemExit when the held-out part drawn
    from them (split_train) would leave a class, or the whole fit part, without an image."""
    indices = torch.arange(len(labels)) if train_fraction == 1 else eval_knn.low_shot_indices(labels, train_fraction)
    fit, held_out = split_train(len(indices), val_fraction, seed)
    missing = sorted(set(labels[indices].tolist()) - set(labels[indices[fit]].tolist()))
    if not missing:
        return indices
    what = "no image to fit" if len(fit) == 0 else f"class {missing[0]} with no image to fit"
    if train_fraction < 1:
        raise SystemExit(f"error: --train_fraction {train_fraction:g}: its {len(indices)} training images leave "
                         f"{what} once --val_fraction {val_fraction:g} holds out {len(held_out)} of them; "
                         f"valid: a larger fraction")
    raise SystemExit(f"error: --val_fraction {val_fraction:g}: holding out {len(held_out)} of the {len(indices)} "
                     f"training images leaves {what}; valid: a smaller fraction")


def print_lbfgs(result: dict) -> None:
    """The L2 path (held-out top-1, objective and gradient reached per strength), the selection and the refit."""
    print("L2 strength  held-out top-1  objective     max|grad|  iterations")
    for i, (l2, info) in enumerate(zip(result["l2_strengths"].tolist(), result["path"])):
        mark = "  <- selected on held-out" if i == result["selected"] else ""
        mark += "" if info["converged"] else f"  (not converged: {info['stop']})"
        print(f"{l2:<12.3g} {result['val_top1'][i]:14.2f}  {info['objective']:<12.8f}  {info['grad_max']:<9.2e}"
              f"  {info['iterations']:10d}{mark}")
    if len(result["path"]) > 1 and result["selected"] in (0, len(result["path"]) - 1):
        print(f"note: the selected strength is the {'strongest' if result['selected'] == 0 else 'weakest'} of the "
              f"grid: the best may lie beyond it (extend --l2)")
    refit = result["refit"]
    print(f"refit on every training image used (fit + held-out: {result['n_train']} images) at L2 "
          f"{result['l2']:.3g}: objective {refit['objective']:.8f}, max|grad| {refit['grad_max']:.2e} after "
          f"{refit['iterations']} iterations"
          f"{'' if refit['converged'] else ' (not converged: ' + refit['stop'] + ')'}")
    print(f"solve time {result['solve_seconds']:.1f} s ({len(result['path'])} strengths and the refit)")


def print_sgd(result: dict) -> None:
    print("lr        wd        held-out top-1  test top-1")
    for i, (lr, wd) in enumerate(zip(result["lrs"].tolist(), result["weight_decays"].tolist())):
        mark = "  <- selected on held-out" if i == result["selected"] else ""
        print(f"{lr:<9.3g} {wd:<9.3g} {result['val_top1'][i]:14.2f} {result['test_top1'][i]:11.2f}{mark}")
    print(f"best test top-1 over the grid (DINO/iBOT-style, selected on test): {result['best_test_top1']:.2f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
    eval_knn.close_distributed()
