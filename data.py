"""Data for sop: the datasets and the batches the training loop and the k-NN evaluation read (README, "Image
folders" and "Synthetic data").

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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_LONG_SIDE = 512  # px: training images are decoded with their longer side at most this (README, "Image folders")


class DatasetError(Exception):
    """A dataset that cannot be used: bad name, missing path, failed download or corrupt file (one-line message)."""


def seed_for(*values: int) -> int:
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
        return self.images[i], int(self.labels[i])


# ----------------------------------------------------------------------------------------------------- image folders
def _class_folders(root: Path) -> list[str]:
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class folders: expected {root}/<class>/<image>.jpg")
    return classes


def decode_image(path: str, long_side: int | None = None) -> np.ndarray:
    """RGB uint8 (h, w, 3) of an image file, its longer side scaled down to long_side (aspect kept, never upsampled;
    None: full size). JPEGs use Pillow's draft mode: the decoder scales by 1/2, 1/4 or 1/8 in the DCT domain to the
    smallest size still >= the target, which a bicubic resize then finishes (BENCHMARKS.md, "Folder input")."""
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


class ImageFolder(torch.utils.data.Dataset):
    """Images in root/<class>/*.{jpg,png,...} (sub-folders included), labelled by sorted class name.

    evaluation=True: the DINO evaluation transform (facebookresearch/dino eval_knn.py: Resize(256) bicubic,
    CenterCrop(224), scaled to crop size S); an item is (uint8 (3, S, S), label). Training: the whole image, its
    longer side at most long_side (decode_image), at the top left of a zero L x L canvas; an item is (uint8 (3, L, L),
    int64 (2,) valid (height, width), label, index of the image read), and the multicrop draws inside that region.
    An unreadable image is replaced by the next readable one of its class (then of the dataset) and listed once in
    bad_images_file (printed when there is none); strict=True raises DatasetError("cannot read image PATH: ...").
    """

    def __init__(self, root: str | Path, image_size: int = 224, evaluation: bool = True,
                 long_side: int | None = None, strict: bool = False, bad_images_file: str | None = None):
        root = Path(root)
        self.classes = _class_folders(root)
        self.samples: list[tuple[str, int]] = []
        self.class_ranges: list[tuple[int, int]] = []  # samples of class c: [start, end)
        for label, name in enumerate(self.classes):
            files = sorted(str(p) for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
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
        if not self.evaluation:
            pixels = decode_image(path, self.long_side)  # (h, w, 3)
            canvas = torch.zeros(3, self.long_side, self.long_side, dtype=torch.uint8)
            canvas[:, :pixels.shape[0], :pixels.shape[1]] = torch.from_numpy(pixels).permute(2, 0, 1)
            return canvas, torch.tensor(pixels.shape[:2])
        from PIL import Image

        with Image.open(path) as image:
            image, S = image.convert("RGB"), self.crop_size
            w, h = image.size  # torchvision Resize(int): shorter side -> resize, longer side scaled and truncated
            size = (self.resize, int(self.resize * h / w)) if w <= h else (int(self.resize * w / h), self.resize)
            top, left = round((size[1] - S) / 2), round((size[0] - S) / 2)
            pixels = np.array(image.resize(size, Image.BICUBIC).crop((left, top, left + S, top + S)))  # (S, S, 3)
        return (torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),)

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


def load_batches(dataset, batch_sampler, num_workers: int = 0, pin_memory: bool = False, collate_fn=None):
    """Batches of a folder dataset through a DataLoader. The DataLoader re-raises a worker's DatasetError with the
    worker's traceback folded in (last line 'data.DatasetError: <message>'): it comes back as that one line."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, collate_fn=collate_fn, worker_init_fn=_ignore_sigint)
    try:
        yield from loader
    except DatasetError as error:
        last = (str(error).strip().splitlines() or [""])[-1]
        raise DatasetError(last.split("DatasetError: ", 1)[-1]) from None


def _ignore_sigint(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches every process of the group: workers ignore it, so that the main process can
    finish its step and save (train.py: a first Ctrl-C stops like SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def folder_batches(dataset: ImageFolder, batches: list[list[int]], device: torch.device, num_workers: int = 0,
                   gpu_decode: bool = False):
    """(uint8 canvases (B, 3, L, L), int64 valid sizes (B, 2), int64 indices (B,) of the images read: those asked
    for, or their replacements where unreadable) on device, per list of indices of a training ImageFolder. CPU:
    workers decode, resize and pad (ImageFolder.transform). gpu_decode: workers only read the files and the main
    process decodes each batch in one nvJPEG call (README, "Image folders"); without torchvision or CUDA it says so
    and decodes on the CPU."""
    if gpu_decode and (reason := _gpu_decode_unavailable(device)):
        if reason not in _NOTES_PRINTED:  # once per run, not every epoch
            print(f"note: gpu_decode: {reason}; decoding on the CPU", flush=True)
            _NOTES_PRINTED.add(reason)
        gpu_decode = False
    if gpu_decode:
        for items in load_batches(_FileBytes(dataset), batches, num_workers, collate_fn=list):
            yield _decode_on_gpu(dataset, items, device)
        return
    for images, sizes, _, read in load_batches(dataset, batches, num_workers, pin_memory=device.type == "cuda"):
        yield tuple(t.to(device, non_blocking=True) for t in (images, sizes, read))


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
    by nvJPEG on device and resized there (bicubic, antialiased). A file it cannot decode (PNG, CMYK, corrupt,
    unread) goes through folder[i] on the CPU, with its replacement and listing of unreadable images."""
    import torchvision.io as tvio

    def decode(raw):
        try:
            return tvio.decode_jpeg(raw, mode=tvio.ImageReadMode.RGB, device=device)
        except Exception:
            return None
    L = folder.long_side
    canvas = torch.zeros(len(items), 3, L, L, dtype=torch.uint8, device=device)
    sizes = torch.zeros(len(items), 2, dtype=torch.int64)
    read = torch.tensor([i for i, _ in items], dtype=torch.int64)
    # one call for the batch; one undecodable (or unread: None) file fails it, and then the files go one by one
    images = decode([raw for _, raw in items]) or [decode(raw) for _, raw in items]
    for b, ((i, _), image) in enumerate(zip(items, images)):
        if image is None:
            image_canvas, sizes[b], _, read[b] = folder[i]
            canvas[b] = image_canvas.to(device)
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
_PATTERNS = {  # class -> field (n, H, W), > 0 on the pattern, < 0 on the background; u, v: rotated lattice
    # coordinates in periods, fu, fv: position inside the lattice cell in [-0.5, 0.5), r, t: polar coordinates about
    # the pattern's centre (r in periods), b: a random smooth field
    "stripes": lambda u, v, fu, fv, r, t, b: torch.cos(2 * math.pi * u),
    "checker": lambda u, v, fu, fv, r, t, b: torch.cos(2 * math.pi * u) * torch.cos(2 * math.pi * v),
    "dots": lambda u, v, fu, fv, r, t, b: 0.3 - torch.hypot(fu, fv),
    "grid": lambda u, v, fu, fv, r, t, b: torch.maximum(0.12 - fu.abs(), 0.12 - fv.abs()),
    "rings": lambda u, v, fu, fv, r, t, b: torch.cos(2 * math.pi * r),
    "zigzag": lambda u, v, fu, fv, r, t, b: torch.cos(2 * math.pi * (u + 0.8 * (fv.abs() - 0.25))),
    "crosses": lambda u, v, fu, fv, r, t, b: torch.maximum(torch.minimum(0.1 - fu.abs(), 0.35 - fv.abs()),
                                                           torch.minimum(0.1 - fv.abs(), 0.35 - fu.abs())),
    "blobs": lambda u, v, fu, fv, r, t, b: b,
    "spiral": lambda u, v, fu, fv, r, t, b: torch.cos(2 * math.pi * r + 3 * t),
    "waves": lambda u, v, fu, fv, r, t, b: torch.cos(2 * math.pi * (u + 0.35 * torch.sin(math.pi * v))),
}
SYNTHETIC_CLASSES = tuple(_PATTERNS)


def make_synthetic(size: int, seed: int, split: str, image_size: int = 32) -> ImageDataset:
    """A class-balanced toy dataset of the 10 SYNTHETIC_CLASSES patterns, uint8 (size, 3, 32, 32), in plain torch.
    Each image: one pattern over the whole image at a random orientation, period (6-10 px), phase and centre, 0.3-0.4
    lighter or darker (random polarity) than a near-grey, faintly tinted background, soft-edged, with grey pixel
    noise. Colours stay within the colour jitter's range and there is no clutter, or self-distillation learns a
    per-image mark instead of the pattern (README, "Synthetic data"). Train and test: unrelated streams of seed."""
    generator = torch.Generator().manual_seed(seed_for(seed, 0 if split == "train" else 1))

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
        k, offset = blob_freq[s], blob_phase[s]  # 4 random plane waves of ~14 px wavelength make smooth blobs
        blobs = sum(torch.cos(k[:, i, 0, None, None] * x + k[:, i, 1, None, None] * y + offset[:, i, None, None])
                    for i in range(4))
        inputs = (u, v, u - u.floor() - 0.5, v - v.floor() - 0.5, torch.hypot(dx, dy) / per, torch.atan2(dy, dx), blobs)
        field = torch.empty(n, image_size, image_size)
        for c, pattern in enumerate(_PATTERNS.values()):
            rows = (labels[s] == c).nonzero().squeeze(1)
            field[rows] = pattern(*(t[rows] for t in inputs))
        alpha = torch.sigmoid(8 * field)[:, None]  # soft edges
        canvas = torch.lerp(background[s, :, None, None].expand(n, 3, image_size, image_size),
                            foreground[s, :, None, None].expand(n, 3, image_size, image_size), alpha)
        canvas += 0.05 * torch.randn(n, 1, image_size, image_size, generator=generator)
        images[s] = canvas.clamp_(0, 1).mul_(255).round_()
    return ImageDataset(images, labels, num_classes)


# ----------------------------------------------------------------------------------------------------- files
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
FASHION_MNIST_MD5 = {  # of the official .gz files (zalandoresearch/fashion-mnist README.md)
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


def _checked(images, labels, shape: tuple, num_classes: int, names: tuple, where: str, fix: str = ""):
    """(images, labels) as tensors, or DatasetError unless they are uint8 (n, *shape) and n int64 labels in
    [0, num_classes): the one check of CIFAR batches, of the CIFAR cache and of Fashion-MNIST files."""
    def tensor(x):
        try:
            return torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):  # None, ragged lists, object arrays: reported below
            return x
    images, labels = tensor(images), tensor(labels)
    got = lambda x: f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.shape[1:] != shape:
        problem = f"'{names[0]}' must be a uint8 (n, {', '.join(map(str, shape))}) tensor, got {got(images)}"
    elif (not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (len(images),)
          or (len(labels) and not 0 <= labels.min() <= labels.max() < num_classes)):
        integers = isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.numel()
        problem = (f"'{names[1]}' must be {len(images)} int64 labels in [0, {num_classes}), got {got(labels)}"
                   + (f" in [{labels.min()}, {labels.max()}]" if integers else ""))
    else:
        return images, labels
    raise DatasetError(f"{where}: {problem}{fix}")


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what CIFAR batches hold (dicts, lists, bytes, numpy arrays) and refuses every other global, so
    that a tampered archive cannot run code when read (plain pickle.load calls whatever the file names)."""

    _reconstruct = np.empty(0).__reduce__()[0]  # numpy's array rebuilder, named numpy.core (1.x) or numpy._core (2)
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy", "dtype"): np.dtype,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct, ("numpy", "ndarray"): np.ndarray,
               ("_codecs", "encode"): lambda text, encoding: text.encode(encoding)}  # bytes, Python 3 protocol 2

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return self.ALLOWED[module, name]


def _open_tar(archive: Path) -> tarfile.TarFile:
    """Open a .tar.gz, refusing it whole if any member is absolute, climbs with '..', is a link or a special file:
    members are only read into memory, never extracted, but such an archive is not the official one."""
    try:
        tar = tarfile.open(archive, "r:gz")
        members = tar.getmembers()  # reads to the end, so a truncated archive fails here
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"cannot read archive {archive} ({error}); delete it so it is downloaded again") from None
    for m in members:
        if m.name.startswith("/") or ".." in PurePosixPath(m.name).parts or not (m.isfile() or m.isdir()):
            tar.close()
            raise DatasetError(f"unsafe member {m.name!r} (absolute, '..', link or special file) in {archive}; "
                               f"delete it and get the official archive")
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
    images, labels = _checked(batch.get("data"), batch.get(label_key), (3072,), num_classes, ("data", label_key),
                              where)
    return images.reshape(-1, 3, 32, 32).clone(), labels


def _load_cifar(name: str, data_path: str) -> dict[str, torch.Tensor]:
    """{train,test}_{images,labels} of CIFAR-10/100: from the tensor cache data_path/<name>.pt, else parsed from
    the archive (downloaded first if absent) and cached."""
    spec, root = CIFAR_ARCHIVES[name], Path(data_path)
    cache, archive, num_classes = root / f"{name}.pt", root / spec["url"].rsplit("/", 1)[1], spec["num_classes"]
    if cache.exists():
        try:
            tensors = torch.load(cache, weights_only=True)
        except Exception as error:
            raise DatasetError(f"cannot read cache {cache} ({error}); delete it to rebuild it from {archive}") from None
        tensors = tensors if isinstance(tensors, dict) else {}
        for split in ("train", "test"):
            keys = (f"{split}_images", f"{split}_labels")
            _checked(*map(tensors.get, keys), (3, 32, 32), num_classes, keys, f"cache {cache}",
                     f"; delete it to rebuild it from {archive}")
        return tensors
    if not archive.exists():
        _download(spec["url"], archive, spec["md5"])
    with open(archive, "rb") as f:
        actual = hashlib.file_digest(f, "md5").hexdigest()
    if actual != spec["md5"]:
        raise DatasetError(f"{archive} has md5 {actual}, expected {spec['md5']}: not the official archive; delete it "
                           f"(it will be downloaded again) or replace it with {spec['url']}")
    tensors = {}
    with _open_tar(archive) as tar:
        for split in ("train", "test"):
            batches = [_read_cifar_batch(tar, f"{spec['folder']}/{member}", archive, spec["label_key"], num_classes)
                       for member in spec[split]]
            tensors[f"{split}_images"] = torch.cat([images for images, _ in batches])
            tensors[f"{split}_labels"] = torch.cat([labels for _, labels in batches])
    temp = root / f"{cache.name}.{os.getpid()}.part"  # written whole, then renamed: never a half-written cache
    torch.save(tensors, temp)
    os.replace(temp, cache)
    return tensors


def _find_fashion_mnist_file(name: str, data_path: str) -> Path | None:
    """name or name.gz in data_path, else in the Debian system folder; None if in neither."""
    folders = (Path(data_path), Path(FASHION_MNIST_SYSTEM_DIR))
    return next((p for folder in folders for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


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
        paths[name] = _find_fashion_mnist_file(name, data_path)
        if paths[name] is None:
            paths[name] = Path(data_path) / f"{name}.gz"
            _download(FASHION_MNIST_URL + f"{name}.gz", paths[name], FASHION_MNIST_MD5[name])
    # files found locally are checked by content, not md5: Debian's package recompresses the official .gz files
    prefix = "train" if split == "train" else "t10k"
    images, labels = paths[f"{prefix}-images-idx3-ubyte"], paths[f"{prefix}-labels-idx1-ubyte"]
    images, labels = _checked(_read_idx(images, 2051, 3), _read_idx(labels, 2049, 1).long(), (28, 28), 10,
                              (images.name, labels.name), f"Fashion-MNIST in {images.parent}")
    return ImageDataset(F.pad(images, (2, 2, 2, 2))[:, None].repeat(1, 3, 1, 1), labels, 10)


# ----------------------------------------------------------------------------------------------------- entry points
def check_dataset(name: str, data_path: str) -> None:
    """Cheap validation before any compute: DatasetError naming what is wrong and what would be valid."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    root, missing = Path(data_path), None  # missing: what would be downloaded into data_path
    if name == "folder":
        for sub in ("train", "val"):
            if not (root / sub).is_dir():
                raise DatasetError(f"dataset 'folder' needs the directory {root / sub} "
                                   f"(layout: {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")
        train, val = _class_folders(root / "train"), _class_folders(root / "val")
        if train != val:
            raise DatasetError(f"{root}/train and {root}/val must hold the same class folders; in only one of "
                               f"them: {sorted(set(train) ^ set(val))[:5]}")
        for folder in [root / sub / c for sub in ("train", "val") for c in train]:
            # rglob is lazy: any() stops at the first image, cheap on ImageNet-sized trees
            if not any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.rglob("*")):
                raise DatasetError(f"class folder {folder} holds no image with extension {IMAGE_EXTENSIONS}; "
                                   f"every class needs images in train/ and val/")
    elif name in CIFAR_ARCHIVES:
        archive = root / CIFAR_ARCHIVES[name]["url"].rsplit("/", 1)[1]
        missing = None if archive.exists() or (root / f"{name}.pt").exists() else archive.name
    elif name == "fashion_mnist" and any(_find_fashion_mnist_file(f, data_path) is None for f in FASHION_MNIST_MD5):
        missing = "Fashion-MNIST"
    if missing:  # data_path must be, or be creatable as, a writable directory
        if root.exists() and not root.is_dir():
            raise DatasetError(f"data_path {root} is not a directory; {missing} would be downloaded into it")
        existing = next(p for p in [root, *root.absolute().parents] if p.exists())
        if not os.access(existing, os.W_OK):
            raise DatasetError(f"{missing} is not in {root} and {existing} is not writable to download it; "
                               f"put it there by hand")


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
        return ImageDataset(tensors[f"{split}_images"], tensors[f"{split}_labels"], CIFAR_ARCHIVES[name]["num_classes"])
    return _load_fashion_mnist(data_path, split)


# ----------------------------------------------------------------------------------------------------- batches
def training_batches(train_set, images: torch.Tensor | None, batches: torch.Tensor, device: torch.device,
                     num_workers: int = 0, gpu_decode: bool = False):
    """(uint8 images (B, 3, H, W), valid sizes (B, 2) or None, int64 dataset indices (B,)) on device for each row of
    batches (n, B): gathered from images, the whole in-memory split already on the device, or read from a folder
    dataset as canvases with their images' sizes (folder_batches)."""
    if images is not None:
        return ((images[idx], None, idx) for idx in batches.to(device))
    return folder_batches(train_set, batches.tolist(), device, num_workers, gpu_decode)


def epoch_batches(num_samples: int, batch_size: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """int64 (num_batches, batch_size) sample indices of this rank in this epoch: one permutation per (seed, epoch),
    the same on every rank, truncated to whole global batches (drop_last, as facebookresearch/dino main_dino.py:
    every step enqueues a full global batch into the memories), global batch t being the rank-ordered concatenation
    of the ranks' batches t. Deterministic: a run resumes mid-epoch by slicing [step:]."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    num_batches = num_samples // (batch_size * world_size)
    if num_batches == 0:
        raise ValueError(f"{num_samples} samples do not fill one global batch of {batch_size} x {world_size} ranks")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed_for(seed, epoch)))
    return order[: num_batches * batch_size * world_size].view(num_batches, world_size, batch_size)[:, rank].clone()


def subset_indices(num_samples: int, size: int) -> torch.Tensor:
    """int64 sorted indices of a fixed random subset of `size` of `num_samples` images (train.py --train_subset),
    seeded by nothing but the sizes, so runs with different --seed train on the same images."""
    if not 0 < size <= num_samples:
        raise ValueError(f"a subset of {size} images of {num_samples} is not possible")
    generator = torch.Generator().manual_seed(seed_for(num_samples, size))
    return torch.randperm(num_samples, generator=generator)[:size].sort().values


def normalize_images(images: torch.Tensor, size: int | None = None, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float32 (B, 3, size, size) for k-NN features, resized (bicubic,
    antialiased when shrinking) only when size differs from H."""
    x = images.float().div_(255)
    if size is not None and (size != x.shape[2] or size != x.shape[3]):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=size < x.shape[2], align_corners=False)
        x = x.clamp_(0, 1)
    return normalize(x, mean, std)
