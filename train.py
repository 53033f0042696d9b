"""SOP pre-training: iBOT-style self-distillation against self-organizing prototypes (the paper, Sec. 3).

    python train.py --preset cpu_demo                                   # laptop CPU, a few minutes, offline
    python train.py --preset cifar --data_path data                     # CIFAR-10 on one GPU
    torchrun --nproc_per_node=8 train.py --preset imagenet --data_path /path/to/imagenet

Every field of Config is a flag (`--field value`, `python train.py --help` lists them); a preset sets a group of
fields and explicit flags override it. The run writes output_dir/log.jsonl and output_dir/checkpoint.pth and
resumes from the latter when it exists.

Read top to bottom: Config and presets; Trainer (networks, optimiser, `train_step` in the paper's order); the loop.
Running a job is in launch.py (flags, checks, devices, log) and checkpoint.py (checkpoints, resume rules, the
output lock, stop signals); what differs between SOP and the baselines is in methods.py.
"""
import json
import os
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

import augment
import data
import launch
import methods
from checkpoint import (PREEMPTED_EXIT_CODE, CheckpointError, NonFiniteLoss, StopSignals, check_finite_state,
                        initialise_from, read_init_source, resume_state, resumed_step, save_checkpoint)
from data import seed_for
from eval_knn import knn_evaluate
from launch import ConfigError, RunLog, validate
from memory import search_kind
from model import ProjectionHead, build_backbone, masked_tokens, token_budget


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
    # multi-crop augmentation (facebookresearch/dino main_dino.py DataAugmentationDINO)
    global_crops_size: int = 224  # px
    global_crops_scale: tuple[float, float] = (0.25, 1.0)  # area fraction of the source image
    local_crops_number: int = 10
    local_crops_size: int = 96  # px
    local_crops_scale: tuple[float, float] = (0.05, 0.25)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px, Gaussian blur sigma range
    # block masks on the global crops for SOP-MIM: the iBOT recipe (bytedance/ibot README); (0.3,) (0.0,) = the
    # official SOP default, every global crop masked at 0.3
    pred_ratio: tuple[float, ...] = (0.0, 0.3)
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)
    # networks (sthalles/sop models/vision_transformer.py, models/head.py)
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | custom (set embed_dim, depth, num_heads)
    patch_size: int = 16
    embed_dim: int = 0  # 0: the arch's width
    depth: int = 0  # 0: the arch's depth
    num_heads: int = 0  # 0: the arch's heads
    drop_path_rate: float = 0.1  # student stochastic depth
    interpolate_offset: float = 0.0  # position-embedding resampling at other sizes: 0 exact, 0.1 DINO/iBOT's form
    head_hidden_dim: int = 2048
    bottleneck_dim: int = 256  # d, the head's output and the memories' embedding dim (DINO's bottleneck_dim)
    # self-organizing prototypes (sthalles/sop memory_bank.py; README, "Official SOP flags and ours")
    class_memory_size: int = 65536  # N_C teacher [CLS] embeddings
    patch_memory_size: int = 8192  # N_P teacher patch embeddings
    class_anchors: int = 4096  # M_C SOPs per [CLS] draw
    class_neighbors: int = 8  # k_C support embeddings besides the anchor
    class_draws: int = 4  # T_C draws per step, losses averaged
    patch_anchors: int = 512  # M_P SOPs per patch draw
    patch_neighbors: int = 0  # k_P
    smoothing: float = 0.1  # anchor vote 1 - smoothing
    # losses and temperatures (paper: L = λ1 L_SOP + λ2 L_MIM)
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # reached after the warm-up; 0.04 everywhere = the official default
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    cls_loss_weight: float = 1.0
    patch_loss_weight: float = 1.0  # 0: MIM off, nothing patch-level computed (loss_patch logs 0); masks: pred_ratio
    # baselines (methods.py); 0 = the method's official default (methods.default_sizes)
    num_prototypes: int = 0  # K learnable prototypes: ibot 8192, dino 65536, carp 65536
    norm_last_layer: bool = True  # ibot, dino, carp: prototype gain fixed at 1 (false: learnable, not decayed)
    shared_head: bool = True  # ibot: one prototype layer for [CLS] and patches, student and teacher (iBOT)
    freeze_last_layer: int = 1  # ibot, dino: epochs with the prototype layer frozen
    center_momentum: float = 0.9  # ibot, dino: EMA of the teacher-logit centres
    partition_size: int = 0  # NB, block size of the random partitions: massl class_memory_size // 8, carp 512
    carp_cosine: bool = True  # carp: unit-norm head + temperatures; false = official unnormalised head
    # optimisation (facebookresearch/dino main_dino.py: AdamW, cosine schedules, per-parameter clipping)
    epochs: int = 100
    batch_size_per_gpu: int = 128
    lr: float = 5e-4  # per 256 images of global batch; linear warm-up then cosine
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04  # cosine to weight_decay_end, weights only
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter gradient-norm clip; 0 = off
    momentum_teacher: float = 0.996  # EMA momentum, cosine to momentum_teacher_end
    momentum_teacher_end: float = 1.0  # DINO, iBOT: 1 (the teacher freezes at the end of the schedule)
    # system
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the student and the teacher
    seed: int = 0
    output_dir: str = "runs/sop"
    resume: bool = True  # continue from output_dir/checkpoint.pth when it exists
    resume_changes: str = "refuse"  # refuse | ok: resume although settings that change the trajectory differ
    init_from: str = ""  # a new run (step 0, fresh optimiser) from a train.py checkpoint's or a ViT file's networks
    init_memories: bool = False  # init_from a train.py checkpoint: take its memories or centres too
    knn_every: int = 10  # epochs between k-NN evaluations (also before the first step); 0 = never
    log_every: int = 20  # steps between progress updates (the only host syncs of the loop)
    max_steps: int = 0  # stop after this many steps of this run (with a checkpoint); 0 = to the end
    saveckp_freq: int = 0  # also keep checkpoint{epoch:04}.pth every this many epochs (DINO's flag); 0 = never
    tensorboard: bool = False  # also write the log's numbers as TensorBoard events in output_dir/tensorboard

    def __post_init__(self):  # sizes left at 0: the method's official default, resolved here so logs show it
        for name, value in methods.default_sizes(self.method, self.class_memory_size).items():
            setattr(self, name, getattr(self, name) or value)


