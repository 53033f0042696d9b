"""FIFO memories of teacher embeddings and the self-organizing prototypes drawn from them (official code:
sthalles/sop memory_bank.py).

A memory bank holds Q unit-norm teacher embeddings of past images. Each draw picks M random anchors; each anchor and
its k nearest memory neighbours (the support embeddings, SEs) form one self-organizing prototype (SOP). A view u is
scored against all S = M (k + 1) SEs at once and the SE similarities are pooled into M SOP probabilities by the vote
matrix Y (paper: P(u) = softmax(u D^T / tau) Y). Shapes follow the legend in model.py.
"""
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

SEARCH_CHUNK = 2 ** 27  # similarity entries per top-k chunk (512 MiB of fp32 scores)
SHORTLIST = 128  # bf16-searched candidates per anchor that the fast search re-ranks in fp32
PREFILTER_GROUP = 32  # the fast search's exact prefilter: columns per group whose maximum stands for it; 0 = off


class MemoryBank(nn.Module):
    """FIFO queue of Q embeddings (fp32 buffer (Q, d), an index buffer and a pointer buffer, all checkpointed).

    `enqueue` writes the global batch (all ranks' rows, in rank order) over the oldest rows. When the global batch
    does not divide Q the write wraps around the end of the buffer, so any batch size works and every slot is
    overwritten once every Q / (global batch) steps on average; train.py only requires global batch <= Q.
    `index` (Q,) holds the dataset index of the image each row came from (-1: a random initial row or an unknown
    source); nothing in training reads it, visualize.py uses it to show a prototype's members as images.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        # Random points on the unit sphere until real embeddings arrive; the default generator makes
        # the start identical on every rank, since every rank seeds it the same way.
        self.register_buffer("memory", F.normalize(torch.randn(size, dim), dim=1))  # (Q, d)
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))  # (Q,) dataset index of each row
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        # For the diagnostics only: enqueues so far, and by which one (1, 2, ...) each row was written (0: never)
        self.register_buffer("enqueues", torch.zeros((), dtype=torch.long))
        self.register_buffer("written_at", torch.zeros(size, dtype=torch.long))  # (Q,)

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor, index: torch.Tensor | None = None, gathered: bool = False) -> None:
        """x (b, d) rank-local embeddings, index (b,) their images' dataset indices (None: stored as -1); all ranks
        must call this with the same b. gathered: x and index already hold every rank's rows (all_gather_rows)."""
        x = x.detach().float()
        index = x.new_full((x.shape[0],), -1, dtype=torch.long) if index is None else index.to(x.device, torch.long)
        if not gathered:
            x, index = all_gather_rows(x, index)  # (b W, d), (b W,)
        Q, n = self.memory.shape[0], x.shape[0]
        if n > Q:
            raise ValueError(f"global batch {n} is larger than the memory ({Q} rows)")
        # Index arithmetic on the device pointer: no host sync, and wrap-around comes for free.
        rows = (self.ptr + torch.arange(n, device=x.device)) % Q  # (n,)
        self.memory.index_copy_(0, rows, x)
        self.index.index_copy_(0, rows, index)
        self.ptr.copy_((self.ptr + n) % Q)
        self.enqueues += 1
        self.written_at.index_fill_(0, rows, self.enqueues)

    def age(self, rows: torch.Tensor) -> torch.Tensor:
        """Steps since each of rows (any shape) was written: 1 for the last enqueue, enqueues + 1 for rows still
        holding their random start."""
        return self.enqueues + 1 - self.written_at[rows]

    @torch.no_grad()
    def support_stats(self, sops: "SOPs") -> dict[str, torch.Tensor]:
        """How alike and how fresh a draw's SEs are (README, "Reading the diagnostics"): mean neighbour vote (its
        cosine to the anchor, clamped at 0; 0 without neighbours), distinct memory rows among the S SEs, mean
        age of the SEs in steps."""
        used = torch.zeros(self.memory.shape[0], dtype=torch.bool, device=self.memory.device)
        used.index_fill_(0, sops.rows.flatten(), True)  # no host sync, unlike unique()
        neighbor_votes = sops.weights[:, 1:]  # (M, k)
        return dict(se_cosine=neighbor_votes.mean() if neighbor_votes.numel() else sops.weights.new_zeros(()),
                    se_distinct_rows=used.sum().float(), se_age=self.age(sops.rows).float().mean())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the index buffer existed still resume: their rows' sources are unknown (-1).
        state_dict.setdefault(prefix + "index", torch.full_like(self.index, -1))
        state_dict.setdefault(prefix + "enqueues", torch.zeros_like(self.enqueues))  # ages count from the resume
        state_dict.setdefault(prefix + "written_at", torch.zeros_like(self.written_at))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def draw(self, num_anchors: int, num_neighbors: int, smoothing: float,
             generator: torch.Generator) -> "SOPs":
        """Draw M = num_anchors SOPs of k = num_neighbors neighbours each.

        Anchors are a uniform random subset of the memory; the remaining Q - M rows form the search pool, so anchors
        are never neighbours of each other (neighbours may be shared). Neighbours are the k most cosine-similar pool
        rows of each anchor and vote for it with that similarity; the anchor votes with 1 - smoothing. The draw
        depends only on the memory and the generator: seed it from (seed, step) and every rank builds the same SOPs.
        README, "Deviations from the official code": Anchors, Same anchors on every rank.
        """
        Q = self.memory.shape[0]
        if not (0 < num_anchors and num_anchors + num_neighbors <= Q):
            raise ValueError(f"need 0 < anchors and anchors + neighbours <= memory size, got M={num_anchors}, "
                             f"k={num_neighbors}, Q={Q}")
        perm = torch.randperm(Q, generator=generator, device=generator.device).to(self.memory.device)
        anchors = self.memory[perm[:num_anchors]]  # (M, d), a copy: later enqueues cannot touch it
        anchor_weight = anchors.new_full((num_anchors, 1), 1.0 - smoothing)  # (M, 1)
        if num_neighbors == 0:
            return SOPs(anchors, anchor_weight, perm[:num_anchors].unsqueeze(1))
        pool = perm[num_anchors:]  # (Q - M,) memory rows the neighbours come from
        neighbor_rows = pool[_nearest(anchors, self.memory[pool], num_neighbors)]  # (M, k) memory rows
        neighbors = self.memory[neighbor_rows]  # (M, k, d)
        # Vote weight of a neighbour = its cosine to the anchor, recomputed in fp32 whatever the search precision.
        # A negative cosine would be a negative vote (and could make P negative); top-k neighbours of real memories
        # are far from that, but a tiny random memory can get there, so clamp at 0.
        neighbor_weight = torch.einsum("md,mkd->mk", anchors, neighbors).clamp(0, 1)  # (M, k)
        support = torch.cat((anchors.unsqueeze(1), neighbors), dim=1)  # (M, 1 + k, d), anchor first
        weights = torch.cat((anchor_weight, neighbor_weight), dim=1)  # (M, 1 + k)
        rows = torch.cat((perm[:num_anchors].unsqueeze(1), neighbor_rows), dim=1)  # (M, 1 + k)
        return SOPs(support.flatten(0, 1), weights, rows)


