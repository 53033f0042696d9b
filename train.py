"""SOP pre-training: iBOT-style self-distillation against self-organizing prototypes (spec §1).

    python train.py --preset cpu_demo                                   # laptop CPU, a few minutes, offline
    python train.py --preset cifar --data_path data                     # CIFAR-10 on one GPU
    torchrun --nproc_per_node=8 train.py --preset imagenet --data_path /path/to/imagenet

Every field of Config is a flag (`--field value`, `python train.py --help` lists them); a preset sets a group of
fields and explicit flags override it. The run writes output_dir/log.jsonl and output_dir/checkpoint.pth and
resumes from the latter when it exists.
"""
import argparse
import dataclasses
import errno
import fcntl
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import augment
import data
from eval_knn import knn_evaluate, read_checkpoint
import methods
from memory import MemoryBank
from model import ARCHS, ProjectionHead, build_backbone


@dataclass
class Config:
    method: str = "sop"  # sop | ibot | dino | massl | carp (methods.py; the baselines of the paper's comparison)
    # data
    dataset: str = "folder"  # synthetic | cifar10 | cifar100 | fashion_mnist | folder (ImageNet-style tree)
    data_path: str = "data/imagenet"  # dataset root; CIFAR/Fashion-MNIST files are downloaded here when missing
    synthetic_size: int = 20000  # training images of the synthetic dataset (test split: 2000)
    train_subset: int = 0  # train on a fixed random subset of this many training images (0 = all); k-NN uses all
    num_workers: int = 10  # folder dataset: JPEG-decoding DataLoader processes per GPU
    gpu_decode: bool = False  # folder training: decode JPEGs on the GPU (nvJPEG, needs torchvision); else Pillow
    strict_data: bool = False  # folder: stop at the first unreadable image; false: skip it, list it in bad_images.txt
    # multi-crop augmentation (spec §6, Decision 8)
    global_crops_size: int = 224  # px
    global_crops_scale: tuple[float, float] = (0.25, 1.0)  # area fraction of the source image
    local_crops_number: int = 10
    local_crops_size: int = 96  # px
    local_crops_scale: tuple[float, float] = (0.05, 0.25)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px, Gaussian blur sigma range
    # block masks on the global crops for SOP-MIM (spec §2.6, Decision 7): iBOT recipe; (0.3,) (0.0,) = official
    pred_ratio: tuple[float, ...] = (0.0, 0.3)
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)
    # networks (spec §4, §5)
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | custom (set embed_dim, depth, num_heads)
    patch_size: int = 16
    embed_dim: int = 0  # 0: the arch's width
    depth: int = 0  # 0: the arch's depth
    num_heads: int = 0  # 0: the arch's heads
    drop_path_rate: float = 0.1  # student stochastic depth
    interpolate_offset: float = 0.0  # position-embedding resampling at other sizes: 0 exact, 0.1 DINO/iBOT's form
    head_hidden_dim: int = 2048
    out_dim: int = 256  # d, embedding dim of the memories
    # self-organizing prototypes (spec §2, Decisions 1-3)
    class_memory_size: int = 65536  # N_C teacher [CLS] embeddings
    patch_memory_size: int = 8192  # N_P teacher patch embeddings
    class_anchors: int = 4096  # M_C SOPs per [CLS] draw
    class_neighbors: int = 8  # k_C support embeddings besides the anchor
    class_draws: int = 4  # T_C draws per step, losses averaged
    patch_anchors: int = 512  # M_P SOPs per patch draw
    patch_neighbors: int = 0  # k_P
    smoothing: float = 0.1  # anchor vote 1 - smoothing
    # losses and temperatures (spec §1.5, §3, Decisions 6, 10)
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # reached after the warm-up; 0.04 everywhere = the official default
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    cls_loss_weight: float = 1.0
    patch_loss_weight: float = 1.0  # 0: MIM off, nothing patch-level computed (loss_patch logs 0); masks: pred_ratio
    # baselines (methods.py, FAMILY_SPEC); 0 = the method's official default (methods.default_sizes)
    num_prototypes: int = 0  # K learnable prototypes: ibot 8192, dino 65536, carp 65536
    norm_last_layer: bool = True  # ibot, dino, carp: prototype gain fixed at 1 (false: learnable, not decayed)
    shared_head: bool = True  # ibot: one prototype layer for [CLS] and patches, student and teacher (§2(e)1)
    freeze_last_layer: int = 1  # ibot, dino: epochs with the prototype layer frozen
    center_momentum: float = 0.9  # ibot, dino: EMA of the teacher-logit centres
    partition_size: int = 0  # NB, block size of the random partitions: massl class_memory_size // 8, carp 512
    carp_cosine: bool = True  # carp: unit-norm head + temperatures; false = official unnormalised head (§5(e)7)
    # optimisation (spec §1.5, Decision 9)
    epochs: int = 100
    batch_size_per_gpu: int = 128
    lr: float = 5e-4  # per 256 images of global batch; linear warm-up then cosine
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04  # cosine to weight_decay_end, weights only
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter gradient-norm clip; 0 = off
    momentum_teacher: float = 0.996  # EMA momentum, cosine to 1
    # system
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the student and the teacher
    seed: int = 0
    output_dir: str = "runs/sop"
    resume: bool = True  # continue from output_dir/checkpoint.pth when it exists
    resume_changes: str = "refuse"  # refuse | ok: resume although settings that change the trajectory differ
    knn_every: int = 10  # epochs between k-NN evaluations (also before the first step); 0 = never
    log_every: int = 20  # steps between progress updates (the only host syncs of the loop)
    max_steps: int = 0  # stop after this many steps of this run (with a checkpoint); 0 = to the end

    def __post_init__(self):  # sizes left at 0: the method's official default, resolved here so logs show it
        for name, value in methods.default_sizes(self.method, self.class_memory_size).items():
            if getattr(self, name) == 0:
                setattr(self, name, value)