PRESETS = {
    # README quick start: synthetic data, a 4-block ViT at patch 8, about 4 minutes on a 2-core CPU. Tuned on that
    # budget (BENCHMARKS.md): SOP-MIM is off because at 4 x 4 tokens it lowered k-NN (45 -> 31 % at weight
    # 0.2); local crops are 24 px (3 x 3 tokens) since 16 px ones would be 2 x 2.
    "cpu_demo": dict(dataset="synthetic", synthetic_size=10000, global_crops_size=32, global_crops_scale=(0.3, 1.0),
                     local_crops_number=2, local_crops_size=24, local_crops_scale=(0.15, 0.4), blur_sigma=(0.1, 0.5),
                     arch="custom", patch_size=8, embed_dim=96, depth=4, num_heads=3, drop_path_rate=0.0,
                     head_hidden_dim=256, bottleneck_dim=64, class_memory_size=2560, patch_memory_size=1024,
                     class_anchors=1024, class_neighbors=4, class_draws=1, patch_anchors=128, patch_loss_weight=0.0,
                     teacher_temp=0.04, epochs=12, batch_size_per_gpu=128, lr=4e-3, warmup_epochs=1,
                     momentum_teacher=0.99, knn_every=3, log_every=10, output_dir="runs/cpu_demo",
                     num_prototypes=2048, partition_size=256),  # baselines: 8 CARP blocks, 10 MaSSL blocks
    # One GPU, 32 px images, ViT at patch 4 (8 x 8 tokens); local crops 16 px (4 x 4).
    "cifar": dict(dataset="cifar10", data_path="data", global_crops_size=32, local_crops_size=16,
                  local_crops_number=6, blur_sigma=(0.1, 0.5), arch="vit_small", patch_size=4,
                  class_memory_size=16384, patch_memory_size=4096, class_anchors=1024, class_draws=1,
                  warmup_teacher_temp_epochs=30, epochs=200, batch_size_per_gpu=512, warmup_epochs=10,
                  momentum_teacher=0.996, knn_every=20, output_dir="runs/cifar", compile=True),
    # The faithful ImageNet-1k recipe (the Config defaults): ViT-S/16, 2 x 224 + 10 x 96. The GPU presets compile
    # the networks (no graph breaks, no recompiles after the first step: bench.py --count); --compile false if not.
    "imagenet": dict(output_dir="runs/imagenet", compile=True),
}
# Fashion-MNIST on a 2-core CPU in 30 minutes: cpu_demo on the whole training split, with a larger memory, fewer
# anchors and more neighbours (512 of 8192, k = 8: anchors a sixteenth of the memory, the official ratio), a slower
# teacher and temperatures that keep the targets informative, and schedules that barely anneal: lr 3e-3 to 2.5e-3,
# weight decay 0.04 to 0.1, teacher momentum 0.996 to 0.997 (README, "Fashion-MNIST on a CPU"; results/fmnist_cpu)
PRESETS["fmnist_cpu"] = {**PRESETS["cpu_demo"], **dict(
    dataset="fashion_mnist", data_path=data.FASHION_MNIST_SYSTEM_DIR, epochs=10, knn_every=2, class_memory_size=8192,
    class_anchors=512, class_neighbors=8, momentum_teacher=0.996, momentum_teacher_end=0.997, student_temp=0.2,
    teacher_temp=0.02, warmup_teacher_temp=0.02, lr=6e-3, min_lr=2.5e-3, weight_decay_end=0.1,
    output_dir="runs/fmnist_cpu")}


