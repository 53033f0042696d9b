"""Weighted k-NN evaluation of a frozen backbone (facebookresearch/dino eval_knn.py knn_classifier).

Features are the final-normed [CLS] token of the teacher backbone, L2-normalised. Each test image votes over its k
most cosine-similar training images with weight exp(similarity / T), T = 0.07; top-1/top-5 are reported for k in
10, 20, 100, 200 (k = 20 is the headline number).

    python eval_knn.py --checkpoint runs/cpu_demo/checkpoint.pth
    python eval_knn.py --checkpoint dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16 \\
        --dataset folder --data_path /path/to/imagenet
    python eval_knn.py --pixels --dataset fashion_mnist     # the raw-pixel baseline
    torchrun --nproc_per_node=8 eval_knn.py --pretrained_weights CKPT --checkpoint_key teacher --dump_features f/
    python eval_knn.py --load_features f/ --temperature 0.05 --train_fraction 0.1   # a sweep without re-extracting

Under torchrun every process extracts a shard of the features; rank 0 alone classifies and prints. Published
DINO/iBOT/SOP weights resample their position embeddings with DINO's offset (0.1), ours exactly (README,
"Deviations from the official code").
"""
import argparse
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from checkpoint import read_checkpoint
from launch import writable_dir
from model import ARCHS, build_backbone

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07


