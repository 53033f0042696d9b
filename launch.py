"""How a run is launched: flags -> Config, the checks every flag value passes before any compute, the device and
torchrun process group, the job around the training (output lock, stop signals), and the log with its environment
record.

The Config dataclass and its presets live in train.py; this file turns a command line into one (`--field value`
for every field, `--preset NAME` for a group, explicit flags winning) and refuses values that cannot work with a
one-line ConfigError that names the flag, the value and what would be valid (README, "Failure behaviour").
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import methods
from checkpoint import CheckpointError, OutputLock, StopSignals
from model import ARCHS

RENAMED_FLAGS = {"out_dim": "bottleneck_dim"}  # a flag renamed to the DINO name of what it sets: old -> new


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag, the value and what would be valid."""


def parse_config(argv: list[str], config_class, presets: dict, description: str = ""):
    """A config_class instance from `--preset NAME` and `--field value` flags (explicit flags override the preset)."""
    for arg in argv:
        if arg.startswith("--") and arg[2:].split("=")[0] in RENAMED_FLAGS:
            old = arg[2:].split("=")[0]
            raise ConfigError(f"--{old} was renamed --{RENAMED_FLAGS[old]} (DINO's name for the same thing)")
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False)
    parser.add_argument("--preset", choices=list(presets), help="named group of settings")
    for field in dataclasses.fields(config_class):
        kind, default = field.type, field.default
        if kind == bool:
            parser.add_argument(f"--{field.name}", type=_parse_bool, metavar="true|false", help=f"(default {default})")
        elif str(kind).startswith("tuple"):
            parser.add_argument(f"--{field.name}", type=float, nargs="+",
                                help=f"(default {' '.join(map(str, default))})")
        else:
            parser.add_argument(f"--{field.name}", type=kind, help=f"(default {default})")
    args = parser.parse_args(argv)
    values = dict(presets[args.preset]) if args.preset else {}
    explicit = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
                if k != "preset" and v is not None}
    values.update(explicit)
    method = values.get("method", config_class.method)
    if method in methods.FIELDS:  # an unknown method is named by validate()
        for name in sorted(set(explicit) & methods.METHOD_FIELDS - methods.FIELDS[method]):
            value = explicit[name]
            if value != getattr(config_class, name):  # a flag set away from its default that the method ignores
                value = " ".join(map(str, value)) if isinstance(value, tuple) else value
                raise ConfigError(f"--{name} {value} has no meaning for --method {method}")
    return config_class(**values)


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
# Caps far above any published setting (ViT-22B: width 6144, depth 48; DINO: 65536 prototypes, 10 local crops; a
# memory of all 1.28 M ImageNet images): a larger value is a typo that would fail allocating the networks, memories
# or crops with a traceback, or build for hours. The seed: torch.manual_seed takes 64 bits, data.seed_for mixes 63.
MAX_VALUES = {"global_crops_size": 4096, "local_crops_size": 4096, "local_crops_number": 64, "embed_dim": 8192,
              "depth": 128, "head_hidden_dim": 65536, "bottleneck_dim": 65536, "class_memory_size": 2 ** 24,
              "patch_memory_size": 2 ** 24, "class_draws": 64, "num_prototypes": 2 ** 20, "num_workers": 256,
              "seed": 2 ** 63 - 1}


def _needs(cfg):
    """need(ok, name, valid): a ConfigError naming --name, its value and what is valid, unless ok."""
    def need(ok, name, valid):
        if not ok:
            value = getattr(cfg, name)
            raise ConfigError(f"--{name} {' '.join(map(str, value)) if isinstance(value, tuple) else repr(value)}: "
                              f"{valid}")
    return need


def validate(cfg, world_size: int) -> None:
    """Refuse impossible or inconsistent settings before any compute (ConfigError names the flag)."""
    need = _needs(cfg)
    for field in dataclasses.fields(cfg):  # nan and inf pass every comparison below in some direction
        value = getattr(cfg, field.name)
        if isinstance(value, (float, tuple)):
            need(all(math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))), field.name,
                 "must be finite")
    positive = ("epochs", "batch_size_per_gpu", "class_draws", "log_every", "student_temp", "teacher_temp",
                "warmup_teacher_temp", "lr", "patch_size", "head_hidden_dim", "bottleneck_dim", "global_crops_size",
                "local_crops_size")
    for name in positive:
        need(getattr(cfg, name) > 0, name, "must be > 0")
    for name in ("local_crops_number", "warmup_epochs", "warmup_teacher_temp_epochs", "knn_every", "max_steps",
                 "saveckp_freq",
                 "num_workers", "min_lr", "clip_grad", "weight_decay", "weight_decay_end", "synthetic_size", "seed",
                 "train_subset", "embed_dim", "depth", "num_heads"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0" + (" (0 = the arch's)" if name in
                                                                ("embed_dim", "depth", "num_heads") else ""))
    need(cfg.epochs <= MAX_EPOCHS, "epochs", f"valid: 1 to {MAX_EPOCHS}")
    for name, most in MAX_VALUES.items():
        need(getattr(cfg, name) <= most, name, f"valid: at most {most}")
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
    _validate_method(cfg, world_size)
    _validate_system(cfg)


def _validate_method(cfg, world_size: int) -> None:
    """The method's own fields: memories, anchors, prototypes, partitions."""
    need = _needs(cfg)
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
    for name in ("cls_loss_weight", "patch_loss_weight"):  # the paper's λ1, λ2: a negative one ascends its loss
        need(getattr(cfg, name) >= 0, name, "must be >= 0 (0 = that loss off)")


