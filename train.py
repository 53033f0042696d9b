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
import json
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

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
    num_workers: int = 10  # folder dataset: JPEG-decoding DataLoader processes per GPU
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
    patch_loss_weight: float = 1.0
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


def validate(cfg: Config, world_size: int) -> None:
    """Refuse impossible or inconsistent settings before any compute (ConfigError names the flag)."""
    def need(ok, name, valid):
        if not ok:
            raise ConfigError(f"--{name} {getattr(cfg, name)!r}: {valid}")
    need(cfg.method in methods.FIELDS, "method", f"valid: {', '.join(methods.FIELDS)}")
    need(cfg.dataset in data.DATASETS, "dataset", f"valid: {', '.join(data.DATASETS)}")
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
    positive = ("epochs", "batch_size_per_gpu", "class_draws", "log_every", "student_temp", "teacher_temp",
                "warmup_teacher_temp", "lr", "patch_size", "head_hidden_dim", "out_dim")
    for name in positive:
        need(getattr(cfg, name) > 0, name, "must be > 0")
    for name in ("local_crops_number", "warmup_epochs", "warmup_teacher_temp_epochs", "knn_every", "max_steps",
                 "num_workers", "min_lr", "clip_grad", "weight_decay", "weight_decay_end", "synthetic_size"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(0 <= cfg.smoothing < 1, "smoothing", "valid: 0 <= smoothing < 1")
    need(0 <= cfg.drop_path_rate < 1, "drop_path_rate", "valid: 0 <= rate < 1")
    need(0 <= cfg.momentum_teacher <= 1, "momentum_teacher", "valid: 0 <= momentum <= 1")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "valid: auto, cpu, cuda")
    need(cfg.device != "cuda" or torch.cuda.is_available(), "device", "no CUDA device is available; valid: auto, cpu")
    need(cfg.precision in ("auto", "bf16", "fp16", "fp32"), "precision", "valid: auto, bf16, fp16, fp32")
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    need(cfg.precision != "fp16" or cuda, "precision", "fp16 needs a CUDA device; valid on CPU: auto, bf16, fp32")
    try:
        data.check_dataset(cfg.dataset, cfg.data_path)
    except data.DatasetError as e:
        raise ConfigError(f"--dataset {cfg.dataset} --data_path {cfg.data_path}: {e}")


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
        self.augment = data.MultiCropAugmentation(cfg.global_crops_size, cfg.local_crops_size, cfg.local_crops_number,
                                                  cfg.global_crops_scale, cfg.local_crops_scale, cfg.blur_sigma)
        self.make_masks = data.BlockMaskGenerator(cfg.global_crops_size // cfg.patch_size, cfg.pred_ratio,
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

    def train_step(self, images: torch.Tensor, step: int, rank: int = 0) -> torch.Tensor:
        """One step on a rank-local batch of uint8 images (B, 3, H, W) on the device, in the paper's order.

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

        # ---- multi-crop views and block masks, batched on the device (data.py)
        global_crops, local_crops = self.augment(images, gen)  # (2B, 3, G, G), (V_l B, 3, l, l)
        masks = self.make_masks(global_crops.shape[0], gen) if self.method.uses_masks else None  # (2B, P) or None

        # ---- teacher on the unmasked global crops; student on masked globals and all locals
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.precision != "fp32"):
            with torch.no_grad():
                teacher = self.teacher_forward(global_crops)  # cls (2B, d), patch (2B, P, d)[, their logits]
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
            self.method.update(teacher)
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


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, cfg: Config) -> dict:
    """Read a checkpoint with weights_only=True; refuse one whose networks or memories differ from cfg."""
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:  # a corrupt file, or a pickle that would run code
        raise ConfigError(f"--output_dir {cfg.output_dir}: cannot resume from {e}; delete it, or pass --resume false "
                          f"with another --output_dir")
    saved = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    for name in SHAPE_FIELDS:
        if saved.get(name, getattr(Config(), name)) != getattr(cfg, name):  # default: from before the field
            raise ConfigError(f"--{name} {getattr(cfg, name)!r}: the checkpoint in {cfg.output_dir} was trained with "
                              f"{saved.get(name)!r}; use that value or another --output_dir")
    return ckpt


def main(argv: list[str] | None = None) -> "Trainer":
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    return train(cfg)


def train(cfg: Config) -> Trainer:
    run_start = time.time()
    device, rank, world = setup(cfg)
    main_process = rank == 0
    if rank > 0:
        dist.barrier()  # rank 0 downloads and caches the dataset first
    try:  # the dataset was checked by validate(); this parses it (and downloads it on first use)
        train_set = data.load_dataset(cfg.dataset, cfg.data_path, "train", size=cfg.synthetic_size,
                                      image_size=cfg.global_crops_size)
    except data.DatasetError as e:
        raise SystemExit(f"error: --dataset {cfg.dataset}: {e}")
    if rank == 0 and world > 1:
        dist.barrier()
    in_memory = isinstance(train_set, data.ImageDataset)  # in-memory sets live on the device (airbench style)
    train_images = train_set.images.to(device) if in_memory else None
    global_batch = cfg.batch_size_per_gpu * world
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch_size_per_gpu {cfg.batch_size_per_gpu}: the global batch {global_batch} "
                         f"exceeds the {len(train_set)} training images")
    total_steps = cfg.epochs * steps_per_epoch
    trainer = Trainer(cfg, device, world, steps_per_epoch)

    os.makedirs(cfg.output_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(cfg.output_dir, "checkpoint.pth"), os.path.join(cfg.output_dir, "log.jsonl")
    step = 0
    if cfg.resume and os.path.exists(ckpt_path):
        try:
            ckpt = load_checkpoint(ckpt_path, cfg)
        except ConfigError as e:
            raise SystemExit(f"error: {e}")
        trainer.load_state_dict(ckpt)
        step = ckpt["step"]
        run_start -= ckpt.get("elapsed_s", 0.0)  # wall-clock time keeps counting across resumes
    env = environment(device, world)
    if main_process:
        print(f"config: {json.dumps(asdict(cfg))}\nenvironment: {json.dumps(env)}")
        print(f"derived: global batch {global_batch}, peak lr {cfg.lr * global_batch / 256:.3g} (= {cfg.lr:g} x "
              f"{global_batch} / 256), {steps_per_epoch} steps/epoch, {total_steps} steps, precision "
              f"{trainer.precision}, {sum(p.numel() for p in trainer.params) / 1e6:.2f} M student parameters"
              + (f", resuming at step {step}" if step else ""))

    def log(record: dict) -> None:
        if main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    if step == 0 and main_process:
        with open(log_path, "w") as f:  # a fresh run starts a fresh log with its config and environment
            f.write(json.dumps({"config": asdict(cfg), "environment": env}) + "\n")

    test_set = None
    def knn_top1(epoch: int) -> float | None:
        """k-NN top-1 (k = 20, %) of the teacher backbone on the test split, every knn_every epochs and at the end."""
        nonlocal test_set
        if cfg.knn_every == 0 or (epoch % cfg.knn_every and epoch != cfg.epochs):
            return None
        if test_set is None:
            test_set = data.load_dataset(cfg.dataset, cfg.data_path, "test", image_size=cfg.global_crops_size)
        knn_train = train_set if in_memory else data.load_dataset(cfg.dataset, cfg.data_path, "train",
                                                                  image_size=cfg.global_crops_size, evaluation=True)
        return knn_evaluate(trainer.teacher.backbone, knn_train, test_set, device, num_workers=cfg.num_workers,
                            ks=(20,))[20][0]

    if step == 0 and (top1 := knn_top1(0)) is not None:
        log({"epoch": 0, "step": 0, "knn_top1": top1, "elapsed_s": time.time() - run_start})
        if main_process:
            print(f"epoch 0: knn_top1 {top1:.2f}")

    stop_requested = False
    def on_sigterm(signum, frame):
        nonlocal stop_requested
        stop_requested = True
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

    stop_step = total_steps if cfg.max_steps == 0 else min(total_steps, step + cfg.max_steps)
    no_bad_step = torch.iinfo(torch.long).max
    first_bad_step = torch.full((), no_bad_step, dtype=torch.long, device=device)
    while step < stop_step:
        epoch, first_batch = divmod(step, steps_per_epoch)
        # The epoch's batches are a function of (seed, epoch): resuming mid-epoch skips the ones already done.
        batches = data.epoch_batches(len(train_set), cfg.batch_size_per_gpu, epoch, cfg.seed, rank, world)
        batches = batches[first_batch:first_batch + stop_step - step]
        if in_memory:
            batch_iter = (train_images[idx] for idx in batches.to(device))
        else:
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches.tolist(),
                                                 num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
            batch_iter = (images.to(device, non_blocking=True) for images, _ in loader)
        sums = torch.zeros(len(STATS), device=device)
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not main_process,
                   dynamic_ncols=True)
        start_time, epoch_steps = time.time(), 0
        for images in batch_iter:
            stats = trainer.train_step(images, step, rank)
            sums += stats
            first_bad_step = torch.where(torch.isfinite(stats[0]), first_bad_step,
                                         first_bad_step.clamp(max=step))  # no host sync
            step, epoch_steps = step + 1, epoch_steps + 1
            bar.update(1)
            if step % cfg.log_every == 0 or epoch_steps == len(batches):  # the loop's only host syncs
                stop_requested = check_health(first_bad_step, no_bad_step, stop_requested, ckpt_path)
                images_per_s = epoch_steps * global_batch / (time.time() - start_time)
                bar.set_postfix(loss=f"{stats[0].item():.4f}", lr=f"{trainer.schedules['lr'][step - 1]:.2e}",
                                img_s=f"{images_per_s:.0f}")
                if stop_requested:
                    break
        bar.close()

        whole_epoch = step % steps_per_epoch == 0
        record = {"epoch": step // steps_per_epoch if whole_epoch else round(step / steps_per_epoch, 4), "step": step,
                  **dict(zip(STATS, (sums / max(epoch_steps, 1)).tolist())),
                  "lr": float(trainer.schedules["lr"][step - 1]),
                  "images_per_s": epoch_steps * global_batch / (time.time() - start_time)}
        if main_process:  # every random stream of step s is seeded from (seed, s): the step is the RNG state
            save_checkpoint(ckpt_path, {**trainer.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                                        "elapsed_s": time.time() - run_start, "config": asdict(cfg)})
        if stop_requested:
            log(record)
            if main_process:
                print(f"SIGTERM: stopped after step {step}; checkpoint written to {ckpt_path}")
            break
        if whole_epoch and (top1 := knn_top1(step // steps_per_epoch)) is not None:
            record["knn_top1"] = top1
        record["elapsed_s"] = time.time() - run_start  # since the run began, k-NN evaluations included
        log(record)
        if main_process:
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    signal.signal(signal.SIGTERM, previous_handler)
    if world > 1:
        dist.destroy_process_group()
    trainer.step = step
    return trainer


def check_health(first_bad_step: torch.Tensor, no_bad_step: int, stop_requested: bool, ckpt_path: str) -> bool:
    """Host sync at the logging cadence: stop on a non-finite loss, agree on SIGTERM across ranks.

    Returns whether any rank asked to stop. A non-finite loss exits before any checkpoint is written, so the last
    checkpoint stays the last good state.
    """
    status = torch.stack((first_bad_step, first_bad_step.new_tensor(-int(stop_requested))))
    if dist.is_initialized():
        dist.all_reduce(status, op=dist.ReduceOp.MIN)  # earliest bad step; -1 when any rank got SIGTERM
    bad_step, stop = status.tolist()
    if bad_step != no_bad_step:
        raise SystemExit(f"error: non-finite loss at step {bad_step}; stopped without saving, the last checkpoint "
                         f"({ckpt_path}) is intact")
    return stop < 0


def environment(device: torch.device, world: int) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "world_size": world, "cpu_threads": torch.get_num_threads(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


if __name__ == "__main__":
    main()
