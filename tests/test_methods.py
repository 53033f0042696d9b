"""The baselines beside SOP (methods.py): each loss against a loop written from the official losses' equations, the
centres, the random partitions (also across two gloo ranks), the frozen prototypes, flags, resume."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import methods
import train
from conftest import TINY
from memory import all_gather_rows
from model import NetworkOutput as Out
from model import masked_tokens

SIZES = {"num_prototypes": "64", "partition_size": "16"}


def tiny_for(method):
    """TINY without the flags the method ignores, plus small sizes for the ones it reads."""
    flags, i = [], 0
    while i < len(TINY):
        name, j = TINY[i][2:], i + 1
        while j < len(TINY) and not TINY[j].startswith("--"):
            j += 1
        if name not in methods.METHOD_FIELDS or name in methods.FIELDS[method]:
            flags += TINY[i:j]
        i = j
    extra = [[f"--{k}", v] for k, v in SIZES.items() if k in methods.FIELDS[method]]
    return flags + ["--method", method] + sum(extra, [])


def config(method, *flags):
    return train.parse_config(tiny_for(method) + list(flags))


def views(x, B):
    return [x[i * B:(i + 1) * B] for i in range(x.shape[0] // B)]


# ----------------------------------------------------------------------------------------- reference matches
def reference_ibot(s_cls, s_patch, t_cls, t_patch, masks, c, c2, tau_s, tau_t, B, lam1=1.0, lam2=1.0):
    """Loop form of bytedance/ibot main_ibot.py iBOTLoss.forward."""
    T = [F.softmax((t - c) / tau_t, -1) for t in views(t_cls, B)]
    Tp = [F.softmax((t - c2) / tau_t, -1) for t in views(t_patch, B)]
    S = [F.log_softmax(s / tau_s, -1) for s in views(s_cls, B)]
    Sp = [F.log_softmax(s / tau_s, -1) for s in views(s_patch, B)]
    M = views(masks, B)
    total_cls, n1, total_mim, n2 = 0.0, 0, 0.0, 0
    for q in range(2):
        for v in range(len(S)):
            if v == q:
                term = 0.0
                for b in range(B):
                    ce = [-(Tp[q][b, p] * Sp[v][b, p]).sum() for p in range(masks.shape[1]) if M[v][b, p]]
                    term += sum(ce) / max(len(ce), 1)
                total_mim, n2 = total_mim + term / B, n2 + 1
            else:
                total_cls, n1 = total_cls + sum(-(T[q][b] * S[v][b]).sum() for b in range(B)) / B, n1 + 1
    return lam1 * total_cls / n1 + lam2 * total_mim / n2, total_cls / n1, total_mim / n2


def test_ibot_and_dino_losses_match_loop_reference():
    torch.manual_seed(0)
    B, V, P, K = 3, 4, 5, 7
    s_cls, t_cls = torch.randn(V * B, K), torch.randn(2 * B, K)
    s_patch, t_patch = torch.randn(2 * B, P, K), torch.randn(2 * B, P, K)
    masks = torch.rand(2 * B, P) < 0.5
    masks[0] = False  # an image without a masked patch gives 0 and still counts
    cfg = train.Config(method="ibot", num_prototypes=K, student_temp=0.1, cls_loss_weight=0.7, patch_loss_weight=1.3)
    ibot = methods.IBOT(cfg)
    ibot.centers.cls.normal_()
    ibot.centers.patch.normal_()
    tokens = masked_tokens(masks, 2 * B * P)  # padded with every unmasked token: they must count nothing
    out = ibot.loss(Out(None, None, s_cls, s_patch.flatten(0, 1)[tokens.index]),
                    Out(None, None, t_cls, t_patch.flatten(0, 1)), tokens, 0.05, None)  # the teacher: every patch
    ref = reference_ibot(s_cls, s_patch, t_cls, t_patch, masks, ibot.centers.cls, ibot.centers.patch, 0.1, 0.05, B,
                         0.7, 1.3)
    for a, b in zip((out[0], out[1]["loss_cls"], out[1]["loss_patch"]), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    dino = methods.DINO(train.Config(method="dino", num_prototypes=K))
    dino.centers.cls.normal_()
    loss = dino.loss(Out(None, None, s_cls, None), Out(None, None, t_cls, None), None, 0.05, None)[0]
    T = [F.softmax((t - dino.centers.cls) / 0.05, -1) for t in views(t_cls, B)]
    S = [F.log_softmax(s / 0.1, -1) for s in views(s_cls, B)]
    terms = [-(T[q] * S[v]).sum(-1).mean() for q in range(2) for v in range(V) if v != q]  # dino DINOLoss
    torch.testing.assert_close(loss, sum(terms) / len(terms), rtol=1e-5, atol=1e-5)


def test_massl_loss_matches_loop_reference():
    torch.manual_seed(0)
    B, V, d, Q, NB = 2, 3, 8, 12, 4
    cfg = train.Config(method="massl", class_memory_size=Q, partition_size=NB, bottleneck_dim=d)
    massl = methods.MaSSL(cfg)
    s, t = F.normalize(torch.randn(V * B, d), dim=1), F.normalize(torch.randn(2 * B, d), dim=1)
    loss = massl.loss(Out(s, None), Out(t, None), None, 0.05, torch.Generator().manual_seed(3))[0]
    idx = methods.random_blocks(Q, NB, torch.Generator().manual_seed(3))
    mem = massl.class_memory.memory
    total, pairs = 0.0, 0
    for j in range(2):  # teacher view (sthalles/MaSSL criterion.py)
        for i in range(V):  # student view
            if i == j:
                continue
            ce = 0.0
            for k in range(Q // NB):
                for b in range(B):
                    block = mem[idx[k]]  # (NB, d)
                    q = F.softmax(block @ t[j * B + b] / 0.05, -1)
                    log_p = F.log_softmax(block @ s[i * B + b] / 0.1, -1)
                    ce += -(q * log_p).sum()
            total, pairs = total + ce / (B * Q // NB), pairs + 1
    torch.testing.assert_close(loss, total / pairs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cosine", [True, False])
def test_carp_loss_matches_loop_reference(cosine):
    torch.manual_seed(0)
    B, V, K, NB = 2, 3, 12, 4
    cfg = train.Config(method="carp", num_prototypes=K, partition_size=NB, carp_cosine=cosine)
    s, t = torch.randn(V * B, K), torch.randn(2 * B, K)
    loss, stats = methods.CARP(cfg).loss(Out(None, None, s, None), Out(None, None, t, None), None, 0.05,
                                               torch.Generator().manual_seed(5))
    consistency = stats["loss_cls"]
    idx = methods.random_blocks(K, NB, torch.Generator().manual_seed(5))
    tau_s, tau_t = (0.1, 0.05) if cosine else (1.0, 1.0)
    eps = torch.finfo(torch.float32).eps
    P = [[F.softmax(s[n, idx[k]] / tau_s, -1) for k in range(K // NB)] for n in range(V * B)]
    Qs = [[F.softmax(t[n, idx[k]] / tau_t, -1) for k in range(K // NB)] for n in range(2 * B)]
    terms = []
    for j in range(2):  # sthalles/carp modules/carp_loss.py: consistency
        for i in range(V):
            if i != j:
                terms.append(sum(-(P[i * B + b][k] * Qs[j * B + b][k]).sum().clamp(eps, 1 - eps).log()
                                 for b in range(B) for k in range(K // NB)) / (B * K // NB))
    ref_consistency = sum(terms) / len(terms)
    uniformity = 0.0
    for k in range(K // NB):  # uniformity: KL(batch-mean assignment || uniform), mean over blocks
        mean = sum(row[k] for row in P + Qs) / len(P + Qs)
        uniformity += math.log(NB) + (mean * mean.clamp(eps, 1 - eps).log()).sum()
    torch.testing.assert_close(consistency, ref_consistency, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_consistency + uniformity / (K // NB), rtol=1e-5, atol=1e-5)


def test_losses_near_their_analytic_value_at_initialisation():
    torch.manual_seed(0)
    d, B, K, NB = 256, 64, 4096, 512
    s, t = F.normalize(torch.randn(4 * B, d), dim=1), F.normalize(torch.randn(2 * B, d), dim=1)
    layer = methods.PrototypeLayer(d, K)
    # Student logits are cosines (variance 1/d) over tau_s = 0.1; the teacher's q is independent of them, so
    # E[H(q, p)] = E[logsumexp] ~ log K + 1 / (2 d tau_s^2) (a log-normal sum).
    excess = 1 / (2 * d * 0.1 ** 2)
    for method in ("ibot", "dino"):  # near-uniform distributions over K prototypes: about log K
        m = methods.METHODS[method](train.Config(method=method, num_prototypes=K))
        logits_s, logits_t = layer(s), layer(t)
        out = m.loss(Out(s, None, logits_s, logits_s[:2 * B]), Out(t, None, logits_t, logits_t),
                     masked_tokens(torch.ones(2 * B, 1, dtype=torch.bool), 2 * B), 0.04, None)
        stats = out[1]
        assert stats["loss_cls"].item() == pytest.approx(math.log(K) + excess, rel=0.01), method
        assert stats["teacher_entropy"].item() == pytest.approx(math.log(K), rel=0.03)  # far from collapse
        assert stats["teacher_image_entropy"].item() <= stats["teacher_entropy"].item() + 1e-4  # at most the mean's
    massl = methods.MaSSL(train.Config(method="massl", class_memory_size=K, partition_size=NB, bottleneck_dim=d))
    loss = massl.loss(Out(s, None), Out(t, None), None, 0.04, torch.Generator().manual_seed(0))[0]
    assert loss.item() == pytest.approx(math.log(NB) + excess, rel=0.01)  # within each block: about log NB
    carp = methods.CARP(train.Config(method="carp", num_prototypes=K, partition_size=NB))
    loss, stats = carp.loss(Out(s, None, layer(s), None), Out(t, None, layer(t), None), None, 0.04,
                                  torch.Generator().manual_seed(0))
    consistency = stats["loss_cls"]
    assert consistency.item() == pytest.approx(math.log(NB), rel=0.03)  # -log P(same prototype) ~ log NB
    assert 0 <= (loss - consistency).item() < 0.05  # uniformity: the batch mean is near uniform


# ----------------------------------------------------------------------------------------- state and partitions
def test_center_update_equals_formula():
    torch.manual_seed(0)
    centers = methods.Centers(6, patch=True, momentum=0.9)
    c0, c20 = torch.randn(1, 6), torch.randn(1, 1, 6)
    centers.cls.copy_(c0)
    centers.patch.copy_(c20)
    t_cls, t_patch = torch.randn(8, 6), torch.randn(8, 5, 6)
    centers.update(t_cls, t_patch)
    torch.testing.assert_close(centers.cls, 0.9 * c0 + 0.1 * t_cls.mean(0, keepdim=True))
    torch.testing.assert_close(centers.patch, 0.9 * c20 + 0.1 * t_patch.mean(1).mean(0).view(1, 1, 6))


def test_random_blocks_partition_every_row_once_and_change_per_step():
    gens = [torch.Generator().manual_seed(train.seed_for(0, step, 3)) for step in (0, 0, 1)]
    a, b, c = (methods.random_blocks(24, 6, g) for g in gens)
    assert a.shape == (4, 6) and torch.equal(a.flatten().sort().values, torch.arange(24))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different local batches on the two ranks
    t_cls, t_patch = torch.randn(4, 6), torch.randn(4, 3, 6)
    centers = methods.Centers(6, patch=True, momentum=0.9)
    centers.update(t_cls, t_patch)
    blocks = [methods.random_blocks(24, 6, torch.Generator().manual_seed(train.seed_for(0, s, 3))) for s in (7, 8)]
    # CARP's uniformity gathers the rows of both ranks, with gradient (sthalles/carp modules/carp_loss.py)
    cfg = train.Config(method="carp", num_prototypes=8, partition_size=4)
    s, t = torch.randn(6, 8, requires_grad=True), torch.randn(4, 8)  # V = 3 student views, 2 teacher views, B = 2
    loss, stats = methods.CARP(cfg).loss(Out(None, None, s, None), Out(None, None, t, None), None, 0.05,
                                               torch.Generator().manual_seed(0))
    consistency = stats["loss_cls"]
    (loss - consistency).backward()
    # SOP's memories: embeddings and dataset indices of both ranks in one all_gather, indices bit for bit
    rows, index = torch.randn(4, 6), torch.arange(4) + 2 ** 53 + 3 + 10 * rank  # not exact as floats
    gathered = all_gather_rows(rows, index)
    torch.save({"rows": rows, "index": index, "gathered": gathered,
                "cls": centers.cls, "patch": centers.patch, "t_cls": t_cls, "t_patch": t_patch, "blocks": blocks,
                "s": s.detach(), "t": t, "uniformity": (loss - consistency).detach(), "grad": s.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_same_centres_partitions_and_gathered_uniformity(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in ("cls", "patch"):
        assert torch.equal(r0[key], r1[key]), key
    for r in (r0, r1):  # rank order, exact, the same on both ranks
        assert torch.equal(r["gathered"][0], torch.cat((r0["rows"], r1["rows"])))
        index = torch.cat((r0["index"], r1["index"]))
        assert r["gathered"][1].dtype == torch.int64 and torch.equal(r["gathered"][1], index)
    torch.testing.assert_close(r0["uniformity"], r1["uniformity"])  # loss - consistency: rounding differs
    assert all(torch.equal(a, b) for a, b in zip(r0["blocks"], r1["blocks"]))
    assert not torch.equal(*r0["blocks"])  # a new partition every step
    t_cls, t_patch = torch.cat((r0["t_cls"], r1["t_cls"])), torch.cat((r0["t_patch"], r1["t_patch"]))
    torch.testing.assert_close(r0["cls"], 0.1 * t_cls.mean(0, keepdim=True))  # from zero: 0.1 x the global mean
    torch.testing.assert_close(r0["patch"], 0.1 * t_patch.mean(1).mean(0).view(1, 1, 6))
    # The gathered term equals the term over both ranks' rows in one process; each rank's gradient is W x the
    # global term's gradient for its rows (summed backward), which DDP's averaging turns into the global gradient.
    idx = methods.random_blocks(8, 4, torch.Generator().manual_seed(0))
    s = torch.cat((r0["s"], r1["s"])).requires_grad_()
    rows = torch.cat([(s / 0.1)[:, idx].softmax(-1)] + [(r["t"] / 0.05)[:, idx].softmax(-1) for r in (r0, r1)])
    mean = rows.mean(0)
    uniformity = (math.log(4) + (mean * mean.log()).sum(-1)).mean()
    torch.testing.assert_close(r0["uniformity"], uniformity.detach())
    uniformity.backward()
    torch.testing.assert_close(torch.cat((r0["grad"], r1["grad"])), 2 * s.grad)


# ----------------------------------------------------------------------------------------- training steps
@pytest.mark.parametrize("method", ["ibot", "dino", "massl", "carp"])
def test_step_gradients_only_reach_the_student(method):
    """One step: finite stats; teacher and memory get no gradient; iBOT/DINO's prototypes frozen in epoch 0 only."""
    trainer = train.Trainer(config(method, "--warmup_epochs", "0"), torch.device("cpu"), 1, steps_per_epoch=4)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    protos = [p for n, p in trainer.student.named_parameters() if "prototypes" in n]
    assert len(protos) == (0 if method == "massl" else 1)
    before = [p.detach().clone() for p in protos]
    stats = trainer.train_step(images, 0)
    assert stats.shape == (len(trainer.stat_names),) and torch.isfinite(stats).all()
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert not any(b.requires_grad for b in trainer.method.buffers())
    frozen = method in ("ibot", "dino")
    assert all((p.grad is None) == frozen and torch.equal(a, p) == frozen for a, p in zip(before, protos))
    trainer.train_step(images, 4)  # epoch 1: the prototype layer learns
    assert all(p.grad is not None and p.grad.abs().sum() > 0 and not torch.equal(a, p) for a, p in zip(before, protos))