def _validate_system(cfg) -> None:
    """Rates, devices, precision, the output directory and the dataset's presence."""
    need = _needs(cfg)
    need(0 <= cfg.drop_path_rate < 1, "drop_path_rate", "valid: 0 <= rate < 1")
    for name in ("momentum_teacher", "momentum_teacher_end"):  # the EMA momentum's cosine: start and end
        need(0 <= getattr(cfg, name) <= 1, name, "valid: 0 <= momentum <= 1")
    need(0 <= cfg.interpolate_offset < 1, "interpolate_offset", "valid: 0 (exact) to < 1; DINO/iBOT use 0.1")
    need(cfg.resume_changes in ("refuse", "ok"), "resume_changes", "valid: refuse, ok")
    need(not cfg.init_from or os.path.isfile(cfg.init_from), "init_from",
         f"{'a directory' if os.path.isdir(cfg.init_from) else 'no such file'}; valid: a train.py checkpoint or a "
         f"ViT state dict file")
    need(cfg.init_from or not cfg.init_memories, "init_memories", "needs --init_from (a train.py checkpoint)")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "valid: auto, cpu, cuda")
    need(cfg.device != "cuda" or torch.cuda.is_available(), "device", "no CUDA device is available; valid: auto, cpu")
    need(cfg.precision in ("auto", "bf16", "fp16", "fp32"), "precision", "valid: auto, bf16, fp16, fp32")
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    need(cfg.precision != "fp16" or cuda, "precision", "fp16 needs a CUDA device; valid on CPU: auto, bf16, fp32")
    need(writable_dir(cfg.output_dir), "output_dir", "cannot be created or written to (check its permissions)")
    need(not cfg.tensorboard or importlib.util.find_spec("tensorboard") is not None, "tensorboard",
         "needs the tensorboard package (pip install tensorboard); valid without it: false")
    try:
        data.check_dataset(cfg.dataset, cfg.data_path)
    except data.DatasetError as e:
        raise ConfigError(f"--dataset {cfg.dataset} --data_path {cfg.data_path}: {e}")


def setup(cfg):
    """Pick the device and join the process group when launched by torchrun. Returns (device, rank, world)."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1),
                                                                       ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # the patch-embedding convolution: fixed shapes, fastest algorithm
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device, rank, world


def run_job(cfg, rank: int, world: int, body):
    """body(stop_signals) with output_dir locked (rank 0) and SIGTERM / Ctrl-C turned into a save-and-stop request;
    the lock, the signal handlers and the process group are released however it ends."""
    lock = stop = None
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        lock = OutputLock(cfg.output_dir)
    try:
        stop = StopSignals(world)
        return body(stop)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    finally:
        if stop is not None:
            stop.restore()
        if lock is not None:
            lock.release()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def check_run_length(cfg, num_train: int, world_size: int) -> None:
    """Once the training split is read: one global batch must fit in it, and the schedules in memory."""
    global_batch = cfg.batch_size_per_gpu * world_size
    if num_train < global_batch:
        raise SystemExit(f"error: --batch_size_per_gpu {cfg.batch_size_per_gpu}: the global batch {global_batch} "
                         f"exceeds the {num_train} training images")
    if cfg.epochs * (num_train // global_batch) > MAX_STEPS:
        raise SystemExit(f"error: --epochs {cfg.epochs}: {cfg.epochs * (num_train // global_batch)} steps "
                         f"({num_train // global_batch} per epoch) is more than {MAX_STEPS}")


def writable_dir(path: str) -> bool:
    """Whether path is, or can be created as, a directory this process can write files into."""
    existing = next(p for p in [os.path.abspath(path), *Path(os.path.abspath(path)).parents] if os.path.exists(p))
    if os.path.abspath(existing) == os.path.abspath(path) and not os.path.isdir(path):
        return False
    return os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)


def environment(device: torch.device, world: int) -> dict:
    """What the run ran on, logged beside its config."""
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "world_size": world, "cpu_threads": torch.get_num_threads(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


class RunLog:
    """output_dir/log.jsonl, written by rank 0: the config and environment first (a fresh run), then the records
    (per epoch, and per log_every steps with "kind": "step"), each with the unreadable images the data workers
    listed since the previous record. tensorboard: the records' numbers also go to TensorBoard event files in
    output_dir/tensorboard, as step/<key> and epoch/<key> against the training step."""

    def __init__(self, output_dir: str, main_process: bool, header: dict | None, tensorboard: bool = False):
        self.path, self.main_process = os.path.join(output_dir, "log.jsonl"), main_process
        self.checkpoint_path = os.path.join(output_dir, "checkpoint.pth")
        self.bad_images_file = os.path.join(output_dir, "bad_images.txt")
        self.reported = set(data.read_bad_images(self.bad_images_file))
        if header is not None and main_process:
            with open(self.path, "w") as f:
                f.write(json.dumps(header) + "\n")
        self.events = None
        if tensorboard and main_process:  # imported only when asked for (validate checked it is installed)
            from torch.utils.tensorboard import SummaryWriter
            self.events = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict, show: bool = False) -> None:
        new = [p for p in data.read_bad_images(self.bad_images_file) if p not in self.reported]
        self.reported.update(new)
        if not self.main_process:
            return
        if new:
            record["bad_images"] = new
            print(f"skipped {len(new)} unreadable image(s), listed in {self.bad_images_file}: {', '.join(new[:3])}"
                  + (" ..." if len(new) > 3 else ""))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.events is not None:
            kind = record.get("kind", "epoch")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self.events.add_scalar(f"{kind}/{key}", value, global_step=record["step"])
            self.events.flush()
        if show:
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
