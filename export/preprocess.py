"""Training's evaluation transform re-implemented with Pillow and numpy, so serving needs no torch at import.

`models.preprocess.eval_transform` runs, on a PIL image: mode conversion (L or RGB), a shorter-side bilinear
resize done by PIL, a centre crop, uint8 -> float32 scaling, and normalisation. Because PIL performs the resize
in both places, every step below can copy torchvision's arithmetic exactly (same size rounding, same crop anchor,
multiply by float32(1/255) rather than divide, subtract then divide in float32), and the test suite checks the
two agree bit for bit on real images of many sizes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from export.errors import ImageDecodeError

ImageInput = Image.Image | bytes | bytearray | memoryview | np.ndarray | str | os.PathLike

_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's shorter-side rule: the short side becomes `size`, the long side is truncated, not rounded."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Crop anchor as torchvision computes it: Python's round() of the half margin (banker's rounding)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def to_pil(image: ImageInput, index: int) -> Image.Image:
    """Accept what clients actually send (PIL images, encoded bytes, file paths, HxW[xC] uint8 arrays)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ImageDecodeError(index, "empty image data")
        try:
            img = Image.open(io.BytesIO(bytes(image)))
            img.load()
        except _DECODE_ERRORS as err:
            raise ImageDecodeError(index, f"cannot decode image bytes ({type(err).__name__}: {err})") from err
        return img
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as img:
                img.load()
                return img
        except FileNotFoundError as err:
            raise ImageDecodeError(index, f"no such image file {os.fspath(image)!r}") from err
        except _DECODE_ERRORS as err:
            raise ImageDecodeError(index, f"cannot decode {os.fspath(image)!r} ({type(err).__name__}: {err})") from err
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, index)
    raise ImageDecodeError(
        index, f"unsupported input type {type(image).__name__} (expected PIL image, bytes, path or uint8 array)"
    )


def _array_to_pil(array: np.ndarray, index: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageDecodeError(index, f"arrays must be uint8 pixels, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
    else:
        raise ImageDecodeError(index, f"arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(index, f"empty image of shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def transform_pil(img: Image.Image, image_size: int, mode: str) -> np.ndarray:
    """Mode conversion, resize and crop in PIL; returns the cropped uint8 pixels as (C, H, W)."""
    if img.mode != mode:
        img = img.convert(mode)
    width, height = img.size
    new_w, new_h = resized_size(width, height, image_size)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    if img.size != (image_size, image_size):
        img = img.crop(center_crop_box(new_w, new_h, image_size))
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.transpose(pixels, (2, 0, 1))


class Preprocessor:
    """The evaluation transform for one model's input contract; reused for every request of a runtime."""

    def __init__(self, image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError("mean and std need one entry per input channel")
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.mode = "L" if in_channels == 1 else "RGB"
        # torchvision builds float32 tensors from the Python floats, then subtracts and divides in float32.
        self._mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self._scale = np.float32(1.0 / 255)

    def __call__(self, images: Sequence[ImageInput], *, offset: int = 0) -> np.ndarray:
        """`offset` is the position of `images[0]` in the caller's request, so errors name the right image."""
        out = np.empty((len(images), self.in_channels, self.image_size, self.image_size), dtype=np.float32)
        for j, image in enumerate(images):
            i = offset + j
            img = to_pil(image, i)
            try:
                pixels = transform_pil(img, self.image_size, self.mode)
            except _DECODE_ERRORS as err:  # truncated files that PIL decodes lazily, odd modes
                raise ImageDecodeError(i, f"cannot convert image ({type(err).__name__}: {err})") from err
            x = pixels.astype(np.float32) * self._scale
            out[j] = (x - self._mean) / self._std
        return out
