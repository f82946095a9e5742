"""The batched uint8 transform equals models.preprocess.eval_transform on PIL images, bit for bit, and
`extract` gives the same features whichever path the images take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.sources import DataSpecError, ImageSource
from models.config import ModelConfig
from models.encoder import build_model
from models.preprocess import eval_transform
from pretrain.evaluate.features import convert_mode_array, extract, transform_array_batch


@pytest.fixture(scope="module")
def fashion_images(fmnist) -> np.ndarray:
    return fmnist.array[:48]


def _pil_reference(images: np.ndarray, config: ModelConfig) -> torch.Tensor:
    transform = eval_transform(config)
    mode = "L" if images.ndim == 3 else "RGB"
    return torch.stack([transform(Image.fromarray(img, mode=mode)) for img in images])


def _config(in_channels: int, size: int) -> ModelConfig:
    mean, std = ([0.3], [0.35]) if in_channels == 1 else ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    return ModelConfig(
        backbone="resnet18",
        backbone_kwargs={"width": 0.125},
        projector_dims=[16, 8],
        in_channels=in_channels,
        image_size=size,
        mean=mean,
        std=std,
    )


@pytest.mark.parametrize(
    ("case", "in_channels", "size"),
    [
        ("grey", 1, 28),  # Fashion-MNIST into its own model: no resize, PIL's copy path
        ("grey", 3, 32),  # grey into a colour model at another size: L -> RGB, then upsample
        ("rgb", 1, 20),  # colour into a grey model: Pillow's fixed-point luma, then downsample
        ("rgb", 3, 24),  # non-square colour: shorter-side resize and an odd centre crop
        ("rgb", 3, 33),  # upsample of the non-square images
    ],
)
def test_batched_transform_equals_pil_eval_transform(fashion_images, case, in_channels, size):
    rng = np.random.default_rng(size)
    images = fashion_images if case == "grey" else rng.integers(0, 256, size=(12, 30, 41, 3), dtype=np.uint8)
    config = _config(in_channels, size)
    got = transform_array_batch(images, config)
    want = _pil_reference(images, config)
    assert got.shape == want.shape == (len(images), in_channels, size, size)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)


def test_mode_conversion_matches_pil_on_all_grey_levels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    rgb[0, 0, :, :] = np.arange(64)[:, None] * 4  # include exact greys and extremes
    rgb[0, 1, :4] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0]]
    luma = convert_mode_array(rgb, 1)[..., 0]
    pil = np.stack([np.asarray(Image.fromarray(img, "RGB").convert("L")) for img in rgb])
    np.testing.assert_array_equal(luma, pil)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(convert_mode_array(grey, 3), np.repeat(grey[..., None], 3, axis=-1))
    with pytest.raises(ValueError, match="uint8"):
        convert_mode_array(grey.astype(np.float32), 3)


def _pil_only(source: ImageSource) -> ImageSource:
    """The same images without the in-memory array, so `extract` takes the per-image PIL path."""
    return ImageSource(name=source.name, length=len(source), loader=source.loader, labels=source.labels)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_extract_same_on_array_and_pil_paths(fashion_images, in_channels):
    torch.manual_seed(0)
    model = build_model(_config(in_channels, 28))
    model.train()
    labels = np.arange(len(fashion_images)) % 10
    source = ImageSource(
        name="fm",
        length=len(fashion_images),
        loader=lambda i: Image.fromarray(fashion_images[i], mode="L"),
        labels=labels,
        array=fashion_images,
        channels=1,
    )
    idx = [5, 0, 17, 33, 2, 47, 9]
    f_arr, z_arr, y_arr = extract(model, source, model.config, batch_size=3, indices=idx, progress=False)
    f_pil, z_pil, y_pil = extract(model, _pil_only(source), model.config, batch_size=3, indices=idx, progress=False)
    assert model.training  # the caller's mode is restored
    assert f_arr.shape == (7, model.feature_dim) and z_arr.shape == (7, 8)
    assert torch.equal(y_arr, torch.tensor(labels[idx])) and torch.equal(y_arr, y_pil)
    torch.testing.assert_close(f_arr, f_pil, rtol=0, atol=0)
    torch.testing.assert_close(z_arr, z_pil, rtol=0, atol=0)
    # eval mode really is used: one image alone gives the same features as inside a batch
    f_one, _, _ = extract(model, source, model.config, batch_size=1, indices=[idx[2]], progress=False)
    torch.testing.assert_close(f_one[0], f_arr[2], rtol=1e-5, atol=1e-5)


def test_extract_reports_unreadable_files(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")

    def load(i):
        with Image.open(bad) as img:
            img.load()
            return img

    source = ImageSource(name=str(tmp_path), length=1, loader=load, labels=np.zeros(1, dtype=np.int64))
    model = build_model(_config(1, 28))
    with pytest.raises(DataSpecError, match="image 0 cannot be read"):
        extract(model, source, model.config, progress=False)