def parse_config(argv: list[str]) -> Config:
    """Config from `--preset NAME` and `--field value` flags (launch.parse_config)."""
    return launch.parse_config(argv, Config, PRESETS, __doc__)


# ------------------------------------------------------------------------------------------------------ schedules
def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    start_warmup: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up start_warmup -> base, then cosine base -> final (facebookresearch/dino
    utils.py cosine_scheduler)."""
    warmup = np.linspace(start_warmup, base, warmup_epochs * steps_per_epoch, endpoint=False)
    t = np.arange(epochs * steps_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate((warmup, cosine))


def build_schedules(cfg: Config, steps_per_epoch: int, global_batch: int) -> dict[str, np.ndarray]:
    """lr (scaled by global batch / 256), weight decay, teacher temperature (linear warm-up, then constant) and EMA
    momentum for every step, indexed by the global step (as sthalles/sop main_ibot.py)."""
    total = cfg.epochs * steps_per_epoch
    warm = min(cfg.warmup_teacher_temp_epochs * steps_per_epoch, total)
    teacher_temp = np.full(total, cfg.teacher_temp)
    teacher_temp[:warm] = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, warm)
    return {"lr": cosine_schedule(cfg.lr * global_batch / 256, cfg.min_lr, cfg.epochs, steps_per_epoch,
                                  min(cfg.warmup_epochs, cfg.epochs)),
            "weight_decay": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch),
            "teacher_temp": teacher_temp,
            "momentum": cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, steps_per_epoch)}


def clip_gradients(params: list[torch.Tensor], clip: float) -> None:
    """Scale each parameter's gradient to norm <= clip on its own (facebookresearch/dino utils.py clip_gradients),
    without host syncs."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))  # (n_params,)
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scale.unbind()))


