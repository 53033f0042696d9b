import math

import pytest
import torch
import torch.nn.functional as F

from memory import MemoryBank, SOPs


def generator(seed):
    return torch.Generator().manual_seed(seed)


def filled_bank(Q=64, d=16, seed=0):
    torch.manual_seed(seed)
    bank = MemoryBank(Q, d)
    bank.enqueue(F.normalize(torch.randn(Q, d), dim=1))
    return bank


def test_enqueue_exact_contents_and_wrap_around():
    torch.manual_seed(0)
    bank = MemoryBank(10, 3)
    initial = bank.memory.clone()
    batches = [torch.full((4, 3), float(i + 1)) for i in range(4)]
    expected = initial.clone()
    # Batch i lands on rows ptr .. ptr + 3 (mod 10): 0-3, 4-7, 8-9 then 0-1 (wrap), 2-5.
    for i, (rows, ptr_after) in enumerate([([0, 1, 2, 3], 4), ([4, 5, 6, 7], 8), ([8, 9, 0, 1], 2),
                                           ([2, 3, 4, 5], 6)]):
        bank.enqueue(batches[i])
        expected[rows] = batches[i]
        assert torch.equal(bank.memory, expected), f"after enqueue {i}"
        assert bank.ptr.item() == ptr_after and 0 <= bank.ptr.item() < 10


def test_enqueue_dividing_batch_cycles_exactly():
    bank = MemoryBank(8, 2)
    for step in range(5):  # 4 | 8: the pointer visits 0, 4, 0, 4, ...
        x = torch.randn(4, 2)
        bank.enqueue(x)
        start = 4 * (step % 2)
        assert torch.equal(bank.memory[start:start + 4], x)
        assert bank.ptr.item() == (start + 4) % 8


def test_enqueue_keeps_fp32_and_refuses_oversized_batches():
    bank = MemoryBank(8, 2)
    bank.enqueue(torch.randn(2, 2, dtype=torch.bfloat16))
    assert bank.memory.dtype == torch.float32
    with pytest.raises(ValueError, match="larger than the memory"):
        bank.enqueue(torch.randn(9, 2))


