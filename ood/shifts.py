"""Synthetic distribution shifts of in-distribution images: OOD validation data that needs no second data set.

`lpjepa ood calibrate` evaluates every score on these (beside the OOD sets the user names) to choose the one it
serves. Each shift is a deterministic function of the image and a per-image seed, so a calibration is
reproducible. Strengths are set so the shifted image is still recognisably the same object to a person: a
detector that only flags destroyed images is not what a user needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

SHIFT_NAMES = ("noise", "blur", "invert", "rotate")


def _mode_of(img: Any) -> Any:
    return img.convert("L") if img.mode in ("L", "1", "I", "I;16", "F") else img.convert("RGB")


def gaussian_noise(img: Any, rng: np.random.Generator, sigma: float = 0.2) -> Any:
    """Additive Gaussian pixel noise, sigma in units of the full [0, 255] range, clipped."""
    from PIL import Image

    base = _mode_of(img)
    arr = np.asarray(base, dtype=np.float32)
    noisy = np.clip(arr + rng.normal(0.0, 255.0 * sigma, size=arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, mode=base.mode)


def blur(img: Any, rng: np.random.Generator, radius_fraction: float = 0.06) -> Any:
    """Gaussian blur with a radius proportional to the image size (about 1.7 px at 28 px)."""
    from PIL import ImageFilter

    base = _mode_of(img)
    return base.filter(ImageFilter.GaussianBlur(radius=max(1.0, radius_fraction * min(base.size))))


def invert(img: Any, rng: np.random.Generator) -> Any:
    from PIL import ImageOps

    return ImageOps.invert(_mode_of(img))


def rotate(img: Any, rng: np.random.Generator) -> Any:
    """A quarter turn, either way (upside-down is too close to some symmetric in-distribution objects)."""
    from PIL import Image

    return _mode_of(img).transpose(Image.Transpose.ROTATE_90 if rng.random() < 0.5 else Image.Transpose.ROTATE_270)


SHIFTS: dict[str, Callable[[Any, np.random.Generator], Any]] = dict(
    zip(SHIFT_NAMES, (gaussian_noise, blur, invert, rotate), strict=True)
)


def shifted_loaders(source: Any, indices: Any, shift: str, *, seed: int = 0) -> list[tuple[str, Callable[[], Any]]]:
    """(name, loader) pairs for `ood.inputs.embed_images`: image i of `source` with `shift` applied."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose from {', '.join(SHIFT_NAMES)}")
    fn = SHIFTS[shift]

    def load(i: int) -> Any:
        rng = np.random.default_rng([seed, i, SHIFT_NAMES.index(shift)])
        return fn(source.image(i), rng)

    return [(f"{shift}({source.name}[{int(i)}])", (lambda i=int(i): load(i))) for i in indices]
