"""SOP loss on [CLS] and SOP-MIM loss on masked patches, the paper's two objectives.

Both compare a teacher distribution q over SOPs (the target, no gradient) with a student distribution p by the
cross-entropy H(q, p) = -sum_c q_c log p_c, in fp32 with a clamped log (README, "Deviations from the official code":
Numerics). Inputs are view-major, as model.MultiCropWrapper returns them. Shapes follow the legend in model.py.
"""
import torch

from model import PatchTokens

LOG_EPS = 1e-12  # p is a convex mix of smoothed votes and never 0 in exact arithmetic; guard fp32 underflow only


def cross_entropy(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> torch.Tensor:
    """H(q, p) = -sum_c q_c log p_c over the last dim: (..., M), (..., M) -> (...). No gradient through q."""
    return -(teacher_probs.detach().float() * student_probs.float().clamp_min(LOG_EPS).log()).sum(-1)


def sop_loss(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Global SOP loss (the paper's L_SOP) for one draw: every teacher global view against every other student view.

    student_probs (V B, M): all student views (the 2 masked globals first, then the locals).
    teacher_probs (G B, M): the teacher's G = 2 unmasked global views.
    Returns the mean over the G V - G pairs (g, v) with v != g and over the B images of H(q_g, p_v).
    """
    return cross_view_loss(student_probs.float().clamp_min(LOG_EPS).log(), teacher_probs)


def cross_view_loss(student_log_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean of H(q_g, p_v) = -sum_c q_g log p_v over the pairs v != g and over images (and blocks, if any).

    student_log_probs (V B, ..., M) log p of all student views; teacher_probs (G B, ..., M) of the G = 2 teacher
    global views. Shared by SOP (probabilities over SOPs), iBOT/DINO (over prototypes) and MaSSL (within memory
    blocks, the middle dim), so the pair set and the averaging are written once.
    """
    G = 2
    B, M = teacher_probs.shape[0] // G, teacher_probs.shape[-1]
    V = student_log_probs.shape[0] // B
    q = teacher_probs.detach().float().reshape(G, B, -1, M)  # (G, B, n, M), n = blocks (1 if none)
    log_p = student_log_probs.float().reshape(V, B, -1, M)  # (V, B, n, M)
    ce = -torch.einsum("gbnm,vbnm->gvbn", q, log_p)  # (G, V, B, n): H(q_g, p_v) of every pair, image and block
    same_view = torch.eye(G, V, dtype=torch.bool, device=ce.device)  # (G, V): a view never predicts itself
    ce = ce.masked_fill(same_view[:, :, None, None], 0.0)
    return ce.sum() / (B * ce.shape[-1] * (G * V - G))  # paper Eq. (L_SOP): mean over pairs and images


def sop_mim_loss(student_probs: torch.Tensor, teacher_probs: torch.Tensor, tokens: PatchTokens) -> torch.Tensor:
    """SOP-MIM loss: the masked student crop predicts the unmasked teacher crop of the SAME view (the pairing of
    bytedance/ibot main_ibot.py iBOTLoss), at the masked patch tokens.

    student_probs, teacher_probs (T, M) at the T tokens of `tokens` (model.PatchTokens: the masked ones and padding).
    Per crop: cross-entropy summed over its masked patches over their count (crops without a mask give 0 and still
    count); then the mean over the 2B global crops.
    """
    return masked_patch_loss(student_probs.float().clamp_min(LOG_EPS).log(), teacher_probs, tokens)


def masked_patch_loss(student_log_probs: torch.Tensor, teacher_probs: torch.Tensor,
                      tokens: PatchTokens) -> torch.Tensor:
    """Per global crop, H(q, p) summed over its masked patches over their count; mean over the 2B crops (SOP, iBOT).

    student_log_probs, teacher_probs (T, M) at the tokens' T positions; padding tokens (valid False) count nothing.
    """
    ce = -(teacher_probs.detach().float() * student_log_probs.float()).sum(-1)  # (T,)
    ce = torch.where(tokens.valid, ce, 0.0)
    per_crop = ce.new_zeros(tokens.masks.shape[0]).index_add_(0, tokens.crop, ce)  # (2B,) sums over masked patches
    return (per_crop / tokens.masks.sum(-1).clamp_min(1)).mean()  # paper Eq. (L_MIM)
