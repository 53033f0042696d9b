"""Data for sop: datasets (spec §6) and the batches the training loop and the k-NN evaluation read.

Small datasets live in memory as one uint8 (N, 3, H, W) tensor (synthetic, CIFAR-10/100, Fashion-MNIST); image
folders are decoded per item by DataLoader workers (or by nvJPEG on the GPU), the whole image kept in a padded
canvas for training. The multicrop augmentation and the masks run on the training device (augment.py).
"""
import fcntl
import gzip
import hashlib
import http.client
import itertools
import math
import os
import pickle
import signal
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

from augment import IMAGENET_MEAN, IMAGENET_STD, normalize

DATASETS = ("synthetic", "cifar10", "cifar100", "fashion_mnist", "folder")


class DatasetError(Exception):
    """A dataset that cannot be used: bad name, missing path, failed download or corrupt file (one-line message)."""


def _seed_from(*values: int) -> int:
    """A 63-bit seed mixed from several integers, e.g. (seed, epoch): distinct tuples give unrelated streams."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------------- datasets
class ImageDataset(torch.utils.data.Dataset):
    """A whole dataset in memory: images uint8 (N, 3, H, W) contiguous on the CPU, labels int64 (N,).
    Small enough (CIFAR train: 150 MB) to move to the GPU in one piece and gather batches there by index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(labels) != len(images):
            raise ValueError(f"need uint8 (N, 3, H, W) images and N labels, got {images.dtype} "
                             f"{tuple(images.shape)} and {len(labels)} labels")
        self.images, self.labels, self.num_classes = images.contiguous(), labels.to(torch.int64), num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image i, uint8 (3, H, W), and its label."""
        return self.images[i], int(self.labels[i])


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_folders(root: Path) -> list[str]:
    """Sorted names of the class sub-folders of root (ImageNet layout root/<class>/<image>)."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class folders: expected {root}/<class>/<image>.jpg")
    return classes


FOLDER_LONG_SIDE = 512  # px: training images are decoded with their longer side at most this (README, "Image folders")


def decode_image(path: str, long_side: int | None = None) -> np.ndarray:
    """RGB uint8 (h, w, 3) of an image file, with its longer side scaled down to long_side (aspect kept, never
    upsampled; None: full size). JPEGs use Pillow's draft mode: the decoder scales by 1/2, 1/4 or 1/8 in the DCT
    domain to the smallest size still >= the target, which a bicubic resize then finishes."""
    from PIL import Image  # lazily: only folder datasets need Pillow

    with Image.open(path) as image:
        w, h = image.size
        scale = 1.0 if long_side is None else min(1.0, long_side / max(w, h))
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
        drafted = image.draft("RGB", target) if target != (w, h) else None  # None for non-JPEG files
        image = image.convert("RGB")
        if image.size != target:
            image = image.resize(target, Image.BICUBIC, box=drafted[1] if drafted else None)
        return np.array(image)  # a writable copy (np.asarray would be a read-only view)


def _holds_an_image(folder: Path) -> bool:
    """Whether folder or a sub-folder holds an image file; stops at the first (cheap on ImageNet-sized trees)."""
    with os.scandir(folder) as entries:
        subfolders = []
        for entry in entries:
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                return True
            if entry.is_dir():
                subfolders.append(entry.path)
    return any(_holds_an_image(Path(sub)) for sub in subfolders)


