"""Checkpoints and the run directory: what lets a long run stop, crash and continue without losing anything.

    save_checkpoint    atomic write (temp file, fsync, rename); the replaced file is kept as checkpoint.prev.pth
    read_checkpoint    torch.load(weights_only=True) after checking the zip CRCs (a flipped bit is refused)
    resume_state       the checkpoint a resume starts from, refused in one line when it cannot fit the run
    read_init_source   --init_from: another run's checkpoint or a published ViT state dict, for a new run
    initialise_from    its networks (and with --init_memories its memories or centres) into a fresh trainer
    OutputLock         one run per output_dir
    StopSignals        SIGTERM / Ctrl-C: save after the current step, exit with PREEMPTED_EXIT_CODE

The rules are listed in the README, "Failure behaviour" and "Resuming".
"""
import dataclasses
import errno
import fcntl
import os
import pickle
import signal
import sys
import zipfile
import zlib

import torch
import torch.distributed as dist

import methods

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on SIGTERM / Ctrl-C after saving; resume to continue
# Fields that fix the shapes of the networks and memories: a checkpoint with other values cannot be loaded.
SHAPE_FIELDS = ("arch", "patch_size", "embed_dim", "depth", "num_heads", "head_hidden_dim", "bottleneck_dim",
                "global_crops_size", "class_memory_size", "patch_memory_size", "method", "num_prototypes")
# Fields a resume may change freely: where things are, how often to report, how to run. Every other field changes
# the trajectory (schedules, data order, numerics), so changing it breaks the exact-resume promise.
RESUME_FREE_FIELDS = ("output_dir", "data_path", "resume", "resume_changes", "knn_every", "log_every", "max_steps",
                      "num_workers", "device", "compile", "strict_data", "saveckp_freq", "tensorboard",
                      "init_from", "init_memories")  # where a run started does not change it from the checkpoint on
RENAMED_FIELDS = {"out_dim": "bottleneck_dim"}  # old name -> new name; older checkpoints are read under the new


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message is one line."""


def previous_path(path: str) -> str:
    return path.removesuffix(".pth") + ".prev.pth"


def save_checkpoint(path: str, state: dict, keep_every: int = 0) -> None:
    """Write atomically (temp file, fsync, rename) and keep the checkpoint it replaces as checkpoint.prev.pth, so a
    crash mid-write, a full disk or one bad file never costs the last good state. keep_every N: at the end of every
    N-th epoch, also keep a copy as checkpoint{epoch:04}.pth (DINO's --saveckp_freq), written the same way."""
    epoch, steps_per_epoch = state.get("epoch", 0), state.get("schedule", {}).get("steps_per_epoch", 0)
    keep = keep_every and steps_per_epoch and state["step"] % steps_per_epoch == 0 and epoch % keep_every == 0
    numbered = os.path.join(os.path.dirname(path), f"checkpoint{epoch:04}.pth")
    tmp = path + ".tmp"
    try:
        for target in (tmp, numbered + ".tmp") if keep else (tmp,):
            with open(target, "wb") as f:  # a Python file: a full disk surfaces as OSError(ENOSPC)
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        for target in (tmp, numbered + ".tmp"):
            if os.path.exists(target):
                os.remove(target)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        kept = path if os.path.exists(path) else "none was written yet"
        raise CheckpointError(f"{'disk full' if full else 'cannot write'} while saving {path} "
                              f"({getattr(e, 'strerror', None) or e}); the previous checkpoint ({kept}) is intact")
    if keep:
        os.replace(numbered + ".tmp", numbered)
    if os.path.exists(path):
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # the renames themselves survive a power cut
    finally:
        os.close(directory)


def read_checkpoint(path: str) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only. A file that would need arbitrary code to
    unpickle, a corrupt one, or one whose zip CRCs do not match its bytes (a flipped bit inside a tensor, which
    torch.load itself does not notice) raises ValueError with a one-line reason."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor its legacy pickle
            raise ValueError(f"{path}: not a file written by torch.save (a checkpoint or a state dict)")
        if zipfile.is_zipfile(path):  # torch.save's format; older (legacy) pickles carry no checksums
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()  # reads every member and checks its CRC-32
            if bad is not None:
                raise ValueError(f"{path}: corrupt checkpoint: the CRC of member {bad} does not match its bytes")
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file")
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a checkpoint file")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, zlib.error, KeyError,
            AttributeError, IndexError, TypeError) as e:  # a damaged or foreign file fails in many ways
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "GLOBAL" in line or "global" in line), lines[0])
        raise ValueError(f"{path}: refused or unreadable (checkpoints load with weights_only=True): {reason}")


