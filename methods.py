"""What differs between SOP and the methods it is compared with: one flat object per method.

Everything else (crops, masks, schedules, AdamW, clipping, the EMA teacher, the loop) is shared in train.py. A method
object owns its state (memories, centres; learnable prototype layers live in the networks, so DDP, AdamW and the EMA
treat them like any weight), turns the networks' outputs into the losses with `loss(...)`, and updates its state
after the optimizer step with `update(...)`:

    SOP    self-organizing prototypes drawn from FIFO memories of teacher embeddings (the paper; sthalles/sop
           main_ibot.py, memory_bank.py)
    IBOT   learnable prototype layer, centring + sharpening, [CLS] and masked-patch losses (bytedance/ibot
           main_ibot.py iBOTLoss)
    DINO   iBOT's [CLS] part alone (facebookresearch/dino main_dino.py DINOLoss)
    MaSSL  the class memory split into random blocks, one softmax per block (sthalles/MaSSL criterion.py,
           random_partition.py)
    CARP   learnable prototypes split into random blocks, consistency + uniformity (sthalles/carp
           modules/carp_loss.py)

`loss(student, teacher, tokens, teacher_temp, generator)` gets the networks' outputs (model.NetworkOutput: `.cls`,
`.patch`, and for methods with a prototype layer `.cls_logits`, `.patch_logits`) and returns (loss, stats): stats
holds the method's STATS as 0-d device tensors (the loss terms and the collapse monitors of README, "Reading the
diagnostics"), read by the loop at its log cadence only. `tokens` (model.PatchTokens, None without a masked-patch
loss) says which patch tokens the student's head embedded: its masked ones; `teacher_patch_index(tokens,
generator)` says which the teacher's head must embed. `generator` is seeded from (seed, step) and identical on
every rank.
README, "How SOP and the baselines differ", lists what each official implementation does differently.
Shapes follow the legend in model.py; K = learnable prototypes or memory rows split into blocks, NB = block size.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from losses import cross_view_loss, masked_patch_loss, sop_loss, sop_mim_loss
from memory import MemoryBank, all_gather_rows
from model import MultiCropWrapper, NetworkOutput, PatchTokens

# Config fields that only some methods read; every other field is shared. A flag given on the command line for a
# method that ignores it is an error (train.parse_config).
FIELDS = {
    "sop": {"class_memory_size", "patch_memory_size", "class_anchors", "class_neighbors", "class_draws",
            "patch_anchors", "patch_neighbors", "smoothing", "pred_ratio", "pred_ratio_var", "cls_loss_weight",
            "patch_loss_weight"},
    "ibot": {"num_prototypes", "norm_last_layer", "shared_head", "freeze_last_layer", "center_momentum",
             "pred_ratio", "pred_ratio_var", "cls_loss_weight", "patch_loss_weight"},
    "dino": {"num_prototypes", "norm_last_layer", "freeze_last_layer", "center_momentum"},
    "massl": {"class_memory_size", "partition_size"},
    "carp": {"num_prototypes", "norm_last_layer", "partition_size", "carp_cosine"},
}
METHOD_FIELDS = set().union(*FIELDS.values())


def default_sizes(method: str, class_memory_size: int) -> dict:
    """The official defaults of num_prototypes K and partition_size NB, for Config fields left at 0."""
    return {"ibot": dict(num_prototypes=8192), "dino": dict(num_prototypes=65536),
            "massl": dict(partition_size=max(class_memory_size // 8, 1)),  # README: 131072 rows / 16384 = 8 blocks
            "carp": dict(num_prototypes=65536, partition_size=512)}.get(method, {})


def uses_patch_tokens(cfg) -> bool:
    """Whether a loss reads the global crops' patch embeddings: SOP-MIM or iBOT's MIM term, weighted > 0. Otherwise
    the networks send only [CLS] through the head (as DINO's official code does) and return patch None."""
    return cfg.method in ("sop", "ibot") and cfg.patch_loss_weight > 0


def build_network(cfg, backbone: nn.Module, head: nn.Module) -> MultiCropWrapper:
    """The student or teacher network: a prototype layer after the head for iBOT, DINO and CARP."""
    patch = uses_patch_tokens(cfg)
    if cfg.method not in ("ibot", "dino", "carp"):
        return MultiCropWrapper(backbone, head, patch)
    def layer():
        return PrototypeLayer(cfg.bottleneck_dim, cfg.num_prototypes, cfg.norm_last_layer)
    patch_prototypes = None if (not patch or cfg.shared_head) else layer()  # first: the order fixes the init
    return PrototypeNetwork(backbone, head, layer(), patch, patch_prototypes)


def build_method(cfg) -> nn.Module:
    return METHODS[cfg.method](cfg)


# What every method logs, in this order (README, "Reading the diagnostics"); SOP and MaSSL add SE_STATS.
STATS = ("loss_cls", "loss_patch", "teacher_entropy", "teacher_image_entropy", "kl_teacher_student",
         "effective_prototypes")
SE_STATS = ("se_cosine", "se_distinct_rows", "se_age")
DUPLICATE_COSINE = 0.9  # distinct_prototypes: two unit vectors closer than this count as one prototype


def distribution_stats(teacher_probs: torch.Tensor, cross_entropy: torch.Tensor) -> dict[str, torch.Tensor]:
    """The collapse monitors of teacher rows (n, ..., M) (averaged over blocks, if any) given the loss's mean
    cross-entropy H(q, p) over the same teacher rows:
      teacher_entropy        H(mean_n q), the entropy of the batch-mean target: -> 0 on one-hot collapse
      teacher_image_entropy  mean_n H(q), the images' own entropy: rises to the first on uniform collapse
      kl_teacher_student     mean KL(q || p) = H(q, p) - H(q): how far the student is from its targets
      effective_prototypes   exp(teacher_entropy): how many targets are used evenly (of M, or of a block's NB)
    DINO's pair of the first two tells the two collapses apart: a healthy teacher keeps the first high and the
    second well below it."""
    q = teacher_probs.float()
    mean_q = q.mean(0)  # (..., M)
    of_mean = -(mean_q * mean_q.clamp_min(1e-12).log()).sum(-1).mean()
    per_image = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
    return dict(teacher_entropy=of_mean, teacher_image_entropy=per_image,
                kl_teacher_student=cross_entropy - per_image, effective_prototypes=of_mean.exp())


@torch.no_grad()
def distinct_prototypes(vectors: torch.Tensor, threshold: float = DUPLICATE_COSINE, chunk: int = 4096) -> torch.Tensor:
    """How many of the K rows of vectors (K, d) remain after merging near-duplicates: row j is a duplicate when some
    earlier row i < j has cosine > threshold with it (partial prototype collapse, as Govindarajan et al. 2024, "On
    Partial Prototype Collapse in the DINO Family of Self-Supervised Methods", count it). 0-d int64 tensor."""
    v = F.normalize(vectors.float(), dim=1)
    duplicates = torch.zeros((), dtype=torch.long, device=v.device)
    for start in range(0, v.shape[0], chunk):
        rows = v[start:start + chunk]  # (c, d)
        cos = rows @ v[:start + rows.shape[0]].T  # (c, start + c): against this row and all earlier ones
        earlier = torch.arange(cos.shape[1], device=v.device) < torch.arange(start, start + rows.shape[0],
                                                                               device=v.device)[:, None]
        duplicates += ((cos > threshold) & earlier).any(1).sum()
    return v.shape[0] - duplicates


class SOP(nn.Module):
    """The paper: [CLS] and patch memories, SOPs drawn from them each step (sthalles/sop main_ibot.py)."""
    uses_masks = True  # the student sees block-masked global crops
    STATS = STATS + SE_STATS  # the monitors of the first [CLS] draw of each step

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.class_memory = MemoryBank(cfg.class_memory_size, cfg.bottleneck_dim)
        self.patch_memory = MemoryBank(cfg.patch_memory_size, cfg.bottleneck_dim)

    def teacher_patch_index(self, tokens: PatchTokens, generator: torch.Generator) -> torch.Tensor:
        """The teacher embeds the student's masked tokens (the SOP-MIM targets) and, for the patch memory, one
        uniformly random patch of the second global crop of each image (sthalles/sop main_ibot.py): (T + B,).
        generator: the rank's own stream of the step (its augmentation's)."""
        n, P = tokens.masks.shape
        B = n // 2
        pick = torch.randint(P, (B,), device=tokens.index.device, generator=generator)  # (B,) one patch per image
        return torch.cat((tokens.index, (B + torch.arange(B, device=pick.device)) * P + pick))  # (T + B,)

    def loss(self, student, teacher, tokens, teacher_temp, generator):
        cfg = self.cfg
        # ---- SOP loss on [CLS], averaged over T_C draws of M_C prototypes (paper: L_SOP; official
        # --num_class_tasks draws)
        loss_cls = 0.0
        for draw in range(cfg.class_draws):
            sops = self.class_memory.draw(cfg.class_anchors, cfg.class_neighbors, cfg.smoothing, generator)
            teacher_probs = sops.probabilities(teacher.cls, teacher_temp)  # (2B, M_C)
            student_probs = sops.probabilities(student.cls, cfg.student_temp)  # ((2 + V_l) B, M_C)
            draw_loss = sop_loss(student_probs, teacher_probs)
            loss_cls = loss_cls + draw_loss / cfg.class_draws
            if draw == 0:  # the monitors of one draw: the draws are alike, and each costs ~25 small ops
                stats = dict(**distribution_stats(teacher_probs, draw_loss), **self.class_memory.support_stats(sops))
        stats["loss_cls"] = loss_cls
        # ---- SOP-MIM loss on the masked patches of the global crops (paper: L_MIM); weight 0: not computed
        loss_patch = torch.zeros_like(loss_cls)
        if student.patch is not None:
            psops = self.patch_memory.draw(cfg.patch_anchors, cfg.patch_neighbors, cfg.smoothing, generator)
            T = student.patch.shape[0]
            loss_patch = sop_mim_loss(psops.probabilities(student.patch, cfg.student_temp),  # (T, M_P)
                                      psops.probabilities(teacher.patch[:T], teacher_temp), tokens)
        loss = cfg.cls_loss_weight * loss_cls + cfg.patch_loss_weight * loss_patch  # paper: λ1 L_SOP + λ2 L_MIM
        return loss, dict(stats, loss_patch=loss_patch)

    def prototype_vectors(self, teacher) -> torch.Tensor:
        return self.class_memory.memory  # (Q, d): every anchor and SE is one of its rows

    @torch.no_grad()
    def update(self, teacher, indices: torch.Tensor | None = None) -> None:
        """Memories are enqueued only now, after the losses read them (as sthalles/sop main_ibot.py: the SEs of this
        step come from the memory before its update). What enters: the teacher [CLS] of the second global crop,
        and one uniformly random teacher patch of it per image (the last B rows of teacher.patch,
        teacher_patch_index). indices (B,): the images' dataset indices, kept beside their memory rows
        (visualize.py)."""
        B = teacher.cls.shape[0] // 2
        second_view = teacher.cls[B:2 * B]  # (B, d)
        if teacher.patch is None:  # SOP-MIM off: the patch memory is never read
            self.class_memory.enqueue(second_view, indices)
            return
        cls, patch, indices = all_gather_rows(second_view, teacher.patch[-B:], indices)  # one collective
        self.class_memory.enqueue(cls, indices, gathered=True)
        self.patch_memory.enqueue(patch, indices, gathered=True)


# ---------------------------------------------------------------------------------------------- learnable prototypes
class PrototypeLayer(nn.Module):
    """Weight-normalised linear without bias (DINO/iBOT's `last_layer`): logit_k = g_k <v_k / |v_k|, z>.

    The gain g is fixed at 1 when norm_last_layer; otherwise it is a learnable 1-D tensor, so AdamW's rule keeps it
    out of weight decay (the official (K, 1) `weight_g` is decayed; README, "Deviations from the official code").
    The logits are computed in fp32 under autocast, like SOP's similarities, so the methods compare evenly.
    """

    def __init__(self, dim: int, num_prototypes: int, norm_last_layer: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))  # (K, d) rows v_k
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init, as the official layer
        self.gain = None if norm_last_layer else nn.Parameter(torch.ones(num_prototypes))  # (K,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., d) -> logits (..., K)."""
        with torch.autocast(z.device.type, enabled=False):
            logits = z.float() @ F.normalize(self.weight.float(), dim=1).T  # (..., K)
            return logits if self.gain is None else logits * self.gain.float()


