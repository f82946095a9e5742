"""Multi-view augmentation, vectorised over the batch with per-sample randomness.

torchvision.transforms.v2 applied to a batch tensor draws ONE set of random parameters for the whole batch,
which would make every image of a batch share its crop and colour: useless for self-supervised views. Applied
per image it is correct but costs a Python round trip per op per image, which on 2 CPU cores is slower than
the model (bench/bench_loader.py measures both). So the views are made here as batched tensor programs with
per-sample parameters:

- geometry: RandomResizedCrop as one torchvision.ops.roi_align call over per-sample boxes (bilinear, adaptive
  sampling so downscaling averages like antialiasing, and a full-image box is the identity), then a per-sample
  horizontal flip;
- colour: ColorJitter (brightness, contrast, saturation, hue in torchvision's formulas, applied in that fixed
  order with per-sample factors), random grayscale, solarize and Gaussian blur.

File-backed sources (ImageFolder trees, ImageNet-100) cannot be stacked before cropping, so their geometry runs
per image in DataLoader workers with torchvision.transforms.v2 (`view_geometry`) and only colour is batched.
Grey data gets no saturation/hue jitter and no random grayscale (they are identities or undefined on one channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2

from data.config import AugmentConfig

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma), so grayscale and contrast match v2 exactly.
GREY_WEIGHTS = (0.2989, 0.587, 0.114)
SOLARIZE_THRESHOLD = 0.5
BLUR_SIGMA = (0.1, 2.0)


def resolve_recipe(aug: AugmentConfig, in_channels: int) -> AugmentConfig:
    """'auto' picks by channel count; 'grey' switches off every op that only makes sense on colour."""
    recipe = aug.recipe
    if recipe == "auto":
        recipe = "grey" if in_channels == 1 else "color"
    if recipe == "grey" or in_channels == 1:
        return aug.model_copy(update={"recipe": "grey", "saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0})
    return aug.model_copy(update={"recipe": "color"})


@dataclass(frozen=True)
class ViewPlan:
    """How many views of which size and crop scale; global views come first (the loss pairs views 0 and 1)."""

    sizes: tuple[int, ...]
    scales: tuple[tuple[float, float], ...]

    @classmethod
    def from_config(cls, aug: AugmentConfig, image_size: int) -> ViewPlan:
        small = int(aug.small_size) if aug.small_size > 0 else max(8, int(round(image_size * 96 / 168)))
        sizes = (image_size,) * aug.global_views + (small,) * aug.small_views
        big, little = (aug.crop_scale[0], aug.crop_scale[1]), (aug.small_crop_scale[0], aug.small_crop_scale[1])
        scales = (big,) * aug.global_views + (little,) * aug.small_views
        return cls(sizes, scales)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    tries: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop's box distribution for n images at once: (n, 4) float boxes x1, y1, x2, y2.

    As torchvision: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), `tries` attempts, first one that
    fits wins; if none fits, the central crop clamped to the ratio range. Boxes are continuous (roi_align
    interpolates), where torchvision rounds them to whole pixels.
    """
    area = float(height * width)
    u = torch.rand((n, tries, 2), generator=generator, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(target * aspect)
    h = torch.sqrt(target / aspect)
    ok = (w <= width) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = height * ratio[1], float(height)
    else:
        fw, fh = float(width), float(height)
    found = ok.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    off = torch.rand((n, 2), generator=generator, device=device)
    x1 = off[:, 0] * (width - w)
    y1 = off[:, 1] * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crop-and-resize of image i to boxes[i] (one roi_align call), float images in, float out."""
    idx = torch.arange(images.shape[0], device=images.device, dtype=boxes.dtype).unsqueeze(1)
    rois = torch.cat([idx, boxes], dim=1)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)


def grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(GREY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _bernoulli(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, rotate H, back) with a per-sample shift in [-0.5, 0.5]."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    rgb_by_sector = ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))
    table = torch.stack([torch.stack(row, dim=1) for row in rgb_by_sector], dim=1)  # (B, 3, 6, H, W)
    return table.gather(2, i.unsqueeze(1).unsqueeze(2).expand(-1, 3, 1, -1, -1)).squeeze(2)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (sigma <= 0 leaves that sample unchanged)."""
    n, c, hgt, wid = x.shape
    k = max(3, int(round(0.1 * min(hgt, wid))) | 1)
    half = k // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    sig = sigma.to(x.dtype).clamp_min(1e-3).view(-1, 1)
    kern = torch.exp(-0.5 * (pos.view(1, -1) / sig) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)
    delta = (pos == 0).to(x.dtype).expand_as(kern)
    kern = torch.where((sigma > 0).view(-1, 1), kern, delta)
    kern = kern.repeat_interleave(c, dim=0)  # (n*c, k)
    flat = x.reshape(1, n * c, hgt, wid)
    flat = F.pad(flat, (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kern.view(n * c, 1, k, 1), groups=n * c)
    flat = F.conv2d(flat, kern.view(n * c, 1, 1, k), groups=n * c)
    return flat.view(n, c, hgt, wid)


def color_augment(x: torch.Tensor, aug: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """ColorJitter (p = jitter_p) -> RandomGrayscale -> RandomSolarize -> GaussianBlur, per-sample, x in [0, 1].

    Samples not selected for an op are left bit-for-bit unchanged.
    """
    n, dev = x.shape[0], x.device
    jitter = _bernoulli(n, aug.jitter_p, generator, dev)

    def factor(strength: float) -> torch.Tensor:
        return _per_sample(_uniform(n, max(0.0, 1.0 - strength), 1.0 + strength, generator, dev))

    if aug.jitter_p > 0:
        y = x
        if aug.brightness > 0:
            y = (y * factor(aug.brightness)).clamp_(0.0, 1.0)
        if aug.contrast > 0:
            m = grey(y).mean(dim=(1, 2, 3), keepdim=True)
            y = ((y - m) * factor(aug.contrast) + m).clamp_(0.0, 1.0)
        if x.shape[1] == 3 and aug.saturation > 0:
            g = grey(y)
            y = ((y - g) * factor(aug.saturation) + g).clamp_(0.0, 1.0)
        if x.shape[1] == 3 and aug.hue > 0:
            y = shift_hue(y, _uniform(n, -aug.hue, aug.hue, generator, dev))
        x = torch.where(_per_sample(jitter), y, x)
    if x.shape[1] == 3 and aug.grayscale_p > 0:
        to_grey = _per_sample(_bernoulli(n, aug.grayscale_p, generator, dev))
        x = torch.where(to_grey, grey(x).expand_as(x), x)
    if aug.solarize_p > 0:
        sol = _per_sample(_bernoulli(n, aug.solarize_p, generator, dev))
        x = torch.where(sol & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)
    if aug.blur_p > 0:
        sigma = _uniform(n, *BLUR_SIGMA, generator, dev)
        sigma = torch.where(_bernoulli(n, aug.blur_p, generator, dev), sigma, torch.zeros_like(sigma))
        x = gaussian_blur(x, sigma)
    return x


class ViewMaker:
    """Turns a uint8 batch (B, C, H, W) into normalised float views, all randomness from one generator.

    The generator makes views reproducible from (seed, step), which is what lets `--resume` replay the exact
    batches of an uninterrupted run.
    """

    def __init__(
        self, aug: AugmentConfig, image_size: int, in_channels: int, mean: list[float], std: list[float]
    ) -> None:
        self.aug = resolve_recipe(aug, in_channels)
        self.plan = ViewPlan.from_config(self.aug, image_size)
        self.in_channels = in_channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """All views from whole images: crop + flip batched, then colour, then normalisation."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected uint8 images (B, {self.in_channels}, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        x = images.float().div_(255.0)
        n, _, hgt, wid = x.shape
        ratio = (self.aug.ratio[0], self.aug.ratio[1])
        views = []
        for size, scale in zip(self.plan.sizes, self.plan.scales, strict=True):
            v = crop_resize(x, sample_crop_boxes(n, hgt, wid, scale, ratio, generator, x.device), size)
            if self.aug.flip_p > 0:
                flip = _per_sample(_bernoulli(n, self.aug.flip_p, generator, x.device))
                v = torch.where(flip, v.flip(-1), v)
            views.append(self._normalize(color_augment(v, self.aug, generator)))
        return views

    def finish(self, views: list[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Colour + normalisation of uint8 views that were already cropped per image (file-backed sources)."""
        return [self._normalize(color_augment(v.float().div_(255.0), self.aug, generator)) for v in views]


def view_geometry(aug: AugmentConfig, size: int, scale: tuple[float, float]) -> v2.Compose:
    """Per-image crop + flip for file-backed sources (run in DataLoader workers), PIL in, uint8 tensor out."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, ratio=(aug.ratio[0], aug.ratio[1]), antialias=True),
            v2.RandomHorizontalFlip(aug.flip_p),
            v2.PILToTensor(),
        ]
    )
