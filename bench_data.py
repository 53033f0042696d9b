"""Folder input pipeline: JPEG decode throughput, crop fidelity of the decode bound, and (on a GPU machine) GPU decode
and end-to-end training images/s, on JPEGs the benchmark fabricates itself (also 1024 x 768 ones, where draft mode
matters at the chosen bound).

    python bench_data.py                          # CPU: per-core decode rates and crop fidelity per bound
    python bench_data.py --gpu                    # also: all-core loader rate, nvJPEG rate, folder path vs step

Images: 1/f-noise colour pictures (the power spectrum of natural images) of ImageNet's typical 500 x 375, saved at
JPEG quality 90. Decode rates are images per CPU-second of one thread (process time, so other load on the machine
barely changes them); "before" is the former training transform (full decode, shorter side to 224, centre 224
square), "after" is data.decode_image at each long-side bound plus the canvas (draft mode where it applies).
Fidelity: PSNR of our crops (decode at the bound, then augment.resized_crops with the canvas path's antialiasing;
the former square without, as it ran) against DINO's (the same box cut from the full-resolution image and resized by
Pillow, antialiased), for 96 px local crops of 5 % of the image and 224 px
global crops of 25 % and 100 %; the boxes lie in the central square, so the former transform is measured too.
"""
import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data
from augment import resized_crops

BOUNDS = (256, 320, 384, 448, 512)


def make_jpegs(folder: Path, num_images: int, size=(500, 375), quality: int = 90, seed: int = 0) -> list[str]:
    """num_images JPEGs of 1/f colour noise in folder/train/c<k>/ and folder/val/c<k>/ (2 classes); train paths."""
    from PIL import Image

    rng, (w, h), paths = np.random.default_rng(seed), size, []
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amplitude = 1 / np.maximum(np.hypot(fx, fy), 1 / max(w, h))  # 1/f amplitude: natural-image statistics
    for split in ("train", "val"):
        for i in range(num_images if split == "train" else 4):
            spectrum = np.fft.rfft2(rng.standard_normal((3, h, w))) * amplitude
            pixels = np.fft.irfft2(spectrum, s=(h, w))  # (3, h, w)
            pixels = np.einsum("ij,jhw->hwi", rng.uniform(0.3, 1.0, (3, 3)), pixels)  # correlated colours
            pixels = (pixels - pixels.mean()) / (4 * pixels.std()) + 0.5
            path = folder / split / f"c{i % 2}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8)).save(path, quality=quality)
            paths += [str(path)] if split == "train" else []
    return paths


