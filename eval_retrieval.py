"""Image retrieval with a frozen backbone: class-level ranking metrics, and the revisited Oxford / Paris protocol.

Features are the teacher's final-normed [CLS] token, L2-normalised; images are ranked by cosine similarity.

Class-level retrieval (any dataset of data.py): every test image queries the training split. A database image is
relevant when it has the query's class. Reported: mAP@R (R = the number of relevant database images; the mean over
the first R ranks of precision at each relevant rank, divided by R), mAP over the full ranking, and recall@k (the
share of queries with at least one relevant image among the first k). Queries go in chunks, so no
queries x database matrix is ever held whole.

Revisited Oxford 5k / Paris 6k (the paper's retrieval benchmark, protocol of sthalles/sop
evaluation/eval_image_retrieval.py; Radenović et al., CVPR 2018): the 70 queries are cropped to their boxes, every
image is resized so that its longer side is --imsize, optionally embedded at scales 1, 1/sqrt 2, 1/2 (features
averaged, then renormalised); mAP is reported for the Medium setting (easy + hard images are positives) and the Hard
setting (hard images are positives, easy ones count as junk).
Junk images are taken out of the ranking before positions are counted, and AP is the trapezoid rule over the
recall steps, the convention of the revisitop evaluation code.

    python eval_retrieval.py --checkpoint runs/cpu_demo/checkpoint.pth
    python eval_retrieval.py --pixels --dataset synthetic --synthetic_size 10000       # the raw-pixel baseline
    python eval_retrieval.py --checkpoint dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16 \\
        --dataset roxford5k --data_path /path/to/roxford5k --imsize 224 --multiscale
    torchrun --nproc_per_node=8 eval_retrieval.py --pretrained_weights CKPT --arch vit_small --dataset rparis6k ...

Under torchrun every process embeds a shard of the images (eval_knn.extract_features for the class level) and
rank 0 alone ranks and prints.
"""
import argparse
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import eval_knn

RECALL_KS = (1, 5, 10)
OXFORD_PARIS = {"roxford5k": "gnd_roxford5k.pkl", "rparis6k": "gnd_rparis6k.pkl"}
MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)


# ----------------------------------------------------------------------------------------------------- class level
@torch.no_grad()
def class_retrieval(query_features: torch.Tensor, query_labels: torch.Tensor, db_features: torch.Tensor,
                    db_labels: torch.Tensor, ks=RECALL_KS, chunk_size: int = 256) -> dict[str, float]:
    """mAP@R, mAP and recall@k in % of unit-norm query features (q, D) against database features (n, D).

    Queries whose class has no database image are left out of every average. Ties in similarity are ranked in
    database order (a stable sort), so the result does not depend on the chunking.
    """
    device = db_features.device
    query_labels, db_labels = query_labels.to(device), db_labels.to(device)
    ks = [k for k in ks if k <= len(db_features)]
    sums = torch.zeros(2 + len(ks), dtype=torch.float64, device=device)  # AP@R, AP, hit@k per k
    counted = torch.zeros((), dtype=torch.float64, device=device)
    positions = torch.arange(1, len(db_features) + 1, device=device, dtype=torch.float64)  # ranks 1..n
    for start in range(0, len(query_features), chunk_size):
        labels = query_labels[start:start + chunk_size]
        sims = query_features[start:start + chunk_size] @ db_features.T  # (c, n)
        order = sims.sort(dim=1, descending=True, stable=True).indices  # (c, n) best first
        relevant = (db_labels[order] == labels[:, None]).double()  # (c, n), 1 where rank i is relevant
        R = relevant.sum(1)  # (c,)
        precision = relevant.cumsum(1) / positions  # (c, n) precision at every rank
        hits = precision * relevant
        within_r = positions[None] <= R[:, None]
        valid = R > 0
        safe_R = R.clamp_min(1)
        ap_at_r = (hits * within_r).sum(1) / safe_R
        ap = hits.sum(1) / safe_R
        recall = [relevant[:, :k].amax(1) for k in ks]
        per_query = torch.stack([ap_at_r, ap, *recall], 1)  # (c, 2 + len(ks))
        sums += (per_query * valid[:, None]).sum(0)
        counted += valid.sum()
    means = (100 * sums / counted.clamp_min(1)).tolist()
    names = ["mAP@R", "mAP"] + [f"recall@{k}" for k in ks]
    return dict(zip(names, means), queries=int(counted))