class PrototypeNetwork(MultiCropWrapper):
    """MultiCropWrapper with a prototype layer after the head, inside the one forward that DDP wraps.

    The layer is registered under the head (keys `head.prototypes.*`, like iBOT's `head.last_layer`), so
    backbone-only loaders skip it. Returns a NetworkOutput with all four fields (patch ones None without MIM).
    """

    def __init__(self, backbone, head, prototypes: PrototypeLayer, patch: bool,
                 patch_prototypes: PrototypeLayer | None = None):
        super().__init__(backbone, head, patch_tokens=patch)  # iBOT with its MIM term: patch logits too
        head.prototypes = prototypes
        head.patch_prototypes = patch_prototypes  # iBOT with shared_head false: a second layer for patches

    def forward(self, global_crops, masks=None, local_crops=None, patch_index=None) -> NetworkOutput:
        cls, patch = super().forward(global_crops, masks, local_crops, patch_index)[:2]  # ((2 + V_l) B, d), (T, d)
        patch_layer = self.head.prototypes if self.head.patch_prototypes is None else self.head.patch_prototypes
        patch_logits = None if patch is None else patch_layer(patch)  # (T, K)
        return NetworkOutput(cls, patch, self.head.prototypes(cls), patch_logits)  # cls_logits ((2 + V_l) B, K)


