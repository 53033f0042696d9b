"""Throughput of full SOP training steps and model FLOPs utilisation (MFU).

    python bench.py                                  # the GPU configurations below, eager and compiled
    python bench.py --configs cpu_demo --steps 5     # on a CPU
    python bench.py --configs imagenet_vit_s16 --compile false --profile
    python bench.py --peer --json results/bench_h100.json   # + our ViT-S/16 against timm's, all as JSON
    python bench.py --custom "mim0=--preset cifar --arch vit_tiny --patch_loss_weight 0"   # any train.py flags

Each configuration builds the exact training step of train.py (Trainer.train_step: augmentation and masking on the
device, teacher and student forwards, SOP and SOP-MIM losses, backward, clipping, AdamW, EMA, memory enqueue) from
a train.py preset, feeds it random uint8 images already on the device, and times `--steps` steps after `--warmup`
steps (CUDA-synchronised). It also times, alone and with the same shapes, the augmentation + masking and the memory
work (SOP draws with their top-k search, probabilities forward and backward), and prints their share of the step.

MFU = model FLOPs per step / (step time x peak). Model FLOPs count the ViT blocks, the patch embedding and the
projection head (2 FLOPs per multiply-add), for the teacher forward on the 2 global crops and the student forward
and backward (3 x forward) on all crops; the memory matmuls, LayerNorm, GELU and softmax are left out.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import methods
import train
from losses import sop_loss, sop_mim_loss
from memory import MemoryBank
from data import FOLDER_LONG_SIDE
from model import ARCHS, masked_tokens

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (datasheet)

CONFIGS = {  # name -> train.py flags
    "imagenet_vit_s16": ["--preset", "imagenet", "--batch_size_per_gpu", "128"],
    "cifar_vit_s4": ["--preset", "cifar", "--batch_size_per_gpu", "512"],
    "cifar_vit_t4": ["--preset", "cifar", "--arch", "vit_tiny", "--batch_size_per_gpu", "512"],
    "cpu_demo": ["--preset", "cpu_demo"],
}
GPU_CONFIGS = ("imagenet_vit_s16", "cifar_vit_s4", "cifar_vit_t4")  # bench.py's default
# Steps per epoch of the real runs (ImageNet-1k on 8 GPUs, CIFAR-10 on one, the quick start): the masks are drawn
# once per epoch (train.Trainer.block_masks), so their cost per step is spread over as many steps.
STEPS_PER_EPOCH = {"imagenet_vit_s16": 1281167 // 1024, "cifar_vit_s4": 50000 // 512, "cifar_vit_t4": 50000 // 512,
                   "cpu_demo": 10000 // 128}
FOLDER_CONFIGS = ("imagenet_vit_s16",)  # fed as image-folder training is: 512 px canvases and each image's size


def source_images(name: str, cfg, n: int, device: torch.device, seed: int = 0):
    """n random uint8 images as train.py feeds them: squares of the crop size for in-memory datasets, or, for
    folder configurations, FOLDER_LONG_SIDE canvases with valid sizes (n, 2) of a typical ImageNet photo (longer
    side 512, shorter 340-512), so the antialiased canvas path of the augmentation runs."""
    generator = torch.Generator().manual_seed(seed)
    if name not in FOLDER_CONFIGS:
        size = cfg.global_crops_size
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator).to(device), None
    L = FOLDER_LONG_SIDE
    images = torch.randint(0, 256, (n, 3, L, L), dtype=torch.uint8, generator=generator)
    short = torch.randint(340, L + 1, (n,), generator=generator)
    landscape = torch.rand(n, generator=generator) < 0.75
    sizes = torch.stack((torch.where(landscape, short, L), torch.where(landscape, L, short)), dim=1)  # (n, 2) h, w
    return images.to(device), sizes.to(device)


def vit_flops_per_image(embed_dim: int, depth: int, num_tokens: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of depth transformer blocks on one image of N tokens of width D.

    Per block, in multiply-adds: qkv 3 N D^2, attention scores N^2 D, attention-weighted values N^2 D, output
    projection N D^2, MLP 2 r N D^2.
    """
    N, D = num_tokens, embed_dim
    return 2 * depth * int(3 * N * D * D + 2 * N * N * D + N * D * D + 2 * mlp_ratio * N * D * D)


