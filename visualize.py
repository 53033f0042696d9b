"""Show what a backbone learnt, as PNG grids drawn with Pillow (no matplotlib needed).

    python visualize.py attention --checkpoint runs/cpu_demo/checkpoint.pth --out attention.png
    python visualize.py attention --checkpoint dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16 \\
        --images cat.jpg dog.png --out attention.png
    python visualize.py sops --checkpoint runs/cpu_demo/checkpoint.pth --out sops.png
    python visualize.py neighbors --checkpoint runs/cpu_demo/checkpoint.pth --out neighbors.png

attention: the [CLS]-to-patch attention of every head of the last block (DINO's maps), one row per image.
sops: self-organizing prototypes drawn from the checkpoint's class memory as in training (MemoryBank.draw): one row per
    SOP, its anchor first, then its k support embeddings, each shown as the training image it came from with its
    vote weight. Needs a train.py checkpoint (the memory and its index buffer live there).
neighbors: test images, each followed by its k nearest training images by teacher [CLS] cosine (the neighbours
    of the k-NN evaluation, eval_knn.py), framed green when the label agrees and red when it does not.
The same --seed picks the same images and SOPs, so a picture is reproducible.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
from eval_knn import extract_features, load_backbone, pick_device, read_checkpoint
from memory import MemoryBank
from model import ARCHS

CLASS_NAMES = {
    "synthetic": data.SYNTHETIC_CLASSES,
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "fashion_mnist": ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"),
}
PAD = 4  # px between tiles
TEXT = 12  # px font size
LINE = TEXT + 4  # px per text line
# A perceptually ordered colour map (5 stops of matplotlib's 'inferno', linearly interpolated).
HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------- drawing
def font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=TEXT)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: a fixed bitmap font


def to_pil(image: torch.Tensor, tile: int) -> Image.Image:
    """uint8 (3, H, W) -> a tile x tile RGB image; whole-number upscaling stays sharp (nearest)."""
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    sharp = tile % image.shape[-1] == 0
    return pil.resize((tile, tile), Image.NEAREST if sharp else Image.BICUBIC)


def heat_overlay(image: torch.Tensor, attention: torch.Tensor, tile: int) -> Image.Image:
    """Image uint8 (3, H, W) dimmed under a heat map of one attention map (h, w), min-max scaled, patch-sharp."""
    a = attention.float()
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)  # (h, w) in [0, 1]
    a = F.interpolate(a[None, None], size=(tile, tile), mode="nearest")[0, 0].numpy()  # (tile, tile), DINO's upsampling
    position = a * (len(HEAT) - 1)
    low = np.floor(position).astype(int).clip(0, len(HEAT) - 2)
    frac = (position - low)[..., None]
    heat = HEAT[low] * (1 - frac) + HEAT[low + 1] * frac  # (tile, tile, 3)
    grey = np.asarray(to_pil(image, tile).convert("L"), dtype=np.float32)[..., None]  # (tile, tile, 1)
    return Image.fromarray((0.75 * heat + 0.25 * grey).clip(0, 255).astype(np.uint8))


def wrap(text: str, width: int, draw: ImageDraw.ImageDraw, fnt) -> list[str]:
    """Greedy word wrap of text to lines at most width px wide."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=fnt) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def draw_grid(cells: list[list[tuple]], tile: int, caption: str, header: list[str] | None = None,
              text_lines: int = 1) -> Image.Image:
    """A white sheet: the caption on top, an optional header row, then one row of tiles per list in cells.

    A cell is (image or None, text under it, frame colour or None); None images are blank grey tiles. The width
    depends only on the column count and the tile size; the caption wraps to it.
    """
    fnt = font()
    columns = max(len(row) for row in cells)
    cell_w, cell_h = tile + PAD, tile + PAD + text_lines * LINE
    width = PAD + columns * cell_w
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption_lines = wrap(caption, width - 2 * PAD, probe, fnt)
    top = PAD + len(caption_lines) * LINE + (LINE if header else 0)
    sheet = Image.new("RGB", (width, top + len(cells) * cell_h + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(caption_lines):
        draw.text((PAD, PAD + i * LINE), line, fill="black", font=fnt)
    for c, name in enumerate(header or []):
        draw.text((PAD + c * cell_w, top - LINE), name, fill="black", font=fnt)
    for r, row in enumerate(cells):
        y = top + r * cell_h
        for c, (image, text, frame) in enumerate(row):
            x = PAD + c * cell_w
            if image is None:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(225, 225, 225))
            else:
                sheet.paste(image, (x, y))
            if frame is not None:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=frame, width=max(2, tile // 32))
            for i, line in enumerate(text.split("\n")[:text_lines]):
                draw.text((x, y + tile + 2 + i * LINE), line, fill="black", font=fnt)
    return sheet


# ----------------------------------------------------------------------------------------------------- inputs
def class_name(dataset_name: str, dataset, label: int) -> str:
    names = getattr(dataset, "classes", None) or CLASS_NAMES.get(dataset_name)
    return str(names[label]) if names and 0 <= label < len(names) else str(label)


def load_image_files(paths: list[str], size: int) -> torch.Tensor:
    """uint8 (n, 3, size, size) from image files: shorter side to size * 256/224, centre crop (DINO evaluation)."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                w, h = image.size
                short = int(size * 256 / 224)
                image = image.resize((short, max(short, round(short * h / w))) if w <= h else
                                     (max(short, round(short * w / h)), short), Image.BICUBIC)
                left, top = (image.width - size) // 2, (image.height - size) // 2
                pixels = np.asarray(image.crop((left, top, left + size, top + size)))  # (size, size, 3)
        except Exception as error:  # Pillow reports unreadable files through many exception types
            raise SystemExit(f"error: --images {path}: cannot read it as an image ({error})")
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
    return torch.stack(images)


def pick(n: int, total: int, seed: int) -> torch.Tensor:
    """n distinct indices in [0, total), fixed by the seed, in increasing order."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


# ----------------------------------------------------------------------------------------------------- pictures
@torch.no_grad()
def attention_picture(backbone, images: torch.Tensor, image_size: int, tile: int, names: list[str],
                      caption: str) -> Image.Image:
    """One row per image: the image, the [CLS]->patch attention of each head of the last block, and their mean."""
    x = data.normalize_images(images, image_size)  # (n, 3, S, S)
    _, weights = backbone.eval().last_self_attention(x)  # (n, H, N, N)
    n, H = weights.shape[:2]
    g = image_size // backbone.patch_size
    cls_to_patch = weights[:, :, 0, 1:].reshape(n, H, g, g)  # (n, H, g, g), row 0 = [CLS] as the query
    display = data.normalize_images(images, image_size, mean=(0, 0, 0), std=(1, 1, 1)).mul(255).round().byte()
    cells = []
    for i in range(n):
        row = [(to_pil(display[i], tile), names[i], None)]
        row += [(heat_overlay(display[i], cls_to_patch[i, h], tile), f"head {h + 1}", None) for h in range(H)]
        row.append((heat_overlay(display[i], cls_to_patch[i].mean(0), tile), "mean", None))
        cells.append(row)
    return draw_grid(cells, tile, caption)


def sops_picture(memory: MemoryBank, train_set, dataset_name: str, num_sops: int, num_anchors: int,
                 num_neighbors: int, smoothing: float, seed: int, tile: int, caption: str) -> Image.Image:
    """One row per SOP of one draw: anchor then support embeddings as their training images, with vote weights."""
    sops = memory.draw(num_anchors, num_neighbors, smoothing, torch.Generator().manual_seed(seed))
    rows, weights = sops.rows[:num_sops], sops.weights[:num_sops].tolist()  # (n, k + 1) memory rows and votes
    source = memory.index[rows]  # (n, k + 1) dataset indices, -1 = unknown (blank tile)
    cells = []
    for j in range(len(rows)):
        row = []
        for r in range(rows.shape[1]):
            i = int(source[j, r])
            if 0 <= i < len(train_set):
                image, label = train_set[i]
                name = class_name(dataset_name, train_set, label)
                row.append((to_pil(image, tile), f"w {weights[j][r]:.3f}\n{name}", None))
            else:
                row.append((None, f"w {weights[j][r]:.3f}\nunknown", None))
        cells.append(row)
    header = ["anchor"] + [f"SE {r}" for r in range(1, rows.shape[1])]
    return draw_grid(cells, tile, caption, header=header, text_lines=2)


@torch.no_grad()
def neighbors_picture(backbone, train_set, test_set, dataset_name: str, queries: torch.Tensor, k: int,
                      image_size: int, device: torch.device, num_workers: int, tile: int,
                      caption: str) -> Image.Image:
    """One row per query test image: the query, then its k nearest training images (teacher [CLS] cosine)."""
    train_features = extract_features(backbone, train_set, 256, device, image_size, num_workers)  # (n_train, D)
    query_images = torch.stack([test_set[int(i)][0] for i in queries])  # (n, 3, H, W)
    query_features = F.normalize(backbone.eval()(data.normalize_images(query_images.to(device), image_size))[:, 0]
                                 .float(), dim=1)  # (n, D), as extract_features computes them
    sims, nearest = (query_features @ train_features.T).topk(k, dim=1)  # (n, k), most similar first
    cells = []
    for q, i in enumerate(queries):
        label = int(test_set.labels[int(i)])
        row = [(to_pil(query_images[q], tile), f"query\n{class_name(dataset_name, test_set, label)}", None)]
        for s, t in zip(sims[q].tolist(), nearest[q].tolist()):
            image, train_label = train_set[t]
            row.append((to_pil(image, tile), f"cos {s:.3f}\n{class_name(dataset_name, train_set, train_label)}",
                        (0, 170, 0) if train_label == label else (220, 0, 0)))
        cells.append(row)
    return draw_grid(cells, tile, caption, header=["test image"] + [f"NN {r}" for r in range(1, k + 1)],
                     text_lines=2)


# ----------------------------------------------------------------------------------------------------- command line
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("picture", choices=("attention", "sops", "neighbors"))
    parser.add_argument("--checkpoint", required=True, help="train.py checkpoint or a plain ViT state dict")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--dataset", default=None, help=f"one of {data.DATASETS} (default: the checkpoint's)")
    parser.add_argument("--data_path", default=None, help="dataset root (default: the checkpoint's)")
    parser.add_argument("--arch", default=None, help=f"plain state dicts only: {', '.join(ARCHS)}")
    parser.add_argument("--patch_size", type=int, default=16, help="plain state dicts only")
    parser.add_argument("--image_size", type=int, default=None, help="px (default: the training crop size, or 224)")
    parser.add_argument("--images", nargs="+", default=None, help="attention: image files instead of test images")
    parser.add_argument("--num_images", type=int, default=4, help="attention/neighbors: test images (rows)")
    parser.add_argument("--num_sops", type=int, default=6, help="sops: prototypes (rows)")
    parser.add_argument("--k", type=int, default=None,
                        help="neighbors: neighbours per image (default 8); sops: SEs per SOP (default: training's)")
    parser.add_argument("--tile", type=int, default=None, help="px per tile (default: the image size, scaled up "
                                                               "by a whole factor to at least 128)")
    parser.add_argument("--seed", type=int, default=0, help="picks the images and the SOPs")
    parser.add_argument("--num_workers", type=int, default=8, help="neighbors on folder datasets: decoding processes")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv)


MAX_ROWS, MAX_K, MAX_TILE = 64, 64, 1024  # beyond these a picture is too large to read (and to write)


def check_arguments(args) -> None:
    """One 'error: ...' line for a flag value that cannot work, before anything is read."""
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not args.out.lower().endswith(".png"):
        raise SystemExit(f"error: --out {args.out}: must be a .png file")
    if not os.path.isdir(out_dir):
        raise SystemExit(f"error: --out {args.out}: directory {out_dir} does not exist")
    if os.path.isdir(args.out):
        raise SystemExit(f"error: --out {args.out}: is a directory; valid: a .png file name")
    for name, most in (("num_images", MAX_ROWS), ("num_sops", MAX_ROWS), ("k", MAX_K), ("tile", MAX_TILE),
                       ("image_size", 4096), ("patch_size", 4096)):
        value = getattr(args, name)
        if value is not None and not 0 < value <= most:
            raise SystemExit(f"error: --{name} {value}: valid: 1 to {most}")
    for name, most in (("seed", 2 ** 63 - 1), ("num_workers", 256)):  # seeds as train.py's
        if not 0 <= getattr(args, name) <= most:
            raise SystemExit(f"error: --{name} {getattr(args, name)}: valid: 0 to {most}")
    for path in args.images or []:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --images {path}: {'a directory' if os.path.isdir(path) else 'no such file'}; "
                             f"valid: image files")


def check_sops_checkpoint(args, ckpt, config) -> tuple[int, int]:
    """The sops picture needs an SOP train.py checkpoint whose class memory traces rows to images: (rows, k)."""
    if config is not None and config.get("method", "sop") != "sop":
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: sops needs an SOP checkpoint; this one was "
                         f"trained with --method {config['method']}, which draws no SOPs")
    memory_state = ckpt.get("class_memory") if config is not None else None
    if not isinstance(memory_state, dict) or "memory" not in memory_state:
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: sops needs a train.py checkpoint (it draws "
                         f"from the class memory); this is a plain state dict")
    if "index" not in memory_state:
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: its class memory has no index buffer (written "
                         f"before visualize.py existed), so its rows cannot be traced to images; train (or resume "
                         f"for an epoch) with the current train.py")
    rows = memory_state["memory"].shape[0]
    k = args.k if args.k is not None else config["class_neighbors"]
    if k >= rows:
        raise SystemExit(f"error: --k {k}: must leave room for an anchor in the {rows}-row class memory")
    return rows, k