class Trainer:
    """Networks, memories, optimiser and the training step; everything a checkpoint holds."""

    def __init__(self, cfg: Config, device: torch.device, world: int, steps_per_epoch: int):
        self.cfg, self.device, self.steps_per_epoch = cfg, device, steps_per_epoch
        self.precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
        self.global_batch = cfg.batch_size_per_gpu * world
        self.schedules = build_schedules(cfg, steps_per_epoch, self.global_batch)
        self.augment = augment.MultiCropAugmentation(cfg.global_crops_size, cfg.local_crops_size,
                                                     cfg.local_crops_number, cfg.global_crops_scale,
                                                     cfg.local_crops_scale, cfg.blur_sigma)
        self.make_masks = augment.BlockMaskGenerator(cfg.global_crops_size // cfg.patch_size, cfg.pred_ratio,
                                                     cfg.pred_ratio_var)
        self.masks_epoch, self.epoch_masks = None, None  # block_masks' cache: (epoch, rank, crops) and its masks
        self.token_budget = 0  # T, set with the epoch's masks (model.token_budget)
        self.patch_loss = methods.uses_patch_tokens(cfg)  # a masked-patch loss reads the global patch tokens
        self.stat_names = ("loss", *methods.METHODS[cfg.method].STATS, "teacher_cls_std")  # what train_step returns

        # Student (drop path, mask token) and teacher: a copy without either, never trained by gradients.
        def network(student: bool) -> nn.Module:
            backbone = build_backbone(cfg.arch, cfg.global_crops_size, cfg.patch_size,
                                      cfg.drop_path_rate if student else 0.0,
                                      use_mask_token=student and methods.METHODS[cfg.method].uses_masks,
                                      embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
            head = ProjectionHead(backbone.embed_dim, cfg.head_hidden_dim, cfg.bottleneck_dim,
                                  normalize=cfg.method != "carp" or cfg.carp_cosine)
            return methods.build_network(cfg, backbone, head)  # + a prototype layer for ibot, dino, carp
        torch.manual_seed(cfg.seed)  # identical networks and initial memories on every rank
        self.student, self.teacher = network(True).to(device), network(False).to(device)
        self.teacher.load_state_dict(self.student.state_dict(), strict=False)  # all but the mask token
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
                                           fused=True)  # one kernel for all parameters, on CPU and CUDA
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.params = [p for _, p in named]
        # EMA pairs by name: the student's mask token has no teacher counterpart.
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

        Returns the values of self.stat_names, on the device: no host sync.
        """
        cfg, sched = self.cfg, self.schedules
        # ---- schedules; this step's random streams are all seeded from (seed, step)
        teacher_temp, momentum = float(sched["teacher_temp"][step]), float(sched["momentum"][step])
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(sched["lr"][step])  # Python floats: the optimizer state is checkpointed
            if i == 0:
                group["weight_decay"] = float(sched["weight_decay"][step])
        torch.manual_seed(seed_for(cfg.seed, step, 1, rank))  # drop path, own stream per rank
        gen = torch.Generator(self.device).manual_seed(seed_for(cfg.seed, step, 2, rank))
        anchor_gen = torch.Generator(self.device).manual_seed(seed_for(cfg.seed, step, 3))  # same on every rank:
        # SOP anchors, MaSSL/CARP partitions

        # ---- multi-crop views and block masks, batched on the device (augment.py)
        global_crops, local_crops = self.augment(images, gen, sizes)  # (2B, 3, G, G), (V_l B, 3, l, l)
        masks = self.block_masks(step, rank, len(global_crops)) if self.method.uses_masks else None  # (2B, P) bool
        # the patch tokens whose embeddings a loss reads: the masked ones (model.PatchTokens); None: no patch loss
        tokens = masked_tokens(masks, self.token_budget) if self.patch_loss else None
        teacher_index = None if tokens is None else self.method.teacher_patch_index(tokens, gen)

        # ---- teacher on the unmasked global crops; student on masked globals and all locals
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.precision != "fp32"):
            with torch.no_grad():
                teacher = self.teacher_forward(global_crops, patch_index=teacher_index)  # cls (2B, d), patch, ...
            student = self.student_forward(global_crops, masks, local_crops,
                                           patch_index=None if tokens is None else tokens.index)  # patch (T, d)

        # ---- the losses: SOP loss on [CLS] + SOP-MIM loss on masked patches (methods.SOP), or a baseline's
        loss, stats = self.method.loss(student, teacher, tokens, teacher_temp, anchor_gen)  # stats: method.STATS

        # ---- backward, per-parameter clipping, AdamW, EMA teacher
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
            # ---- the method's state after the losses read it: memory enqueue or centre update
            self.method.update(teacher, indices)
            cls_std = F.normalize(teacher.cls.float(), dim=-1).std(0).mean()  # collapse monitor: -> 0 if collapsed
            return torch.stack((loss, *(stats[name] for name in self.method.STATS), cls_std)).float().detach()

    def block_masks(self, step: int, rank: int, n: int) -> torch.Tensor:
        """The step's block masks (n = 2B, P), True = masked. They are drawn for a whole epoch at once, seeded from
        (seed, epoch, rank): one batched call per epoch instead of ~2000 small ops per step, and a resumed run
        draws the same ones."""
        epoch = step // self.steps_per_epoch
        if self.masks_epoch != (epoch, rank, n):
            gen = torch.Generator(self.device).manual_seed(seed_for(self.cfg.seed, epoch, 4, rank))
            self.epoch_masks = self.make_masks(self.steps_per_epoch * n, gen).view(self.steps_per_epoch, n, -1)
            self.masks_epoch, self.token_budget = (epoch, rank, n), token_budget(self.epoch_masks)
        return self.epoch_masks[step % self.steps_per_epoch]  # (n, P)

    def state_dict(self) -> dict:
        # The method's state under its parts' names: SOP class_memory, patch_memory; MaSSL class_memory; iBOT/DINO
        # centers; CARP nothing (its prototype layer is in the networks).
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                **{name: part.state_dict() for name, part in self.method.named_children()}}

    def load_state_dict(self, state: dict, path: str = "the checkpoint") -> None:
        try:
            for name, part in (("student", self.student), ("teacher", self.teacher), ("optimizer", self.optimizer),
                               ("scaler", self.scaler), *self.method.named_children()):
                part.load_state_dict(state[name])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path} does not fit this run's networks or memories: "
                                  f"{str(e).strip().splitlines()[0]}")


# ----------------------------------------------------------------------------------------------------------- loop
# Log keys of the scheduled values (the Config fields they come from) -> Trainer.schedules keys
SCHEDULE_LOG = {"lr": "lr", "weight_decay": "weight_decay", "teacher_temp": "teacher_temp",
                "momentum_teacher": "momentum"}


@dataclass
class TrainingData:
    """The training split (held on the device when in memory, airbench style), its subset, the k-NN test split."""
    train_set: data.ImageDataset | data.ImageFolder
    images: torch.Tensor | None  # uint8 (n, 3, H, W) on the device, in-memory datasets only
    subset: torch.Tensor | None  # int64 indices into train_set (--train_subset)
    folder_options: dict
    test_set: data.ImageDataset | data.ImageFolder | None = None

    num_train = property(lambda self: len(self.train_set) if self.subset is None else len(self.subset))


def load_training_data(cfg: Config, device: torch.device, rank: int, world: int) -> TrainingData:
    """Parse the training split (rank 0 first: it downloads and caches); one-line errors for what cannot work."""
    folder_options = dict(strict=cfg.strict_data, bad_images_file=os.path.join(cfg.output_dir, "bad_images.txt"))
    if rank > 0:
        dist.barrier()
    try:
        train_set = data.load_dataset(cfg.dataset, cfg.data_path, "train", size=cfg.synthetic_size,
                                      image_size=cfg.global_crops_size, **folder_options)
    except data.DatasetError as e:
        raise SystemExit(f"error: --dataset {cfg.dataset}: {e}")
    if rank == 0 and world > 1:
        dist.barrier()
    if cfg.train_subset > len(train_set):
        raise SystemExit(f"error: --train_subset {cfg.train_subset}: the training split has {len(train_set)} images; "
                         f"valid: 0 (all) to {len(train_set)}")
    # The same subset for every seed and rank; batches hold indices into the whole split, so the memories' image
    # indices, k-NN and visualize.py refer to the dataset as it is on disk.
    subset = data.subset_indices(len(train_set), cfg.train_subset) if cfg.train_subset else None
    images = train_set.images.to(device) if isinstance(train_set, data.ImageDataset) else None
    loaded = TrainingData(train_set, images, subset, folder_options)
    launch.check_run_length(cfg, loaded.num_train, world)
    return loaded


def knn_top1(cfg: Config, trainer: Trainer, loaded: TrainingData, epoch: int) -> float | None:
    """k-NN top-1 (k = 20, %) of the teacher backbone on the test split, every knn_every epochs and at the end."""
    if cfg.knn_every == 0 or (epoch % cfg.knn_every and epoch != cfg.epochs):
        return None
    options = dict(image_size=cfg.global_crops_size, **loaded.folder_options)
    if loaded.test_set is None:
        loaded.test_set = data.load_dataset(cfg.dataset, cfg.data_path, "test", **options)
    knn_train = loaded.train_set if loaded.images is not None else data.load_dataset(
        cfg.dataset, cfg.data_path, "train", evaluation=True, **options)
    return knn_evaluate(trainer.teacher.backbone, knn_train, loaded.test_set, trainer.device,
                        num_workers=cfg.num_workers, ks=(20,))[20][0]


def train_epoch(trainer: Trainer, loaded: TrainingData, step: int, stop_step: int, stop: StopSignals,
                watch: NonFiniteLoss, log: RunLog, run_start: float, rank: int, world: int) -> tuple[int, dict, bool]:
    """Steps from `step` to the end of its epoch (or stop_step, or a stop signal), with a "step" record of the
    last log_every steps' mean stats and schedules every log_every steps. Returns the step reached, the epoch's
    record (mean stats, lr, images/s) and whether a signal asked to stop."""
    cfg, global_batch, sched = trainer.cfg, trainer.global_batch, trainer.schedules
    epoch, first_batch = divmod(step, trainer.steps_per_epoch)
    # The epoch's batches are a function of (seed, epoch): resuming mid-epoch skips the ones already done.
    batches = data.epoch_batches(loaded.num_train, cfg.batch_size_per_gpu, epoch, cfg.seed, rank, world)
    batches = batches[first_batch:first_batch + stop_step - step]
    batches = batches if loaded.subset is None else loaded.subset[batches]
    sums = window = torch.zeros(len(trainer.stat_names), device=trainer.device)  # summed on the device, no sync
    done, window_start, stopping = 0, 0, False
    bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0, dynamic_ncols=True)
    start = window_time = time.time()
    for images, sizes, indices in data.training_batches(loaded.train_set, loaded.images, batches, trainer.device,
                                                        cfg.num_workers, cfg.gpu_decode):
        stats = trainer.train_step(images, step, rank, indices=indices, sizes=sizes)
        sums, window = sums + stats, window + stats
        watch.see(stats[0], step)
        step, done = step + 1, done + 1
        bar.update(1)
        report = step % cfg.log_every == 0 or done == len(batches)
        stopping = stop.any_rank(poll=report)  # across ranks only at the log cadence (checkpoint.StopSignals)
        if report or stopping:  # the loop's only host syncs
            watch.check(log.checkpoint_path)
            means, n, now = (window / (done - window_start)).tolist(), done - window_start, time.time()
            log.write({"kind": "step", "step": step, "epoch": round(step / trainer.steps_per_epoch, 4),
                       **dict(zip(trainer.stat_names, means)),
                       **{name: float(sched[key][step - 1]) for name, key in SCHEDULE_LOG.items()},
                       "step_time_s": (now - window_time) / n, "images_per_s": n * global_batch / (now - window_time),
                       "elapsed_s": now - run_start})
            entropy = means[trainer.stat_names.index("teacher_image_entropy")]  # rises on uniform collapse
            bar.set_postfix(loss=f"{means[0]:.4f}", image_entropy=f"{entropy:.3f}", lr=f"{sched['lr'][step - 1]:.2e}",
                            img_s=f"{done * global_batch / (now - start):.0f}")
            window, window_start, window_time = torch.zeros_like(window), done, now
        if stopping:
            break
    bar.close()
    epochs_done = step / trainer.steps_per_epoch
    record = {"epoch": int(epochs_done) if epochs_done.is_integer() else round(epochs_done, 4),
              "step": step, **dict(zip(trainer.stat_names, (sums / max(done, 1)).tolist())),
              "lr": float(sched["lr"][step - 1]), "images_per_s": done * global_batch / (time.time() - start)}
    prototypes = trainer.method.prototype_vectors(trainer.teacher)  # (K or Q, d)
    record["distinct_prototypes"] = int(methods.distinct_prototypes(prototypes))  # partial prototype collapse
    return step, record, stopping


def train(cfg: Config) -> Trainer:
    """Run (or resume) the training cfg describes; returns the Trainer, with .step and .preempted set."""
    run_start = time.time()
    device, rank, world = launch.setup(cfg)
    return launch.run_job(cfg, rank, world, lambda stop: run_training(cfg, device, rank, world, run_start, stop))


def start_run(cfg: Config, loaded: TrainingData, device: torch.device, rank: int, world: int,
              run_start: float) -> tuple[Trainer, int, RunLog, float]:
    """The trainer, fresh (its networks from --init_from when given) or restored from output_dir/checkpoint.pth
    (checked before any compute), the log, and the start-up print of config, environment and derived values.
    Returns (trainer, step, log, run start time)."""
    global_batch = cfg.batch_size_per_gpu * world
    steps_per_epoch = loaded.num_train // global_batch
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pth")
    ckpt, notes = resume_state(cfg, ckpt_path)
    source = read_init_source(cfg) if cfg.init_from and ckpt is None else None  # --init_from: README, "Resuming"
    trainer, step = Trainer(cfg, device, world, steps_per_epoch), 0
    trainer.schedule = dict(world_size=world, global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                            train_images=loaded.num_train)  # what the schedules depend on, saved with checkpoints
    if ckpt is not None:
        trainer.load_state_dict(ckpt, ckpt_path)
        step = resumed_step(ckpt, trainer.schedule, cfg.resume_changes, notes)
        run_start -= ckpt.get("elapsed_s", 0.0)  # wall-clock time keeps counting across resumes
    env = launch.environment(device, world)
    derived = {**trainer.schedule, "peak_lr": cfg.lr * global_batch / 256, "total_steps": cfg.epochs * steps_per_epoch,
               "precision": trainer.precision, "student_parameters": sum(p.numel() for p in trainer.params),
               "neighbour_search": search_kind(device)}
    if source is not None:  # checked before the log starts; what came from where goes into its first record
        derived["initialised"] = initialise_from(trainer, source, cfg, notes)
    log = RunLog(cfg.output_dir, not rank, None if step else dict(config=asdict(cfg), environment=env, derived=derived),
                 cfg.tensorboard)
    if rank == 0:
        print(f"config: {json.dumps(asdict(cfg))}\nenvironment: {json.dumps(env)}\nderived: {json.dumps(derived)}"
              + (f"\nresuming at step {step}" if step else "") + "".join(f"\n{note}" for note in notes))
    if ckpt is not None and (notes or ckpt["changes"]):
        log.write({"step": step, "resumed_from_previous_checkpoint": any(n.startswith("warning") for n in notes),
                   "resume_changes": {name: [old, new] for name, (old, new) in ckpt["changes"].items()}})
    if step == 0 and (top1 := knn_top1(cfg, trainer, loaded, 0)) is not None:
        log.write({"epoch": 0, "step": 0, "knn_top1": top1, "elapsed_s": time.time() - run_start}, show=True)
    return trainer, step, log, run_start


def run_training(cfg: Config, device: torch.device, rank: int, world: int, run_start: float,
                 stop: StopSignals) -> Trainer:
    """Data and trainer, then epochs until the end of the schedule, --max_steps or a stop signal; a checkpoint
    after every epoch and when stopped."""
    loaded = load_training_data(cfg, device, rank, world)
    trainer, step, log, run_start = start_run(cfg, loaded, device, rank, world, run_start)
    main_process, steps_per_epoch, ckpt_path = rank == 0, trainer.steps_per_epoch, log.checkpoint_path
    stop_step = min(cfg.epochs * steps_per_epoch, step + cfg.max_steps if cfg.max_steps else 10 ** 18)
    watch = NonFiniteLoss(device)
    stopping = stop.any_rank()  # a signal during the epoch-0 k-NN
    while step < stop_step and not stopping:
        step, record, stopping = train_epoch(trainer, loaded, step, stop_step, stop, watch, log, run_start, rank,
                                             world)
        check_finite_state(trainer, step, ckpt_path)  # on every rank (identical weights), so all stop together
        if main_process:  # every random stream of step s is seeded from (seed, s): the step is the RNG state
            save_checkpoint(ckpt_path, {**trainer.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                                        "elapsed_s": time.time() - run_start, "config": asdict(cfg),
                                        "schedule": trainer.schedule}, keep_every=cfg.saveckp_freq)
        if stopping:
            if dist.is_initialized():
                dist.barrier()  # no rank exits (and makes torchrun stop the others) before the checkpoint is written
            log.write({**record, "stopped_by_signal": True})
            if main_process:
                print(f"stopped by a signal after step {step}; checkpoint written to {ckpt_path}; run the same "
                      f"command to resume (exit status {PREEMPTED_EXIT_CODE})")
            break
        top1 = knn_top1(cfg, trainer, loaded, step // steps_per_epoch) if step % steps_per_epoch == 0 else None
        if top1 is not None:
            record["knn_top1"] = top1
        log.write({**record, "elapsed_s": time.time() - run_start}, show=True)  # k-NN evaluations included
        stopping = stop.any_rank()  # a signal during the k-NN evaluation: the checkpoint above is this step's
    trainer.step, trainer.preempted = step, stopping  # the step reached; stopped by a signal (exit status 75)
    return trainer


def main(argv: list[str] | None = None) -> Trainer:
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    try:
        return train(cfg)
    except data.DatasetError as e:  # e.g. an unreadable image with --strict_data true, found by a loader worker
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    try:
        sys.exit(PREEMPTED_EXIT_CODE if main().preempted else 0)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint for the interrupted step, the last one is intact
        sys.exit("interrupted by a second Ctrl-C; the last checkpoint is intact")
