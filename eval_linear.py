"""Linear probing of a frozen backbone (DINO/iBOT protocol, spec §7.2), with a grid of classifiers trained at once.

Features come from the frozen teacher backbone: the [CLS] tokens of the last 4 blocks concatenated (DINO's ViT-S
choice; `--n_last_blocks`), plus the mean patch token of the last block with `--avgpool` (the ViT-B recipe). There
is no batch norm; features are standardised with the statistics of the training part (a choice of this project).

Default (fast): features are extracted once, without augmentation, and a grid of linear classifiers (learning
rates x weight decays; SGD, momentum 0.9, cosine schedule) is trained on them as one batched computation: one
(G, F, C) weight tensor, one matmul per step. 10 % of the training split (seeded) is held out; the grid point with
the best held-out top-1 is selected, and its top-1 on the test split is the reported number. The best test top-1
over the grid is printed as well: that is how DINO/iBOT report it (they select on the validation set).

`--augment` is the official protocol (random-resized crop + flip, features recomputed every epoch); it is slow.
For image folders the crops are then cut from the whole training image (as in train.py); the held-out images, and
the statistics that standardise the features, use the evaluation transform (resize 256, centre crop 224).

    python eval_linear.py --checkpoint runs/cpu_demo/checkpoint.pth
    python eval_linear.py --pixels --dataset synthetic --synthetic_size 10000      # the raw-pixel baseline
    python eval_linear.py --checkpoint dino_vitbase16_pretrain.pth --arch vit_base --patch_size 16 --avgpool \\
        --n_last_blocks 1 --dataset folder --data_path /path/to/imagenet --augment --epochs 100
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

import augment
import data
import eval_knn
from model import ARCHS

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # base lrs, scaled by batch_size / 256 (DINO)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)


# ----------------------------------------------------------------------------------------------------- features
@torch.no_grad()
def probe_features(backbone: torch.nn.Module, images: torch.Tensor, n_last_blocks: int = 4,
                   avgpool: bool = False) -> torch.Tensor:
    """float (b, F) features of normalised images (b, 3, H, W): [CLS] of the last n blocks (+ mean patch token)."""
    if not hasattr(backbone, "get_intermediate_layers"):  # eval_knn.Pixels: the pixels are the feature
        return backbone(images)[:, 0].float()
    layers = backbone.get_intermediate_layers(images, n_last_blocks)  # n x (b, N, D), final-normed
    parts = [tokens[:, 0] for tokens in layers]  # spec §7.2: concatenated [CLS] tokens
    if avgpool:
        parts.append(layers[-1][:, 1:].mean(1))  # mean patch token of the last block
    return torch.cat(parts, dim=1).float()  # (b, n D [+ D])


@torch.no_grad()
def extract(backbone, dataset, batch_size: int, device: torch.device, image_size: int | None,
            n_last_blocks: int = 4, avgpool: bool = False, indices: torch.Tensor | None = None,
            generator: torch.Generator | None = None, num_workers: int = 0) -> torch.Tensor:
    """Features (n, F) on `device` of dataset[indices] (default: all), in that order. With a generator, every
    image is first cut by a random-resized crop (scale 0.08-1) and flipped with p 0.5 (the --augment protocol)."""
    indices = torch.arange(len(dataset)) if indices is None else indices.cpu()
    chunks = indices.split(batch_size)
    if isinstance(dataset, data.ImageDataset):
        batches = ((dataset.images[idx], None) for idx in chunks)
    else:  # folder items: (image, label) under the evaluation transform, (canvas, valid size, label, index) else
        loader = data.load_batches(dataset, [c.tolist() for c in chunks], num_workers, device.type == "cuda")
        batches = ((items[0], items[1] if len(items) == 4 else None) for items in loader)
    was_training = backbone.training
    backbone.eval()
    features = []
    for images, sizes in batches:
        images = images.to(device, non_blocking=True)
        if generator is not None:
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
            features.append(probe_features(backbone, x, n_last_blocks, avgpool))
    backbone.train(was_training)
    return torch.cat(features)


def split_train(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of n training indices into (fit, held-out) parts; held-out has round(n * fraction)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]


# ----------------------------------------------------------------------------------------------------- the grid
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
                    lrs=LRS, weight_decays=WEIGHT_DECAYS, steps=500, batch_size=1024, val_fraction=0.1, seed=0,
                    augment_epochs=0, extract_batch_size=256, num_workers=0, augment_set=None) -> dict:
    """Held-out-selected linear probe. Returns dict(top1 (test top-1 % of the selected classifier), best_test_top1
    (best test top-1 % over the grid, DINO/iBOT-style), val_top1 (G,), test_top1 (G,), lrs, weight_decays,
    selected (grid index)). Test labels are read only after the selection. augment_set: the training split as
    augment_epochs crops it (folder datasets: whole images on canvases; default train_set itself)."""
    num_classes = max(train_set.num_classes, test_set.num_classes)
    fit, held_out = split_train(len(train_set), val_fraction, seed)
    train_labels = train_set.labels.to(device)
    extract_args = dict(batch_size=extract_batch_size, device=device, image_size=image_size,
                        n_last_blocks=n_last_blocks, avgpool=avgpool, num_workers=num_workers)
    val_features = extract(backbone, train_set, indices=held_out, **extract_args)
    if augment_epochs == 0:
        fit_features = extract(backbone, train_set, indices=fit, **extract_args)
        mean, std = fit_features.mean(0), fit_features.std(0)
        grid = train_grid(standardise(fit_features, mean, std), train_labels[fit.to(device)], num_classes, lrs,
                          weight_decays, steps, batch_size, seed)
    else:
        # Official protocol: each epoch embeds a fresh random-resized, flipped crop of every fit image.
        # Standardisation statistics come from the un-augmented fit images, computed once.
        plain = extract(backbone, train_set, indices=fit, **extract_args)
        mean, std = plain.mean(0), plain.std(0)
        del plain
        pairs = [(lr * min(batch_size, len(fit)) / 256, wd) for lr in lrs for wd in weight_decays]
        grid = LinearGrid(len(mean), num_classes, [p[0] for p in pairs], [p[1] for p in pairs], device, seed)
        per_epoch, generator = max(1, len(fit) // batch_size), torch.Generator().manual_seed(seed)
        fit_labels = train_labels[fit.to(device)]
        for epoch in range(augment_epochs):
            crops = extract(backbone, train_set if augment_set is None else augment_set, indices=fit,
                            generator=generator, **extract_args)
            features = standardise(crops, mean, std)
            order = batch_order(len(fit), batch_size, per_epoch, seed + 1 + epoch).to(device)
            for i, idx in enumerate(order):
                grid.step(features[idx], fit_labels[idx],
                          cosine_factor(epoch * per_epoch + i, augment_epochs * per_epoch))
    val_top1 = grid.top1(standardise(val_features, mean, std), train_labels[held_out.to(device)])
    selected = int(val_top1.argmax())  # first of equal maxima: the smallest lr, then the smallest weight decay
    test_features = standardise(extract(backbone, test_set, **extract_args), mean, std)
    test_top1 = grid.top1(test_features, test_set.labels.to(device))
    return dict(top1=float(test_top1[selected]), best_test_top1=float(test_top1.max()), val_top1=val_top1.cpu(),
                test_top1=test_top1.cpu(), lrs=grid.lr.cpu(), weight_decays=grid.weight_decay.cpu(),
                selected=selected)


# ----------------------------------------------------------------------------------------------------- command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_knn.add_common_arguments(parser)
    parser.add_argument("--n_last_blocks", type=int, default=None,
                        help="[CLS] of the last n blocks (default 4, DINO's ViT-S choice, or all blocks if fewer)")
    parser.add_argument("--avgpool", action="store_true", help="add the last block's mean patch token (ViT-B recipe)")
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS, help="base lrs, scaled by batch_size / 256")
    parser.add_argument("--weight_decays", type=float, nargs="+", default=WEIGHT_DECAYS)
    parser.add_argument("--steps", type=int, default=500, help="SGD steps on fixed features")
    parser.add_argument("--batch_size", type=int, default=1024, help="classifier batch")
    parser.add_argument("--extract_batch_size", type=int, default=256, help="backbone batch")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="held-out part of the train split")
    parser.add_argument("--augment", action="store_true", help="official protocol: crops + flips, slow")
    parser.add_argument("--epochs", type=int, default=100, help="--augment only: epochs of recomputed features")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=8, help="folder datasets only")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)

    for flag in ("steps", "batch_size", "extract_batch_size", "n_last_blocks", "epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise SystemExit(f"error: --{flag} {getattr(args, flag)}: must be a positive integer")
    if not 0 < args.val_fraction < 1:
        raise SystemExit(f"error: --val_fraction {args.val_fraction}: must be in (0, 1)")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs):
        raise SystemExit(f"error: --lrs {args.lrs}: every lr must be positive and finite")
    if any(not (wd >= 0 and math.isfinite(wd)) for wd in args.weight_decays):
        raise SystemExit(f"error: --weight_decays {args.weight_decays}: every value must be >= 0 and finite")
    device = eval_knn.pick_device(args.device)  # before any loading: a missing GPU is a flag error
    if args.pixels:
        backbone, image_size, config = None, args.image_size, None
    else:
        backbone, image_size, config = eval_knn.load_backbone(args.checkpoint, args.arch, args.patch_size,
                                                              args.interpolate_offset)
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
    if round(len(train_set) * args.val_fraction) >= len(train_set):
        raise SystemExit(f"error: --val_fraction {args.val_fraction} leaves no training image")
    if backbone is None:
        backbone = eval_knn.Pixels(image_size or train_set[0][0].shape[-1])
    result = linear_evaluate(backbone.to(device), train_set, test_set, device, n_last_blocks=args.n_last_blocks or 1,
                             avgpool=args.avgpool, image_size=image_size, lrs=args.lrs,
                             weight_decays=args.weight_decays, steps=args.steps, batch_size=args.batch_size,
                             val_fraction=args.val_fraction, seed=args.seed,
                             augment_epochs=args.epochs if args.augment else 0,
                             extract_batch_size=args.extract_batch_size, num_workers=args.num_workers,
                             augment_set=augment_set)
    print("lr        wd        held-out top-1  test top-1")
    for i, (lr, wd) in enumerate(zip(result["lrs"].tolist(), result["weight_decays"].tolist())):
        mark = "  <- selected on held-out" if i == result["selected"] else ""
        print(f"{lr:<9.3g} {wd:<9.3g} {result['val_top1'][i]:14.2f} {result['test_top1'][i]:11.2f}{mark}")
    print(f"best test top-1 over the grid (DINO/iBOT-style, selected on test): {result['best_test_top1']:.2f} %")
    print(f"linear top-1 {result['top1']:.2f} %")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