def main(argv=None) -> str:
    """Write the picture; returns the path. Every bad input ends in one 'error: ...' line before any compute."""
    args = parse_args(argv)
    check_arguments(args)
    device = pick_device(args.device)
    try:
        ckpt = read_checkpoint(args.checkpoint)
    except ValueError as e:
        raise SystemExit(f"error: --checkpoint {e}")
    config = ckpt.get("config") if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else None
    rows, k = check_sops_checkpoint(args, ckpt, config) if args.picture == "sops" else (None, args.k)
    backbone, image_size, _ = load_backbone(args.checkpoint, args.arch, args.patch_size)  # one-line SystemExits
    image_size = args.image_size or image_size
    if image_size % backbone.patch_size:
        raise SystemExit(f"error: --image_size {image_size}: must be a multiple of the patch size "
                         f"{backbone.patch_size}")
    backbone = backbone.to(device).eval()
    dataset_name = args.dataset or (config or {}).get("dataset")
    data_path = args.data_path or (config or {}).get("data_path", "data")
    need_data = not (args.picture == "attention" and args.images)
    if need_data and dataset_name is None:
        raise SystemExit("error: --dataset is required with a plain state dict (or, for attention, --images); "
                         f"valid: {', '.join(data.DATASETS)}")
    if need_data:
        try:
            data.check_dataset(dataset_name, data_path)
        except data.DatasetError as e:
            raise SystemExit(f"error: --dataset {dataset_name} --data_path {data_path}: {e}")

    def load(split):
        try:
            return data.load_dataset(dataset_name, data_path, split, size=(config or {}).get("synthetic_size")
                                     if split == "train" else None, image_size=image_size, evaluation=True)
        except data.DatasetError as e:
            raise SystemExit(f"error: --dataset {dataset_name}: {e}")

    epoch = ckpt.get("epoch") if config is not None else None
    source = f"{args.checkpoint}" + (f", epoch {epoch}" if epoch is not None else "")
    picture = draw(args, ckpt, config, backbone, load, dataset_name, image_size, source, rows, k, device)
    picture.save(args.out, optimize=True)
    print(f"wrote {args.out} ({picture.width} x {picture.height} px)")
    return args.out