def former_transform(path: str, size: int = 224) -> np.ndarray:
    """The former training transform, before data.decode_image and its canvas: full decode, shorter side to size
    (bicubic), central square."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        image = image.resize(new, Image.BICUBIC)
        top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
        return np.asarray(image.crop((left, top, left + size, top + size)))


def per_core_rate(fn, paths: list[str], repeats: int = 2) -> float:
    """Images per CPU-second of fn(path), one thread."""
    fn(paths[0])
    start = time.process_time()
    for _ in range(repeats):
        for path in paths:
            fn(path)
    return repeats * len(paths) / (time.process_time() - start)


def canvas_item(long_side: int):
    folder = data.ImageFolder.__new__(data.ImageFolder)  # only its transform, without a tree to scan
    folder.evaluation, folder.long_side = False, long_side
    return folder.transform


def decode_rates(paths: list[str]) -> dict:
    """Per-core decode + resize rates, before and after, per bound; and the full-size decode alone."""
    torch.set_num_threads(1)
    rates = {"former_224_square": per_core_rate(former_transform, paths),
             "full_decode_only": per_core_rate(lambda p: data.decode_image(p), paths)}
    for bound in (224, *BOUNDS):
        rates[f"bound_{bound}"] = per_core_rate(canvas_item(bound), paths)
    return rates


def large_image_rates(paths: list[str]) -> dict:
    """Per-core rates on larger JPEGs: the former transform, the chosen bound without and with draft mode."""
    from PIL import Image

    def without_draft(path):  # full decode, then the same bicubic resize to the bound
        with Image.open(path) as image:
            w, h = image.size
            scale = min(1.0, data.FOLDER_LONG_SIDE / max(w, h))
            return np.asarray(image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.BICUBIC))
    torch.set_num_threads(1)
    return {"former_224_square": per_core_rate(former_transform, paths),
            f"bound_{data.FOLDER_LONG_SIDE}_without_draft": per_core_rate(without_draft, paths),
            f"bound_{data.FOLDER_LONG_SIDE}_draft": per_core_rate(canvas_item(data.FOLDER_LONG_SIDE), paths)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def crop_fidelity(paths: list[str], boxes_per_image: int = 4, seed: int = 0) -> dict:
    """Mean PSNR (dB) of our crops against DINO's, per crop kind and decode bound (and the former transform)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    kinds = {"local_96px_5pct": (96, 0.05), "global_224px_25pct": (224, 0.25), "global_224px_100pct": (224, 1.0)}
    sources = {"former_224_square": None, **{f"bound_{b}": b for b in BOUNDS}}
    scores = {kind: {name: [] for name in sources} for kind in kinds}
    for path in paths:
        with Image.open(path) as image:
            full = image.convert("RGB")
        W, H = full.size
        side = min(W, H)  # boxes inside the central square, where the former transform has pixels too
        square_top, square_left = (H - side) / 2, (W - side) / 2
        for kind, (out, fraction) in kinds.items():
            for _ in range(boxes_per_image):
                box_side = min(side, math.sqrt(fraction * W * H))  # a square box of fraction of the image's area
                top = square_top + rng.uniform(0, side - box_side)
                left = square_left + rng.uniform(0, side - box_side)
                reference = full.resize((out, out), Image.BICUBIC, box=(left, top, left + box_side, top + box_side))
                reference = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float() / 255
                for name, bound in sources.items():
                    if bound is None:  # the 224 square covers [square_top, +side) at scale 224 / side
                        pixels, scale, origin = former_transform(path), 224 / side, (square_top, square_left)
                    else:
                        pixels = data.decode_image(path, bound)
                        scale, origin = pixels.shape[1] / W, (0.0, 0.0)
                    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255
                    crop_box = torch.tensor([[(top - origin[0]) * scale, (left - origin[1]) * scale,
                                              box_side * scale, box_side * scale]])
                    ours = resized_crops(image, crop_box, torch.tensor([False]), out, antialias=bound is not None)[0]
                    scores[kind][name].append(psnr(ours, reference))
    return {kind: {name: round(float(np.mean(v)), 2) for name, v in by_source.items()}
            for kind, by_source in scores.items()}


def loader_rate(root: Path, workers: int, batch: int, batches: int) -> float:
    """Images/s of the folder training path's CPU decoding with `workers` DataLoader processes."""
    dataset = data.ImageFolder(root / "train", evaluation=False)
    order = torch.randint(0, len(dataset), (batches + 2, batch), generator=torch.Generator().manual_seed(0))
    loader = data.load_batches(dataset, order.tolist(), workers)
    next(loader), next(loader)  # workers started and warm
    start = time.perf_counter()
    for _ in loader:
        pass
    return batches * batch / (time.perf_counter() - start)