PRESETS = {
    # README quick start: synthetic data, a 4-block ViT at patch 8, about 4 minutes on a 2-core CPU. Tuned on that
    # budget (BENCHMARKS.md): SOP-MIM is off because at 4 x 4 tokens it lowered k-NN (45 -> 31 % at weight
    # 0.2); local crops are 24 px (3 x 3 tokens) since 16 px ones would be 2 x 2.
    "cpu_demo": dict(dataset="synthetic", synthetic_size=10000, global_crops_size=32, global_crops_scale=(0.3, 1.0),
                     local_crops_number=2, local_crops_size=24, local_crops_scale=(0.15, 0.4), blur_sigma=(0.1, 0.5),
                     arch="custom", patch_size=8, embed_dim=96, depth=4, num_heads=3, drop_path_rate=0.0,
                     head_hidden_dim=256, out_dim=64, class_memory_size=2560, patch_memory_size=1024,
                     class_anchors=1024, class_neighbors=4, class_draws=1, patch_anchors=128, patch_loss_weight=0.0,
                     teacher_temp=0.04, epochs=12, batch_size_per_gpu=128, lr=4e-3, warmup_epochs=1,
                     momentum_teacher=0.99, knn_every=3, log_every=10, output_dir="runs/cpu_demo",
                     num_prototypes=2048, partition_size=256),  # baselines: 8 CARP blocks, 10 MaSSL blocks
    # One GPU, 32 px images, ViT at patch 4 (8 x 8 tokens); local crops 16 px (4 x 4).
    "cifar": dict(dataset="cifar10", data_path="data", global_crops_size=32, local_crops_size=16,
                  local_crops_number=6, blur_sigma=(0.1, 0.5), arch="vit_small", patch_size=4,
                  class_memory_size=16384, patch_memory_size=4096, class_anchors=1024, class_draws=1,
                  warmup_teacher_temp_epochs=30, epochs=200, batch_size_per_gpu=512, warmup_epochs=10,
                  momentum_teacher=0.996, knn_every=20, output_dir="runs/cifar"),
    # The faithful ImageNet-1k recipe (the Config defaults): ViT-S/16, 2 x 224 + 10 x 96.
    "imagenet": dict(output_dir="runs/imagenet"),
}


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag, the value and what would be valid."""


def parse_config(argv: list[str]) -> Config:
    """Config from `--preset NAME` and `--field value` flags (explicit flags override the preset)."""
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--preset", choices=list(PRESETS), help="named group of settings")
    for field in dataclasses.fields(Config):
        kind, default = field.type, field.default
        if kind == bool:
            parser.add_argument(f"--{field.name}", type=_parse_bool, metavar="true|false", help=f"(default {default})")
        elif str(kind).startswith("tuple"):
            parser.add_argument(f"--{field.name}", type=float, nargs="+", help=f"(default {' '.join(map(str, default))})")
        else:
            parser.add_argument(f"--{field.name}", type=kind, help=f"(default {default})")
    args = parser.parse_args(argv)
    values = dict(PRESETS[args.preset]) if args.preset else {}
    explicit = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
                if k != "preset" and v is not None}
    values.update(explicit)
    method = values.get("method", Config.method)
    if method in methods.FIELDS:  # an unknown method is named by validate()
        for name in sorted(set(explicit) & methods.METHOD_FIELDS - methods.FIELDS[method]):
            value = explicit[name]
            if value != getattr(Config, name):  # a flag set away from its default that the method ignores
                value = " ".join(map(str, value)) if isinstance(value, tuple) else value
                raise ConfigError(f"--{name} {value} has no meaning for --method {method}")
    return Config(**values)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage dump
        hint = " (python train.py --help lists the flags)" if message.startswith("unrecognized") else ""
        raise ConfigError(message + hint)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; valid: true, false")


MAX_EPOCHS, MAX_SYNTHETIC_SIZE, MAX_STEPS = 100_000, 2_000_000, 10 ** 8  # beyond these, schedules or data won't fit


def validate(cfg: Config, world_size: int) -> None:
    """Refuse impossible or inconsistent settings before any compute (ConfigError names the flag)."""
    def need(ok, name, valid):
        if not ok:
            value = getattr(cfg, name)
            raise ConfigError(f"--{name} {' '.join(map(str, value)) if isinstance(value, tuple) else repr(value)}: "
                              f"{valid}")
    for field in dataclasses.fields(Config):  # nan and inf pass every comparison below in some direction
        value = getattr(cfg, field.name)
        if isinstance(value, (float, tuple)):
            need(all(math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))), field.name,
                 "must be finite")
    positive = ("epochs", "batch_size_per_gpu", "class_draws", "log_every", "student_temp", "teacher_temp",
                "warmup_teacher_temp", "lr", "patch_size", "head_hidden_dim", "out_dim", "global_crops_size",
                "local_crops_size")
    for name in positive:
        need(getattr(cfg, name) > 0, name, "must be > 0")
    for name in ("local_crops_number", "warmup_epochs", "warmup_teacher_temp_epochs", "knn_every", "max_steps",
                 "num_workers", "min_lr", "clip_grad", "weight_decay", "weight_decay_end", "synthetic_size", "seed",
                 "train_subset", "embed_dim", "depth", "num_heads"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0" + (" (0 = the arch's)" if name in
                                                                ("embed_dim", "depth", "num_heads") else ""))
    need(cfg.epochs <= MAX_EPOCHS, "epochs", f"valid: 1 to {MAX_EPOCHS}")
    need(cfg.synthetic_size <= MAX_SYNTHETIC_SIZE, "synthetic_size", f"valid: 1 to {MAX_SYNTHETIC_SIZE} images")
    need(cfg.method in methods.FIELDS, "method", f"valid: {', '.join(methods.FIELDS)}")
    need(cfg.dataset in data.DATASETS, "dataset", f"valid: {', '.join(data.DATASETS)}")
    need(cfg.dataset != "synthetic" or cfg.synthetic_size > 0, "synthetic_size", "must be > 0")
    need(cfg.arch in (*ARCHS, "custom"), "arch", f"valid: {', '.join([*ARCHS, 'custom'])}")
    if cfg.arch == "custom":
        for name in ("embed_dim", "depth", "num_heads"):
            need(getattr(cfg, name) > 0, name, "arch custom needs embed_dim, depth and num_heads > 0")
    width, _, heads = ARCHS.get(cfg.arch, (0, 0, 0))
    need((cfg.embed_dim or width) % (cfg.num_heads or heads) == 0, "num_heads", "must divide the width")
    for name in ("global_crops_size", "local_crops_size"):
        need(getattr(cfg, name) % cfg.patch_size == 0, name, f"must be a multiple of --patch_size {cfg.patch_size}")
    for name in ("global_crops_scale", "local_crops_scale"):
        lo_hi = getattr(cfg, name)
        need(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1, name, "two numbers 0 < min <= max <= 1")
    need(len(cfg.blur_sigma) == 2 and 0 < cfg.blur_sigma[0] <= cfg.blur_sigma[1], "blur_sigma", "0 < min <= max")
    need(len(cfg.pred_ratio) == len(cfg.pred_ratio_var) > 0, "pred_ratio_var", "one value per --pred_ratio value")
    need(all(v >= 0 for v in cfg.pred_ratio_var), "pred_ratio_var", "every value must be >= 0")
    for r, v in zip(cfg.pred_ratio, cfg.pred_ratio_var):
        need(0 <= r - v and r + v < 1, "pred_ratio", "every ratio +- its var must lie in [0, 1)")
    global_batch = cfg.batch_size_per_gpu * world_size
    if cfg.method == "massl":
        need(cfg.class_memory_size >= global_batch, "class_memory_size",
             f"must hold at least one global batch ({global_batch} images)")
    blocks_of = {"massl": "class_memory_size", "carp": "num_prototypes"}.get(cfg.method)
    if blocks_of:  # random partitions: every row in exactly one block, each block a real softmax
        size = getattr(cfg, blocks_of)
        need(2 <= cfg.partition_size <= size and size % cfg.partition_size == 0, "partition_size",
             f"must be >= 2 and divide --{blocks_of} {size}")
    if cfg.method in ("ibot", "dino", "carp"):
        need(cfg.num_prototypes > 0, "num_prototypes", "must be > 0")
    if cfg.method in ("ibot", "dino"):
        need(cfg.freeze_last_layer >= 0, "freeze_last_layer", "must be >= 0")
        need(0 <= cfg.center_momentum < 1, "center_momentum", "valid: 0 <= momentum < 1")
    for memory, anchors, neighbors in (("class_memory_size", "class_anchors", "class_neighbors"),
                                       ("patch_memory_size", "patch_anchors", "patch_neighbors")):
        if cfg.method != "sop":
            break
        size = getattr(cfg, memory)
        need(size >= global_batch, memory, f"must hold at least one global batch ({global_batch} images)")
        need(getattr(cfg, anchors) > 0, anchors, "must be > 0")
        need(getattr(cfg, neighbors) >= 0, neighbors, "must be >= 0")
        need(getattr(cfg, anchors) + getattr(cfg, neighbors) <= size, anchors,
             f"anchors + neighbours must not exceed --{memory} {size}")
    need(0 <= cfg.smoothing < 1, "smoothing", "valid: 0 <= smoothing < 1")
    need(0 <= cfg.drop_path_rate < 1, "drop_path_rate", "valid: 0 <= rate < 1")
    need(0 <= cfg.momentum_teacher <= 1, "momentum_teacher", "valid: 0 <= momentum <= 1")
    need(0 <= cfg.interpolate_offset < 1, "interpolate_offset", "valid: 0 (exact) to < 1; DINO/iBOT use 0.1")
    need(cfg.resume_changes in ("refuse", "ok"), "resume_changes", "valid: refuse, ok")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "valid: auto, cpu, cuda")
    need(cfg.device != "cuda" or torch.cuda.is_available(), "device", "no CUDA device is available; valid: auto, cpu")
    need(cfg.precision in ("auto", "bf16", "fp16", "fp32"), "precision", "valid: auto, bf16, fp16, fp32")
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    need(cfg.precision != "fp16" or cuda, "precision", "fp16 needs a CUDA device; valid on CPU: auto, bf16, fp32")
    need(_writable_dir(cfg.output_dir), "output_dir", "cannot be created or written to (check its permissions)")
    try:
        data.check_dataset(cfg.dataset, cfg.data_path)
    except data.DatasetError as e:
        raise ConfigError(f"--dataset {cfg.dataset} --data_path {cfg.data_path}: {e}")


def _writable_dir(path: str) -> bool:
    """Whether path is, or can be created as, a directory this process can write files into."""
    existing = next(p for p in [os.path.abspath(path), *Path(os.path.abspath(path)).parents] if os.path.exists(p))
    if os.path.abspath(existing) == os.path.abspath(path) and not os.path.isdir(path):
        return False
    return os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)


def setup(cfg: Config):
    """Pick the device and join the process group when launched by torchrun. Returns (device, rank, world)."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1),
                                                                       ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device, rank, world


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers, e.g. (seed, step, stream, rank)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    start_warmup: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up start_warmup -> base, then cosine base -> final (DINO's cosine_scheduler)."""
    warmup = np.linspace(start_warmup, base, warmup_epochs * steps_per_epoch, endpoint=False)
    t = np.arange(epochs * steps_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate((warmup, cosine))


def build_schedules(cfg: Config, steps_per_epoch: int, global_batch: int) -> dict[str, np.ndarray]:
    """lr, weight decay, teacher temperature and EMA momentum for every step (spec §1.5)."""
    total = cfg.epochs * steps_per_epoch
    warm = min(cfg.warmup_teacher_temp_epochs * steps_per_epoch, total)
    teacher_temp = np.full(total, cfg.teacher_temp)
    teacher_temp[:warm] = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, warm)
    return {"lr": cosine_schedule(cfg.lr * global_batch / 256, cfg.min_lr, cfg.epochs, steps_per_epoch,
                                  min(cfg.warmup_epochs, cfg.epochs)),
            "weight_decay": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch),
            "teacher_temp": teacher_temp,
            "momentum": cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch)}


