"""Tests for data.py: dataset parsers (on fabricated files, corrupt ones included), image folders (draft decoding,
canvases, unreadable images, GPU-decode path and fallback, a folder training run), epoch batches. CPU, seeded, no
network (urlopen is patched in every test)."""
import gzip
import hashlib
import io
import math
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import DatasetError, check_dataset, epoch_batches, load_dataset, normalize_images


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails as if offline, unless a test installs its own fake urlopen."""
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(urllib.request, "urlopen", offline)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_balanced_and_split():
    train = load_dataset("synthetic", "", "train", size=200, seed=0)
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.uint8 and train.num_classes == 10
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 20))
    again = load_dataset("synthetic", "", "train", size=200, seed=0)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images, load_dataset("synthetic", "", "test", size=200, seed=0).images)
    assert not torch.equal(train.images, load_dataset("synthetic", "", "train", size=200, seed=1).images)
    image, label = train[3]
    assert image.shape == (3, 32, 32) and label == train.labels[3]
    assert len(load_dataset("synthetic", "", "test")) == 2000


# ----------------------------------------------------------------------------------------------------- Fashion-MNIST
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def write_fashion(folder: Path, n: int = 5, gz: bool = True, seed: int = 0) -> dict[str, bytes]:
    """Fabricated train + t10k IDX files; returns name -> file bytes."""
    rng, files = np.random.default_rng(seed), {}
    for prefix in ("train", "t10k"):
        files[f"{prefix}-images-idx3-ubyte"] = idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 2051)
        files[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(rng.integers(0, 10, (n,), dtype=np.uint8), 2049)
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return files


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "absent"))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_fabricated(tmp_path, no_system_fashion, gz):
    files = write_fashion(tmp_path, gz=gz)
    dataset = load_dataset("fashion_mnist", str(tmp_path), "train")
    original = torch.tensor(np.frombuffer(files["train-images-idx3-ubyte"][16:], np.uint8).reshape(5, 28, 28))
    assert dataset.images.shape == (5, 3, 32, 32) and dataset.num_classes == 10
    assert torch.equal(dataset.images[:, 1, 2:30, 2:30], original)  # zero-padded, not resampled
    assert dataset.images[:, :, :2].eq(0).all() and dataset.images[:, :, :, 30:].eq(0).all()
    assert torch.equal(dataset.images[:, 0], dataset.images[:, 2])
    assert dataset.labels.tolist() == list(files["train-labels-idx1-ubyte"][8:])
    assert len(load_dataset("fashion_mnist", str(tmp_path), "test")) == 5


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: raw[:-10], "truncated or corrupt"),
    (lambda raw: (2049).to_bytes(4, "big") + raw[4:], "magic number 2049, expected 2051"),
    (lambda raw: raw[:3], "magic number None"),
])
def test_fashion_mnist_corrupt_images(tmp_path, no_system_fashion, corrupt, message):
    files = write_fashion(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(corrupt(files["train-images-idx3-ubyte"]))
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("fashion_mnist", str(tmp_path), "train")
    assert "train-images-idx3-ubyte" in str(error.value)


def test_fashion_mnist_corrupt_gzip_and_labels(tmp_path, no_system_fashion):
    write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="cannot read .*train-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", str(tmp_path), "train")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(5, 10, np.uint8), 2049)))
    with pytest.raises(DatasetError, match=r"labels in \[0, 10\)"):
        load_dataset("fashion_mnist", str(tmp_path), "test")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8), 2049)))
    with pytest.raises(DatasetError, match="must be 5 int64 labels"):
        load_dataset("fashion_mnist", str(tmp_path), "test")


def test_fashion_mnist_missing_test_file_stops_loading_the_train_split(tmp_path, no_system_fashion):
    write_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="could not download .*t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", str(tmp_path), "train")  # before training, not at the first k-NN


@pytest.mark.skipif(not Path(data.FASHION_MNIST_SYSTEM_DIR, "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files(tmp_path):
    test = load_dataset("fashion_mnist", str(tmp_path), "test")
    assert test.images.shape == (10000, 3, 32, 32)
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert test.images[:, :, :2].eq(0).all()


def fake_urlopen(payloads: dict[str, bytes]):
    def urlopen(url, *args, **kwargs):
        if url not in payloads:
            raise urllib.error.URLError(f"unexpected url {url}")
        return io.BytesIO(payloads[url])
    return urlopen


def test_fashion_mnist_download(tmp_path, no_system_fashion, monkeypatch):
    files = write_fashion(tmp_path / "source")
    payloads = {}
    for name in files:
        payloads[data.FASHION_MNIST_URL + name + ".gz"] = payload = (tmp_path / "source" / (name + ".gz")).read_bytes()
        monkeypatch.setitem(data.FASHION_MNIST_MD5, name, hashlib.md5(payload).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(payloads))
    check_dataset("fashion_mnist", str(tmp_path / "data"))
    assert len(load_dataset("fashion_mnist", str(tmp_path / "data"), "train")) == 5
    assert (tmp_path / "data" / "train-images-idx3-ubyte.gz").exists()


def test_download_offline_and_wrong_md5(tmp_path, no_system_fashion, monkeypatch):
    with pytest.raises(DatasetError) as error:
        load_dataset("fashion_mnist", str(tmp_path), "train")
    url = data.FASHION_MNIST_URL + "train-images-idx3-ubyte.gz"
    assert f"could not download {url}" in str(error.value) and "by hand" in str(error.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(error.value)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen({url: b"not the archive"}))
    with pytest.raises(DatasetError, match=f"has md5 {hashlib.md5(b'not the archive').hexdigest()}, "
                                           f"expected {data.FASHION_MNIST_MD5['train-images-idx3-ubyte']}"):
        load_dataset("fashion_mnist", str(tmp_path), "train")
    assert os.listdir(tmp_path) == []  # no partial download left behind


# ----------------------------------------------------------------------------------------------------- CIFAR
class RunsCode:
    """Pickles to a call of os.system, as a tampered archive would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_cifar(path: Path, name: str = "cifar10", n: int = 4, replace: dict | None = None, extra=(),
                numpy1_names: bool = True) -> dict:
    """A small archive in the official layout; replace maps a member to other content (a dict or raw bytes).
    numpy1_names: name numpy's array reconstructor as the official files (written with numpy 1) do."""
    spec, rng, batches = data.CIFAR_ARCHIVES[name], np.random.default_rng(0), {}
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(spec["folder"])
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for member in spec["train"] + spec["test"]:
            batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     spec["label_key"].encode(): rng.integers(0, spec["num_classes"], n).tolist(),
                     b"batch_label": b"fabricated"}
            if name == "cifar100":
                batch[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
            batch = (replace or {}).get(member, batch)
            payload = batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2)
            if numpy1_names:
                payload = payload.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            info = tarfile.TarInfo(f"{spec['folder']}/{member}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            batches[member] = batch
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return batches


def use_md5_of(monkeypatch, name: str, path: Path):
    monkeypatch.setitem(data.CIFAR_ARCHIVES[name], "md5", hashlib.md5(path.read_bytes()).hexdigest())


def test_cifar10_parse_and_cache(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = write_cifar(archive)
    use_md5_of(monkeypatch, "cifar10", archive)
    train = load_dataset("cifar10", str(tmp_path), "train")
    assert train.images.shape == (20, 3, 32, 32) and train.num_classes == 10
    assert torch.equal(train.images[:4].flatten(1), torch.from_numpy(batches["data_batch_1"][b"data"]))
    assert train.labels[4:8].tolist() == batches["data_batch_2"][b"labels"]
    test = load_dataset("cifar10", str(tmp_path), "test")
    assert test.labels.tolist() == batches["test_batch"][b"labels"]
    archive.unlink()  # the cache alone now serves both splits
    assert torch.equal(load_dataset("cifar10", str(tmp_path), "train").images, train.images)


@pytest.mark.parametrize("key, value, message", [
    ("train_labels", lambda t: t.clone().fill_(10),
     r"'train_labels' must be 20 int64 labels in \[0, 10\), got .* in \[10, 10\]"),
    ("test_labels", lambda t: t.float(), r"'test_labels' must be 4 int64 labels"),
    ("train_images", lambda t: t.float(), r"'train_images' must be a uint8 \(n, 3, 32, 32\) tensor, got torch.float32"),
    ("test_images", lambda t: t[:, :, :16], r"'test_images' must be a uint8 \(n, 3, 32, 32\) tensor"),
    ("test_labels", lambda t: t[:3], r"'test_labels' must be 4 int64 labels"),
    ("train_images", None, r"'train_images' must be"),
])
def test_cifar_cache_contents_are_checked(tmp_path, monkeypatch, key, value, message):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar(archive)
    use_md5_of(monkeypatch, "cifar10", archive)
    load_dataset("cifar10", str(tmp_path), "train")  # builds the cache
    cache = tmp_path / "cifar10.pt"
    tensors = torch.load(cache, weights_only=True)
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value(tensors[key])
    torch.save(tensors, cache)
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("cifar10", str(tmp_path), "test")
    assert f"cache {cache}" in str(error.value) and "delete it to rebuild" in str(error.value)


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-100-python.tar.gz"
    batches = write_cifar(archive, "cifar100", n=6, numpy1_names=False)
    use_md5_of(monkeypatch, "cifar100", archive)
    train = load_dataset("cifar100", str(tmp_path), "train")
    assert train.num_classes == 100 and train.labels.tolist() == batches["train"][b"fine_labels"]


def test_cifar_download(tmp_path, monkeypatch):
    write_cifar(tmp_path / "source.tar.gz")
    payload = (tmp_path / "source.tar.gz").read_bytes()
    monkeypatch.setitem(data.CIFAR_ARCHIVES["cifar10"], "md5", hashlib.md5(payload).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen({data.CIFAR_ARCHIVES["cifar10"]["url"]: payload}))
    assert len(load_dataset("cifar10", str(tmp_path / "data"), "test")) == 4


def test_cifar_offline_says_where_to_put_the_archive(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", str(tmp_path), "train")
    assert data.CIFAR_ARCHIVES["cifar10"]["url"] in str(error.value)
    assert f"put it at {tmp_path / 'cifar-10-python.tar.gz'}" in str(error.value)


def test_cifar_wrong_md5(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar(archive)
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", str(tmp_path), "train")
    assert all(s in str(error.value) for s in (str(archive), actual, data.CIFAR_ARCHIVES["cifar10"]["md5"]))


def unsafe_member(kind: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo({"parent": "../evil", "absolute": "/tmp/evil", "symlink": "cifar-10-batches-py/link",
                            "device": "cifar-10-batches-py/dev"}[kind])
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "device":
        info.type = tarfile.CHRTYPE
    else:
        info.size = 1
    return info


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "device"])
def test_cifar_unsafe_archive_refused(tmp_path, monkeypatch, kind):
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    write_cifar(archive, extra=[unsafe_member(kind)])
    use_md5_of(monkeypatch, "cifar10", archive)
    with pytest.raises(DatasetError, match="unsafe member"):
        load_dataset("cifar10", str(archive.parent), "train")
    assert not (tmp_path / "evil").exists() and not (archive.parent / "cifar10.pt").exists()


def test_cifar_forbidden_pickle_global_is_not_run(tmp_path, monkeypatch):
    archive, marker = tmp_path / "cifar-10-python.tar.gz", tmp_path / "pwned"
    write_cifar(archive, replace={"test_batch": pickle.dumps(RunsCode(marker), protocol=2)})
    use_md5_of(monkeypatch, "cifar10", archive)
    with pytest.raises(DatasetError, match=r"cannot unpickle cifar-10-batches-py/test_batch in .*forbidden global"):
        load_dataset("cifar10", str(tmp_path), "train")
    assert not marker.exists()


@pytest.mark.parametrize("replace, message", [
    ({"data_batch_3": {b"data": np.zeros((4, 1000), np.uint8), b"labels": [0] * 4}},
     r"'data' must be a uint8 \(n, 3072\)"),
    ({"data_batch_3": {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}}, r"'labels' must be 4 int64 labels"),
    ({"data_batch_3": {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}}, r"in \[0, 10\)"),
    ({"data_batch_3": [1, 2, 3]}, "holds a list, expected a dict"),
    ({"data_batch_3": b"\x80\x02}q\x00(X"}, "cannot unpickle"),
])
def test_cifar_corrupt_batches(tmp_path, monkeypatch, replace, message):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar(archive, replace=replace)
    use_md5_of(monkeypatch, "cifar10", archive)
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("cifar10", str(tmp_path), "train")
    assert "data_batch_3" in str(error.value)


def test_cifar_truncated_archive_and_missing_member(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar(archive)
    archive.write_bytes(archive.read_bytes()[:-200])
    use_md5_of(monkeypatch, "cifar10", archive)
    with pytest.raises(DatasetError, match=f"cannot read archive {archive}"):
        load_dataset("cifar10", str(tmp_path), "train")
    write_cifar(archive, "cifar100")  # a CIFAR-100 archive under the CIFAR-10 name
    use_md5_of(monkeypatch, "cifar10", archive)
    with pytest.raises(DatasetError, match="has no member cifar-10-batches-py/data_batch_1"):
        load_dataset("cifar10", str(tmp_path), "train")


# ----------------------------------------------------------------------------------------------------- image folders
def write_tree(root: Path, classes=("cat", "dog"), per_class: int = 2) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                colour = (40 * k + 10 * i, 100, 200)
                Image.new("RGB", (40, 30) if i % 2 else (30, 50), colour).save(root / split / name / f"{i}.png")


def test_image_folder_train_and_test(tmp_path):
    write_tree(tmp_path)
    train = load_dataset("folder", str(tmp_path), "train", image_size=16)
    assert len(train) == 4 and train.num_classes == 2 and train.labels.tolist() == [0, 0, 1, 1]
    canvas, size, label, read = train[3]  # a 40 x 30 image, whole (never upsampled), at the top left of the canvas
    L = data.FOLDER_LONG_SIDE
    assert canvas.shape == (3, L, L) and canvas.dtype == torch.uint8 and label == 1 and size.tolist() == [30, 40]
    assert read == 3
    colour = torch.tensor([50, 100, 200], dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(canvas[:, :30, :40], colour.expand(3, 30, 40))
    assert canvas[:, 30:].eq(0).all() and canvas[:, :, 40:].eq(0).all()
    test = load_dataset("folder", str(tmp_path), "test", image_size=16)
    assert test.resize == 18 and test[0][0].shape == (3, 16, 16) and train.resize == 16
    assert load_dataset("folder", str(tmp_path), "train", image_size=16, evaluation=True).resize == 18  # k-NN features


def test_image_folder_eval_protocol_crops_the_border(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        image = Image.new("RGB", (64, 64), (255, 0, 0))
        image.paste((0, 0, 255), (4, 4, 60, 60))  # blue inside a 4 px red border
        image.save(tmp_path / split / "a" / "0.png")
    test_image = load_dataset("folder", str(tmp_path), "test", image_size=56)[0][0]  # 64 -> 64, centre crop 56
    assert torch.equal(test_image, torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 56, 56))
    train_image, size, _, _ = load_dataset("folder", str(tmp_path), "train", image_size=56)[0]  # whole: border kept
    assert size.tolist() == [64, 64] and train_image[0, 0, 0] == 255 and train_image[2, 32, 32] == 255


def test_image_folder_errors(tmp_path):
    write_tree(tmp_path)
    bad = tmp_path / "val" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    test = load_dataset("folder", str(tmp_path), "test", image_size=16, strict=True)
    with pytest.raises(DatasetError, match=f"^cannot read image {bad}: "):
        test[[path for path, _ in test.samples].index(str(bad))]
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DatasetError, match="same class folders.*bird"):
        check_dataset("folder", str(tmp_path))
    (tmp_path / "train" / "bird").mkdir()
    with pytest.raises(DatasetError, match="bird holds no image"):
        load_dataset("folder", str(tmp_path), "train")


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match=f"needs the directory {tmp_path / 'train'}"):
        check_dataset("folder", str(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match="has no class folders"):
        check_dataset("folder", str(tmp_path))


# ----------------------------------------------------------------------------------------------------- checks, batches
def test_check_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'; valid names: synthetic, cifar10"):
        check_dataset("imagenet", str(tmp_path))
    check_dataset("synthetic", "/nonexistent")
    check_dataset("cifar10", str(tmp_path / "new"))  # absent but downloadable there
    (tmp_path / "file").write_text("")
    with pytest.raises(DatasetError, match="is not a directory"):
        check_dataset("cifar100", str(tmp_path / "file"))
    with pytest.raises(ValueError, match="split"):
        load_dataset("synthetic", "", "val")


def test_epoch_batches():
    ranks = [epoch_batches(103, 8, epoch=2, seed=0, rank=r, world_size=3) for r in range(3)]
    assert all(b.shape == (4, 8) and b.dtype == torch.int64 for b in ranks)  # 103 // 24 = 4 global batches
    flat = torch.cat([b.flatten() for b in ranks])
    assert len(flat.unique()) == 96 and flat.max() < 103  # disjoint ranks, drop_last
    order = torch.stack(ranks, 1).flatten()  # global batch t = rank 0, 1, 2 batches t
    assert torch.equal(order, torch.cat([epoch_batches(103, 24, 2, 0).flatten()]))
    assert torch.equal(ranks[1], epoch_batches(103, 8, 2, 0, 1, 3))
    assert not torch.equal(ranks[1], epoch_batches(103, 8, 3, 0, 1, 3))
    with pytest.raises(ValueError, match="one global batch"):
        epoch_batches(20, 8, 0, 0, 0, 3)


def test_normalize_images():
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    out = normalize_images(images)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 5, 5], expected)
    resized = normalize_images(images, 16)
    assert resized.shape == (2, 3, 16, 16)
    torch.testing.assert_close(resized, out[:, :, :16, :16])
    assert normalize_images(images, 48).shape == (2, 3, 48, 48)


def write_jpeg_tree(root: Path, sizes=((500, 375), (375, 500), (120, 90)), classes=("a", "b")) -> None:
    """A train/val tree of noisy JPEGs (quality 90) of the given (width, height) sizes in every class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                pixels = rng.integers(40, 216, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
                Image.fromarray(pixels).resize((w, h), Image.BICUBIC).save(root / split / name / f"{i}.jpg",
                                                                           quality=90)


def test_draft_decoding_matches_the_slow_path(tmp_path):
    from PIL import Image

    write_jpeg_tree(tmp_path, sizes=((500, 375), (375, 500), (641, 479), (120, 90)), classes=("a",))
    for path in sorted((tmp_path / "train" / "a").iterdir()):
        for long_side in (96, 224, 320, 448):
            fast = data.decode_image(str(path), long_side)
            with Image.open(path) as image:  # full decode, one bicubic resize of the whole image
                w, h = image.size
                scale = min(1.0, long_side / max(w, h))
                slow = np.asarray(image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.BICUBIC))
            assert abs(fast.shape[0] - slow.shape[0]) <= 1 and abs(fast.shape[1] - slow.shape[1]) <= 1
            assert max(fast.shape[:2]) == min(long_side, max(w, h))  # never upsampled
            assert np.abs(fast.astype(float) - slow.astype(float)).mean() < 6  # same picture (8-bit levels)


def test_unreadable_images_are_skipped_listed_once_or_stop_strict(tmp_path):
    write_jpeg_tree(tmp_path)
    bad = tmp_path / "train" / "a" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated JPEG
    listing = tmp_path / "bad_images.txt"
    train = load_dataset("folder", str(tmp_path), "train", bad_images_file=str(listing))
    index = [path for path, _ in train.samples].index(str(bad))
    canvas, size, label, read = train[index]  # replaced by the next readable image of its class, which it names
    next_canvas, next_size, next_label, next_read = train[index + 1]
    assert torch.equal(canvas, next_canvas) and torch.equal(size, next_size) and label == next_label == 0
    assert read == next_read == index + 1
    train[index]
    again = load_dataset("folder", str(tmp_path), "train", bad_images_file=str(listing))  # e.g. after a resume
    again[index]
    assert data.read_bad_images(str(listing)) == [str(bad)]  # listed once
    last = index + 1  # the last image of class a is bad too: its replacement wraps to the class's first one
    (tmp_path / "train" / "a" / "2.jpg").write_bytes(b"not an image")
    assert torch.equal(train[last][0], train[index - 1][0]) and train[last][2] == 0 and train[last][3] == index - 1
    assert data.read_bad_images(str(listing)) == [str(bad), str(tmp_path / "train" / "a" / "2.jpg")]
    strict = load_dataset("folder", str(tmp_path), "train", strict=True, bad_images_file=str(listing))
    with pytest.raises(DatasetError, match=f"^cannot read image {bad}: "):
        strict[index]


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_error_from_a_worker_is_one_line(tmp_path, workers):
    write_jpeg_tree(tmp_path, sizes=((60, 40), (40, 60)))
    bad = tmp_path / "train" / "b" / "0.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    strict = load_dataset("folder", str(tmp_path), "train", strict=True)
    with pytest.raises(DatasetError) as error:
        list(data.load_batches(strict, [[0, 1], [2, 3]], num_workers=workers))
    assert str(error.value).startswith(f"cannot read image {bad}: ") and "\n" not in str(error.value)


def test_folder_batches_canvases_and_gpu_decode_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "FOLDER_LONG_SIDE", 448)  # 500 x 375 images are scaled down, 120 x 90 ones not
    write_jpeg_tree(tmp_path)
    train = load_dataset("folder", str(tmp_path), "train")
    images, sizes, read = next(data.folder_batches(train, [[0, 1, 2, 5]], torch.device("cpu")))
    L = data.FOLDER_LONG_SIDE
    assert images.shape == (4, 3, L, L) and sizes.tolist() == [[336, 448], [448, 336], [90, 120], [90, 120]]
    assert read.tolist() == [0, 1, 2, 5]
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)  # as on the CPU machines: not importable
    monkeypatch.setattr(data, "_NOTES_PRINTED", set())
    again = next(data.folder_batches(train, [[0, 1, 2, 5]], torch.device("cpu"), gpu_decode=True))
    assert torch.equal(again[0], images) and torch.equal(again[1], sizes) and torch.equal(again[2], read)
    assert "note: gpu_decode:" in capsys.readouterr().out
    assert data._gpu_decode_unavailable(torch.device("cuda")).startswith("torchvision cannot be imported")


def test_gpu_decode_path_with_a_stand_in_decoder(tmp_path, monkeypatch):
    """The batched decode path (canvas, sizes, per-file fallback) on the CPU, with decode_jpeg played by Pillow."""
    import sys
    import types
    from PIL import Image

    def decode_jpeg(raw, mode=None, device=None):
        if isinstance(raw, list):
            return [decode_jpeg(r, mode, device) for r in raw]
        with Image.open(io.BytesIO(raw.numpy().tobytes())) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).to(device)
    fake_io = types.SimpleNamespace(decode_jpeg=decode_jpeg, ImageReadMode=types.SimpleNamespace(RGB="RGB"))
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(io=fake_io))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake_io)
    monkeypatch.setattr(data, "_gpu_decode_unavailable", lambda device: None)
    monkeypatch.setattr(data, "FOLDER_LONG_SIDE", 448)
    write_jpeg_tree(tmp_path)
    (tmp_path / "train" / "b" / "1.jpg").write_bytes(b"broken")  # index 4: replaced by index 5 on the CPU path
    train = load_dataset("folder", str(tmp_path), "train", bad_images_file=str(tmp_path / "bad.txt"))
    gpu_images, gpu_sizes, gpu_read = next(data.folder_batches(train, [[0, 1, 2, 4]], torch.device("cpu"),
                                                                gpu_decode=True))
    cpu_images, cpu_sizes, cpu_read = next(data.folder_batches(train, [[0, 1, 2, 5]], torch.device("cpu")))
    assert torch.equal(gpu_sizes, cpu_sizes) and gpu_read.tolist() == cpu_read.tolist() == [0, 1, 2, 5]
    assert torch.equal(gpu_images[3], cpu_images[3])  # the broken file went through the CPU path
    assert (gpu_images.float() - cpu_images.float()).abs().mean() < 3  # another resampler, the same pictures
    assert data.read_bad_images(str(tmp_path / "bad.txt")) == [str(tmp_path / "train" / "b" / "1.jpg")]


def test_check_dataset_finds_a_class_folder_without_images(tmp_path):
    write_tree(tmp_path)
    for f in (tmp_path / "val" / "dog").iterdir():
        f.unlink()
    (tmp_path / "val" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=f"class folder {tmp_path / 'val' / 'dog'} holds no image"):
        check_dataset("folder", str(tmp_path))


def folder_training_flags(root: Path, out: Path) -> list[str]:
    from conftest import TINY

    flags = [f for f in TINY if f not in ("synthetic", "--synthetic_size", "512")]
    flags[flags.index("--dataset") + 1:flags.index("--dataset") + 1] = ["folder"]
    return flags + ["--data_path", str(root), "--output_dir", str(out), "--batch_size_per_gpu", "8", "--epochs", "1",
                    "--class_memory_size", "64", "--patch_memory_size", "64", "--num_workers", "0"]


def test_folder_training_runs_skips_a_bad_image_and_strict_stops(tmp_path, monkeypatch):
    import json
    import train

    monkeypatch.setattr(data, "FOLDER_LONG_SIDE", 40)  # small canvases keep the CPU test fast
    write_jpeg_tree(tmp_path / "tree", sizes=[(60 - 3 * i, 45 + 2 * i) for i in range(12)])  # k-NN needs k = 20
    bad = tmp_path / "tree" / "train" / "b" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    trainer = train.main(folder_training_flags(tmp_path / "tree", tmp_path / "run"))
    assert trainer.step == 3  # 24 images, global batch 8
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert [path for r in records for path in r.get("bad_images", [])] == [str(bad)]  # logged once
    assert data.read_bad_images(str(tmp_path / "run" / "bad_images.txt")) == [str(bad)]
    stored = trainer.method.class_memory.index.tolist()  # the memory names the replacement, not the bad image
    bad_index = [path for path, _ in data.ImageFolder(tmp_path / "tree" / "train").samples].index(str(bad))
    assert len([i for i in stored if i >= 0]) == 24 and bad_index not in stored and stored.count(bad_index + 1) == 2
    with pytest.raises(SystemExit) as error:
        train.main(folder_training_flags(tmp_path / "tree", tmp_path / "strict") + ["--strict_data", "true"])
    assert str(error.value).startswith(f"error: cannot read image {bad}: ") and "\n" not in str(error.value)


def test_bench_data_runs_on_a_few_images(capsys):
    import bench_data

    results = bench_data.main(["--num_images", "2", "--fidelity_images", "1"])
    assert set(results["decode_images_per_cpu_second"]) >= {"former_224_square", f"bound_{data.FOLDER_LONG_SIDE}"}
    assert all(rate > 0 for rate in results["decode_images_per_cpu_second"].values())
    assert all(math.isfinite(db) for kind in results["crop_psnr_db"].values() for db in kind.values())