def gpu_measurements(root: Path, batch: int, steps: int) -> dict:
    """nvJPEG decode rate, the folder path's end-to-end training rate against the step alone (ViT-S/16 preset)."""
    import bench
    import train

    device = torch.device("cuda")
    dataset = data.ImageFolder(root / "train", evaluation=False)
    order = torch.randint(0, len(dataset), (steps + 3, batch), generator=torch.Generator().manual_seed(0)).tolist()
    items = [data._FileBytes(dataset)[i] for i in order[0]]
    data._decode_on_gpu(dataset, items, device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        data._decode_on_gpu(dataset, items, device)
    torch.cuda.synchronize()
    results = {"gpu_decode_images_per_s": steps * batch / (time.perf_counter() - start)}
    cfg = train.parse_config(["--preset", "imagenet", "--batch_size_per_gpu", str(batch)])
    trainer = train.Trainer(cfg, device, world=1, steps_per_epoch=1281167 // 1024)
    workers = os.cpu_count()
    for gpu_decode in (False, True):
        batches = data.folder_batches(dataset, order, device, workers, gpu_decode)
        for step, (images, sizes, indices) in enumerate(batches):
            if step == 3:  # workers warm, kernels compiled
                torch.cuda.synchronize()
                start = time.perf_counter()
            trainer.train_step(images, 1000 + step, 0, indices=indices, sizes=sizes)
        torch.cuda.synchronize()
        results[f"folder_end_to_end_images_per_s_gpu_decode_{gpu_decode}"] = steps * batch / (
            time.perf_counter() - start)
    canvases = torch.randint(0, 256, (batch, 3, data.FOLDER_LONG_SIDE, data.FOLDER_LONG_SIDE), dtype=torch.uint8,
                             device=device)
    sizes = torch.tensor([[336, 448]] * batch, device=device)
    times = bench.timed(lambda: trainer.train_step(canvases, 2000, 0, sizes=sizes), steps, device)
    results["step_alone_images_per_s"] = batch / float(np.median(times))
    return results


MAX_IMAGES = 20_000  # fabricated 500 x 375 JPEGs (about 50 kB each) in a temporary directory: 1 GB at most


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=200, help="fabricated JPEGs (per-core rates, fidelity)")
    parser.add_argument("--fidelity_images", type=int, default=40)
    parser.add_argument("--gpu", action="store_true", help="also the all-core, nvJPEG and end-to-end measurements")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    for name, most in (("num_images", MAX_IMAGES), ("fidelity_images", MAX_IMAGES), ("batch", 4096),
                       ("steps", 10_000)):  # one line before any JPEG is written; steps: as bench.py's cap
        if not 1 <= getattr(args, name) <= most:
            raise SystemExit(f"error: --{name} {getattr(args, name)}: valid: 1 to {most}")
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
        raise SystemExit(f"error: --json {args.json}: is a directory or in a directory that does not exist; valid: "
                         f"a file in an existing directory")  # before the measurements, not after them
    results = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "image_size": [500, 375], "jpeg_quality": 90}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_jpegs(root, max(args.num_images, args.batch if args.gpu else 0))
        results["decode_images_per_cpu_second"] = {k: round(v, 1) for k, v in decode_rates(paths).items()}
        print(json.dumps(results["decode_images_per_cpu_second"]), flush=True)
        large = make_jpegs(root / "large", max(2, args.num_images // 4), size=(1024, 768), seed=1)
        results["decode_images_per_cpu_second_1024x768"] = {k: round(v, 1) for k, v in large_image_rates(large).items()}
        print(json.dumps(results["decode_images_per_cpu_second_1024x768"]), flush=True)
        results["crop_psnr_db"] = crop_fidelity(paths[:args.fidelity_images])
        print(json.dumps(results["crop_psnr_db"]), flush=True)
        if args.gpu:
            torch.set_num_threads(os.cpu_count())
            results["loader_images_per_s_all_cores"] = loader_rate(root, os.cpu_count(), args.batch, args.steps)
            results.update(gpu_measurements(root, args.batch, args.steps))
            step_rate = results["step_alone_images_per_s"]
            per_core = results["decode_images_per_cpu_second"][f"bound_{data.FOLDER_LONG_SIDE}"]
            results["cpu_cores_for_8_gpus_cpu_decode"] = math.ceil(8 * step_rate / per_core)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