def saved_config(ckpt: dict) -> dict:
    """The checkpoint's config under today's field names (RENAMED_FIELDS)."""
    config = dict(ckpt["config"])
    for old, new in RENAMED_FIELDS.items():
        if old in config and new not in config:
            config[new] = config.pop(old)
    return config


def check_finite_state(trainer, step: int, ckpt_path: str) -> None:
    """Refuse to save non-finite networks or memories: the loss is checked before each update, so a diverging last
    update (e.g. --lr inf) would otherwise write NaN weights over the last good checkpoint. One host sync."""
    tensors = [t for module in (trainer.student, trainer.teacher, trainer.method)  # networks, memories, centres
               for t in module.state_dict().values() if t.is_floating_point()]
    if not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
        raise CheckpointError(f"non-finite weights or memories after step {step} (the update diverged: lower --lr?); "
                              f"stopped without saving, the last checkpoint ({ckpt_path}) is intact")


def load_checkpoint(path: str, cfg) -> dict:
    """Read a checkpoint, verifying its CRCs; refuse one whose networks or memories differ from cfg (a Config), or
    that lacks what a resume needs. Its config comes back under today's field names."""
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:  # a corrupt file, or a pickle that would run code
        raise CheckpointError(f"cannot resume from {e}")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not a train.py checkpoint (no config)")
    ckpt["config"] = saved = saved_config(ckpt)
    defaults = type(cfg)()  # what a checkpoint from before a field existed ran with
    for name in SHAPE_FIELDS:
        if ignored_by_method(name, cfg.method):
            continue
        if saved.get(name, getattr(defaults, name)) != getattr(cfg, name):
            raise CheckpointError(f"--{name} {getattr(cfg, name)!r}: the checkpoint in {cfg.output_dir} was trained "
                                  f"with {saved.get(name)!r}; use that value or another --output_dir")
    step = ckpt.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be an integer >= 0, got {step!r}")
    missing = [k for k in ("student", "teacher", "optimizer", "scaler") if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a complete train.py checkpoint")
    return ckpt


def ignored_by_method(name: str, method: str) -> bool:
    """Whether a field belongs to some method's objective but not to this one's (e.g. num_prototypes for SOP)."""
    return name in methods.METHOD_FIELDS and name not in methods.FIELDS.get(method, methods.METHOD_FIELDS)


def config_changes(saved: dict, cfg) -> dict[str, tuple]:
    """{field: (old, new)} for the fields that change the trajectory and differ from the checkpoint's config."""
    changes = {}
    for field in dataclasses.fields(cfg):
        if field.name in RESUME_FREE_FIELDS or ignored_by_method(field.name, cfg.method):
            continue
        old, new = saved.get(field.name, field.default), getattr(cfg, field.name)  # older checkpoints: defaults
        if (tuple(old) if isinstance(old, list) else old) != new:
            changes[field.name] = (old, new)
    return changes


def resume_state(cfg, ckpt_path: str) -> tuple[dict | None, list[str]]:
    """The checkpoint to resume from (None for a fresh start) and notes to print and log. A current checkpoint that
    fails its checks while checkpoint.prev.pth passes them is replaced by the latter, loudly. A checkpoint whose
    trajectory settings differ from cfg is refused unless cfg.resume_changes is 'ok'."""
    prev = previous_path(ckpt_path)
    candidates = [p for p in (ckpt_path, prev) if os.path.exists(p)]
    if not cfg.resume or not candidates:
        return None, []
    try:
        ckpt, notes = load_checkpoint(candidates[0], cfg), []
    except CheckpointError as error:
        if candidates[0] == prev or len(candidates) == 1:
            raise
        try:
            ckpt = load_checkpoint(prev, cfg)
        except CheckpointError:
            raise error from None
        notes = [f"warning: {error}; resuming from the previous checkpoint {prev} (step {ckpt['step']})"]
    changes = config_changes(ckpt["config"], cfg)
    listed = "; ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
    if changes and cfg.resume_changes != "ok":
        raise CheckpointError(f"--output_dir {cfg.output_dir}: resuming with changed settings breaks exact resume: "
                              f"{listed}; pass --resume_changes ok to accept them, or use another --output_dir")
    started_from = ckpt["config"].get("init_from", "")
    if cfg.init_from and not same_file(started_from, cfg.init_from):  # a requeued --init_from job resumes
        began = f"started from {started_from}" if started_from else "not started from it"
        raise CheckpointError(f"--init_from {cfg.init_from}: {cfg.output_dir} already holds a checkpoint (step "
                              f"{ckpt['step']}) of a run {began}; --resume would continue that run, --init_from is "
                              f"for new runs: use another --output_dir, or drop --init_from")
    if cfg.init_from:
        notes.append(f"--init_from {cfg.init_from} started this run; resuming its checkpoint (step {ckpt['step']}), "
                     f"the file is not read again")
    ckpt["changes"] = changes
    notes += [f"resuming with changed settings (--resume_changes ok): {name} {old!r} -> {new!r}"
              for name, (old, new) in changes.items()]
    return ckpt, notes


def same_file(a: str, b: str) -> bool:
    return bool(a) and bool(b) and os.path.abspath(a) == os.path.abspath(b)


# Where published files keep a ViT state dict, in the order tried: DINO's full checkpoints hold teacher and student
# (the teacher first, as facebookresearch/dino eval_knn.py --checkpoint_key teacher), others state_dict or model.
BACKBONE_KEYS = ("teacher", "state_dict", "model", "student")


def read_init_source(cfg) -> dict:
    """The file --init_from names, read and checked before the networks are built: {"kind": "checkpoint",
    "state": ckpt} for a train.py checkpoint, {"kind": "backbone", "state": backbone} for a plain ViT state dict
    (DINO/timm names, as eval_knn.load_backbone reads them: "module." and "backbone." prefixes removed, head
    tensors and the mask token dropped). A missing, foreign or incomplete file raises CheckpointError."""
    path = cfg.init_from
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise CheckpointError(f"--init_from {e}")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        missing = [k for k in ("student", "teacher") if not isinstance(ckpt.get(k), dict)]
        if missing:
            raise CheckpointError(f"--init_from {path} lacks {', '.join(missing)}: not a complete train.py checkpoint")
        ckpt["config"] = saved_config(ckpt)
        return {"kind": "checkpoint", "state": ckpt}
    if cfg.init_memories:
        raise CheckpointError(f"--init_memories true: --init_from {path} is a plain ViT state dict, which holds no "
                              f"memories or centres; valid with it: false")
    state = ckpt
    for key in BACKBONE_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--init_from {path}: neither a train.py checkpoint nor a ViT state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    return {"kind": "backbone", "state": {k: v for k, v in state.items()
                                          if not k.startswith("head.") and k != "masked_embed"}}


def initialise_from(trainer, source: dict, cfg, notes: list[str]) -> dict:
    """Load source (read_init_source) into a freshly built trainer, whose optimiser, schedules and step stay fresh:
    from a train.py checkpoint its student and teacher (and with --init_memories the method's memories or centres),
    from a plain ViT the same backbone into both (heads, mask token and memories keep their fresh initialisation).
    Every tensor is checked first: an extra, missing or differently shaped one is refused naming the first. Returns
    what was initialised from where, for log.jsonl's first record; the same goes to notes (the start-up print)."""
    path, state = cfg.init_from, source["state"]
    networks = (("student", trainer.student), ("teacher", trainer.teacher))
    kept = ["memories or centres"] if list(trainer.method.named_children()) else []  # CARP keeps none
    if source["kind"] == "backbone":
        parts = [(f"{name}.backbone", network.backbone, state) for name, network in networks]
        described, hint = "a plain ViT state dict", " (check --arch, --patch_size and --global_crops_size)"
        fresh = ["heads", *(["mask token"] if "masked_embed" in trainer.student.backbone.state_dict() else []), *kept]
    else:
        method = state["config"].get("method", "sop")  # checkpoints from before --method: SOP
        parts = [(name, network, state[name]) for name, network in networks]
        described = f"a train.py checkpoint of --method {method}, step {state.get('step')}"
        hint = (f" (the file is a --method {method} run: export its backbone with hubconf.py and pass that file)"
                if method != cfg.method else "")
        fresh = [] if cfg.init_memories else kept
        if cfg.init_memories and not kept:
            raise CheckpointError(f"--init_memories true: --method {cfg.method} keeps no memories or centres; "
                                  f"valid: false")
        for name, part in trainer.method.named_children() if cfg.init_memories else ():
            if not isinstance(state.get(name), dict):
                raise CheckpointError(f"--init_memories true: --init_from {path} holds no {name} ({described})"
                                      f"{hint}; valid: false")
            parts.append((name, part, state[name]))
    for name, module, tensors in parts:
        own = module.state_dict()
        unknown = [k for k in tensors if k not in own]
        # A network must come whole (the mask token excepted: a plain ViT has none); a memory may lack the
        # diagnostics buffers of older checkpoints, which MemoryBank fills in as a resume does.
        network = name.split(".")[0] in ("student", "teacher")
        missing = [k for k in own if k not in tensors and k != "masked_embed"] if network else []
        if unknown or missing:
            key, where = (unknown[0], "is in the file but not in this run") if unknown else (missing[0], "is missing")
            raise CheckpointError(f"--init_from {path}: {name}.{key} {where}{hint}")
        for key, tensor in tensors.items():
            if tensor.shape != own[key].shape:
                raise CheckpointError(f"--init_from {path}: {name}.{key} has shape {tuple(tensor.shape)} in the file "
                                      f"and {tuple(own[key].shape)} in this run{hint}")
    try:
        for name, module, tensors in parts:
            module.load_state_dict(tensors, strict=source["kind"] == "checkpoint")
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"--init_from {path} does not fit this run: {str(e).strip().splitlines()[0]}")
    loaded = [name for name, _, _ in parts]
    notes.append(f"initialised {', '.join(loaded)} from --init_from {path} ({described}); fresh: "
                 f"{', '.join(fresh + ['optimiser', 'schedules from step 0'])}")
    return {"init_from": path, "file": described, "loaded": loaded, "fresh": fresh}