def all_gather_rows(*parts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Every rank's rows of each part (b, ...), in rank order (so every rank writes the same memory rows), in one
    all_gather: the parts travel side by side as fp32 columns, integer ones as int64 bit for bit (each viewed as two
    fp32). A None part (no dataset indices) stays None; MemoryBank.enqueue stores it as -1."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(parts)
    present = [p for p in parts if p is not None]
    b = present[0].shape[0]
    columns = [p.float().reshape(b, -1) if p.is_floating_point() else p.long().reshape(b, -1).view(torch.float32)
               for p in present]  # (b, c_i) each
    packed = torch.cat(columns, dim=1)  # (b, C)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, packed)
    packed, start, rows = torch.cat(gathered), 0, []  # (b W, C)
    for part, c in zip(present, columns):
        chunk = packed[:, start:start + c.shape[1]].contiguous()  # (b W, c_i)
        start += c.shape[1]
        rows.append((chunk if part.is_floating_point() else chunk.view(torch.int64)).reshape(-1, *part.shape[1:]))
    rows = iter(rows)
    return [None if p is None else next(rows) for p in parts]


def _nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, fast: bool | None = None) -> torch.Tensor:
    """Indices (M, k) of the k keys with the largest dot product with each query, most similar first.

    Chunked over queries so the M x (Q - M) similarity matrix never exists whole (Q = 65536, M = 4096 would be 1 GiB
    in fp32). fast (default: on CUDA) searches in bf16 and re-ranks in fp32: a trained memory is so concentrated
    that a neighbour's cosine differs from the next one's by ~1e-6, far below bf16's step of 2^-8 near 1, so
    bf16 scores alone miss the fp32 top k for most anchors (README, "Deviations", 7). Instead, each anchor's
    SHORTLIST best keys are found from bf16 inputs with fp32 products and sums (keys centred first: q (key - mean)
    ranks keys like q key, with smaller values and so smaller rounding; `_top_columns` finds them), and the k best
    of those by exact fp32 scores (one batched matrix-vector product; torch keeps TF32 off for fp32 matmuls unless
    a user turns it on) are returned.
    """
    fast = keys.is_cuda if fast is None else fast
    rows = max(1, SEARCH_CHUNK // keys.shape[0])
    if not fast:
        keys_t = keys.float().T  # (d, Q - M)
        return torch.cat([(q.float() @ keys_t).topk(k, dim=1).indices for q in queries.split(rows)])
    length = min(keys.shape[0], max(SHORTLIST, 2 * k))
    centred_t = (keys - keys.mean(0)).to(torch.bfloat16).T  # (d, Q - M)
    nearest = []
    for q in queries.split(rows):
        shortlist = _top_columns(_bf16_scores(q.to(torch.bfloat16), centred_t), length, PREFILTER_GROUP)  # (m, L)
        exact = torch.bmm(keys[shortlist].float(), q.float().unsqueeze(2)).squeeze(2)  # (m, L) fp32
        nearest.append(shortlist.gather(1, exact.topk(k, dim=1).indices))
    return torch.cat(nearest)


def _top_columns(scores: torch.Tensor, length: int, group: int) -> torch.Tensor:
    """Column indices (m, length) of each row's `length` largest scores (m, n), in no particular order: the same
    set as scores.topk(length) (up to ties), through a cheaper route for wide rows. The columns are cut into groups
    of `group`; a group holding one of the row's `length` largest scores has a maximum at least as large as the
    length-th largest score, so it is among the `length` groups with the largest maxima, and the top-k runs over
    those groups' length x group columns (plus the n mod group left over) instead of all n."""
    m, n = scores.shape
    groups = n // group if group > 0 else 0
    if groups <= 2 * length:  # off, or narrow rows: the prefilter would not shrink the search
        return scores.topk(length, dim=1).indices
    maxima = scores[:, :groups * group].unflatten(1, (groups, group)).amax(2)  # (m, groups)
    offsets = torch.arange(group, device=scores.device)
    columns = (maxima.topk(length, dim=1).indices.unsqueeze(2) * group + offsets).flatten(1)  # (m, length group)
    leftover = torch.arange(groups * group, n, device=scores.device).expand(m, -1)  # (m, n mod group)
    columns = torch.cat((columns, leftover), dim=1)
    return columns.gather(1, scores.gather(1, columns).topk(length, dim=1).indices)


def _bf16_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 matrices, products summed and returned in fp32: one bf16 GEMM with an fp32 output on CUDA
    (torch.mm out_dtype), and the same numbers elsewhere (bf16 products are exact in fp32)."""
    if a.is_cuda and _mm_has_out_dtype():
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


@functools.cache
def _mm_has_out_dtype() -> bool:
    """Whether this torch's CUDA mm takes out_dtype (decided once; search_kind says which search runs)."""
    try:
        ones = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        return torch.mm(ones, ones, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def search_kind(device: torch.device) -> str:
    """The neighbour search a draw on device runs, for the start-up print."""
    if device.type != "cuda":
        return "exact fp32 scores"
    return (f"bf16 shortlist of {SHORTLIST} (group-max prefilter) re-ranked in fp32, "
            + ("one bf16 GEMM with fp32 output" if _mm_has_out_dtype() else
               "this torch has no mm out_dtype: shortlist scores by an fp32 GEMM of the bf16 inputs (slower)"))


@dataclass
class SOPs:
    """One draw of M self-organizing prototypes.

    support (S, d): the SEs, SOP j owning rows j (k + 1) ... j (k + 1) + k, its anchor first.
    weights (M, k + 1): w_r, the vote each SE gives its own SOP (anchor 1 - smoothing, neighbours their cosine).
    rows (M, k + 1): the memory row each SE was read from, laid out like weights (memory.index[rows] gives the
    dataset images; only visualize.py reads it).
    """
    support: torch.Tensor
    weights: torch.Tensor
    rows: torch.Tensor | None = None

    @property
    def num_sops(self) -> int:
        return self.weights.shape[0]

    def vote_matrix(self) -> torch.Tensor:
        """Y (S, M): Y[r, c] = w_r if SE r belongs to SOP c, else (1 - w_r) / (M - 1).

        Every row is a label-smoothed one-hot vote and sums to 1. `probabilities` never builds Y (S x M would be
        36864 x 4096 at the ImageNet setting); this is the reference it must agree with.
        """
        M, K1 = self.weights.shape
        w = self.weights.reshape(-1, 1)  # (S, 1)
        own = torch.arange(M, device=w.device).repeat_interleave(K1)  # (S,) SOP of each SE
        one_hot = F.one_hot(own, M).to(w.dtype)  # (S, M)
        Y = one_hot * w + (1 - one_hot) * (1 - w) / max(M - 1, 1)
        return Y / Y.sum(1, keepdim=True)  # a no-op up to rounding, except for M = 1 where Y = 1

    def probabilities(self, u: torch.Tensor, temperature: float) -> torch.Tensor:
        """P(u) = softmax(u D^T / tau) Y over the M SOPs, in fp32 whatever the autocast dtype (README,
        "Deviations from the official code": Numerics).

        u (..., d) unit-norm embeddings ((n, d) for [CLS], (n, P, d) for patches) -> (..., M), rows sum to 1.
        Y's structure gives the product without Y: with a = softmax over all S SEs (paper: joint, not per SOP),
        a_c the SE weights of SOP c, g_c = sum_{r in c} a_r w_r and h_c = sum_{r in c} a_r (1 - w_r),
            P_c = sum_r a_r Y[r, c] = g_c + (sum_c' h_c' - h_c) / (M - 1).
        That is O(S) per embedding instead of O(S M). Gradients flow to u only: support and weights are constants.
        """
        M, K1 = self.weights.shape
        with torch.autocast(u.device.type, enabled=False):
            # 1 / tau folded into u (n x d) rather than applied to the logits (n x S, S >> d): one pass less
            logits = (u.float() / temperature) @ self.support.float().T  # (..., S), paper: P(u) = softmax(u D^T) Y
            a = logits.softmax(dim=-1).unflatten(-1, (M, K1))  # (..., M, k + 1)
            g = (a * self.weights).sum(-1)  # (..., M) votes for the own SOP
            h = a.sum(-1) - g  # (..., M) smoothing mass, spread over the other M - 1 SOPs
            if M == 1:
                return g + h
            return g + (h.sum(-1, keepdim=True) - h) / (M - 1)  # (..., M)