@pytest.mark.parametrize("method", ["sop", "ibot"])
def test_mim_weight_zero_skips_patch_work_and_keeps_the_trajectory(method, monkeypatch):
    """--patch_loss_weight 0: patch tokens skip the head and nothing patch-level is computed, yet three steps end
    where the full computation (patch embeddings, logits and the weight-0 loss) ends; loss_patch logs 0."""
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    cfg = config(method, "--patch_loss_weight", "0", "--warmup_epochs", "0")

    def run():
        trainer = train.Trainer(cfg, torch.device("cpu"), 1, steps_per_epoch=4)
        stats = torch.stack([trainer.train_step(images, s) for s in range(3)])
        return trainer, stats
    skipped, stats = run()
    assert all(out is None for out in skipped.teacher(images[:2].float())[1::2])  # patch and its logits
    assert (stats[:, 2] == 0).all() and torch.isfinite(stats).all()
    monkeypatch.setattr(methods, "uses_patch_tokens", lambda cfg: True)  # the computation before this change
    full, full_stats = run()
    assert full.teacher(images[:2].float())[1] is not None and (full_stats[:, 2] > 0).all()
    torch.testing.assert_close(stats[:, :2], full_stats[:, :2])
    for a, b in zip(skipped.student.state_dict().values(), full.student.state_dict().values()):
        torch.testing.assert_close(a, b)
    full_state = full.method.state_dict()
    for name, value in skipped.method.state_dict().items():  # class memory, [CLS] centre; the patch ones go unused
        if "patch" not in name:
            torch.testing.assert_close(value, full_state[name])