# ----------------------------------------------------------------------------------------------------- Oxford / Paris
try:
    from numpy._core import multiarray as _numpy_multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _numpy_multiarray


class _GroundTruthUnpickler(pickle.Unpickler):
    """Builds only plain containers, strings, numbers and numpy arrays or scalars; any other global the file names
    is refused, so a tampered ground-truth file cannot run code when read (plain pickle.load would call it)."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),  # Python 2 bytes
               **{(module, name): getattr(_numpy_multiarray, name)  # numpy 1 / numpy 2 module names
                  for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct",
                                                                                                "scalar")}}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return self.ALLOWED[module, name]


def read_ground_truth(path: Path) -> dict:
    """The revisitop ground truth: dict(imlist, qimlist, gnd) with one dict(easy, hard, junk, bbx) per query,
    validated; indices become int64 tensors, bbx a 4-tuple of floats (x1, y1, x2, y2)."""
    try:
        with open(path, "rb") as f:
            gt = _GroundTruthUnpickler(f, encoding="latin1").load()
    except Exception as error:  # unpickling damaged data can raise almost any exception type
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(gt, dict) or not all(k in gt for k in ("imlist", "qimlist", "gnd")):
        raise ValueError(f"{path} must hold a dict with 'imlist', 'qimlist' and 'gnd'")
    imlist, qimlist, gnd = list(gt["imlist"]), list(gt["qimlist"]), list(gt["gnd"])
    if not imlist or not qimlist:
        raise ValueError(f"{path}: 'imlist' and 'qimlist' must name at least one image each "
                         f"(got {len(imlist)} and {len(qimlist)})")
    if len(gnd) != len(qimlist) or not all(isinstance(name, str) for name in imlist + qimlist):
        raise ValueError(f"{path}: 'gnd' needs one entry per query name of 'qimlist' ({len(qimlist)}), "
                         f"got {len(gnd)}")
    queries = []
    for i, entry in enumerate(gnd):
        try:
            parsed = {key: torch.as_tensor(np.asarray(entry.get(key, []), dtype=np.int64).reshape(-1))
                      for key in ("easy", "hard", "junk")}
            bbx = tuple(float(v) for v in np.asarray(entry["bbx"], dtype=np.float64).reshape(-1))
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: gnd[{i}] must hold integer lists easy/hard/junk and a bbx ({error})") from None
        everything = torch.cat(list(parsed.values()))
        if len(bbx) != 4 or (len(everything) and not 0 <= int(everything.min()) <= int(everything.max()) < len(imlist)):
            raise ValueError(f"{path}: gnd[{i}] has indices outside [0, {len(imlist)}) or a bbx without 4 values")
        queries.append(dict(parsed, bbx=bbx))
    return dict(imlist=imlist, qimlist=qimlist, gnd=queries)


def average_precision(positive_ranks: torch.Tensor, num_positives: int) -> float:
    """AP of 0-based sorted ranks of the positives (junk already removed), trapezoid rule over recall steps of
    1 / num_positives: the precision just before and just after each positive is averaged."""
    j = torch.arange(len(positive_ranks), dtype=torch.float64)
    rank = positive_ranks.double()
    precision_before = torch.where(rank == 0, 1.0, j / rank.clamp_min(1))
    precision_after = (j + 1) / (rank + 1)
    return float(((precision_before + precision_after) / 2).sum() / num_positives)


def revisited_map(ranking: torch.Tensor, gnd: list[dict], setting: str) -> float:
    """mAP % of rankings (Q, n) (database indices, best first) in the 'medium' or 'hard' setting; queries without
    a positive in that setting are left out (revisitop convention)."""
    aps = []
    for order, query in zip(ranking.cpu(), gnd):
        if setting == "medium":
            positives, junk = torch.cat((query["easy"], query["hard"])), query["junk"]
        else:
            positives, junk = query["hard"], torch.cat((query["junk"], query["easy"]))
        if len(positives) == 0:
            continue
        rank_of = torch.empty_like(order)
        rank_of[order] = torch.arange(len(order))  # rank_of[image] = its 0-based position in the ranking
        positive_ranks = rank_of[positives].sort().values
        junk_ranks = rank_of[junk]
        # every junk image ranked above a positive moves it up one place: junk is removed from the ranking
        positive_ranks = positive_ranks - (junk_ranks[None, :] < positive_ranks[:, None]).sum(1)
        aps.append(average_precision(positive_ranks, len(positives)))
    return 100 * sum(aps) / max(len(aps), 1)


def _load_image(path: Path, box, imsize: int) -> torch.Tensor:
    """uint8 (1, 3, h, w): the image (cropped to box = (x1, y1, x2, y2) if given), longer side resized to imsize."""
    from PIL import Image  # lazily: only these datasets need Pillow

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if box is not None:
                image = image.crop(tuple(round(v) for v in box))
            w, h = image.size
            scale = imsize / max(w, h)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
            pixels = np.asarray(image)  # (h, w, 3)
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None]


@torch.no_grad()
def _embed_image(backbone, images: torch.Tensor, device, scales) -> torch.Tensor:
    """Unit-norm [CLS] feature (D,) of one uint8 (1, 3, h, w) image, averaged over scales before normalising."""
    x = data.normalize_images(images.to(device))  # (1, 3, h, w), no resize
    feature = torch.zeros(backbone.embed_dim, device=device)
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feature += backbone(xs)[0, 0].float()  # final-normed [CLS]
    return F.normalize(feature / len(scales), dim=0)


def embed_images(backbone, paths: list[Path], boxes: list, device, imsize: int, scales) -> torch.Tensor:
    """Unit-norm features (n, D) of the images at paths (each cropped to its box, or whole for None). Under
    torchrun each rank embeds every world_size-th image and the features are all-gathered."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", 1)
    features = torch.zeros(len(paths), backbone.embed_dim, device=device)  # rows of the other ranks stay 0
    for i in range(rank, len(paths), world):
        image = _load_image(paths[i], boxes[i], imsize)  # (1, 3, h, w)
        if int(min(image.shape[-2:]) * min(scales)) < patch:  # a ViT embeds whole patches only
            raise ValueError(f"image {paths[i]} is {image.shape[-1]} x {image.shape[-2]} px at --imsize {imsize}: "
                             f"its shorter side at scale {min(scales):.2g} is below the patch size {patch}; "
                             f"use a larger --imsize")
        features[i] = _embed_image(backbone, image, device, scales)
    if world > 1:
        dist.all_reduce(features)  # disjoint rows: the sum gathers them exactly
    return features