def clip_gradients(params: list[torch.Tensor], clip: float) -> None:
    """Scale each parameter's gradient to norm <= clip on its own (DINO/iBOT, spec §8.2), without host syncs."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))  # (n_params,)
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scale.unbind()))


class Trainer:
    """Networks, memories, optimiser and the training step; everything a checkpoint holds."""

    def __init__(self, cfg: Config, device: torch.device, world: int, steps_per_epoch: int):
        self.cfg, self.device = cfg, device
        self.precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
        self.global_batch = cfg.batch_size_per_gpu * world
        self.schedules = build_schedules(cfg, steps_per_epoch, self.global_batch)
        self.augment = augment.MultiCropAugmentation(cfg.global_crops_size, cfg.local_crops_size,
                                                     cfg.local_crops_number, cfg.global_crops_scale,
                                                     cfg.local_crops_scale, cfg.blur_sigma)
        self.make_masks = augment.BlockMaskGenerator(cfg.global_crops_size // cfg.patch_size, cfg.pred_ratio,
                                                     cfg.pred_ratio_var)

        # Student (drop path, mask token) and teacher: a copy without either, never trained by gradients.
        def network(student: bool) -> nn.Module:
            backbone = build_backbone(cfg.arch, cfg.global_crops_size, cfg.patch_size,
                                      cfg.drop_path_rate if student else 0.0,
                                      use_mask_token=student and methods.METHODS[cfg.method].uses_masks,
                                      embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
            head = ProjectionHead(backbone.embed_dim, cfg.head_hidden_dim, cfg.out_dim,
                                  normalize=cfg.method != "carp" or cfg.carp_cosine)
            return methods.build_network(cfg, backbone, head)  # + a prototype layer for ibot, dino, carp
        torch.manual_seed(cfg.seed)  # identical networks and initial memories on every rank
        self.student, self.teacher = network(True).to(device), network(False).to(device)
        self.teacher.load_state_dict(self.student.state_dict(), strict=False)  # all but the mask token (§1.2)
        self.teacher.requires_grad_(False)
        # What differs between SOP and the baselines: memories or centres, the losses (methods.py)
        self.method = methods.build_method(cfg).to(device)
        # iBOT/DINO: the student's prototype layer gets no update during the first freeze_last_layer epochs
        frozen = cfg.method in ("ibot", "dino") and cfg.freeze_last_layer > 0
        self.freeze_steps = cfg.freeze_last_layer * steps_per_epoch if frozen else 0
        self.frozen_params = [p for n, p in self.student.named_parameters() if "prototypes." in n]

        # Weight decay on weights, not on biases and norms (DINO's rule: >= 2-D tensors, so cls_token and
        # pos_embed are decayed too).
        named = list(self.student.named_parameters())
        decay = [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in named if not (p.ndim > 1 and not n.endswith(".bias"))]
        self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                           fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.params = [p for _, p in named]
        # EMA pairs by name: the student's mask token has no teacher counterpart (spec §8.8).
        student_by_name = dict(named)
        self.ema_teacher = [p for _, p in self.teacher.named_parameters()]
        self.ema_student = [student_by_name[n] for n, _ in self.teacher.named_parameters()]

        student = DistributedDataParallel(self.student) if world > 1 else self.student
        self.student_forward = torch.compile(student) if cfg.compile else student
        self.teacher_forward = torch.compile(self.teacher) if cfg.compile else self.teacher

    def train_step(self, images: torch.Tensor, step: int, rank: int = 0,
                   indices: torch.Tensor | None = None, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """One step on a rank-local batch of uint8 images (B, 3, H, W) on the device, in the paper's order.
        indices (B,): the images' dataset indices, stored beside their memory rows (for visualize.py; None: -1).
        sizes (B, 2): valid (height, width) of each image when they are padded canvases (folder datasets).

        Returns, on the device, (loss, loss_cls, loss_patch, teacher entropy, teacher [CLS] std): no host sync.
        """
        cfg, sched = self.cfg, self.schedules
        # ---- schedules (spec §1.5); this step's random streams are all seeded from (seed, step)
        teacher_temp, momentum = float(sched["teacher_temp"][step]), float(sched["momentum"][step])
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(sched["lr"][step])  # Python floats: the optimizer state is checkpointed
            if i == 0:
                group["weight_decay"] = float(sched["weight_decay"][step])
        torch.manual_seed(seed_for(cfg.seed, step, 1, rank))  # drop path and patch choice, own stream per rank
        gen = torch.Generator(self.device).manual_seed(seed_for(cfg.seed, step, 2, rank))
        anchor_gen = torch.Generator(self.device).manual_seed(seed_for(cfg.seed, step, 3))  # same on every rank:
        # SOP anchors, MaSSL/CARP partitions

        # ---- multi-crop views and block masks, batched on the device (augment.py)
        global_crops, local_crops = self.augment(images, gen, sizes)  # (2B, 3, G, G), (V_l B, 3, l, l)
        masks = self.make_masks(global_crops.shape[0], gen) if self.method.uses_masks else None  # (2B, P) or None

        # ---- teacher on the unmasked global crops; student on masked globals and all locals
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.precision != "fp32"):
            with torch.no_grad():
                teacher = self.teacher_forward(global_crops)  # cls (2B, d), patch (2B, P, d) or None[, logits]
            student = self.student_forward(global_crops, masks, local_crops)  # cls ((2 + V_l) B, d), patch, ...

        # ---- the losses: SOP loss on [CLS] + SOP-MIM loss on masked patches (methods.SOP, spec §3), or a baseline's
        loss, loss_cls, loss_patch, entropy = self.method.loss(student, teacher, masks, teacher_temp, anchor_gen)

        # ---- backward, per-parameter clipping, AdamW, EMA teacher (spec §1.4)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if step < self.freeze_steps:  # iBOT/DINO: a None gradient makes AdamW skip the prototypes, decay included
            for p in self.frozen_params:
                p.grad = None
        if cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.params, cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_teacher, self.ema_student, 1.0 - momentum)  # t <- m t + (1 - m) s

        # ---- the method's state after the losses read it: memory enqueue (spec §1.4, Decision 3) or centre update
        with torch.no_grad():
            self.method.update(teacher, indices)
            cls_std = F.normalize(teacher[0].float(), dim=-1).std(0).mean()  # collapse monitor: -> 0 if collapsed
            return torch.stack((loss, loss_cls, loss_patch, entropy, cls_std)).detach()

    @property
    def class_memory(self) -> MemoryBank:  # SOP and MaSSL
        return self.method.class_memory

    @property
    def patch_memory(self) -> MemoryBank:  # SOP
        return self.method.patch_memory

    def state_dict(self) -> dict:
        # The method's state under its parts' names: SOP class_memory, patch_memory; MaSSL class_memory; iBOT/DINO
        # centers; CARP nothing (its prototype layer is in the networks).
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                **{name: part.state_dict() for name, part in self.method.named_children()}}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for name, part in self.method.named_children():
            part.load_state_dict(state[name])


STATS = ("loss", "loss_cls", "loss_patch", "teacher_entropy", "teacher_cls_std")
SHAPE_FIELDS = ("arch", "patch_size", "embed_dim", "depth", "num_heads", "head_hidden_dim", "out_dim",
                "global_crops_size", "class_memory_size", "patch_memory_size", "method", "num_prototypes")
# Fields a resume may change freely: where things are, how often to report, how to run. Every other field changes
# the trajectory (schedules, data order, numerics), so changing it breaks the exact-resume promise.
RESUME_FREE_FIELDS = ("output_dir", "data_path", "resume", "resume_changes", "knn_every", "log_every", "max_steps",
                      "num_workers", "device", "compile", "strict_data")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on SIGTERM / Ctrl-C after saving; resume to continue


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message is one line."""