@pytest.mark.parametrize("method", ["dino", "massl", "carp"])
def test_methods_without_patch_loss_send_only_cls_through_the_head(method):
    net = train.Trainer(config(method), torch.device("cpu"), 1, steps_per_epoch=4).teacher
    assert not methods.uses_patch_tokens(config(method)) and not net.patch_tokens
    assert net(torch.rand(2, 3, 16, 16))[1] is None


def test_separate_patch_layer_and_learnable_gain_out_of_weight_decay():
    trainer = train.Trainer(config("ibot", "--shared_head", "false", "--norm_last_layer", "false"),
                            torch.device("cpu"), 1, steps_per_epoch=4)
    params = dict(trainer.student.named_parameters())
    assert {"head.prototypes.weight", "head.prototypes.gain", "head.patch_prototypes.weight"} <= set(params)
    assert set(trainer.teacher.state_dict()) >= {"head.prototypes.gain", "head.patch_prototypes.weight"}
    no_decay = trainer.optimizer.param_groups[1]["params"]
    assert any(p is params["head.prototypes.gain"] for p in no_decay)  # official: weight_g decayed (README)
    assert not any(p is params["head.prototypes.weight"] for p in no_decay)
    assert len(trainer.frozen_params) == 4  # both layers: weights and gains
    crops = torch.rand(4, 3, 16, 16)
    cls, patch, cls_logits, patch_logits = trainer.student(crops)
    torch.testing.assert_close(patch_logits, trainer.student.head.patch_prototypes(patch))
    torch.testing.assert_close(cls_logits, trainer.student.head.prototypes(cls))