def oxford_paris_evaluate(backbone, root: str | Path, name: str, device, imsize: int = 224,
                          multiscale: bool = False) -> dict[str, float] | None:
    """mAP % (medium, hard) of the revisited Oxford / Paris benchmark in root (gnd pickle + jpg/<name>.jpg).
    Under torchrun the images are embedded in shards; rank 0 alone ranks and returns (the others: None)."""
    root = Path(root)
    gt = read_ground_truth(root / OXFORD_PARIS[name])
    absent = [n for n in dict.fromkeys(gt["imlist"] + gt["qimlist"]) if not (root / "jpg" / f"{n}.jpg").is_file()]
    if absent:  # found now, before any compute (and before one rank stops while the others wait for it)
        raise ValueError(f"{root / 'jpg'} lacks {len(absent)} of the images {OXFORD_PARIS[name]} names, "
                         f"e.g. {absent[0]}.jpg")
    scales = MULTISCALE if multiscale else (1.0,)
    was_training = backbone.training
    backbone.eval()
    db = embed_images(backbone, [root / "jpg" / f"{n}.jpg" for n in gt["imlist"]], [None] * len(gt["imlist"]),
                      device, imsize, scales)  # (n, D)
    queries = embed_images(backbone, [root / "jpg" / f"{n}.jpg" for n in gt["qimlist"]],
                           [q["bbx"] for q in gt["gnd"]], device, imsize, scales)  # (Q, D)
    backbone.train(was_training)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    ranking = (queries @ db.T).sort(dim=1, descending=True, stable=True).indices  # (Q, n)
    return {"medium": revisited_map(ranking, gt["gnd"], "medium"), "hard": revisited_map(ranking, gt["gnd"], "hard")}


