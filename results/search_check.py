"""Two questions about SOP's neighbour search (memory._nearest), answered by measurement:

1. `--checkpoint CKPT`: does the exact fp32 re-rank change anything a user can see? On the class memory of a
   trained train.py checkpoint, SOPs are drawn twice with the same anchors: once with the project's neighbours
   (exact fp32 scores; on a GPU the bf16 shortlist re-ranked in fp32 finds the same ones for >= 97 % of anchors)
   and once with the official code's autocast search (scores rounded to bf16, then top k). Printed: the share of
   anchors whose neighbour set differs, the mean change of a vote weight, and how far apart the two draws put the
   SOP probabilities of 2048 memory rows at the teacher and the student temperature of the checkpoint's config
   (KL and total variation), and the SOP loss between the two temperatures under each draw, beside the same loss
   under a draw with other anchors (the change from one step to the next that every run has anyway).
2. `--time`: the search's device time at the ImageNet draw (4096 anchors, 61440 keys, d = 256), with and without
   the group-max prefilter and by the exact fp32 path, and the fp32 re-rank of one chunk as a batched product and
   element-wise, for the GPU (on a CPU the numbers say little).

    python results/search_check.py --checkpoint runs/fmnist_compare/sop-seed0/checkpoint.pth
    python results/search_check.py --time          # on a GPU (results/gpu_check.sh runs it)
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import losses  # noqa: E402
import memory  # noqa: E402

PREFILTER_GROUP = memory.PREFILTER_GROUP


def autocast_search(queries, keys, k, fast=None):
    """The official search under bf16 autocast: bf16 scores, top k of the rounded values."""
    return (queries.bfloat16() @ keys.bfloat16().T).topk(k, dim=1).indices


def compare(probs_a: torch.Tensor, probs_b: torch.Tensor) -> dict:
    log_a, log_b = probs_a.clamp_min(1e-30).log(), probs_b.clamp_min(1e-30).log()
    return dict(kl=(probs_a * (log_a - log_b)).sum(1).mean().item(),
                total_variation=0.5 * (probs_a - probs_b).abs().sum(1).mean().item())


def check_rerank(path: str, seed: int) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    cfg = checkpoint["config"]
    bank = memory.MemoryBank(*checkpoint["class_memory"]["memory"].shape)
    bank.load_state_dict(checkpoint["class_memory"])
    M, k = cfg["class_anchors"], cfg["class_neighbors"]
    draw = lambda s: bank.draw(M, k, cfg["smoothing"], torch.Generator().manual_seed(s))  # noqa: E731
    exact = draw(seed)
    original = memory._nearest
    memory._nearest = autocast_search
    try:
        rounded = draw(seed)  # the same anchors (same generator), neighbours from bf16 scores
    finally:
        memory._nearest = original
    other = draw(seed + 1)  # other anchors: the change from one step to the next
    views = bank.memory[torch.randperm(bank.memory.shape[0], generator=torch.Generator().manual_seed(seed))[:2048]]
    same_set = (exact.rows.sort(1).values == rounded.rows.sort(1).values).all(1)
    result = dict(checkpoint=path, memory_rows=bank.memory.shape[0], anchors=M, neighbors=k,
                  anchors_with_other_neighbours=1 - same_set.float().mean().item(),
                  mean_vote_change=(exact.weights - rounded.weights).abs().mean().item(),
                  mean_neighbour_vote=exact.weights[:, 1:].mean().item())
    for name, tau in (("teacher", cfg["teacher_temp"]), ("student", cfg["student_temp"])):
        result[f"P at {name} temperature {tau}: autocast search vs exact"] = compare(
            exact.probabilities(views, tau), rounded.probabilities(views, tau))
    for name, sops in (("exact neighbours", exact), ("autocast-search neighbours", rounded), ("other anchors", other)):
        result[f"SOP loss (teacher vs student temperature), {name}"] = losses.sop_loss(
            sops.probabilities(views, cfg["student_temp"]).repeat(2, 1),
            sops.probabilities(views, cfg["teacher_temp"]).repeat(2, 1)).item()
    return result


def best_ms(fn, device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` timed calls of fn after 2 untimed ones, in ms (bench.timed: synchronised on a GPU)."""
    return round(1000 * min(bench.timed(fn, repeats + 2, device)[2:]), 3)


def time_search(device: torch.device, repeats: int) -> dict:
    g = torch.Generator(device).manual_seed(0)
    keys = F.normalize(torch.randn(65536 - 4096, 256, device=device, generator=g), dim=1)
    queries = F.normalize(torch.randn(4096, 256, device=device, generator=g), dim=1)
    result = {}
    for name, fast, group in (("fast, prefilter", True, PREFILTER_GROUP), ("fast, plain top-k", True, 0),
                              ("exact fp32", False, 0)):
        memory.PREFILTER_GROUP = group
        result[name + " (ms per draw)"] = best_ms(lambda: memory._nearest(queries, keys, 8, fast=fast), device, repeats)
    memory.PREFILTER_GROUP = PREFILTER_GROUP
    # the fp32 re-rank of one chunk's shortlist: memory._nearest's batched product against the element-wise form
    rows = memory.SEARCH_CHUNK // keys.shape[0]
    q, shortlist = queries[:rows], torch.randint(keys.shape[0], (rows, memory.SHORTLIST), device=device, generator=g)
    for name, rerank in (("re-rank, bmm", lambda: torch.bmm(keys[shortlist], q.unsqueeze(2)).squeeze(2)),
                         ("re-rank, element-wise", lambda: (keys[shortlist] * q.unsqueeze(1)).sum(-1))):
        result[f"{name} ({rows} anchors, ms)"] = best_ms(rerank, device, repeats)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not args.checkpoint and not args.time:
        raise SystemExit("error: give --checkpoint CKPT and/or --time")
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats {args.repeats}: valid: 1 or more")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file")
    if args.checkpoint:
        print(json.dumps(check_rerank(args.checkpoint, args.seed), indent=1), flush=True)
    if args.time:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps({"device": str(device), **time_search(device, args.repeats)}, indent=1))


if __name__ == "__main__":
    main()