@pytest.mark.parametrize("flags,message", [
    (["--method", "simclr"], "--method 'simclr': valid: sop, ibot, dino, massl, carp"),
    (["--method", "dino", "--class_anchors", "512"], "--class_anchors 512 has no meaning for --method dino"),
    (["--method", "sop", "--num_prototypes", "128"], "--num_prototypes 128 has no meaning for --method sop"),
    (["--method", "carp", "--num_prototypes", "64", "--partition_size", "24"],
     "--partition_size 24: must be >= 2 and divide --num_prototypes 64"),
    (["--method", "massl", "--partition_size", "1"], "--partition_size 1: must be >= 2 and divide"),
    (["--method", "massl", "--partition_size", "512"], "divide --class_memory_size 256"),
])
def test_method_flags_give_one_clear_error(flags, message):
    base = [f for f in TINY]
    for name in ("--class_anchors", "--class_neighbors", "--class_draws", "--patch_anchors", "--patch_memory_size"):
        i = base.index(name)
        del base[i:i + 2]
    if flags[1] != "sop":
        i = base.index("--class_memory_size")
        if flags[1] != "massl":
            del base[i:i + 2]
    with pytest.raises(SystemExit) as info:
        train.main(base + flags)
    text = str(info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text, text


def test_presets_do_not_count_as_flags_and_sizes_default_per_method():
    cfg = train.parse_config(["--preset", "cpu_demo", "--method", "dino"])  # the preset sets SOP's class_anchors
    assert cfg.method == "dino" and cfg.num_prototypes == 2048
    assert train.parse_config(["--method", "dino", "--class_anchors", "4096"]).class_anchors == 4096  # = default
    assert train.parse_config(["--method", "dino"]).num_prototypes == 65536
    assert train.parse_config(["--method", "ibot"]).num_prototypes == 8192
    assert train.parse_config(["--method", "massl"]).partition_size == 65536 // 8


@pytest.mark.parametrize("method", ["ibot", "dino", "massl", "carp"])
def test_resume_equals_uninterrupted(tmp_path, method):
    flags = tiny_for(method) + ["--knn_every", "0", "--epochs", "1", "--warmup_epochs", "0", "--log_every", "2",
                                "--synthetic_size", "256"]
    if method in ("ibot", "dino"):
        flags += ["--freeze_last_layer", "0"]  # so that the prototype layer's optimizer state is compared too
    whole = train.main(flags + ["--output_dir", str(tmp_path / "a")])
    train.main(flags + ["--output_dir", str(tmp_path / "b"), "--max_steps", "3"])
    resumed = train.main(flags + ["--output_dir", str(tmp_path / "b")])
    assert resumed.step == whole.step == 8
    a, b = whole.state_dict(), resumed.state_dict()
    for part in ("student", "teacher", *dict(whole.method.named_children())):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


# ----------------------------------------------------------------------------------------- diagnostics
def test_distribution_stats_tell_the_two_collapses_apart():
    M, n = 16, 32
    s = torch.randn(2 * n, M).log_softmax(-1)
    for name, q in (("one-hot", F.one_hot(torch.zeros(n, dtype=torch.long), M).float()),
                    ("uniform", torch.full((n, M), 1.0 / M)),
                    ("healthy", F.one_hot(torch.arange(n) % M, M).float() * 0.9 + 0.1 / M)):
        ce = -(q.repeat(2, 1) * s).sum(-1).mean()
        stats = methods.distribution_stats(q, ce)
        kl = (q.repeat(2, 1) * (q.repeat(2, 1).clamp_min(1e-12).log() - s)).sum(-1).mean()  # KL(q || p) directly
        torch.testing.assert_close(stats["kl_teacher_student"], kl, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats["effective_prototypes"], stats["teacher_entropy"].exp())
        of_mean, per_image = stats["teacher_entropy"].item(), stats["teacher_image_entropy"].item()
        if name == "one-hot":
            assert of_mean < 1e-5 and per_image < 1e-5
        elif name == "uniform":
            assert of_mean == pytest.approx(math.log(M)) and per_image == pytest.approx(math.log(M))
        else:
            assert of_mean == pytest.approx(math.log(M), rel=1e-4) and per_image < 0.5 * of_mean


def test_distinct_prototypes_merge_near_duplicates_only():
    torch.manual_seed(0)
    base = F.normalize(torch.randn(6, 32), dim=1)  # random directions in 32 dims: pairwise cosines far below 0.9
    near = F.normalize(base[:2] + 0.05 * torch.randn(2, 32), dim=1)  # cosine ~0.96 to rows 0 and 1
    far = F.normalize(base[2:3] + 0.8 * torch.randn(1, 32), dim=1)  # cosine ~0.6 to row 2: distinct
    vectors = torch.cat((base, near, far, base[3:4]))  # 10 rows: two near-duplicates and one exact copy
    assert methods.distinct_prototypes(vectors).item() == 7
    assert methods.distinct_prototypes(vectors, chunk=3).item() == 7  # chunking changes nothing
    assert methods.distinct_prototypes(vectors, threshold=0.999).item() == 9  # only the exact copy merges


@pytest.mark.parametrize("method", ["sop", "ibot", "dino", "massl", "carp"])
def test_every_method_logs_its_stats(method):
    trainer = train.Trainer(config(method), torch.device("cpu"), 1, steps_per_epoch=4)
    stats = dict(zip(trainer.stat_names, trainer.train_step(torch.randint(0, 256, (8, 3, 16, 16),
                                                                          dtype=torch.uint8), 0).tolist()))
    assert list(stats)[:3] == ["loss", "loss_cls", "loss_patch"] and list(stats)[-1] == "teacher_cls_std"
    assert ("se_age" in stats) == (method in ("sop", "massl"))
    assert stats["kl_teacher_student"] >= -1e-4  # a KL
    cfg = trainer.cfg
    targets = {"sop": cfg.class_anchors, "massl": cfg.partition_size, "carp": cfg.partition_size}
    assert 1 <= stats["effective_prototypes"] <= targets.get(method, cfg.num_prototypes) * (1 + 1e-5)
    if method == "sop":  # one draw over a memory of random rows, first step: every SE is as old as the run
        assert stats["se_age"] == 1.0 and 0 < stats["se_distinct_rows"] <= trainer.cfg.class_anchors * (
            trainer.cfg.class_neighbors + 1)
    vectors = trainer.method.prototype_vectors(trainer.teacher)
    assert 0 < methods.distinct_prototypes(vectors).item() <= vectors.shape[0]