def test_index_buffer_exact_contents_and_wrap_around():
    bank = MemoryBank(10, 3)
    assert torch.equal(bank.index, torch.full((10,), -1))  # random initial rows have no source
    expected = torch.full((10,), -1)
    # Same schedule as the embeddings: rows 0-3, 4-7, 8-9 then 0-1 (wrap), 2-5; batch 2 has no indices (-1).
    for i, rows in enumerate([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]):
        index = None if i == 2 else torch.arange(4) + 100 * (i + 1)
        bank.enqueue(torch.full((4, 3), float(i + 1)), index)
        expected[rows] = -1 if index is None else index
        assert torch.equal(bank.index, expected), f"after enqueue {i}"
        assert bank.index.dtype == torch.long
        assert (bank.memory[bank.index >= 0, 0] == (bank.index[bank.index >= 0] // 100).float()).all()


def test_state_dict_round_trip():
    bank = filled_bank()
    bank.enqueue(torch.randn(5, 16), torch.arange(5) + 7)
    other = MemoryBank(64, 16)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.memory, bank.memory) and other.ptr.item() == bank.ptr.item() == 5
    assert torch.equal(other.index, bank.index) and other.index[:5].tolist() == [7, 8, 9, 10, 11]
    assert torch.equal(other.written_at, bank.written_at) and other.enqueues.item() == bank.enqueues.item()
    assert set(bank.state_dict()) == {"memory", "index", "ptr", "enqueues", "written_at"}


def test_ages_and_support_stats_follow_the_fifo():
    bank = MemoryBank(10, 3)
    for i in range(4):  # rows 0-3, 4-7, 8-9 + 0-1 (wrap), 2-5
        bank.enqueue(F.normalize(torch.randn(4, 3), dim=1))
    assert bank.enqueues.item() == 4
    # Ages now (steps since written): rows 2-5 by the last enqueue, 0-1 and 8-9 by the third, 6-7 by the second
    assert bank.age(torch.arange(10)).tolist() == [2, 2, 1, 1, 1, 1, 3, 3, 2, 2]
    assert MemoryBank(10, 3).age(torch.arange(3)).tolist() == [1, 1, 1]  # random start: enqueues + 1
    sops = bank.draw(3, 2, 0.1, generator(0))
    stats = bank.support_stats(sops)
    assert stats["se_distinct_rows"].item() == len(set(sops.rows.flatten().tolist()))
    torch.testing.assert_close(stats["se_cosine"], sops.weights[:, 1:].mean())
    torch.testing.assert_close(stats["se_age"], bank.age(sops.rows).float().mean())
    assert bank.support_stats(bank.draw(3, 0, 0.1, generator(0)))["se_cosine"].item() == 0.0


def test_state_dict_without_index_loads_with_unknown_sources():
    bank = filled_bank()
    old = {k: v for k, v in bank.state_dict().items() if k not in ("index", "enqueues", "written_at")}  # older
    other = MemoryBank(64, 16)
    other.index.fill_(3)
    other.load_state_dict(old)
    assert torch.equal(other.memory, bank.memory) and torch.equal(other.index, torch.full((64,), -1))


def test_initial_memory_is_unit_norm():
    torch.testing.assert_close(MemoryBank(32, 8).memory.norm(dim=1), torch.ones(32))


@pytest.mark.parametrize("k", [0, 3])
def test_same_seed_same_sops(k):
    bank = filled_bank()
    a, b = bank.draw(8, k, 0.1, generator(7)), bank.draw(8, k, 0.1, generator(7))
    assert torch.equal(a.support, b.support) and torch.equal(a.weights, b.weights) and torch.equal(a.rows, b.rows)
    assert a.rows.shape == (8, k + 1) and torch.equal(bank.memory[a.rows].flatten(0, 1), a.support)
    c = bank.draw(8, k, 0.1, generator(8))
    assert not torch.equal(a.support, c.support)


def test_sop_structure_anchor_and_neighbours():
    bank = filled_bank()
    M, k = 6, 4
    sops = bank.draw(M, k, 0.1, generator(1))
    assert sops.support.shape == (M * (k + 1), 16) and sops.weights.shape == (M, k + 1)
    support = sops.support.view(M, k + 1, 16)
    anchors, neighbors = support[:, 0], support[:, 1:]
    torch.testing.assert_close(sops.weights[:, 0], torch.full((M,), 0.9))
    memory = bank.memory
    anchor_rows = [int((memory == a).all(1).nonzero()) for a in anchors]
    assert len(set(anchor_rows)) == M  # distinct anchors
    assert sops.rows.shape == (M, k + 1) and sops.rows[:, 0].tolist() == anchor_rows
    assert torch.equal(memory[sops.rows].flatten(0, 1), sops.support)  # every SE is the memory row it names
    for j in range(M):
        # Brute force: the k most similar memory rows that are not anchors, most similar first.
        sims = memory @ anchors[j]
        sims[anchor_rows] = -math.inf
        best = sims.topk(k).indices
        torch.testing.assert_close(neighbors[j], memory[best])
        torch.testing.assert_close(sops.weights[j, 1:], sims[best])
        assert (sops.weights[j, 1:-1] >= sops.weights[j, 2:]).all()


@pytest.mark.parametrize("k", [0, 2])
def test_vote_matrix_rows(k):
    sops = filled_bank().draw(5, k, 0.1, generator(2))
    Y = sops.vote_matrix()
    M = 5
    assert Y.shape == (M * (k + 1), M)
    torch.testing.assert_close(Y.sum(1), torch.ones(M * (k + 1)))
    anchor_rows = torch.arange(M) * (k + 1)
    torch.testing.assert_close(Y[anchor_rows, torch.arange(M)], torch.full((M,), 0.9))
    off = Y[anchor_rows].clone()
    off[torch.arange(M), torch.arange(M)] = 0
    torch.testing.assert_close(off.sum(1), torch.full((M,), 0.1))  # smoothing spread uniformly
    assert (Y >= 0).all()


def reference_probabilities(u, support, weights, tau):
    """Straight from the equations: a = softmax over all SEs of u.s / tau; P_c = sum_r a_r Y[r, c]."""
    M, K1 = weights.shape
    S = M * K1
    u, support, weights = u.double(), support.double(), weights.double()
    out = torch.zeros(u.shape[0], M, dtype=torch.float64)
    for n in range(u.shape[0]):
        logits = [float(u[n] @ support[r]) / tau for r in range(S)]
        mx = max(logits)
        e = [math.exp(v - mx) for v in logits]
        z = sum(e)
        for c in range(M):
            total = 0.0
            for r in range(S):
                owner, w = r // K1, float(weights[r // K1, r % K1])
                y = w if owner == c else (1 - w) / (M - 1)
                total += e[r] / z * y
            out[n, c] = total
    return out


@pytest.mark.parametrize("k", [0, 3])
def test_probabilities_match_loop_reference(k):
    bank = filled_bank(Q=48, d=8)
    sops = bank.draw(5, k, 0.1, generator(3))
    u = F.normalize(torch.randn(7, 8), dim=1)
    for tau in (0.1, 0.04):
        fast = sops.probabilities(u, tau)
        ref = reference_probabilities(u, sops.support, sops.weights, tau)
        torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=0)
        # ... and the explicit vote-matrix product agrees too.
        torch.testing.assert_close(fast, (u @ sops.support.T / tau).softmax(-1) @ sops.vote_matrix(), atol=1e-6,
                                   rtol=0)


def test_probabilities_patch_shape_sum_to_one_and_fp32_under_autocast():
    sops = filled_bank().draw(6, 2, 0.1, generator(4))
    u = F.normalize(torch.randn(3, 5, 16), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = sops.probabilities(u.bfloat16(), 0.04)
    assert p.shape == (3, 5, 6) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5))
    assert (p > 0).all()