def head_flops_per_token(in_dim: int, hidden_dim: int, bottleneck_dim: int) -> int:
    """Forward FLOPs of the 3-layer projection head on one token."""
    return 2 * (in_dim * hidden_dim + hidden_dim * hidden_dim + hidden_dim * bottleneck_dim)


def model_flops_per_image(cfg: train.Config) -> int:
    """Training FLOPs per image: teacher forward on 2 global crops, student forward + backward on all crops. The
    head embeds [CLS] and, with a masked-patch loss, the masked patch tokens (a fraction mean(pred_ratio) of them,
    the budget's padding not counted): the student's and SOP's teacher's (plus one patch per image for the patch
    memory); iBOT's teacher embeds every patch (its centre c2 averages them)."""
    width, depth, _ = ARCHS.get(cfg.arch, (0, 0, 0))
    D, depth = cfg.embed_dim or width, cfg.depth or depth
    head = head_flops_per_token(D, cfg.head_hidden_dim, cfg.bottleneck_dim)

    def crop_forward(size: int, head_patches: float) -> int:
        P = (size // cfg.patch_size) ** 2
        embed = 2 * P * 3 * cfg.patch_size ** 2 * D  # patch-embedding convolution
        return embed + vit_flops_per_image(D, depth, 1 + P) + int(head * (1 + head_patches * P))

    patch = methods.uses_patch_tokens(cfg)
    masked = sum(cfg.pred_ratio) / len(cfg.pred_ratio) if patch else 0.0
    P = (cfg.global_crops_size // cfg.patch_size) ** 2
    teacher_patches = (1.0 if cfg.method == "ibot" else masked + 0.5 / P) if patch else 0.0
    local_crop = crop_forward(cfg.local_crops_size, 0.0)  # local patch tokens skip the head (model.MultiCropWrapper)
    teacher = 2 * crop_forward(cfg.global_crops_size, teacher_patches)
    student = 2 * crop_forward(cfg.global_crops_size, masked) + cfg.local_crops_number * local_crop
    return teacher + 3 * student


def timed(fn, steps: int, device: torch.device) -> list[float]:
    """Seconds per call of fn, one number per call, synchronised on CUDA."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return times


def bench(name: str, flags: list[str], compile_: bool, steps: int, warmup: int, device: torch.device,
          peak: float | None, profile: bool, augment_only: bool = False) -> dict:
    cfg = train.parse_config(flags + ["--compile", str(compile_).lower(), "--device", device.type])
    trainer = train.Trainer(cfg, device, world=1, steps_per_epoch=STEPS_PER_EPOCH.get(name, 100))
    B = cfg.batch_size_per_gpu
    dataset, sizes = source_images(name, cfg, 4 * B, device)  # held on the device
    step = 0

    # Augmentation + masking alone, with the step's shapes (the masks are drawn once per epoch: train.py).
    gen = torch.Generator(device).manual_seed(0)

    def augment():
        crops, _ = trainer.augment(dataset[:B], gen, None if sizes is None else sizes[:B])
        trainer.make_masks(crops.shape[0], gen)
    timed(augment, 2, device)
    aug_s = statistics.median(timed(augment, max(3, steps // 2), device))
    result = {"config": name, "compile": compile_, "batch": B, "augment_ms": 1e3 * aug_s,
              "augment_images_per_s": B / aug_s}
    if augment_only:
        return result

    def train_step():
        nonlocal step
        idx = torch.randint(0, len(dataset), (B,), device=device)
        trainer.train_step(dataset[idx], len(trainer.schedules["lr"]) // 2 + step,  # mid-run schedules
                           indices=idx, sizes=None if sizes is None else sizes[idx])
        step += 1
    for _ in range(warmup):
        train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times = timed(train_step, steps, device)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            timed(train_step, 3, device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
        if device.type == "cuda":  # kernel time over wall time: the rest is the GPU waiting on the host
            busy_us = sum(e.self_device_time_total for e in prof.key_averages())
            wall_us = 1e6 * 3 * statistics.median(step_times)
            print(f"GPU busy {100 * busy_us / wall_us:.0f} % of the 3 profiled steps (kernels {busy_us / 3e3:.1f} ms "
                  f"per step)")

    memory_times = time_memory_work(cfg, device, gen, steps)
    step_s = statistics.median(step_times)
    flops = model_flops_per_image(cfg)
    result.update({"ms_per_step": 1e3 * step_s, "images_per_s": B / step_s, "peak_mem_gib": peak_mem,
                   "gflops_per_image": flops / 1e9, "mfu_percent": 100 * flops * B / step_s / peak if peak else None,
                   "augment_percent": 100 * aug_s / step_s,
                   "memory_percent": 100 * statistics.median(memory_times) / step_s,
                   "step_ms_min_max": [1e3 * min(step_times), 1e3 * max(step_times)]})
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------ hardware-free counts
class StepCounter(TorchDispatchMode):
    """Counts the aten ops a step dispatches (each one a kernel launch on a GPU) and their FLOPs (torch's
    flop_counter formulas: matmuls, convolutions, attention), by part of the step; the part is set by wrappers."""

    def __init__(self):
        super().__init__()
        self.part, self.ops, self.flops = "other", Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket is torch.ops.aten._unsafe_view:
            return out  # views (select, expand, transpose, ...) change metadata only: no kernel
        self.ops[self.part] += 1
        if func.overloadpacket in flop_registry:
            self.flops[self.part] += flop_registry[func.overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out

    def within(self, part: str, fn):
        def wrapped(*args, **kwargs):
            outer, self.part = self.part, part
            try:
                return fn(*args, **kwargs)
            finally:
                self.part = outer
        return wrapped


COUNT_PARTS = ("augmentation", "masks", "networks", "backward", "method", "optimiser+EMA")


def count_step(name: str, flags: list[str], batch: int, steps: int = 2) -> dict:
    """Ops dispatched per step and FLOPs per image, by part, on the CPU (both are hardware-independent; the op
    count is what a GPU pays in launches). The step is train.py's, at `batch` images (FLOPs scale with it, op
    counts do not); parts are attributed by wrapping the Trainer's pieces, the rest (schedules, seeding, loss
    bookkeeping, clipping, AdamW, the EMA) counts as optimiser+EMA."""
    cfg = train.parse_config(flags + ["--device", "cpu", "--batch_size_per_gpu", str(batch)])
    trainer = train.Trainer(cfg, torch.device("cpu"), world=1, steps_per_epoch=STEPS_PER_EPOCH.get(name, 100))
    images, sizes = source_images(name, cfg, batch, torch.device("cpu"))
    counter = StepCounter()
    trainer.augment = counter.within("augmentation", trainer.augment)
    trainer.make_masks = counter.within("masks", trainer.make_masks)
    trainer.student_forward = counter.within("networks", trainer.student_forward)
    trainer.teacher_forward = counter.within("networks", trainer.teacher_forward)
    trainer.method.loss = counter.within("method", trainer.method.loss)
    trainer.method.update = counter.within("method", trainer.method.update)
    backward = torch.Tensor.backward
    torch.Tensor.backward = counter.within("backward", backward)
    try:
        with counter:  # the first step: the epoch's masks, and lazy state (AdamW moments) that is not counted
            trainer.train_step(images, 0, sizes=sizes)
        epoch_masks = counter.ops["masks"], counter.flops["masks"]
        counter.ops.clear(), counter.flops.clear()
        with counter:
            for s in range(steps):
                trainer.train_step(images, 1 + s, sizes=sizes)
    finally:
        torch.Tensor.backward = backward
    counter.ops["masks"] += epoch_masks[0] * steps / trainer.steps_per_epoch  # drawn once per epoch
    counter.flops["masks"] += epoch_masks[1] * steps / trainer.steps_per_epoch
    parts = dict(zip(COUNT_PARTS, (*COUNT_PARTS[:-1], "other")))
    ops = {part: counter.ops[key] / steps for part, key in parts.items()}
    flops = {part: counter.flops[key] / steps / batch / 1e9 for part, key in parts.items()}
    return {"config": name, "count_batch": batch, "ops_per_step": ops, "ops_total": sum(ops.values()),
            "gflops_per_image": flops, "gflops_total": sum(flops.values())}


def count_compile(name: str, flags: list[str], batch: int, steps: int = 4) -> dict:
    """Graphs, graph breaks and recompiles of the compiled networks over the first steps (dynamo with the 'eager'
    backend: the same graph capture as inductor, without code generation). The steps straddle a teacher-temperature
    change (the schedule's warm-up), which reaches only the uncompiled loss."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    cfg = train.parse_config(flags + ["--device", "cpu", "--batch_size_per_gpu", str(batch)])
    trainer = train.Trainer(cfg, torch.device("cpu"), world=1, steps_per_epoch=2)
    trainer.student_forward = torch.compile(trainer.student, backend="eager")
    trainer.teacher_forward = torch.compile(trainer.teacher, backend="eager")
    images, sizes = source_images(name, cfg, batch, torch.device("cpu"))
    dynamo.reset()
    counters.clear()
    trainer.train_step(images, 0, sizes=sizes)
    first = counters["stats"]["unique_graphs"]
    for s in range(1, steps):
        trainer.train_step(images, s, sizes=sizes)
    return {"config": name, "graphs": first, "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": dict(counters["graph_break"]),
            "recompiles_after_step_1": counters["stats"]["unique_graphs"] - first}


def time_memory_work(cfg, device: torch.device, gen: torch.Generator, steps: int) -> list[float]:
    """The memory work of one step alone: T_C class draws and the patch draw, probabilities forward and backward."""
    B = cfg.batch_size_per_gpu
    G, V = 2 * B, (2 + cfg.local_crops_number) * B
    P = (cfg.global_crops_size // cfg.patch_size) ** 2
    cls_s = F.normalize(torch.randn(V, cfg.bottleneck_dim, device=device), dim=1).requires_grad_()
    cls_t = F.normalize(torch.randn(G, cfg.bottleneck_dim, device=device), dim=1)
    tokens = masked_tokens(torch.rand(G, P, device=device) < 0.15, int(0.2 * G * P))  # the masked patch tokens
    T = tokens.index.shape[0]
    pat_s = F.normalize(torch.randn(T, cfg.bottleneck_dim, device=device), dim=-1).requires_grad_()
    pat_t = F.normalize(torch.randn(T, cfg.bottleneck_dim, device=device), dim=-1)
    class_memory = MemoryBank(cfg.class_memory_size, cfg.bottleneck_dim).to(device)
    patch_memory = MemoryBank(cfg.patch_memory_size, cfg.bottleneck_dim).to(device)

    def memory_work():
        total = 0.0
        for _ in range(cfg.class_draws):
            sops = class_memory.draw(cfg.class_anchors, cfg.class_neighbors, cfg.smoothing, gen)
            total = total + sop_loss(sops.probabilities(cls_s, 0.1), sops.probabilities(cls_t, 0.04))
        if methods.uses_patch_tokens(cfg):  # SOP-MIM on
            psops = patch_memory.draw(cfg.patch_anchors, cfg.patch_neighbors, cfg.smoothing, gen)
            total = total + sop_mim_loss(psops.probabilities(pat_s, 0.1), psops.probabilities(pat_t, 0.04), tokens)
        total.backward()
    timed(memory_work, 2, device)
    return timed(memory_work, max(3, steps // 2), device)


def peer(device: torch.device, batch: int = 128, steps: int = 20, warmup: int = 5, compile_: bool = True) -> dict:
    """Our ViT-S/16 forward + backward against timm's vit_small_patch16_224 (the same model, the reference
    implementation) on 224 px images: same batch, bf16 autocast, compiled, no drop path. timm is installed on the
    GPU machines, not a dependency of this project."""
    import timm

    from model import build_backbone
    x = torch.randn(batch, 3, 224, 224, device=device)
    result = {"config": "peer_vit_s16_fwd_bwd", "batch": batch}
    models = {"ours": build_backbone("vit_small", 224, 16, use_mask_token=False),
              "timm": timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)}
    for name, model in models.items():
        model = torch.compile(model.to(device)) if compile_ else model.to(device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model.forward_features(x) if name == "timm" else model(x)  # (B, 197, 384) normed tokens
            out.float().square().mean().backward()
        timed(step, warmup, device)
        result[f"{name}_ms"] = 1e3 * statistics.median(timed(step, steps, device))
    result["ours_speed_over_timm"] = result["timm_ms"] / result["ours_ms"]
    return result


MAX_TIMED_STEPS = 10_000  # timed or warm-up steps: the median settles within tens; more is a typo that runs for days
MAX_COUNT_BATCH = 1024  # --count: op counts do not depend on the batch, memory does


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit status 2, no usage dump (--help lists the flags)
        self.exit(2, f"error: {message}\n")


def check_json_path(path: str | None, error) -> None:
    """error(message) unless --json names a file that can be written once the measurements are done."""
    directory = os.path.dirname(os.path.abspath(path or "."))
    problem = "is a directory" if path and os.path.isdir(path) else f"directory {directory} does not exist"
    if path and (os.path.isdir(path) or not os.path.isdir(directory)):
        error(f"--json {path}: {problem}; valid: a file in an existing directory")


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help="default: imagenet_vit_s16 cifar_vit_s4 cifar_vit_t4, or none when --custom is given")
    parser.add_argument("--custom", nargs="+", default=[], metavar="NAME=FLAGS",
                        help='more configurations from train.py flags, e.g. "mim0=--preset cifar '
                             '--patch_loss_weight 0"')
    parser.add_argument("--compile", choices=("both", "true", "false"), default="both")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak for MFU (default: 989, the H100 SXM dense bf16 peak, on CUDA; none on CPU)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of 3 steps")
    parser.add_argument("--augment_only", action="store_true", help="time only augmentation + masking")
    parser.add_argument("--peer", action="store_true",
                        help="also time our ViT-S/16 forward + backward against timm's at batch 128 (needs timm)")
    parser.add_argument("--count", action="store_true",
                        help="instead of timing: ops dispatched per step and FLOPs per image by part, and the compiled "
                             "networks' graphs, graph breaks and recompiles (on the CPU, hardware-independent)")
    parser.add_argument("--count_batch", type=int, default=8, help="--count: images per step (op counts do not "
                        "depend on it)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    for name, ok, valid in (("steps", args.steps >= 1, "must be >= 1"), ("warmup", args.warmup >= 0, "must be >= 0"),
                            ("steps", args.steps <= MAX_TIMED_STEPS, f"valid: 1 to {MAX_TIMED_STEPS}"),
                            ("warmup", args.warmup <= MAX_TIMED_STEPS, f"valid: 0 to {MAX_TIMED_STEPS}"),
                            ("count_batch", args.count_batch >= 1, "must be >= 1"),
                            ("count_batch", args.count_batch <= MAX_COUNT_BATCH, f"valid: 1 to {MAX_COUNT_BATCH}"),
                            ("peak_tflops", args.peak_tflops is None or args.peak_tflops > 0, "must be > 0"),
                            ("peak_tflops", args.peak_tflops is None or math.isfinite(args.peak_tflops),
                             "must be finite")):
        if not ok:
            parser.error(f"--{name} {getattr(args, name)}: {valid}")
    check_json_path(args.json, parser.error)
    default = () if args.custom else GPU_CONFIGS
    configs = {name: CONFIGS[name] for name in (default if args.configs is None else args.configs)}
    for spec in args.custom:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in configs:
            parser.error(f"--custom {spec!r}: expected NAME=FLAGS with a new NAME, e.g. \"k0=--preset cifar "
                         f"--class_neighbors 0\"")
        configs[name] = shlex.split(flags)
    for name, flags in configs.items():  # every configuration's flags checked before any compute
        try:
            train.validate(train.parse_config(flags + ["--dataset", "synthetic"]), world_size=1)  # reads no data
        except train.ConfigError as e:
            parser.error(f"configuration {name}: {e}")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (H100_BF16_PEAK if device.type == "cuda" else None)
    run = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": " ".join(["python", "bench.py", *(sys.argv[1:] if argv is None else argv)])}
    print(f"torch {run['torch']}, device {run['device']} ({run['cpu_threads']} CPU threads), {run['date']}")
    if args.count:
        return write_json([{**count_step(name, flags, args.count_batch), **count_compile(name, flags, args.count_batch),
                            **run} for name, flags in configs.items()], args.json, print_counts)
    results = []
    for name, flags in configs.items():
        for compile_ in {"both": (False, True), "true": (True,), "false": (False,)}[args.compile]:
            r = bench(name, flags, compile_, args.steps, args.warmup, device, peak, args.profile,
                      args.augment_only)
            results.append(r)
            print(json.dumps(r))
    if args.augment_only:
        print(f"\n{'config':<18}{'batch':>6}{'aug ms':>9}{'aug img/s':>11}")
        for r in results:
            print(f"{r['config']:<18}{r['batch']:>6}{r['augment_ms']:>9.1f}{r['augment_images_per_s']:>11.0f}")
    else:
        print(f"\n{'config':<18}{'compile':>8}{'batch':>6}{'ms/step':>9}{'img/s':>9}{'GiB':>7}{'GFLOP/img':>10}"
              f"{'MFU %':>7}{'aug %':>7}{'mem %':>7}")
        for r in results:
            mfu = f"{r['mfu_percent']:.1f}" if r["mfu_percent"] is not None else "n/a"
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
            print(f"{r['config']:<18}{str(r['compile']):>8}{r['batch']:>6}{r['ms_per_step']:>9.1f}"
                  f"{r['images_per_s']:>9.0f}{mem:>7}{r['gflops_per_image']:>10.2f}{mfu:>7}"
                  f"{r['augment_percent']:>7.1f}{r['memory_percent']:>7.1f}")
    if args.peer:
        r = peer(device)
        results.append(r)
        print(f"\npeer, ViT-S/16 forward + backward, batch {r['batch']}, bf16, compiled: ours {r['ours_ms']:.1f} ms, "
              f"timm {r['timm_ms']:.1f} ms, ours {r['ours_speed_over_timm']:.2f}x timm's speed")
    return write_json([{**r, **run} for r in results], args.json)  # each names the machine, torch, date, command


def write_json(results: list[dict], path: str | None, show=None) -> list[dict]:
    if show is not None:
        show(results)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def print_counts(results: list[dict]) -> None:
    print(f"\n{'config':<18}" + "".join(f"{p:>14}" for p in COUNT_PARTS) + f"{'total':>8}{'non-net':>9}"
          f"{'graphs':>8}{'breaks':>8}{'recomp':>8}")
    for r in results:
        ops = r["ops_per_step"]
        non_network = sum(v for p, v in ops.items() if p not in ("networks", "backward"))
        print(f"{r['config']:<18}" + "".join(f"{ops[p]:>14.0f}" for p in COUNT_PARTS) + f"{r['ops_total']:>8.0f}"
              f"{non_network:>9.0f}{r['graphs']:>8}{r['graph_breaks']:>8}{r['recompiles_after_step_1']:>8}")
    print("GFLOP per image by part: " + "; ".join(f"{r['config']}: " + ", ".join(
        f"{p} {v:.3g}" for p, v in r["gflops_per_image"].items()) for r in results))


if __name__ == "__main__":
    main()