class Pixels(torch.nn.Module):
    """The baseline 'backbone': normalised raw pixels as the feature (returned as the [CLS] token of one token)."""

    def __init__(self, image_size: int):
        super().__init__()
        self.embed_dim = 3 * image_size * image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).unsqueeze(1)  # (b, 1, 3 H W)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, dataset, batch_size: int, device: torch.device,
                     image_size: int | None = None, num_workers: int = 0) -> torch.Tensor:
    """L2-normalised [CLS] features (n, D) of every image of the dataset, in dataset order, on `device`.

    In-memory datasets are read straight from their tensor; a folder dataset through a DataLoader. Under torchrun
    each rank embeds every world_size-th batch and the features are all-gathered, so every rank gets all of them.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(dataset)
    starts = list(range(0, n, batch_size))
    mine = starts[rank::world]
    if isinstance(dataset, data.ImageDataset):
        batches = (dataset.images[s:s + batch_size] for s in mine)
    else:
        sampler = [list(range(s, min(s + batch_size, n))) for s in mine]
        batches = (images for images, _ in data.load_batches(dataset, sampler, num_workers, device.type == "cuda"))
    was_training = backbone.training
    backbone.eval()
    features = torch.zeros(n, backbone.embed_dim, device=device)  # rows of the other ranks' batches stay 0
    for s, images in zip(mine, batches):
        x = data.normalize_images(images.to(device, non_blocking=True), image_size)  # (b, 3, H, W)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls = backbone(x)[:, 0]  # (b, D): the final-normed [CLS] of the last block, as DINO
        features[s:s + len(cls)] = F.normalize(cls.float(), dim=1)
    backbone.train(was_training)
    if world > 1:
        # Ranks filled disjoint batches and left zeros elsewhere: a sum gathers them.
        dist.all_reduce(features)
    return features


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks=KNN_KS, temperature: float = KNN_TEMPERATURE,
                 chunk_size: int = 256) -> dict[int, tuple[float, float]]:
    """Weighted k-NN: {k: (top1 %, top5 %)}. Features (n, D) unit-norm, labels (n,) int64.

    Test images go in chunks, so a chunk x n_train similarity matrix is the largest tensor (ImageNet-sized sets).
    A k above the number of training images votes with all of them (the result keeps the requested k as its key).
    """
    if len(train_features) == 0 or not ks or min(ks) < 1 or not temperature > 0:
        raise ValueError(f"k-NN needs training images, ks >= 1 and temperature > 0; got {len(train_features)} "
                         f"images, ks {tuple(ks)}, temperature {temperature}")
    train_labels, test_labels = train_labels.to(train_features.device), test_labels.to(train_features.device)
    k_max = min(max(ks), len(train_features))
    correct = {k: torch.zeros(2, device=train_features.device) for k in ks}
    for start in range(0, len(test_features), chunk_size):
        feats, labels = test_features[start:start + chunk_size], test_labels[start:start + chunk_size]
        sims, idx = (feats @ train_features.T).topk(k_max, dim=1)  # (c, k_max), most similar first
        votes = F.one_hot(train_labels[idx], num_classes).float() * (sims / temperature).exp().unsqueeze(-1)
        for k in ks:
            scores = votes[:, :min(k, k_max)].sum(1)  # (c, C) class scores from the k nearest
            top_scores, top = scores.topk(min(5, num_classes), dim=1)  # (c, 5)
            hits = (top == labels.unsqueeze(1)) & (top_scores > 0)  # a class without a vote is no prediction
            correct[k] += torch.stack((hits[:, 0].sum(), hits.any(1).sum())).float()
    n = len(test_features)
    return {k: (100.0 * c[0].item() / n, 100.0 * c[1].item() / n) for k, c in correct.items()}


def knn_evaluate(backbone, train_set, test_set, device, batch_size=256, image_size=None, num_workers=0,
                 ks=KNN_KS, temperature=KNN_TEMPERATURE) -> dict[int, tuple[float, float]]:
    """Extract features of both splits and run the weighted k-NN: {k: (top1 %, top5 %)}."""
    train_features = extract_features(backbone, train_set, batch_size, device, image_size, num_workers)
    test_features = extract_features(backbone, test_set, batch_size, device, image_size, num_workers)
    return knn_classify(train_features, train_set.labels, test_features, test_set.labels,
                        max(train_set.num_classes, test_set.num_classes), ks, temperature)


def load_backbone(path: str, arch: str | None = None, patch_size: int = 16, interpolate_offset: float | None = None,
                  checkpoint_key: str = "teacher"):
    """Backbone from a checkpoint of train.py (its config rebuilds it) or from a plain ViT state dict (needs arch).

    Returns (backbone, eval image size, checkpoint config or None). Loads with weights_only=True: a checkpoint that
    needs arbitrary code to unpickle is refused. checkpoint_key: the network to read (teacher or student, DINO's
    --checkpoint_key). interpolate_offset: position-embedding resampling at other sizes (model.VisionTransformer);
    None = the checkpoint's setting for ours, DINO's 0.1 for published DINO/iBOT/SOP weights (they were evaluated so).
    """
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"error: --checkpoint {e}")
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if config is not None:
        needed = ("arch", "global_crops_size", "patch_size", "embed_dim", "depth", "num_heads")
        if not isinstance(config, dict) or not all(isinstance(config.get(k), (int, str)) for k in needed):
            raise SystemExit(f"error: --checkpoint {path}: its 'config' is not a train.py config (a dict with "
                             f"{', '.join(needed)})")
    state = ckpt
    for key in (checkpoint_key, "state_dict", "model"):  # ours and DINO's / iBOT / generic wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"error: --checkpoint {path}: no state dict of tensors found")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.") and k != "masked_embed"}
    if config is not None:
        offset = config.get("interpolate_offset", 0.0) if interpolate_offset is None else interpolate_offset
        try:
            backbone = build_backbone(config["arch"], config["global_crops_size"], config["patch_size"],
                                      use_mask_token=False, embed_dim=config["embed_dim"], depth=config["depth"],
                                      num_heads=config["num_heads"], interpolate_offset=offset)
        except (ValueError, AssertionError, RuntimeError) as e:
            raise SystemExit(f"error: --checkpoint {path}: its config cannot build a backbone: {e}")
        image_size = config["global_crops_size"]
    else:
        if arch not in ARCHS or "pos_embed" not in state:
            raise SystemExit(f"error: --checkpoint {path} is a plain state dict: pass --arch "
                             f"({', '.join(ARCHS)}) and --patch_size")
        grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))  # learnt grid of the published weights
        backbone = build_backbone(arch, grid * patch_size, patch_size, use_mask_token=False,
                                  interpolate_offset=0.1 if interpolate_offset is None else interpolate_offset)
        image_size = 224
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"error: --checkpoint {path} does not fit the backbone: {str(e).splitlines()[0]} "
                         f"(check --arch/--patch_size)")
    return backbone, image_size, config


def pick_device(choice: str) -> torch.device:
    """The --device of an evaluation script: auto (CUDA when there is one), cpu or cuda (one line if absent)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available; valid: auto, cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


MAX_IMAGE_SIZE = 4096  # px: a larger --image_size/--patch_size is a typo; one image would outgrow memory
MIN_TEMPERATURE = 0.015  # below it exp(similarity / T), summed over 200 neighbours, overflows float32


def check_common_flags(args) -> None:
    """One-line SystemExit for a value of a flag of add_common_arguments (or --num_workers) that cannot work,
    before anything is loaded."""
    for name, ok, valid in (
            ("patch_size", 0 < args.patch_size <= MAX_IMAGE_SIZE, f"valid: 1 to {MAX_IMAGE_SIZE}"),
            ("image_size", args.image_size is None or 0 < args.image_size <= MAX_IMAGE_SIZE,
             f"valid: 1 to {MAX_IMAGE_SIZE} (a multiple of the patch size)"),
            ("synthetic_size", args.synthetic_size is None or 0 < args.synthetic_size <= 10 ** 6,
             "valid: 1 to 1000000"),
            ("interpolate_offset", args.interpolate_offset is None or 0 <= args.interpolate_offset < 1,
             "valid: 0 <= offset < 1"),
            ("num_workers", getattr(args, "num_workers", 0) >= 0, "must be >= 0")):
        if not ok:
            raise SystemExit(f"error: --{name} {getattr(args, name)!r}: {valid}")