class ImageFolder(torch.utils.data.Dataset):
    """Images in root/<class>/*.{jpg,png,...}, labelled by sorted class name.

    evaluation=True is the DINO evaluation protocol (test split, and train split for k-NN features): shorter side
    resized to int(S * 256/224) (bicubic), centre crop S; an item is (uint8 (3, S, S), label). Otherwise (training)
    the whole image is kept: decoded with its longer side scaled to at most long_side (draft mode, see decode_image),
    placed at the top left of a zero long_side x long_side canvas; an item is (uint8 (3, L, L) canvas, int64 (2,)
    valid (height, width), label, index of the image read), and the batched multicrop draws each image's crops
    inside its valid region.

    An unreadable image is skipped: the item is the next readable image of its class (then of the dataset; a
    training item's last entry says which), and its path is appended once to bad_images_file (or printed when there
    is none), from any DataLoader worker; with strict=True the first one raises DatasetError("cannot read image
    PATH: reason") instead.
    """

    def __init__(self, root: str | Path, image_size: int = 224, evaluation: bool = True,
                 long_side: int | None = None, strict: bool = False, bad_images_file: str | None = None):
        root = Path(root)
        self.classes = _class_folders(root)
        self.samples: list[tuple[str, int]] = []
        self.class_ranges: list[tuple[int, int]] = []  # samples of class c: [start, end)
        for label, name in enumerate(self.classes):
            files = sorted(str(p) for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DatasetError(f"class folder {root / name} holds no image with extension {IMAGE_EXTENSIONS}")
            self.class_ranges.append((len(self.samples), len(self.samples) + len(files)))
            self.samples += [(path, label) for path in files]
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.num_classes, self.crop_size, self.evaluation = len(self.classes), image_size, evaluation
        self.resize = int(image_size * 256 / 224) if evaluation else image_size
        self.long_side = long_side or FOLDER_LONG_SIDE
        self.strict, self.bad_images_file = strict, bad_images_file
        # paths already listed are skipped without another decode attempt (e.g. after a resume)
        self.known_bad = set() if strict else set(read_bad_images(bad_images_file))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        """Item i, or the next readable one of its class (then of the dataset) when image i cannot be read."""
        start, end = self.class_ranges[int(self.labels[i])]
        for j in itertools.chain(range(i, end), range(start, i), range(end, len(self)), range(start)):
            path, label = self.samples[j]
            if path in self.known_bad:
                continue
            try:
                return (*self.transform(path), label) if self.evaluation else (*self.transform(path), label, j)
            except Exception as error:  # Pillow reports corrupt files through many exception types
                reason = f"cannot read image {path}: {(str(error).splitlines() or [type(error).__name__])[0]}"
                if self.strict:
                    raise DatasetError(reason) from None
                self.report_bad(path, reason)
        raise DatasetError(f"no readable image among the {len(self)} of {Path(self.samples[0][0]).parent.parent}")

    def transform(self, path: str) -> tuple[torch.Tensor, ...]:
        """(uint8 (3, S, S),) under evaluation, else (uint8 (3, L, L) canvas, int64 (2,) valid height and width)."""
        if self.evaluation:
            return (self.evaluation_crop(path),)
        pixels = decode_image(path, self.long_side)  # (h, w, 3)
        h, w = pixels.shape[:2]
        canvas = torch.zeros(3, self.long_side, self.long_side, dtype=torch.uint8)
        canvas[:, :h, :w] = torch.from_numpy(pixels).permute(2, 0, 1)
        return canvas, torch.tensor([h, w])

    def evaluation_crop(self, path: str) -> torch.Tensor:
        """torchvision Resize(int(S * 256/224)) (shorter side, bicubic) + CenterCrop(S): uint8 (3, S, S)."""
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size  # torchvision Resize(int): shorter side -> resize, longer side scaled and truncated
            size = (self.resize, int(self.resize * h / w)) if w <= h else (int(self.resize * w / h), self.resize)
            image = image.resize(size, Image.BICUBIC)
            top, left = round((size[1] - self.crop_size) / 2), round((size[0] - self.crop_size) / 2)
            pixels = np.asarray(image.crop((left, top, left + self.crop_size, top + self.crop_size)))  # (S, S, 3)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()

    def report_bad(self, path: str, reason: str) -> None:
        """List path once in bad_images_file (an flock makes the check-and-append atomic across workers)."""
        self.known_bad.add(path)
        if self.bad_images_file is None:
            print(f"warning: skipped an unreadable image ({reason})", file=sys.stderr, flush=True)
            return
        with open(self.bad_images_file, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            f.seek(0)
            if path not in f.read().splitlines():
                f.write(path + "\n")


def read_bad_images(path: str | None) -> list[str]:
    """The paths listed in a bad_images_file, in order ([] when there is none)."""
    if path is None or not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f.read().splitlines() if line]


def _worker_message(error: DatasetError) -> str:
    """The one-line message of a DatasetError, also when a DataLoader re-raised it from a worker with the worker's
    traceback folded into the message (its last line is 'data.DatasetError: <message>')."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
    return last.split("DatasetError: ", 1)[1] if "DatasetError: " in last else last


def load_batches(dataset, batch_sampler, num_workers: int = 0, pin_memory: bool = False, collate_fn=None):
    """Batches of a folder dataset through a DataLoader; a worker's DatasetError comes back as a one-line
    DatasetError (not the DataLoader's wrapped traceback)."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, collate_fn=collate_fn, worker_init_fn=_ignore_sigint)
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DatasetError as error:
            raise DatasetError(_worker_message(error)) from None
        yield batch


def _ignore_sigint(worker_id: int) -> None:
    """A Ctrl-C in a terminal reaches every process of the foreground group: workers ignore it, so that the main
    process can finish its step and save (train.py: a first Ctrl-C stops like SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def folder_batches(dataset: ImageFolder, batches: list[list[int]], device: torch.device, num_workers: int = 0,
                   gpu_decode: bool = False):
    """(uint8 canvases (B, 3, L, L), int64 valid sizes (B, 2), int64 indices (B,) of the images read: those asked
    for, or their replacements where unreadable) on device for each list of indices of a training ImageFolder. CPU
    decoding: DataLoader workers decode, resize and pad (ImageFolder.transform). gpu_decode: workers only read the
    files; the main process decodes each batch of JPEGs on the GPU in one nvJPEG call (torchvision.io.decode_jpeg)
    and resizes them there. Without torchvision or CUDA it says so and decodes on the CPU; a file the GPU cannot
    decode (PNG, CMYK, corrupt) goes through the CPU path alone."""
    if gpu_decode and (reason := _gpu_decode_unavailable(device)):
        if reason not in _NOTES_PRINTED:  # once per run, not every epoch
            print(f"note: gpu_decode: {reason}; decoding on the CPU", flush=True)
            _NOTES_PRINTED.add(reason)
        gpu_decode = False
    if not gpu_decode:
        for images, sizes, _, read in load_batches(dataset, batches, num_workers, pin_memory=device.type == "cuda"):
            yield (images.to(device, non_blocking=True), sizes.to(device, non_blocking=True),
                   read.to(device, non_blocking=True))
        return
    for items in load_batches(_FileBytes(dataset), batches, num_workers, collate_fn=list):
        yield _decode_on_gpu(dataset, items, device)


_NOTES_PRINTED: set[str] = set()


def _gpu_decode_unavailable(device: torch.device) -> str | None:
    """Why JPEGs cannot be decoded on device (None: they can)."""
    if device.type != "cuda":
        return f"the training device is {device.type}"
    try:
        import torchvision.io  # noqa: F401  (optional: CPU machines and CI do not have it)
    except ImportError as error:
        return f"torchvision cannot be imported ({error})"
    return None


class _FileBytes(torch.utils.data.Dataset):
    """Item i of an ImageFolder as (i, its file's bytes as uint8 (n,), or None when the file cannot be read)."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        try:
            with open(self.folder.samples[i][0], "rb") as f:
                return i, torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError:
            return i, None


def _decode_on_gpu(folder: ImageFolder, items: list, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Canvases, valid sizes and indices read of a batch of (index, file bytes), as ImageFolder makes them, decoded
    by nvJPEG on device and resized there (bicubic, antialiased); failures go through folder[i] on the CPU."""
    import torchvision.io as tvio

    L = folder.long_side
    canvas = torch.zeros(len(items), 3, L, L, dtype=torch.uint8, device=device)
    sizes = torch.zeros(len(items), 2, dtype=torch.int64)
    read = torch.tensor([i for i, _ in items], dtype=torch.int64)
    if all(raw is not None for _, raw in items):
        try:
            images = tvio.decode_jpeg([raw for _, raw in items], mode=tvio.ImageReadMode.RGB, device=device)
        except Exception:  # one undecodable file fails the whole call: retry one by one
            images = None
    else:
        images = None
    if images is None:
        images = []
        for _, raw in items:
            try:
                images.append(tvio.decode_jpeg(raw, mode=tvio.ImageReadMode.RGB, device=device))
            except Exception:
                images.append(None)
    for b, ((i, _), image) in enumerate(zip(items, images)):
        if image is None:  # the CPU path, with its replacement and listing of unreadable images
            image_canvas, size, _, read[b] = folder[i]
            canvas[b], sizes[b] = image_canvas.to(device), size
            continue
        h, w = image.shape[1:]
        scale = min(1.0, L / max(h, w))
        th, tw = max(1, round(h * scale)), max(1, round(w * scale))
        if (th, tw) != (h, w):
            image = F.interpolate(image[None].float(), size=(th, tw), mode="bicubic", antialias=True,
                                  align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
        canvas[b, :, :th, :tw] = image
        sizes[b, 0], sizes[b, 1] = th, tw
    return canvas, sizes.to(device, non_blocking=True), read.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------- synthetic
SYNTHETIC_CLASSES = ("stripes", "checker", "dots", "grid", "rings", "zigzag", "crosses", "blobs", "spiral", "waves")


def _pattern(name: str, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, theta: torch.Tensor,
             blobs: torch.Tensor) -> torch.Tensor:
    """A class's field (n, H, W): > 0 on the pattern, < 0 on the background. u, v: rotated lattice coordinates in
    periods; r, theta: polar coordinates about the pattern's centre (r in periods); blobs: a random smooth field."""
    fu, fv = u - u.floor() - 0.5, v - v.floor() - 0.5  # position inside the lattice cell, in [-0.5, 0.5)
    if name == "stripes":
        return torch.cos(2 * math.pi * u)
    if name == "checker":
        return torch.cos(2 * math.pi * u) * torch.cos(2 * math.pi * v)
    if name == "dots":
        return 0.3 - torch.hypot(fu, fv)
    if name == "grid":
        return torch.maximum(0.12 - fu.abs(), 0.12 - fv.abs())
    if name == "rings":
        return torch.cos(2 * math.pi * r)
    if name == "zigzag":
        return torch.cos(2 * math.pi * (u + 0.8 * (fv.abs() - 0.25)))
    if name == "crosses":
        bar = lambda a, b: torch.minimum(0.1 - a.abs(), 0.35 - b.abs())
        return torch.maximum(bar(fu, fv), bar(fv, fu))
    if name == "blobs":
        return blobs
    if name == "spiral":
        return torch.cos(2 * math.pi * r + 3 * theta)
    if name == "waves":
        return torch.cos(2 * math.pi * (u + 0.35 * torch.sin(math.pi * v)))
    raise ValueError(f"unknown synthetic pattern {name!r}")


def make_synthetic(size: int, seed: int, split: str, image_size: int = 32) -> ImageDataset:
    """A class-balanced toy dataset of the 10 SYNTHETIC_CLASSES patterns: uint8 (size, 3, 32, 32), plain torch.

    Each image: one class's pattern over the whole image at a random orientation, period (6-10 px), phase and
    centre, in a shade 0.3-0.4 lighter or darker (random polarity) than a near-grey background (level U(0.3, 0.6),
    faint random tints per channel), soft-edged, plus grey pixel noise. Orientation, phase, period and polarity make
    raw pixels a poor code (weighted k-NN 34 % at 10k training images, 42 % at 20k); every crop of an image shares
    the kind of pattern, which a patch-based ViT picks up within CPU minutes. Colours stay within the colour
    jitter's range and there is no clutter: a per-image mark that survives crops and jitter becomes the thing
    self-distillation learns (README, "Synthetic data"). Train and test come from unrelated random streams of seed.
    """
    generator = torch.Generator().manual_seed(_seed_from(seed, 0 if split == "train" else 1))

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    num_classes = len(SYNTHETIC_CLASSES)
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]
    angle, period = uniform(size, high=2 * math.pi), uniform(size, low=6.0, high=10.0)  # period in pixels
    phase, centre = uniform(size, 2), uniform(size, 2, low=-0.5, high=0.5) * image_size
    background = uniform(size, 1, low=0.3, high=0.6) + uniform(size, 3, low=-0.06, high=0.06)  # (size, 3)
    polarity = torch.where(uniform(size, 1) < 0.5, -1.0, 1.0)  # pattern darker or lighter than the background
    foreground = background + polarity * uniform(size, 1, low=0.3, high=0.4) + uniform(size, 3, low=-0.06, high=0.06)
    blob_freq, blob_phase = uniform(size, 4, 2, low=-1, high=1) * 2 * math.pi / 14, uniform(size, 4, high=2 * math.pi)
    pixels = torch.arange(image_size, dtype=torch.float32) + 0.5
    y, x = pixels.view(1, -1, 1), pixels.view(1, 1, -1)
    images = torch.empty(size, 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, size, 4096):  # chunks bound the memory of the float intermediates
        s = slice(start, start + 4096)
        n = len(labels[s])
        dx, dy = x - image_size / 2 - centre[s, 0, None, None], y - image_size / 2 - centre[s, 1, None, None]
        cos, sin, per = angle[s].cos()[:, None, None], angle[s].sin()[:, None, None], period[s, None, None]
        u = (dx * cos + dy * sin) / per + phase[s, 0, None, None]  # (n, H, W) lattice coordinates, in periods
        v = (dy * cos - dx * sin) / per + phase[s, 1, None, None]
        r, theta = torch.hypot(dx, dy) / per, torch.atan2(dy, dx)
        k, offset = blob_freq[s], blob_phase[s]  # 4 random plane waves of ~14 px wavelength make smooth blobs
        blobs = sum(torch.cos(k[:, i, 0, None, None] * x + k[:, i, 1, None, None] * y + offset[:, i, None, None])
                    for i in range(4))
        field = torch.empty(n, image_size, image_size)
        for c, name in enumerate(SYNTHETIC_CLASSES):
            rows = (labels[s] == c).nonzero().squeeze(1)
            field[rows] = _pattern(name, u[rows], v[rows], r[rows], theta[rows], blobs[rows])
        alpha = torch.sigmoid(8 * field)[:, None]  # soft edges
        canvas = torch.lerp(background[s, :, None, None].expand(n, 3, image_size, image_size),
                            foreground[s, :, None, None].expand(n, 3, image_size, image_size), alpha)
        canvas += 0.05 * torch.randn(n, 1, image_size, image_size, generator=generator)
        images[s] = canvas.clamp_(0, 1).mul_(255).round_()
    return ImageDataset(images, labels, num_classes)


# ----------------------------------------------------------------------------------------------------- downloads
CIFAR_ARCHIVES = {  # official python versions: URL and md5 of the archive, its folder, batch members, label key
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], label_key="labels",
                    num_classes=10),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"], label_key="fine_labels", num_classes=100),
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_MD5 = {  # of the official .gz files (fashion-mnist README)
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}


def _download(url: str, path: Path, md5: str) -> None:
    """Fetch url to path and check its md5; written to a temp file and renamed, so a failure leaves nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {path}", flush=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DatasetError(f"download of {url} has md5 {digest.hexdigest()}, expected {md5}; "
                               f"download it by hand and put it at {path}")
        os.replace(temp, path)
    except (OSError, http.client.HTTPException) as error:  # URLError and timeouts are OSErrors
        raise DatasetError(f"could not download {url} ({error}); download it by hand and put it at {path}") from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def _check_download_dir(path: Path, what: str) -> None:
    """DatasetError unless path is, or can be created as, a writable directory to download `what` into."""
    if path.exists() and not path.is_dir():
        raise DatasetError(f"data_path {path} is not a directory; {what} would be downloaded into it")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise DatasetError(f"{what} is not in {path} and {existing} is not writable to download it; "
                           f"put it there by hand")


# ----------------------------------------------------------------------------------------------------- CIFAR
try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what CIFAR batches hold (dicts, lists, bytes, numpy arrays) and refuses every other global, so
    that a tampered archive cannot run code when read (plain pickle.load calls whatever the file names)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,  # numpy 1 name (official files)
               ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,  # numpy 2 name
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): lambda text, encoding: text.encode(encoding)}  # bytes, Python 3 protocol 2

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return self.ALLOWED[module, name]


def _open_tar(archive: Path) -> tarfile.TarFile:
    """Open a .tar.gz, refusing it whole if any member is absolute, climbs with '..', is a link or a special file.
    Members are only ever read into memory, never written out, but such an archive is not the official one."""
    try:
        tar = tarfile.open(archive, "r:gz")
        members = tar.getmembers()  # reads to the end, so a truncated archive fails here
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"cannot read archive {archive} ({error}); delete it so it is downloaded again") from None
    for m in members:
        if m.name.startswith("/") or ".." in PurePosixPath(m.name).parts or not (m.isfile() or m.isdir()):
            tar.close()
            raise DatasetError(f"unsafe member {m.name!r} (absolute path, '..', link or special file) in {archive}; "
                               f"refusing to extract it: delete the archive and get the official one")
    return tar


def _read_cifar_batch(tar: tarfile.TarFile, member: str, archive: Path, label_key: str, num_classes: int):
    """One pickled CIFAR batch -> (uint8 (n, 3, 32, 32), int64 (n,)), validated."""
    where = f"{member} in {archive}"
    try:
        batch = _CifarUnpickler(tar.extractfile(member), encoding="bytes").load()
    except KeyError:
        raise DatasetError(f"{archive} has no member {member}: not the official CIFAR archive") from None
    except Exception as error:  # unpickling damaged data can raise almost any exception type
        raise DatasetError(f"cannot unpickle {where}: {error}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{where} holds a {type(batch).__name__}, expected a dict")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data = batch.get("data")
    try:
        labels = np.asarray(batch.get(label_key, []))
    except (ValueError, TypeError):  # ragged or otherwise not array-like
        labels = np.empty(0, dtype=object)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{where}: 'data' must be a uint8 (n, 3072) array, got "
                           f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if (labels.shape != (len(data),) or labels.dtype.kind not in "iu"
            or (len(labels) and not 0 <= labels.min() <= labels.max() < num_classes)):
        raise DatasetError(f"{where}: '{label_key}' must hold {len(data)} integers in [0, {num_classes}), "
                           f"got {labels.dtype} {labels.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def _check_cifar_cache(tensors, cache: Path, num_classes: int, archive: Path) -> None:
    """DatasetError unless the cache holds, per split, uint8 (n, 3, 32, 32) images and n int64 labels in
    [0, num_classes), as _read_cifar_batch checks the archive's batches."""
    for split in ("train", "test"):
        images = tensors.get(f"{split}_images") if isinstance(tensors, dict) else None
        labels = tensors.get(f"{split}_labels") if isinstance(tensors, dict) else None
        problem = None
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.shape[1:] != (3, 32, 32):
            problem = (f"'{split}_images' must be a uint8 (n, 3, 32, 32) tensor, got "
                       f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        elif (not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (len(images),)
              or (len(labels) and not 0 <= labels.min() <= labels.max() < num_classes)):
            problem = (f"'{split}_labels' must be {len(images)} int64 labels in [0, {num_classes}), got "
                       f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
                       + (f" in [{labels.min()}, {labels.max()}]" if isinstance(labels, torch.Tensor)
                          and labels.numel() and not labels.is_floating_point() else ""))
        if problem:
            raise DatasetError(f"cache {cache}: {problem}; delete it to rebuild it from {archive}")


def _load_cifar(name: str, data_path: str) -> dict[str, torch.Tensor]:
    """{train,test}_{images,labels} of CIFAR-10/100: from the tensor cache data_path/<name>.pt, else parsed from
    the archive (downloaded first if absent) and cached."""
    spec, root = CIFAR_ARCHIVES[name], Path(data_path)
    cache, archive = root / f"{name}.pt", root / spec["url"].rsplit("/", 1)[1]
    if cache.exists():
        try:
            tensors = torch.load(cache, weights_only=True)
        except Exception as error:
            raise DatasetError(f"cannot read cache {cache} ({error}); delete it to rebuild it from {archive}") from None
        _check_cifar_cache(tensors, cache, spec["num_classes"], archive)
        return tensors
    if not archive.exists():
        _download(spec["url"], archive, spec["md5"])
    else:
        with open(archive, "rb") as f:
            actual = hashlib.file_digest(f, "md5").hexdigest()
        if actual != spec["md5"]:
            raise DatasetError(f"{archive} has md5 {actual}, expected {spec['md5']}: corrupt or not the official "
                               f"archive; delete it (it will be downloaded again) or replace it with {spec['url']}")
    tensors = {}
    with _open_tar(archive) as tar:
        for split in ("train", "test"):
            batches = [_read_cifar_batch(tar, f"{spec['folder']}/{member}", archive, spec["label_key"],
                                         spec["num_classes"]) for member in spec[split]]
            tensors[f"{split}_images"] = torch.cat([images for images, _ in batches])
            tensors[f"{split}_labels"] = torch.cat([labels for _, labels in batches])
    fd, temp = tempfile.mkstemp(dir=root, prefix=cache.name + ".", suffix=".part")
    with os.fdopen(fd, "wb") as f:
        torch.save(tensors, f)
    os.replace(temp, cache)  # atomic: an interrupted run never leaves a half-written cache
    return tensors


# ----------------------------------------------------------------------------------------------------- Fashion-MNIST
def _find_fashion_mnist_file(name: str, data_path: str) -> Path | None:
    """name or name.gz in data_path, else in the Debian system folder; None if in neither."""
    for folder in (Path(data_path), Path(FASHION_MNIST_SYSTEM_DIR)):
        for path in (folder / name, folder / f"{name}.gz"):
            if path.is_file():
                return path
    return None


def _read_idx(path: Path, magic: int, num_dims: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (gzipped or not) -> uint8 tensor of the shape its header gives."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"cannot read {path} ({error}): corrupt or truncated file") from None
    header = 4 + 4 * num_dims
    found = int.from_bytes(raw[:4], "big") if len(raw) >= header else None
    if found != magic:
        raise DatasetError(f"{path} is not an IDX file of the expected kind: magic number {found}, expected {magic}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(num_dims)]
    if len(raw) - header != math.prod(dims):
        raise DatasetError(f"{path}: header promises {dims} = {math.prod(dims)} bytes but {len(raw) - header} "
                           f"follow (truncated or corrupt file)")
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy())


def _load_fashion_mnist(data_path: str, split: str) -> ImageDataset:
    """Fashion-MNIST as uint8 (n, 3, 32, 32): each grey 28 x 28 image is zero-padded by 2 px on every side (the
    background is black, so no pixel is resampled) and its channel repeated three times."""
    paths = {}
    for name in FASHION_MNIST_MD5:  # both splits' files, so a missing test file stops the run before training
        path = _find_fashion_mnist_file(name, data_path)
        if path is None:
            path = Path(data_path) / f"{name}.gz"
            _download(FASHION_MNIST_URL + f"{name}.gz", path, FASHION_MNIST_MD5[name])
        if name.startswith("train" if split == "train" else "t10k"):
            paths[name.split("-", 1)[1]] = path
    # files found locally are checked by content, not md5: Debian's package recompresses the official .gz files
    images = _read_idx(paths["images-idx3-ubyte"], 2051, 3)
    labels = _read_idx(paths["labels-idx1-ubyte"], 2049, 1)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{paths['images-idx3-ubyte']} holds {tuple(images.shape[1:])} images, expected 28 x 28")
    if len(labels) != len(images) or (len(labels) and labels.max() >= 10):
        raise DatasetError(f"{paths['labels-idx1-ubyte']} must hold {len(images)} labels in [0, 10), "
                           f"got {len(labels)} with maximum {labels.max() if len(labels) else None}")
    return ImageDataset(F.pad(images, (2, 2, 2, 2))[:, None].repeat(1, 3, 1, 1), labels, 10)


# ----------------------------------------------------------------------------------------------------- entry points
def check_dataset(name: str, data_path: str) -> None:
    """Cheap validation before any compute: DatasetError naming what is wrong and what would be valid."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    root = Path(data_path)
    if name == "folder":
        for sub in ("train", "val"):
            if not (root / sub).is_dir():
                raise DatasetError(f"dataset 'folder' needs the directory {root / sub} "
                                   f"(layout: {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")
        train, val = _class_folders(root / "train"), _class_folders(root / "val")
        if train != val:
            raise DatasetError(f"{root}/train and {root}/val must hold the same class folders; in only one of "
                               f"them: {sorted(set(train) ^ set(val))[:5]}")
        for sub, classes in (("train", train), ("val", val)):
            for name in classes:
                if not _holds_an_image(root / sub / name):
                    raise DatasetError(f"class folder {root / sub / name} holds no image with extension "
                                       f"{IMAGE_EXTENSIONS}; every class needs images in train/ and val/")
    elif name in CIFAR_ARCHIVES:
        archive = root / CIFAR_ARCHIVES[name]["url"].rsplit("/", 1)[1]
        if not (archive.exists() or (root / f"{name}.pt").exists()):
            _check_download_dir(root, archive.name)
    elif name == "fashion_mnist" and any(_find_fashion_mnist_file(f, data_path) is None for f in FASHION_MNIST_MD5):
        _check_download_dir(root, "Fashion-MNIST")


def load_dataset(name: str, data_path: str, split: str, *, size: int | None = None, seed: int = 0,
                 image_size: int = 224, evaluation: bool = False, strict: bool = False,
                 bad_images_file: str | None = None) -> ImageDataset | ImageFolder:
    """The 'train' or 'test' split (val/ for folder) of a dataset. size (default 20000 train / 2000 test) and
    seed: synthetic only. image_size, evaluation (the train split with the evaluation transform, for k-NN
    features), strict and bad_images_file (unreadable images, see ImageFolder): folder only."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    check_dataset(name, data_path)
    if name == "synthetic":
        size = size if size is not None else (20000 if split == "train" else 2000)
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return make_synthetic(size, seed, split)
    if name == "folder":
        return ImageFolder(Path(data_path) / ("train" if split == "train" else "val"), image_size,
                           evaluation=evaluation or split == "test", strict=strict, bad_images_file=bad_images_file)
    if name in CIFAR_ARCHIVES:
        tensors = _load_cifar(name, data_path)
        return ImageDataset(tensors[f"{split}_images"], tensors[f"{split}_labels"],
                            CIFAR_ARCHIVES[name]["num_classes"])
    return _load_fashion_mnist(data_path, split)


def epoch_batches(num_samples: int, batch_size: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """int64 (num_batches, batch_size) sample indices of this rank in this epoch.

    One permutation per (seed, epoch), the same on every rank, truncated to whole global batches (drop_last, as
    DINO: every step enqueues a full global batch into the memories) and cut so that global batch t is the
    rank-ordered concatenation of the ranks' batches t. Deterministic: a run resumes mid-epoch by slicing [step:].
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    num_batches = num_samples // (batch_size * world_size)
    if num_batches == 0:
        raise ValueError(f"{num_samples} samples do not fill one global batch of {batch_size} x {world_size} ranks")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(_seed_from(seed, epoch)))
    return order[: num_batches * batch_size * world_size].view(num_batches, world_size, batch_size)[:, rank].clone()


def subset_indices(num_samples: int, size: int) -> torch.Tensor:
    """int64 sorted indices of a fixed random subset of `size` of `num_samples` images (train.py --train_subset).

    Seeded by nothing but the sizes, so runs with different --seed train on the same images."""
    if not 0 < size <= num_samples:
        raise ValueError(f"a subset of {size} images of {num_samples} is not possible")
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(_seed_from(num_samples, size)))[
        :size].sort().values


# ----------------------------------------------------------------------------------------------------- evaluation
def normalize_images(images: torch.Tensor, size: int | None = None, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float32 (B, 3, size, size), resized (bicubic, antialiased when shrinking)
    only when size differs from H; for k-NN feature extraction."""
    x = images.float().div_(255)
    if size is not None and (size != x.shape[2] or size != x.shape[3]):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=size < x.shape[2], align_corners=False)
        x = x.clamp_(0, 1)
    return normalize(x, mean, std)
