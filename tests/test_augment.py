"""Multi-view augmentation on real Fashion-MNIST images: shapes, per-sample randomness, grey stays grey, and the
vectorised ops against torchvision's own per-image functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from data.augment import (
    ViewMaker,
    color_augment,
    crop_resize,
    gaussian_blur,
    resolve_recipe,
    sample_crop_boxes,
    shift_hue,
)
from data.config import AugmentConfig
from data.loader import ArrayBatches, FileBatches, build_batches, convert_channels, default_stats
from data.sources import open_source
from pretrain.config import TrainConfig


@pytest.fixture(scope="module")
def grey_batch(fmnist) -> torch.Tensor:
    return torch.from_numpy(np.array(fmnist.array[:64])).unsqueeze(1)  # (64, 1, 28, 28) uint8


def test_views_shapes_dtype_and_sizes(grey_batch):
    aug = AugmentConfig(small_views=2, small_size=12)
    maker = ViewMaker(aug, 28, 1, [0.286], [0.353])
    views = maker(grey_batch, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(64, 1, 28, 28)] * 2 + [(64, 1, 12, 12)] * 2
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    lo, hi = (0 - 0.286) / 0.353, (1 - 0.286) / 0.353  # normalised [0, 1] range
    assert all(v.min() >= lo - 1e-5 and v.max() <= hi + 1e-5 for v in views)


def test_views_differ_between_views_and_samples(grey_batch):
    maker = ViewMaker(AugmentConfig(), 28, 1, [0.286], [0.353])
    same = grey_batch[:1].expand(32, -1, -1, -1).contiguous()  # one image 32 times
    v1, v2_ = maker(same, torch.Generator().manual_seed(1))
    assert (v1 - v2_).abs().flatten(1).amax(1).min() > 0.05  # the two views of every sample differ
    # per-sample randomness: copies of the same image get different crops within one view
    flat = v1.flatten(1)
    dists = torch.cdist(flat, flat)
    assert (dists + torch.eye(32) * 1e9).min() > 0.01


def test_views_reproducible_from_generator(grey_batch):
    maker = ViewMaker(AugmentConfig(), 28, 1, [0.5], [0.5])
    a = maker(grey_batch, torch.Generator().manual_seed(7))
    b = maker(grey_batch, torch.Generator().manual_seed(7))
    c = maker(grey_batch, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_grey_recipe_drops_colour_ops_and_grey_stays_grey(grey_batch):
    aug = resolve_recipe(AugmentConfig(), 1)
    assert aug.recipe == "grey" and aug.saturation == 0 and aug.hue == 0 and aug.grayscale_p == 0
    assert resolve_recipe(AugmentConfig(), 3).recipe == "color"
    # grey images fed to a colour model: full colour recipe (p = 1 jitter) must keep R = G = B
    rgb = grey_batch.expand(-1, 3, -1, -1).contiguous()
    maker = ViewMaker(
        AugmentConfig(jitter_p=1.0, hue=0.5, saturation=1.0, blur_p=0.5, solarize_p=0.5), 28, 3, [0.0] * 3, [1.0] * 3
    )
    for v in maker(rgb, torch.Generator().manual_seed(2)):
        assert torch.allclose(v[:, 0], v[:, 1], atol=1e-5) and torch.allclose(v[:, 1], v[:, 2], atol=1e-5)


def test_full_box_crop_is_identity(grey_batch):
    x = grey_batch.float() / 255
    boxes = torch.tensor([[0.0, 0.0, 28.0, 28.0]]).expand(len(x), 4)
    assert torch.allclose(crop_resize(x, boxes, 28), x, atol=1e-6)
    # half-size crop of the top-left quadrant, downscaled by 2, equals 2x2 average pooling of that quadrant
    quad = torch.tensor([[0.0, 0.0, 14.0, 14.0]]).expand(len(x), 4)
    assert torch.allclose(crop_resize(x, quad, 7), torch.nn.functional.avg_pool2d(x[..., :14, :14], 2), atol=1e-6)


def test_crop_boxes_follow_torchvision_distribution():
    n, hgt, wid, scale, ratio = 4000, 28, 28, (0.2, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(n, hgt, wid, scale, ratio, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= wid + 1e-4).all() and (boxes[:, 3] <= hgt + 1e-4).all()
    frac = (w * h / (hgt * wid)).numpy()
    torch.manual_seed(0)
    blank = torch.zeros(1, hgt, wid)
    ref = np.array(
        [
            (lambda p: p[2] * p[3] / (hgt * wid))(RandomResizedCrop.get_params(blank, list(scale), list(ratio)))
            for _ in range(n)
        ]
    )
    # torchvision rounds boxes to whole pixels, we keep them continuous: compare the laws, not the samples
    assert stats.ks_2samp(frac, ref).statistic < 0.06
    aspect = (w / h).numpy()
    assert aspect.min() >= ratio[0] - 1e-4 and aspect.max() <= ratio[1] + 1e-4


def test_hue_shift_matches_torchvision():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 9, 9, generator=gen)
    shifts = torch.tensor([-0.5, -0.3, -0.05, 0.0, 0.2, 0.45])
    out = shift_hue(x, shifts)
    ref = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(6)])
    assert torch.allclose(out, ref, atol=2e-5)


def test_blur_matches_torchvision():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(3, 2, 30, 30, generator=gen)
    sig = torch.tensor([0.5, 1.7, 0.0])
    out = gaussian_blur(x, sig)
    k = 3  # 0.1 * 30 rounded to odd
    for i in range(2):
        ref = TF.gaussian_blur(x[i], [k, k], [float(sig[i])] * 2)
        assert torch.allclose(out[i], ref, atol=1e-5)
    assert torch.equal(out[2], x[2])  # sigma 0 = not selected = untouched


def test_colour_ops_probability_one_and_zero():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    off = AugmentConfig(jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0, blur_p=0.0)
    assert torch.equal(color_augment(x.clone(), off, gen), x)
    g = color_augment(x.clone(), AugmentConfig(jitter_p=0.0, grayscale_p=1.0, solarize_p=0.0), gen)
    assert torch.allclose(g, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6)
    s = color_augment(x.clone(), AugmentConfig(jitter_p=0.0, grayscale_p=0.0, solarize_p=1.0), gen)
    assert torch.allclose(s, TF.solarize(x, 0.5), atol=1e-7)
    # brightness only, factor range [0.6, 1.4]: per-pixel ratios are one constant per image within that range
    b = color_augment(
        x.clone(),
        AugmentConfig(
            jitter_p=1.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0, solarize_p=0.0, brightness=0.4
        ),
        gen,
    )
    unclipped = (b > 0) & (b < 1)
    ratio = torch.where(unclipped, b / x, torch.nan)
    per_img = ratio.flatten(1).nanmedian(1).values
    assert ((per_img >= 0.6 - 1e-5) & (per_img <= 1.4 + 1e-5)).all()
    assert per_img.std() > 0.05  # factors differ per sample


def test_convert_channels_matches_pil(fmnist):
    grey = np.array(fmnist.array[:4])
    rgb = convert_channels(grey, 3)
    assert rgb.shape == (4, 28, 28, 3) and (rgb[..., 0] == grey).all() and (rgb[..., 2] == grey).all()
    colour = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    luma = convert_channels(colour, 1)[..., 0]
    ref = np.stack([np.asarray(Image.fromarray(c, "RGB").convert("L")) for c in colour])
    assert (luma == ref).all()


def test_array_batches_resume_and_shard(fmnist):
    cfg = TrainConfig()
    maker = ViewMaker(cfg.augment, 28, 1, [0.286], [0.353])
    full = ArrayBatches(fmnist, maker, 32, seed=3, rank=0, world_size=1, device=torch.device("cpu"), subset=200)
    assert full.steps_per_epoch == 6
    # a fresh object asked for step 8 (epoch 1) replays exactly what the first one produced there
    seen = [full.indices(s).clone() for s in range(12)]
    again = ArrayBatches(fmnist, maker, 32, seed=3, rank=0, world_size=1, device=torch.device("cpu"), subset=200)
    assert torch.equal(again.indices(8), seen[8])
    assert torch.equal(full.batch(8).views[0], again.batch(8).views[0])
    # one epoch covers distinct images; the next epoch is a different order
    ep0 = torch.cat(seen[:6])
    assert len(set(ep0.tolist())) == 192 and not torch.equal(torch.cat(seen[6:]), ep0)
    # two ranks split the same global batch
    r0 = ArrayBatches(fmnist, maker, 32, seed=3, rank=0, world_size=2, device=torch.device("cpu"), subset=200)
    r1 = ArrayBatches(fmnist, maker, 32, seed=3, rank=1, world_size=2, device=torch.device("cpu"), subset=200)
    assert torch.equal(torch.cat([r0.indices(5), r1.indices(5)]), seen[5])
    labels = r1.batch(5).labels
    assert torch.equal(labels, torch.as_tensor(fmnist.labels[r1.indices(5).numpy()]))


def test_file_source_batches(tmp_path, fmnist):
    """An ImageFolder tree of real images goes through the worker path (per-image crop, batched colour)."""
    for i in range(24):
        label = int(fmnist.labels[i])
        d = tmp_path / f"class{label}"
        d.mkdir(exist_ok=True)
        Image.fromarray(np.array(fmnist.array[i]), "L").resize((40, 36)).save(d / f"{i}.png")
    cfg = TrainConfig()
    cfg.data.spec = str(tmp_path)
    cfg.model.image_size = 32
    cfg.train.batch_size = 8
    cfg.augment.small_views = 1
    src = open_source(cfg.data.spec)
    mean, std = default_stats(src, 1)
    assert len(mean) == 1 and math.isfinite(mean[0])
    batches = build_batches(cfg, src, 1, mean, std, 0, 1, torch.device("cpu"))
    assert isinstance(batches, FileBatches)
    out = list(batches.iterate(1, 3))
    assert len(out) == 2
    assert [tuple(v.shape) for v in out[0].views] == [(8, 1, 32, 32), (8, 1, 32, 32), (8, 1, 18, 18)]
    assert out[0].labels is not None and out[0].labels.shape == (8,)
    assert not torch.equal(out[0].views[0], out[0].views[1])