def check_image_size(image_size: int | None, backbone) -> None:
    """A ViT embeds whole patches only: the evaluation size must be a multiple of its patch size."""
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if image_size and patch and image_size % patch:
        raise SystemExit(f"error: --image_size {image_size}: must be a multiple of the patch size {patch}")


def add_common_arguments(parser: argparse.ArgumentParser, datasets=data.DATASETS, required: bool = True) -> None:
    """The flags every evaluation script shares: what to evaluate (a checkpoint or raw pixels) and on which data."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--checkpoint", "--pretrained_weights", dest="checkpoint",
                        help="train.py checkpoint or a plain ViT state dict (--pretrained_weights: DINO's name)")
    source.add_argument("--pixels", action="store_true", help="baseline: raw pixels as features")
    parser.add_argument("--dataset", default=None, help=f"one of {datasets} (default: the checkpoint's)")
    parser.add_argument("--data_path", default=None, help="dataset root (default: the checkpoint's)")
    parser.add_argument("--checkpoint_key", default="teacher", choices=("teacher", "student"),
                        help="the network of the checkpoint to evaluate (DINO's flag)")
    parser.add_argument("--arch", default=None, help=f"plain state dicts only: {', '.join(ARCHS)}")
    parser.add_argument("--patch_size", type=int, default=16, help="plain state dicts only")
    parser.add_argument("--interpolate_offset", type=float, default=None,
                        help="position-embedding resampling at other sizes: 0 exact (ours), 0.1 DINO/iBOT's form "
                             "(default: the checkpoint's, 0.1 for plain DINO/iBOT/SOP state dicts)")
    parser.add_argument("--image_size", type=int, default=None, help="evaluation size (default: training size)")
    parser.add_argument("--synthetic_size", type=int, default=None,
                        help="synthetic training images (default: the checkpoint's, else 20000)")


def low_shot_indices(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted indices of a fixed class-balanced subset: round(fraction x n_c) (at least 1) images of each class c,
    seeded by nothing but the split's size and the fraction, so every checkpoint is evaluated on the same images (a
    stand-in for the SimCLR 1 % / 10 % ImageNet split files that DINO's low-shot rows use)."""
    generator = torch.Generator().manual_seed(data.seed_for(len(labels), round(fraction * 10 ** 6)))
    order = torch.randperm(len(labels), generator=generator)
    keep = [members[:max(1, round(fraction * len(members)))]
            for members in (order[labels[order] == c] for c in labels.unique())]
    return torch.cat(keep).sort().values


def setup_distributed(choice: str) -> tuple[torch.device, int]:
    """The device, and this process's rank: under torchrun every process joins one group and extracts a shard of
    the features (extract_features); rank 0 alone classifies, prints and writes."""
    device = pick_device(choice)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank() if dist.is_initialized() else 0


