import math

import pytest
import torch
import torch.nn.functional as F

from losses import cross_entropy, sop_loss, sop_mim_loss
from memory import MemoryBank


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
    torch.testing.assert_close(sop_mim_loss(student, teacher, masks), reference_mim_loss(student, teacher, masks))


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
    mim = sop_mim_loss(psops.probabilities(s_patch, 0.1), psops.probabilities(t_patch, 0.04),
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


def test_mim_loss_ignores_unmasked_student_patches():
    torch.manual_seed(0)
    bank = MemoryBank(128, 16)
    sops = bank.draw(16, 0, 0.1, torch.Generator().manual_seed(0))
    B, P = 2, 6
    masks = torch.rand(2 * B, P) < 0.5
    student = F.normalize(torch.randn(2 * B, P, 16), dim=-1)
    teacher = sops.probabilities(F.normalize(torch.randn(2 * B, P, 16), dim=-1), 0.04)
    changed = torch.where(masks.unsqueeze(-1), student, F.normalize(torch.randn(2 * B, P, 16), dim=-1))
    a = sop_mim_loss(sops.probabilities(student, 0.1), teacher, masks)
    b = sop_mim_loss(sops.probabilities(changed, 0.1), teacher, masks)
    assert torch.equal(a, b)
    # Changing a masked position does change it.
    changed[masks] = F.normalize(torch.randn(int(masks.sum()), 16), dim=-1)
    assert not torch.equal(a, sop_mim_loss(sops.probabilities(changed, 0.1), teacher, masks))


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
        l_pat = sop_mim_loss(psops.probabilities(s_patch, 0.1), psops.probabilities(teacher_patch, 0.04), masks)
        history.append((l_cls.item(), l_pat.item()))
        opt.zero_grad()
        (l_cls + l_pat).backward()
        opt.step()
    assert history[-1][0] < history[0][0] - 0.05
    assert history[-1][1] < history[0][1] - 0.05