def test_no_gradient_into_memory():
    bank = filled_bank()
    sops = bank.draw(6, 2, 0.1, generator(5))
    assert not sops.support.requires_grad and not sops.weights.requires_grad
    u = F.normalize(torch.randn(4, 16), dim=1).requires_grad_()
    p = sops.probabilities(u, 0.1)
    p[:, 0].sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()
    assert not bank.memory.requires_grad
    # Enqueueing after the draw (as the training step does) leaves the drawn SOPs untouched.
    before = sops.support.clone()
    bank.enqueue(torch.randn(64, 16))
    assert torch.equal(sops.support, before)


def test_bad_draw_sizes():
    bank = filled_bank(Q=16)
    with pytest.raises(ValueError, match="anchors"):
        bank.draw(14, 3, 0.1, generator(0))
    with pytest.raises(ValueError, match="anchors"):
        bank.draw(0, 0, 0.1, generator(0))


def test_chunked_search_matches_unchunked(monkeypatch):
    import memory
    bank = filled_bank(Q=128, d=16)
    whole = bank.draw(10, 4, 0.1, generator(9))
    monkeypatch.setattr(memory, "SEARCH_CHUNK", 200)  # 200 // 118 = 1 query row per chunk
    chunked = bank.draw(10, 4, 0.1, generator(9))
    assert torch.equal(whole.support, chunked.support)


def test_single_sop_is_certain():
    sops = SOPs(F.normalize(torch.randn(3, 4), dim=1), torch.tensor([[0.9, 0.5, 0.4]]))
    torch.testing.assert_close(sops.probabilities(torch.randn(2, 4), 0.1), torch.ones(2, 1))
    torch.testing.assert_close(sops.vote_matrix(), torch.ones(3, 1))


def concentrated_memory(size: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Unit rows like a trained memory's: clusters around one direction, top-k cosines ~0.996 apart by ~1e-5."""
    g = torch.Generator().manual_seed(seed)
    mean = F.normalize(torch.randn(dim, generator=g), dim=0)
    centres = F.normalize(mean + 0.03 * torch.randn(32, dim, generator=g), dim=1)
    rows = centres[torch.randint(32, (size,), generator=g)] + 0.01 * torch.randn(size, dim, generator=g)
    return F.normalize(rows, dim=1)


def test_fast_search_finds_the_exact_neighbours_of_a_concentrated_memory(monkeypatch):
    """The GPU search (bf16 shortlist, fp32 re-rank; emulated here) picks the fp32 top k where bf16 scores fail."""
    from memory import _nearest

    memory = concentrated_memory(4096, 64)
    queries, keys, k = memory[:512], memory[512:], 8
    exact = (queries.double() @ keys.double().T).topk(k, dim=1).indices
    fp32 = _nearest(queries, keys, k, fast=False)
    bf16_scores = (queries.bfloat16() @ keys.bfloat16().T).float().topk(k, dim=1).indices  # rounded scores
    same = lambda a, b: (a.sort(1).values == b.sort(1).values).all(1).float().mean().item()  # noqa: E731
    assert same(fp32, exact) == 1.0 and same(bf16_scores, exact) < 0.05  # the memory is hard for bf16 scores
    monkeypatch.setattr("memory.SEARCH_CHUNK", 4096 * 100)  # several chunks of 100 queries
    fast = _nearest(queries, keys, k, fast=True)
    assert same(fast, exact) >= 0.99
    scores = (queries.double().unsqueeze(1) * keys[fast].double()).sum(-1)  # most similar first, up to fp32 rounding
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-6).all()


@pytest.mark.parametrize("n", [1000, 4096 + 7, 20000])
def test_group_max_prefilter_finds_the_topk_columns(n):
    """_top_columns returns the columns of each row's largest scores, as topk does, with and without leftover
    columns past the last whole group, and for rows too narrow for the prefilter."""
    from memory import _top_columns

    g = torch.Generator().manual_seed(n)
    scores = torch.randn(37, n, generator=g)
    scores[:5, -3:] += 10  # some of the best columns in the leftover part (n mod group)
    scores[5:9, :64] += 10  # and rows whose best columns crowd into two groups
    for length in (1, 8, 64):
        columns = _top_columns(scores, length, 32)
        assert columns.shape == (37, length)
        expected = scores.topk(length, dim=1).indices
        assert torch.equal(columns.sort(1).values, expected.sort(1).values)


def test_fast_search_with_the_prefilter_matches_the_exact_one(monkeypatch):
    """A search pool wide enough for the prefilter (more than 2 x SHORTLIST groups) gives the same neighbours."""
    from memory import _nearest

    monkeypatch.setattr("memory.SHORTLIST", 16)
    memory = concentrated_memory(6000, 32, seed=3)
    queries, keys = memory[:200], memory[200:]  # 5800 keys: 181 groups of 32 > 2 x 16
    exact = (queries.double() @ keys.double().T).topk(4, dim=1).indices
    fast = _nearest(queries, keys, 4, fast=True)
    assert (fast.sort(1).values == exact.sort(1).values).all(1).float().mean() >= 0.99