SCHEDULE_KEYS = ("world_size", "global_batch", "steps_per_epoch", "train_images")  # what the schedules depend on


def resumed_step(ckpt: dict, schedule: dict, resume_changes: str, notes: list[str]) -> int:
    """The step to resume at; what changed is added to ckpt["changes"] and to notes. A resume
    on another number of GPUs, another global batch or another training set would index schedules built for other
    step counts (8 -> 16 GPUs at epoch 50 of 100 would stop at half its budget): it is refused unless resume_changes
    is 'ok'; then the run continues at the same point of its schedule, the same fraction of the same epochs (the
    images seen, when only the batch changed), so lr, weight decay, teacher temperature and EMA momentum continue
    where they were (lr keeps its rule, base_lr x global batch / 256) and the run ends after its epochs."""
    saved = ckpt.get("schedule") or {}  # checkpoints from before this record: nothing to compare
    changed = {k: [saved[k], schedule[k]] for k in SCHEDULE_KEYS if k in saved and saved[k] != schedule[k]}
    if not changed:
        return ckpt["step"]
    listed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
    if resume_changes != "ok":
        raise CheckpointError(f"the checkpoint was trained with other schedule lengths ({listed}): resuming would "
                              f"index its lr, weight decay, temperature and momentum schedules wrongly; pass "
                              f"--resume_changes ok to continue at the same point of the schedule, or resume with "
                              f"the old values")
    step = round(ckpt["step"] * schedule["steps_per_epoch"] / saved["steps_per_epoch"])
    ckpt["changes"].update(changed)
    notes.append(f"resuming at step {step} of the new schedule (step {ckpt['step']} of the old): {listed}")
    return step


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
    """SIGTERM and a first Ctrl-C ask the loop to save and stop (a second Ctrl-C stops at once). A single process
    reads its own flag after every step; under torchrun the ranks agree through a tiny all-reduce on a CPU (gloo)
    group, host to host so the GPU stream is never synchronised, which the loop calls at its log cadence only: a
    stop then lands within --log_every steps."""

    def __init__(self, world: int):
        self.requested = False
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving and stopping"
              + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def any_rank(self, poll: bool = True) -> bool:
        """Whether any rank was asked to stop; without poll, a multi-rank run answers False without talking."""
        if self.group is None:
            return self.requested
        if not poll:
            return False
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag[0])

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class NonFiniteLoss:
    """The first step whose loss was not finite, remembered on the device (no host sync in the step) and checked
    at the log cadence: the run stops before any checkpoint is written, so the last one stays the last good state."""
    NONE = torch.iinfo(torch.long).max

    def __init__(self, device: torch.device):
        self.first = torch.full((), self.NONE, dtype=torch.long, device=device)

    def see(self, loss: torch.Tensor, step: int) -> None:
        self.first = torch.where(torch.isfinite(loss), self.first, self.first.clamp(max=step))

    def check(self, ckpt_path: str) -> None:
        bad_step = self.first.clone()
        if dist.is_initialized():
            dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)  # the earliest bad step of any rank
        if bad_step.item() != self.NONE:
            raise SystemExit(f"error: non-finite loss at step {bad_step.item()}; stopped without saving, the last "
                             f"checkpoint ({ckpt_path}) is intact")
