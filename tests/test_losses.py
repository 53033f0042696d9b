import math

import pytest
import torch
import torch.nn.functional as F

from losses import cross_entropy, sop_loss, sop_mim_loss
from memory import MemoryBank
from model import masked_tokens, token_budget


def mim_on_grid(student, teacher, masks, budget=None):
    """sop_mim_loss of whole (2B, P, M) grids, at their masked tokens (as the networks embed them) padded to
    budget (default: exactly the masked ones)."""
    tokens = masked_tokens(masks, int(masks.sum()) if budget is None else budget)
    return sop_mim_loss(student.flatten(0, 1)[tokens.index], teacher.flatten(0, 1)[tokens.index], tokens)


def simplex(*shape):
    return torch.rand(*shape).add(0.05).softmax(-1)


def reference_sop_loss(student, teacher, B):
    """Loop form of the SOP loss: pairs (g, v), v != g, each the batch mean of -sum q log p."""
    total, pairs = 0.0, 0
    for g in range(2):
        for v in range(student.shape[0] // B):
            if v == g:
                continue
            q, p = teacher[g * B:(g + 1) * B], student[v * B:(v + 1) * B]
            total += sum(-(q[b] * p[b].log()).sum() for b in range(B)) / B
            pairs += 1
    return total / pairs


def reference_mim_loss(student, teacher, masks):
    """Loop form of the SOP-MIM loss: per image, the sum over masked patches over their count; mean over images."""
    per_image = []
    for n in range(masks.shape[0]):
        losses = [-(teacher[n, l] * student[n, l].log()).sum() for l in range(masks.shape[1]) if masks[n, l]]
        per_image.append(sum(losses) / len(losses) if losses else torch.tensor(0.0))
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("local_views", [0, 3])
def test_sop_loss_matches_loop_reference(local_views):
    B, M = 4, 7
    student, teacher = simplex((2 + local_views) * B, M), simplex(2 * B, M)
    torch.testing.assert_close(sop_loss(student, teacher), reference_sop_loss(student, teacher, B))


def test_mim_loss_matches_loop_reference():
    B, P, M = 3, 5, 6
    student, teacher = simplex(2 * B, P, M), simplex(2 * B, P, M)
    masks = torch.rand(2 * B, P) < 0.4
    masks[1] = False  # an image without a mask contributes 0 and still counts
    masks[2] = True
    reference = reference_mim_loss(student, teacher, masks)
    torch.testing.assert_close(mim_on_grid(student, teacher, masks), reference)
    torch.testing.assert_close(mim_on_grid(student, teacher, masks, budget=2 * B * P), reference)  # padded


def test_masked_tokens_and_their_budget():
    masks = torch.tensor([[False, True, False, True], [True, False, False, False]])
    tokens = masked_tokens(masks, 5)
    assert tokens.index.tolist()[:3] == [1, 3, 4] and tokens.valid.tolist() == [True] * 3 + [False] * 2
    assert tokens.crop.tolist()[:3] == [0, 0, 1] and len(set(tokens.index.tolist())) == 5  # padding: other tokens
    epoch = torch.zeros(3, 8, 32, dtype=torch.bool)  # 3 steps of 8 crops x 32 patches: buckets of 8 tokens
    epoch[0, :, :2], epoch[1, :, :3] = True, True  # 16 and 24 masked tokens
    epoch[2, 0, :] = True  # 32
    assert token_budget(epoch) == 32
    epoch[2, 1, 0] = True  # 33: the next bucket
    assert token_budget(epoch) == 40
    assert token_budget(torch.ones(1, 2, 3, dtype=torch.bool)) == 6 and token_budget(epoch[:, :, :0]) == 0


def test_cross_entropy_clamps_zero_probabilities():
    q = torch.tensor([[0.0, 1.0]])
    assert torch.isfinite(cross_entropy(q, torch.tensor([[0.0, 1.0]]))).all()
    assert cross_entropy(q, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(-math.log(1e-12))


def test_losses_are_about_log_m_for_random_embeddings():
    torch.manual_seed(0)
    d, M, B = 256, 32, 64
    bank = MemoryBank(4096, d)
    sops = bank.draw(M, 8, 0.1, torch.Generator().manual_seed(0))
    student = F.normalize(torch.randn(4 * B, d), dim=1)
    teacher = F.normalize(torch.randn(2 * B, d), dim=1)
    loss = sop_loss(sops.probabilities(student, 0.1), sops.probabilities(teacher, 0.04))
    assert loss.item() == pytest.approx(math.log(M), rel=0.02)
    psops = bank.draw(512, 0, 0.1, torch.Generator().manual_seed(1))
    s_patch = F.normalize(torch.randn(2 * B, 9, d), dim=-1)
    t_patch = F.normalize(torch.randn(2 * B, 9, d), dim=-1)
    mim = mim_on_grid(psops.probabilities(s_patch, 0.1), psops.probabilities(t_patch, 0.04),
                      torch.ones(2 * B, 9, dtype=torch.bool))
    assert mim.item() == pytest.approx(math.log(512), rel=0.05)  # sharper teacher over 512 SOPs: a bit above


def test_no_gradient_reaches_teacher_or_memory():
    torch.manual_seed(0)
    bank = MemoryBank(256, 16)
    sops = bank.draw(8, 2, 0.1, torch.Generator().manual_seed(0))
    student = F.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    teacher = F.normalize(torch.randn(4, 16), dim=1).requires_grad_()
    loss = sop_loss(sops.probabilities(student, 0.1), sops.probabilities(teacher, 0.04))
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher distribution is a target
    assert bank.memory.grad is None and not bank.memory.requires_grad


def test_mim_loss_ignores_padding_tokens():
    torch.manual_seed(0)
    bank = MemoryBank(128, 16)
    sops = bank.draw(16, 0, 0.1, torch.Generator().manual_seed(0))
    B, P = 2, 6
    masks = torch.rand(2 * B, P) < 0.5
    tokens = masked_tokens(masks, 2 * B * P)  # every token: the unmasked ones are padding
    student = F.normalize(torch.randn(2 * B * P, 16), dim=-1)
    teacher = sops.probabilities(F.normalize(torch.randn(2 * B * P, 16), dim=-1), 0.04)
    changed = torch.where(tokens.valid.unsqueeze(-1), student, F.normalize(torch.randn(2 * B * P, 16), dim=-1))
    a = sop_mim_loss(sops.probabilities(student, 0.1), teacher, tokens)
    assert torch.equal(a, sop_mim_loss(sops.probabilities(changed, 0.1), teacher, tokens))
    changed[tokens.valid] = F.normalize(torch.randn(int(masks.sum()), 16), dim=-1)  # a masked one does count
    assert not torch.equal(a, sop_mim_loss(sops.probabilities(changed, 0.1), teacher, tokens))


def test_both_losses_fall_on_a_fixed_batch():
    torch.manual_seed(0)
    d, B, P = 32, 16, 4
    bank = MemoryBank(512, d)
    inputs = torch.randn(4 * B, 64)
    patch_inputs = torch.randn(2 * B, P, 64)
    student = torch.nn.Linear(64, d)
    teacher_cls = F.normalize(torch.randn(2 * B, d), dim=1)
    teacher_patch = F.normalize(torch.randn(2 * B, P, d), dim=-1)
    masks = torch.rand(2 * B, P) < 0.5
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    sops = bank.draw(32, 4, 0.1, torch.Generator().manual_seed(0))
    psops = bank.draw(64, 0, 0.1, torch.Generator().manual_seed(1))
    history = []
    for _ in range(30):
        s_cls = F.normalize(student(inputs), dim=1)
        s_patch = F.normalize(student(patch_inputs), dim=-1)
        l_cls = sop_loss(sops.probabilities(s_cls, 0.1), sops.probabilities(teacher_cls, 0.04))
        l_pat = mim_on_grid(psops.probabilities(s_patch, 0.1), psops.probabilities(teacher_patch, 0.04), masks)
        history.append((l_cls.item(), l_pat.item()))
        opt.zero_grad()
        (l_cls + l_pat).backward()
        opt.step()
    assert history[-1][0] < history[0][0] - 0.05
    assert history[-1][1] < history[0][1] - 0.05