def previous_path(path: str) -> str:
    return path.removesuffix(".pth") + ".prev.pth"


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically (temp file, fsync, rename) and keep the checkpoint it replaces as checkpoint.prev.pth, so a
    crash mid-write, a full disk or one bad file never costs the last good state."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:  # a Python file, so a full disk surfaces as OSError(ENOSPC), not a bare RuntimeError
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        kept = path if os.path.exists(path) else "none was written yet"
        raise CheckpointError(f"{'disk full' if full else 'cannot write'} while saving {path} "
                              f"({getattr(e, 'strerror', None) or e}); the previous checkpoint ({kept}) is intact")
    if os.path.exists(path):
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # the renames themselves survive a power cut
    finally:
        os.close(directory)


def check_finite_state(trainer: "Trainer", step: int, ckpt_path: str) -> None:
    """Refuse to save non-finite networks or memories: the loss is checked before each update, so a diverging last
    update (e.g. --lr inf) would otherwise write NaN weights over the last good checkpoint. One host sync."""
    tensors = [t for module in (trainer.student, trainer.teacher, trainer.method)  # networks, memories, centres
               for t in module.state_dict().values() if t.is_floating_point()]
    if not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
        raise CheckpointError(f"non-finite weights or memories after step {step} (the update diverged: lower --lr?); "
                              f"stopped without saving, the last checkpoint ({ckpt_path}) is intact")