class Centers(nn.Module):
    """iBOT/DINO centres c (1, K) and c2 (1, 1, K) of the teacher logits: EMA of all-reduced batch means."""

    def __init__(self, num_prototypes: int, patch: bool, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("cls", torch.zeros(1, num_prototypes))
        self.register_buffer("patch", torch.zeros(1, 1, num_prototypes) if patch else None)

    @torch.no_grad()
    def update(self, teacher_cls_logits: torch.Tensor, teacher_patch_logits: torch.Tensor | None) -> None:
        """c <- m c + (1 - m) sum_rows(t) / (2B W); c2 the same over the per-image mean of ALL P patches
        (bytedance/ibot main_ibot.py iBOTLoss.update_center). teacher_patch_logits (2B P, K), every patch."""
        sums = [teacher_cls_logits.float().sum(0)]  # (K,)
        patch = self.patch is not None and teacher_patch_logits is not None  # None: iBOT with MIM weight 0
        if patch:
            n = teacher_cls_logits.shape[0]
            sums.append(teacher_patch_logits.float().view(n, -1, teacher_patch_logits.shape[-1]).mean(1).sum(0))  # (K,)
        sums = torch.stack(sums)  # (1 or 2, K)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)  # one collective for both centres: every rank gets the same centres
            world = dist.get_world_size()
        means = sums / (teacher_cls_logits.shape[0] * world)
        self.cls.lerp_(means[0].view_as(self.cls), 1 - self.momentum)
        if patch:
            self.patch.lerp_(means[1].view_as(self.patch), 1 - self.momentum)


class IBOT(nn.Module):
    """iBOT (bytedance/ibot main_ibot.py iBOTLoss): centred, sharpened teacher softmax over K learnable prototypes;
    [CLS] + masked patches."""
    uses_masks = True
    STATS = STATS
    patch_term = True  # L_MIM and c2, the centre of the teacher patch logits

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.centers = Centers(cfg.num_prototypes, patch=self.patch_term, momentum=cfg.center_momentum)

    def teacher_patch_index(self, tokens: PatchTokens, generator: torch.Generator) -> None:
        return None  # every patch: the centre c2 averages the teacher's logits over all of them

    def loss(self, student, teacher, tokens, teacher_temp, generator):
        cfg, c = self.cfg, self.centers
        student_cls, teacher_cls = student.cls_logits.float(), teacher.cls_logits.float()  # ((2 + V_l) B, K), (2B, K)
        # Teacher targets: centred with the previous step's centres, sharpened by teacher_temp
        teacher_probs = ((teacher_cls - c.cls) / teacher_temp).softmax(-1)  # (2B, K)
        loss_cls = cross_view_loss((student_cls / cfg.student_temp).log_softmax(-1), teacher_probs)
        loss_patch = torch.zeros_like(loss_cls)  # MIM weight 0 or DINO: no patch logits, nothing computed
        if self.patch_term and student.patch_logits is not None:
            student_patch = student.patch_logits.float()  # (T, K), the masked tokens (and padding)
            teacher_patch = teacher.patch_logits.float()[tokens.index]  # (T, K) of the (2B P, K) of every patch
            teacher_patch_probs = ((teacher_patch - c.patch.view(1, -1)) / teacher_temp).softmax(-1)  # (T, K)
            loss_patch = masked_patch_loss((student_patch / cfg.student_temp).log_softmax(-1), teacher_patch_probs,
                                           tokens)  # same view, masked patches only
        loss = cfg.cls_loss_weight * loss_cls + cfg.patch_loss_weight * loss_patch  # λ1 L_cls + λ2 L_mim
        return loss, dict(loss_cls=loss_cls, loss_patch=loss_patch, **distribution_stats(teacher_probs, loss_cls))

    def prototype_vectors(self, teacher) -> torch.Tensor:
        return teacher.head.prototypes.weight  # (K, d), the teacher's [CLS] prototype layer

    def update(self, teacher, indices=None) -> None:
        self.centers.update(teacher.cls_logits, teacher.patch_logits)  # after the loss used the old centres


class DINO(IBOT):
    """DINO (facebookresearch/dino main_dino.py DINOLoss): iBOT's [CLS] term alone, weight 1; no masks, no
    patch term or c2 (its networks give no patch logits: uses_patch_tokens)."""
    uses_masks = False
    patch_term = False


# ----------------------------------------------------------------------------------- random blocks: MaSSL and CARP
def random_blocks(size: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random partition of range(size) into size // block_size blocks: (NP, NB) indices (sthalles/MaSSL
    random_partition.py).

    Drawn from the (seed, step) generator, so every rank draws the same partition without the broadcast that
    sthalles/carp modules/random_partition.py needs.
    """
    perm = torch.randperm(size, generator=generator, device=generator.device)  # (K,)
    return perm.view(size // block_size, block_size)  # (NP, NB); train.py requires NB | K


class MaSSL(nn.Module):
    """MaSSL (sthalles/MaSSL criterion.py): the class memory's rows, in random blocks, play the prototypes; [CLS]
    only."""
    uses_masks = False
    STATS = STATS + SE_STATS  # SE analogues: a block's rows play one SOP's SEs

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.class_memory = MemoryBank(cfg.class_memory_size, cfg.bottleneck_dim)

    def loss(self, student, teacher, tokens, teacher_temp, generator):
        blocks = self.class_memory.memory[random_blocks(self.cfg.class_memory_size, self.cfg.partition_size,
                                                        generator)]  # (NP, NB, d), the pre-update memory
        with torch.autocast(blocks.device.type, enabled=False):
            student_logits = torch.einsum("nd,kcd->nkc", student.cls.float(), blocks)  # ((2 + V_l) B, NP, NB)
            teacher_logits = torch.einsum("nd,kcd->nkc", teacher.cls.float(), blocks)  # (2B, NP, NB)
            teacher_probs = (teacher_logits / teacher_temp).softmax(-1)  # softmax within each block
            loss = cross_view_loss((student_logits / self.cfg.student_temp).log_softmax(-1), teacher_probs)
        memory = self.class_memory
        within = blocks.sum(1).square().sum(-1)  # (NP,) |sum of a block's unit rows|^2 = NB + sum of pair cosines
        NB = blocks.shape[1]
        se_stats = dict(se_cosine=((within - NB) / max(NB * (NB - 1), 1)).mean(),  # mean cosine within a block
                        se_distinct_rows=torch.full((), float(memory.memory.shape[0]), device=loss.device),  # all
                        se_age=memory.age(torch.arange(memory.memory.shape[0], device=loss.device)).float().mean())
        return loss, dict(loss_cls=loss, loss_patch=torch.zeros_like(loss), **distribution_stats(teacher_probs, loss),
                          **se_stats)

    def prototype_vectors(self, teacher) -> torch.Tensor:
        return self.class_memory.memory  # (Q, d): the blocks' rows

    @torch.no_grad()
    def update(self, teacher, indices=None) -> None:
        B = teacher.cls.shape[0] // 2
        self.class_memory.enqueue(teacher.cls[B:], indices)  # the teacher's second global view only, as MaSSL


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradient over ranks and keeps this rank's slice, as
    sthalles/carp's gathered uniformity term needs."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (W n, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class CARP(nn.Module):
    """CARP (sthalles/carp modules/carp_loss.py): learnable prototypes in random blocks; consistency + uniformity,
    no centring.

    carp_cosine (default): our head's unit-norm embeddings give cosine logits, so student_temp and the teacher_temp
    schedule sharpen them (a softmax over NB cosines would be nearly uniform). carp_cosine false: the
    official form, an unnormalised head and no temperature.
    """
    uses_masks = False
    STATS = STATS
    EPS = torch.finfo(torch.float32).eps  # the official clamp

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def loss(self, student, teacher, tokens, teacher_temp, generator):
        cfg = self.cfg
        idx = random_blocks(cfg.num_prototypes, cfg.partition_size, generator)  # (NP, NB)
        student_temp, teacher_temp = (cfg.student_temp, teacher_temp) if cfg.carp_cosine else (1.0, 1.0)
        p = (student.cls_logits.float()[:, idx] / student_temp).softmax(-1)  # ((2 + V_l) B, NP, NB), within each block
        q = (teacher.cls_logits.float()[:, idx] / teacher_temp).softmax(-1).detach()  # (2B, NP, NB)
        G, B, NP, NB = 2, q.shape[0] // 2, idx.shape[0], idx.shape[1]
        V = p.shape[0] // B
        # Consistency: -log P(student view v and teacher view g pick the same prototype of a block)
        agree = torch.einsum("gbkc,vbkc->gvbk", q.view(G, B, NP, NB), p.view(V, B, NP, NB))  # (G, V, B, NP)
        same_view = torch.eye(G, V, dtype=torch.bool, device=p.device)[:, :, None, None]
        consistency = -agree.clamp(self.EPS, 1 - self.EPS).log().masked_fill(same_view, 0.0).sum() / (
            B * NP * (G * V - G))
        # Uniformity: KL(batch-mean assignment || uniform) per block, the batch gathered over ranks
        rows = torch.cat((p, q))  # ((V + 2) B, NP, NB)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rows = _GatherWithGradient.apply(rows)  # (W (V + 2) B, NP, NB)
        mean_probs = rows.mean(0)  # (NP, NB)
        uniformity = (math.log(NB) + (mean_probs * mean_probs.clamp(self.EPS, 1 - self.EPS).log()).sum(-1)).mean()
        loss = consistency + uniformity  # weight 1, as the official code
        cross_entropy = cross_view_loss(p.detach().clamp_min(self.EPS).log(), q)  # for the KL monitor only
        return loss, dict(loss_cls=consistency, loss_patch=torch.zeros_like(loss),  # uniformity = loss - loss_cls
                          **distribution_stats(q, cross_entropy))

    def prototype_vectors(self, teacher) -> torch.Tensor:
        return teacher.head.prototypes.weight  # (K, d)

    def update(self, teacher, indices=None) -> None:
        pass  # nothing besides the EMA teacher


METHODS = {"sop": SOP, "ibot": IBOT, "dino": DINO, "massl": MaSSL, "carp": CARP}
