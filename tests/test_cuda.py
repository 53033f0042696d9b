"""Checks that need a GPU: bf16 and fp16 training, fp32 SOP probabilities under autocast, the fast
neighbour search on real teacher embeddings, torch.compile. Skipped where CUDA is absent (CI, the CPU machines).

    SOP_TEST_DEVICE=cpu python -m pytest -s tests/test_cuda.py   # the same checks on the CPU (smaller, slower)

runs them on the CPU, with CPU autocast, to debug them before a GPU session; `-s` shows the measured agreements.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import train
from memory import MemoryBank, _nearest

DEVICE = os.environ.get("SOP_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="needs CUDA (SOP_TEST_DEVICE=cpu runs these on the CPU)")

# The cifar preset's shapes (32 px, patch 4, 16 px local crops) with a narrower ViT; smaller still on the CPU.
SIZE = (["--embed_dim", "192", "--depth", "6", "--num_heads", "3", "--batch_size_per_gpu", "128"] if DEVICE == "cuda"
        else ["--embed_dim", "48", "--depth", "2", "--num_heads", "2", "--batch_size_per_gpu", "32",
              "--head_hidden_dim", "256"])
SMALL_CIFAR = ["--preset", "cifar", "--dataset", "synthetic", "--arch", "custom", *SIZE, "--local_crops_number", "4",
               "--class_memory_size", "4096", "--patch_memory_size", "1024", "--class_anchors", "512",
               "--epochs", "10", "--device", DEVICE or "cpu"]


def make_trainer(precision: str, *flags: str) -> train.Trainer:
    cfg = train.parse_config(SMALL_CIFAR + ["--precision", precision, *flags])
    return train.Trainer(cfg, torch.device(DEVICE), world=1, steps_per_epoch=100)


def run_steps(trainer: train.Trainer, steps: int, first: int = 0) -> torch.Tensor:
    """(steps, 5) statistics of `steps` steps over 2048 synthetic images, a new batch each step."""
    B = trainer.cfg.batch_size_per_gpu
    images = train.data.load_dataset("synthetic", "", "train", size=2048).images.to(DEVICE)
    return torch.stack([trainer.train_step(images[(s * B) % 2048:][:B], s) for s in range(first, first + steps)])


@pytest.fixture(scope="module")
def trained() -> train.Trainer:
    """A bf16 run of 300 steps: its memories hold real teacher embeddings (the class memory refilled ~8 times)."""
    trainer = make_trainer("bf16")
    assert torch.isfinite(run_steps(trainer, 300)).all()
    return trainer


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fifty_steps_stay_finite_with_unit_norm_memories(precision):
    trainer = make_trainer(precision)
    stats = run_steps(trainer, 50)
    assert torch.isfinite(stats).all(), f"non-finite statistics at steps {(~torch.isfinite(stats)).nonzero()}"
    if precision == "fp16":
        assert math.isfinite(trainer.scaler.get_scale()) and trainer.scaler.get_scale() > 0
    for bank in (trainer.method.class_memory, trainer.method.patch_memory):
        assert (bank.memory.norm(dim=1) - 1).abs().max() < 1e-3


def test_sop_probabilities_from_bf16_embeddings_equal_the_fp32_result(trained):
    sops = trained.method.class_memory.draw(512, 8, 0.1, torch.Generator(DEVICE).manual_seed(0))
    images = train.data.load_dataset("synthetic", "", "test", size=256).images.to(DEVICE)
    crops, _ = trained.augment(images, torch.Generator(DEVICE).manual_seed(1))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with torch.no_grad():
            u = trained.teacher(crops)[0].to(torch.bfloat16)  # (2B, d) teacher [CLS] embeddings, bf16
        p = sops.probabilities(u, 0.04)
    assert p.dtype == torch.float32
    Y = sops.vote_matrix().double()  # the paper's P(u) = softmax(u D^T / tau) Y, in fp64
    reference = (u.double() @ sops.support.double().T / 0.04).softmax(-1) @ Y
    assert (p.double() - reference).abs().max() < 1e-4


def test_fast_neighbour_search_agrees_with_fp32_on_real_teacher_embeddings(trained, monkeypatch):
    if DEVICE == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # a true fp32 reference
    memory = trained.method.class_memory.memory
    perm = torch.randperm(len(memory), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    queries, keys, k = memory[perm[:512]], memory[perm[512:]], 8
    fast = _nearest(queries, keys, k, fast=True)
    fp32 = _nearest(queries, keys, k, fast=False)
    fp64 = (queries.double() @ keys.double().T).topk(k, dim=1).indices
    bf16_scores = (queries.bfloat16() @ keys.bfloat16().T).float().topk(k, dim=1).indices  # rounded scores

    def agree(a, b):
        return (a.sort(1).values == b.sort(1).values).all(1).float().mean().item()
    top = (queries @ keys.T).topk(k + 1, dim=1).values
    print(f"\nreal memory: mean top-1 cosine {top[:, 0].mean():.6f}, median k-th minus (k+1)-th "
          f"{(top[:, k - 1] - top[:, k]).median():.2e}; anchors with the fp32 top k: fast search "
          f"{agree(fast, fp32):.4f}, bf16 scores {agree(bf16_scores, fp32):.4f}; with the fp64 top k: fast "
          f"{agree(fast, fp64):.4f}, fp32 {agree(fp32, fp64):.4f}")
    # Where fp32 itself misses near-ties of fp64, the fast search must be at least as exact as fp32.
    assert agree(fast, fp32) >= 0.99 or agree(fast, fp64) >= agree(fp32, fp64)


def test_compile_matches_eager_and_does_not_recompile_after_the_first_steps():
    eager, compiled = make_trainer("bf16"), make_trainer("bf16", "--compile", "true")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    first_eager, first_compiled = run_steps(eager, 1), run_steps(compiled, 1)
    # Losses of the same first step (same weights, crops, masks, anchors) agree within bf16 tolerance.
    assert torch.allclose(first_compiled[0, :3], first_eager[0, :3], rtol=2e-2, atol=1e-3)
    run_steps(compiled, 2, first=1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"\ncompiled graphs after 3 steps: {graphs}")
    assert graphs <= 4  # the student (global + local crops in one call) and the teacher, a graph break each at most
    with torch.compiler.set_stance("fail_on_recompile"):  # steady state: any recompilation raises
        assert torch.isfinite(run_steps(compiled, 3, first=3)).all()