def close_distributed() -> None:
    """Leave the process group before the interpreter exits: a gloo group left to the exit's teardown has aborted a
    rank that finished early on this project's CPU machine ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


FEATURE_FILES = ("trainfeat.pth", "trainlabels.pth", "testfeat.pth", "testlabels.pth")  # DINO's names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, required=False)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=8, help="folder datasets only")
    parser.add_argument("--strict_data", action="store_true",
                        help="folder datasets: stop at the first unreadable image (default: skip it with a warning)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--temperature", type=float, default=KNN_TEMPERATURE)
    parser.add_argument("--train_fraction", type=float, default=1.0,
                        help="low-shot: vote with a fixed class-balanced fraction of the training images (0.01, 0.1)")
    parser.add_argument("--dump_features", default=None, metavar="DIR",
                        help="also save the features and labels there (DINO's trainfeat.pth, ... files)")
    parser.add_argument("--load_features", default=None, metavar="DIR",
                        help="read the features from DIR (written by --dump_features) instead of a checkpoint")
    args = parser.parse_args(argv)
    check_common_flags(args)
    for name, ok, valid in (("batch_size", args.batch_size > 0, "must be > 0"),
                            ("temperature", math.isfinite(args.temperature) and args.temperature >= MIN_TEMPERATURE,
                             f"must be a finite number >= {MIN_TEMPERATURE} (below it the vote weights "
                             f"exp(similarity / T) overflow float32)"),
                            ("train_fraction", 0 < args.train_fraction <= 1, "valid: 0 < fraction <= 1"),
                            ("load_features", args.load_features is None or all(
                                os.path.isfile(os.path.join(args.load_features, f)) for f in FEATURE_FILES),
                             f"must be a directory holding {', '.join(FEATURE_FILES)} (written by --dump_features)"),
                            ("dump_features", args.dump_features is None or not os.path.isfile(args.dump_features),
                             "must be a directory (created if missing), not a file")):
        if not ok:
            raise SystemExit(f"error: --{name} {getattr(args, name)!r}: {valid}")
    if sum(map(bool, (args.checkpoint, args.pixels, args.load_features))) != 1:
        raise SystemExit("error: give exactly one of --checkpoint (--pretrained_weights), --pixels, --load_features")
    if args.dump_features and not writable_dir(args.dump_features):  # now, not after the extraction
        raise SystemExit(f"error: --dump_features {args.dump_features}: cannot be created or written here")
    device, rank = setup_distributed(args.device)
    try:
        features = (read_features(args.load_features) if args.load_features else
                    extract_both(args, device))
    except data.DatasetError as e:  # e.g. an unreadable image with --strict_data, found by a loader worker
        raise SystemExit(f"error: {e}")
    if rank != 0:
        return None
    if args.dump_features:
        os.makedirs(args.dump_features, exist_ok=True)
        for name, tensor in zip(FEATURE_FILES, features[:4]):
            torch.save(tensor.cpu(), os.path.join(args.dump_features, name))
    train_features, train_labels, test_features, test_labels, num_classes = features
    if args.train_fraction < 1:
        keep = low_shot_indices(train_labels.cpu(), args.train_fraction).to(train_features.device)
        train_features, train_labels = train_features[keep], train_labels[keep]
        print(f"low-shot: {len(keep)} training images ({args.train_fraction:g} of each class)")
    if len(train_features) < max(KNN_KS):
        print(f"note: only {len(train_features)} training images: a k above that votes with all of them")
    result = knn_classify(train_features, train_labels, test_features, test_labels, num_classes,
                          temperature=args.temperature)
    for k, (top1, top5) in result.items():
        print(f"{k}-NN: top-1 {top1:.2f} %, top-5 {top5:.2f} %")
    return result


def read_features(folder: str) -> tuple:
    """(train features, train labels, test features, test labels, number of classes) from --dump_features files."""
    tensors = []
    for name in FEATURE_FILES:
        try:
            tensors.append(read_checkpoint(os.path.join(folder, name)))  # weights_only, CRCs checked
        except ValueError as e:
            raise SystemExit(f"error: --load_features {e}")
    ok = (all(isinstance(t, torch.Tensor) for t in tensors) and tensors[0].ndim == tensors[2].ndim == 2
          and tensors[0].shape[1] == tensors[2].shape[1] and len(tensors[0]) == len(tensors[1])
          and len(tensors[2]) == len(tensors[3]) and len(tensors[0]) > 0)
    if not ok:
        raise SystemExit(f"error: --load_features {folder}: not the feature files of --dump_features (shapes differ)")
    train_features, train_labels, test_features, test_labels = tensors
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return train_features.float(), train_labels.long(), test_features.float(), test_labels.long(), num_classes


def extract_both(args, device: torch.device) -> tuple:
    """Features of both splits from a checkpoint (or raw pixels), with the checkpoint's dataset by default."""
    if args.pixels:
        backbone, image_size, config = None, args.image_size, None
    else:
        backbone, image_size, config = load_backbone(args.checkpoint, args.arch, args.patch_size,
                                                     args.interpolate_offset, args.checkpoint_key)
    dataset = args.dataset or (config or {}).get("dataset")
    data_path = args.data_path or (config or {}).get("data_path", "data")
    if dataset is None:
        raise SystemExit("error: --dataset is required with --pixels or a plain state dict; valid: "
                         + ", ".join(data.DATASETS))
    image_size = args.image_size or image_size
    data.check_dataset(dataset, data_path)
    size = args.synthetic_size or (config or {}).get("synthetic_size")
    train_set = data.load_dataset(dataset, data_path, "train", size=size, image_size=image_size or 224,
                                  evaluation=True, strict=args.strict_data)
    test_set = data.load_dataset(dataset, data_path, "test", image_size=image_size or 224, strict=args.strict_data)
    if backbone is None:
        backbone = Pixels(image_size or train_set[0][0].shape[-1])
    check_image_size(image_size, backbone)
    backbone = backbone.to(device)
    extract = (lambda split: extract_features(backbone, split, args.batch_size, device, image_size, args.num_workers))
    return (extract(train_set), train_set.labels.to(device), extract(test_set), test_set.labels.to(device),
            max(train_set.num_classes, test_set.num_classes))

if __name__ == "__main__":
    main(sys.argv[1:])
    close_distributed()