def check_oxford_paris(name: str, data_path: str) -> None:
    """ValueError naming what to put where when the ground truth or the image folder is missing."""
    root = Path(data_path)
    if not (root / OXFORD_PARIS[name]).is_file() or not (root / "jpg").is_dir():
        raise ValueError(f"--dataset {name} needs {root / OXFORD_PARIS[name]} and the images in {root / 'jpg'} "
                         f"(<name>.jpg); this machine does not download them: get {OXFORD_PARIS[name]} and the "
                         f"images from the revisitop page (cmp.felk.cvut.cz/revisitop) and pass their folder "
                         f"as --data_path")


# ----------------------------------------------------------------------------------------------------- command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    valid = (*data.DATASETS, *OXFORD_PARIS)
    eval_knn.add_common_arguments(parser, valid)
    parser.add_argument("--imsize", type=int, default=224, help="Oxford/Paris: longer side of every image")
    parser.add_argument("--multiscale", action="store_true", help="Oxford/Paris: scales 1, 1/sqrt 2, 1/2")
    parser.add_argument("--batch_size", type=int, default=256, help="class level: backbone batch")
    parser.add_argument("--chunk_size", type=int, default=256, help="class level: queries ranked at once")
    parser.add_argument("--num_workers", type=int, default=8, help="folder datasets only")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)

    eval_knn.check_common_flags(args)
    for flag in ("batch_size", "chunk_size"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"error: --{flag} {getattr(args, flag)}: must be a positive integer")
    if not 0 < args.imsize <= eval_knn.MAX_IMAGE_SIZE:
        raise SystemExit(f"error: --imsize {args.imsize}: valid: 1 to {eval_knn.MAX_IMAGE_SIZE}")
    device, rank = eval_knn.setup_distributed(args.device)  # before any loading: a missing GPU is a flag error
    config = None
    if not args.pixels:
        backbone, image_size, config = eval_knn.load_backbone(args.checkpoint, args.arch, args.patch_size,
                                                              args.interpolate_offset, args.checkpoint_key)
    dataset = args.dataset or (config or {}).get("dataset")
    data_path = args.data_path or (config or {}).get("data_path", "data")
    if dataset is None:
        raise SystemExit(f"error: --dataset is required with --pixels or a plain state dict; valid: {', '.join(valid)}")
    if dataset not in valid:
        raise SystemExit(f"error: --dataset {dataset!r}: unknown; valid: {', '.join(valid)}")

    if dataset in OXFORD_PARIS:
        if args.pixels:
            raise SystemExit(f"error: --pixels works on the class-level datasets only ({', '.join(data.DATASETS)}): "
                             f"the {dataset} images differ in size")
        try:
            check_oxford_paris(dataset, data_path)
            result = oxford_paris_evaluate(backbone.to(device), data_path, dataset, device, args.imsize,
                                           args.multiscale)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        if rank != 0:
            return None
        print(f"{dataset} mAP: medium {result['medium']:.2f} %, hard {result['hard']:.2f} %")
        return result

    image_size = args.image_size or (None if args.pixels else image_size)
    try:
        data.check_dataset(dataset, data_path)
        size = args.synthetic_size or (config or {}).get("synthetic_size")
        train_set = data.load_dataset(dataset, data_path, "train", size=size, image_size=image_size or 224,
                                      evaluation=True)
        test_set = data.load_dataset(dataset, data_path, "test", image_size=image_size or 224)
    except data.DatasetError as e:
        raise SystemExit(f"error: {e}")
    if args.pixels:
        backbone = eval_knn.Pixels(image_size or train_set[0][0].shape[-1])
    eval_knn.check_image_size(image_size, backbone)
    backbone = backbone.to(device)
    db = eval_knn.extract_features(backbone, train_set, args.batch_size, device, image_size, args.num_workers)
    queries = eval_knn.extract_features(backbone, test_set, args.batch_size, device, image_size, args.num_workers)
    if rank != 0:
        return None
    result = class_retrieval(queries, test_set.labels, db, train_set.labels, chunk_size=args.chunk_size)
    print(f"{result['queries']} test queries against {len(db)} training images: "
          + ", ".join(f"recall@{k} {result[f'recall@{k}']:.2f} %" for k in RECALL_KS if f"recall@{k}" in result)
          + f", mAP {result['mAP']:.2f} %")
    print(f"retrieval mAP@R {result['mAP@R']:.2f} %")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    eval_knn.close_distributed()