def load_checkpoint(path: str, cfg: Config) -> dict:
    """Read a checkpoint with weights_only=True, verifying its CRCs; refuse one whose networks or memories differ
    from cfg, or that lacks what a resume needs."""
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:  # a corrupt file, or a pickle that would run code
        raise CheckpointError(f"cannot resume from {e}")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not a train.py checkpoint (no config)")
    saved = ckpt["config"]
    defaults = Config()  # what a checkpoint from before a field existed ran with
    for name in SHAPE_FIELDS:
        if ignored_by_method(name, cfg.method):
            continue
        if saved.get(name, getattr(defaults, name)) != getattr(cfg, name):
            raise CheckpointError(f"--{name} {getattr(cfg, name)!r}: the checkpoint in {cfg.output_dir} was trained "
                                  f"with {saved.get(name)!r}; use that value or another --output_dir")
    step = ckpt.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be an integer >= 0, got {step!r}")
    missing = [k for k in ("student", "teacher", "optimizer", "scaler")
               if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a complete train.py checkpoint")
    return ckpt


def ignored_by_method(name: str, method: str) -> bool:
    """Whether a field belongs to some method's objective but not to this one's (e.g. num_prototypes for SOP)."""
    return name in methods.METHOD_FIELDS and name not in methods.FIELDS.get(method, methods.METHOD_FIELDS)


def config_changes(saved: dict, cfg: Config) -> dict[str, tuple]:
    """{field: (old, new)} for the fields that change the trajectory and differ from the checkpoint's config."""
    changes = {}
    for field in dataclasses.fields(Config):
        if field.name in RESUME_FREE_FIELDS or ignored_by_method(field.name, cfg.method):
            continue
        old, new = saved.get(field.name, field.default), getattr(cfg, field.name)  # older checkpoints: defaults
        if (tuple(old) if isinstance(old, list) else old) != new:
            changes[field.name] = (old, new)
    return changes


def resume_state(cfg: Config, ckpt_path: str) -> tuple[dict | None, list[str]]:
    """The checkpoint to resume from (None for a fresh start) and notes to print and log. A current checkpoint that
    fails its checks while checkpoint.prev.pth passes them is replaced by the latter, loudly."""
    prev = previous_path(ckpt_path)
    candidates = [p for p in (ckpt_path, prev) if os.path.exists(p)]
    if not cfg.resume or not candidates:
        return None, []
    try:
        return load_checkpoint(candidates[0], cfg), []
    except CheckpointError as error:
        if candidates[0] == prev or len(candidates) == 1:
            raise
        try:
            ckpt = load_checkpoint(prev, cfg)
        except CheckpointError:
            raise error from None
        return ckpt, [f"warning: {error}; resuming from the previous checkpoint {prev} (step {ckpt['step']})"]


def main(argv: list[str] | None = None) -> "Trainer":
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    try:
        return train(cfg)
    except data.DatasetError as e:  # e.g. an unreadable image with --strict_data true, found by a loader worker
        raise SystemExit(f"error: {e}")


class OutputLock:
    """An exclusive lock on output_dir/.lock for the run's lifetime (rank 0): a second run on the same directory is
    refused, naming the holder's pid. The OS drops the lock when the process ends, however it ends."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, ".lock")
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise SystemExit(f"error: --output_dir {output_dir} is in use by another run (pid {holder}); wait for it "
                             f"to finish or choose another --output_dir")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class StopSignals:
    """SIGTERM and a first Ctrl-C ask the loop to save and stop after the current step (a second Ctrl-C stops at
    once). Under torchrun every rank learns of a request on any rank through a tiny CPU all-reduce per step on a
    gloo group: host-to-host, so the GPU stream is never synchronised."""

    def __init__(self, world: int):
        self.requested = False
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving and stopping after this step"
              + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def any_rank(self) -> bool:
        if self.group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag[0])

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: Config) -> Trainer:
    run_start = time.time()
    device, rank, world = setup(cfg)
    main_process = rank == 0
    lock = None
    if main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        lock = OutputLock(cfg.output_dir)
    stop = None
    try:
        stop = StopSignals(world)
        return _train(cfg, device, rank, world, run_start, stop)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    finally:
        if stop is not None:
            stop.restore()
        if lock is not None:
            lock.release()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, device: torch.device, rank: int, world: int, run_start: float, stop: StopSignals) -> Trainer:
    main_process = rank == 0
    if rank > 0:
        dist.barrier()  # rank 0 downloads and caches the dataset first
    bad_images_path = os.path.join(cfg.output_dir, "bad_images.txt")  # unreadable images, listed by data workers
    folder_options = dict(strict=cfg.strict_data, bad_images_file=bad_images_path)
    try:  # the dataset was checked by validate(); this parses it (and downloads it on first use)
        train_set = data.load_dataset(cfg.dataset, cfg.data_path, "train", size=cfg.synthetic_size,
                                      image_size=cfg.global_crops_size, **folder_options)
    except data.DatasetError as e:
        raise SystemExit(f"error: --dataset {cfg.dataset}: {e}")
    if rank == 0 and world > 1:
        dist.barrier()
    in_memory = isinstance(train_set, data.ImageDataset)  # in-memory sets live on the device (airbench style)
    if cfg.train_subset > len(train_set):
        raise SystemExit(f"error: --train_subset {cfg.train_subset}: the training split has {len(train_set)} images; "
                         f"valid: 0 (all) to {len(train_set)}")
    # The subset is the same for every seed and rank; batches hold indices into the whole split, so the memories'
    # image indices, k-NN and visualize.py refer to the dataset as it is on disk.
    subset = data.subset_indices(len(train_set), cfg.train_subset) if cfg.train_subset else None
    num_train = len(subset) if subset is not None else len(train_set)
    global_batch = cfg.batch_size_per_gpu * world
    steps_per_epoch = num_train // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch_size_per_gpu {cfg.batch_size_per_gpu}: the global batch {global_batch} "
                         f"exceeds the {num_train} training images")
    total_steps = cfg.epochs * steps_per_epoch
    if total_steps > MAX_STEPS:
        raise SystemExit(f"error: --epochs {cfg.epochs}: {total_steps} steps ({steps_per_epoch} per epoch) is more "
                         f"than {MAX_STEPS}")
    ckpt_path, log_path = os.path.join(cfg.output_dir, "checkpoint.pth"), os.path.join(cfg.output_dir, "log.jsonl")
    ckpt, notes = resume_state(cfg, ckpt_path)  # read and checked before any compute
    changes = config_changes(ckpt["config"], cfg) if ckpt is not None else {}
    if changes and cfg.resume_changes != "ok":
        listed = "; ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
        raise SystemExit(f"error: --output_dir {cfg.output_dir}: resuming with changed settings breaks exact resume: "
                         f"{listed}; pass --resume_changes ok to accept them, or use another --output_dir")
    train_images = train_set.images.to(device) if in_memory else None
    trainer = Trainer(cfg, device, world, steps_per_epoch)
    step = 0
    if ckpt is not None:
        try:
            trainer.load_state_dict(ckpt)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt_path} does not fit this run's networks or memories: "
                                  f"{str(e).strip().splitlines()[0]}")
        step = ckpt["step"]
        run_start -= ckpt.get("elapsed_s", 0.0)  # wall-clock time keeps counting across resumes
    env = environment(device, world)
    if main_process:
        print(f"config: {json.dumps(asdict(cfg))}\nenvironment: {json.dumps(env)}")
        print(f"derived: global batch {global_batch}, peak lr {cfg.lr * global_batch / 256:.3g} (= {cfg.lr:g} x "
              f"{global_batch} / 256), {steps_per_epoch} steps/epoch, {total_steps} steps, "
              + (f"a fixed subset of {num_train} of the {len(train_set)} training images, " if subset is not None
                 else "") + f"precision "
              f"{trainer.precision}, {sum(p.numel() for p in trainer.params) / 1e6:.2f} M student parameters"
              + (f", resuming at step {step}" if step else ""))
        for note in notes + [f"resuming with changed settings (--resume_changes ok): {name} {old!r} -> {new!r}"
                             for name, (old, new) in changes.items()]:
            print(note)

    def log(record: dict) -> None:
        if main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    if step == 0 and main_process:
        with open(log_path, "w") as f:  # a fresh run starts a fresh log with its config and environment
            f.write(json.dumps({"config": asdict(cfg), "environment": env}) + "\n")
    if notes or changes:
        log({"step": step, "resumed_from_previous_checkpoint": bool(notes),
             "resume_changes": {name: [old, new] for name, (old, new) in changes.items()}})

    reported_bad_images = set(data.read_bad_images(bad_images_path))
    def log_bad_images(record: dict) -> None:
        """Add the images the data workers skipped since the last call to the record, and print them."""
        new = [path for path in data.read_bad_images(bad_images_path) if path not in reported_bad_images]
        reported_bad_images.update(new)
        if new and main_process:
            record["bad_images"] = new
            print(f"skipped {len(new)} unreadable image(s), listed in {bad_images_path}: {', '.join(new[:3])}"
                  + (" ..." if len(new) > 3 else ""))

    test_set = None
    def knn_top1(epoch: int) -> float | None:
        """k-NN top-1 (k = 20, %) of the teacher backbone on the test split, every knn_every epochs and at the end."""
        nonlocal test_set
        if cfg.knn_every == 0 or (epoch % cfg.knn_every and epoch != cfg.epochs):
            return None
        if test_set is None:
            test_set = data.load_dataset(cfg.dataset, cfg.data_path, "test", image_size=cfg.global_crops_size,
                                         **folder_options)
        knn_train = train_set if in_memory else data.load_dataset(cfg.dataset, cfg.data_path, "train",
                                                                  image_size=cfg.global_crops_size, evaluation=True,
                                                                  **folder_options)
        return knn_evaluate(trainer.teacher.backbone, knn_train, test_set, device, num_workers=cfg.num_workers,
                            ks=(20,))[20][0]

    if step == 0 and (top1 := knn_top1(0)) is not None:
        record = {"epoch": 0, "step": 0, "knn_top1": top1, "elapsed_s": time.time() - run_start}
        log_bad_images(record)
        log(record)
        if main_process:
            print(f"epoch 0: knn_top1 {top1:.2f}")

    stop_step = total_steps if cfg.max_steps == 0 else min(total_steps, step + cfg.max_steps)
    no_bad_step = torch.iinfo(torch.long).max
    first_bad_step = torch.full((), no_bad_step, dtype=torch.long, device=device)
    trainer.preempted = stopping = stop.any_rank()  # a signal during the epoch-0 k-NN
    while step < stop_step and not stopping:
        epoch, first_batch = divmod(step, steps_per_epoch)
        # The epoch's batches are a function of (seed, epoch): resuming mid-epoch skips the ones already done.
        batches = data.epoch_batches(num_train, cfg.batch_size_per_gpu, epoch, cfg.seed, rank, world)
        batches = batches[first_batch:first_batch + stop_step - step]
        if subset is not None:
            batches = subset[batches]
        if in_memory:
            batch_iter = ((train_images[idx], None, idx) for idx in batches.to(device))
        else:  # uint8 canvases (B, 3, L, L), their images' valid sizes (B, 2) and the indices read, on the device
            batch_iter = data.folder_batches(train_set, batches.tolist(), device, cfg.num_workers, cfg.gpu_decode)
        sums = torch.zeros(len(STATS), device=device)
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not main_process,
                   dynamic_ncols=True)
        start_time, epoch_steps = time.time(), 0
        for images, sizes, indices in batch_iter:
            stats = trainer.train_step(images, step, rank, indices=indices, sizes=sizes)
            sums += stats
            first_bad_step = torch.where(torch.isfinite(stats[0]), first_bad_step,
                                         first_bad_step.clamp(max=step))  # no host sync
            step, epoch_steps = step + 1, epoch_steps + 1
            bar.update(1)
            stopping = stop.any_rank()  # a host-side flag (and a CPU all-reduce under torchrun): no GPU sync
            if stopping or step % cfg.log_every == 0 or epoch_steps == len(batches):  # the loop's only host syncs
                check_finite_loss(first_bad_step, no_bad_step, ckpt_path)
                images_per_s = epoch_steps * global_batch / (time.time() - start_time)
                bar.set_postfix(loss=f"{stats[0].item():.4f}", lr=f"{trainer.schedules['lr'][step - 1]:.2e}",
                                img_s=f"{images_per_s:.0f}")
            if stopping:
                break
        bar.close()

        whole_epoch = step % steps_per_epoch == 0
        record = {"epoch": step // steps_per_epoch if whole_epoch else round(step / steps_per_epoch, 4), "step": step,
                  **dict(zip(STATS, (sums / max(epoch_steps, 1)).tolist())),
                  "lr": float(trainer.schedules["lr"][step - 1]),
                  "images_per_s": epoch_steps * global_batch / (time.time() - start_time)}
        check_finite_state(trainer, step, ckpt_path)  # on every rank (identical weights), so all stop together
        if main_process:  # every random stream of step s is seeded from (seed, s): the step is the RNG state
            save_checkpoint(ckpt_path, {**trainer.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                                        "elapsed_s": time.time() - run_start, "config": asdict(cfg)})
        if stopping:
            if dist.is_initialized():
                dist.barrier()  # no rank exits (and makes torchrun stop the others) before the checkpoint is written
            record["stopped_by_signal"] = True
            log_bad_images(record)
            log(record)
            if main_process:
                print(f"stopped by a signal after step {step}; checkpoint written to {ckpt_path}; run the same "
                      f"command to resume (exit status {PREEMPTED_EXIT_CODE})")
            break
        if whole_epoch and (top1 := knn_top1(step // steps_per_epoch)) is not None:
            record["knn_top1"] = top1
        log_bad_images(record)
        record["elapsed_s"] = time.time() - run_start  # since the run began, k-NN evaluations included
        log(record)
        if main_process:
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        stopping = stop.any_rank()  # a signal during the k-NN evaluation: the checkpoint above is this step's
    trainer.step, trainer.preempted = step, stopping
    return trainer


def check_finite_loss(first_bad_step: torch.Tensor, no_bad_step: int, ckpt_path: str) -> None:
    """Host sync at the logging cadence: stop on a non-finite loss (on any rank), naming the earliest such step.

    It exits before any checkpoint is written, so the last checkpoint stays the last good state.
    """
    bad_step = first_bad_step.clone()
    if dist.is_initialized():
        dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)  # the earliest bad step of any rank
    if bad_step.item() != no_bad_step:
        raise SystemExit(f"error: non-finite loss at step {bad_step.item()}; stopped without saving, the last "
                         f"checkpoint ({ckpt_path}) is intact")


def environment(device: torch.device, world: int) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "world_size": world, "cpu_threads": torch.get_num_threads(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


if __name__ == "__main__":
    try:
        sys.exit(PREEMPTED_EXIT_CODE if main().preempted else 0)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint for the interrupted step, the last one is intact
        sys.exit("interrupted by a second Ctrl-C; the last checkpoint is intact")