def draw(args, ckpt, config, backbone, load, dataset_name, image_size, source, rows, k, device) -> Image.Image:
    """The picture args.picture asks for, with its caption."""
    tile = args.tile or image_size * math.ceil(128 / image_size)
    if args.picture == "attention":
        if args.images:
            images, names = load_image_files(args.images, image_size), [os.path.basename(p) for p in args.images]
            what = "the given images"
        else:
            test_set = load("test")
            chosen = pick(min(args.num_images, len(test_set)), len(test_set), args.seed)
            images = torch.stack([test_set[int(i)][0] for i in chosen])
            names = [f"#{int(i)} {class_name(dataset_name, test_set, int(test_set.labels[i]))}" for i in chosen]
            what = f"{len(chosen)} {dataset_name} test images (seed {args.seed})"
        heads, depth = backbone.blocks[-1].attn.num_heads, len(backbone.blocks)
        caption = (f"[CLS] attention, {source}. Rows: {what}. Columns: the image, then the [CLS]-to-patch attention "
                   f"of each of the {heads} heads of the last block ({depth}) at {image_size} px "
                   f"({image_size // backbone.patch_size} x {image_size // backbone.patch_size} patches), then "
                   f"their mean; each map scaled to its own min-max, bright = high.")
        return attention_picture(backbone, images.to(device), image_size, tile, names, caption)
    if args.picture == "sops":
        memory = MemoryBank(*ckpt["class_memory"]["memory"].shape)
        memory.load_state_dict(ckpt["class_memory"])
        train_set = load("train")
        anchors = min(config["class_anchors"], rows - k)  # the training draw's M, fewer if --k asks for more SEs
        unknown = int((memory.index < 0).sum())
        caption = (f"Self-organizing prototypes, {source}. One draw of {anchors} SOPs from the class memory "
                   f"({len(memory.memory)} rows, {unknown} of unknown source) as in training (seed {args.seed}); "
                   f"rows: the first {min(args.num_sops, anchors)}. Each row: the anchor, then its {k} nearest "
                   f"memory embeddings, shown as the {dataset_name} training images they came from; w = vote weight "
                   f"(anchor 1 - smoothing, neighbours their cosine to the anchor); grey = unknown source.")
        return sops_picture(memory, train_set, dataset_name, args.num_sops, anchors, k, config["smoothing"],
                            args.seed, tile, caption)
    train_set, test_set = load("train"), load("test")
    k = min(k or 8, len(train_set))
    queries = pick(min(args.num_images, len(test_set)), len(test_set), args.seed)
    caption = (f"Nearest neighbours, {source}. Rows: {len(queries)} {dataset_name} test images (seed "
               f"{args.seed}), each followed by its {k} nearest of {len(train_set)} training images by teacher "
               f"[CLS] cosine at {image_size} px; frame green = same label, red = different.")
    return neighbors_picture(backbone, train_set, test_set, dataset_name, queries, k, image_size, device,
                             args.num_workers, tile, caption)

if __name__ == "__main__":
    main(sys.argv[1:])
