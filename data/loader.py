"""Training batches addressed by step number: deterministic, shardable over DDP ranks, resumable mid-epoch.

Batch `step` is a pure function of (seed, step): epoch e = step // steps_per_epoch draws its permutation from a
generator seeded with (seed, e), and the views of a step come from a generator seeded with (seed, step, rank).
So `--resume` from step s replays exactly the batches an uninterrupted run would have seen, and every DDP rank
takes its own slice of the same global batch without any communication.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.augment import ViewMaker, ViewPlan, view_geometry
from data.config import AugmentConfig, DataConfig
from data.sources import DataSpecError, ImageSource
from models.config import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from models.preprocess import pil_mode

# Pillow's fixed-point ITU-R 601-2 luma, as PIL's convert("L") (so training pixels equal eval/serving pixels).
_LUMA = np.array([19595, 38470, 7471], dtype=np.uint32)
STATS_SAMPLE = 10000


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (SplitMix64 finaliser), so nearby (seed, step) pairs decorrelate."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def convert_channels(images: np.ndarray, in_channels: int) -> np.ndarray:
    """uint8 (N, H, W[, 3]) -> (N, H, W, C) with PIL's own grey<->RGB conversion."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == in_channels:
        return images
    if in_channels == 3:
        return np.repeat(images, 3, axis=-1)
    return ((images.astype(np.uint32) @ _LUMA + 0x8000) >> 16).astype(np.uint8)[..., None]


def default_stats(source: ImageSource, in_channels: int) -> tuple[list[float], list[float]]:
    """Normalisation statistics: the data's own (in-memory sources), else ImageNet's; stored in the checkpoint."""
    name = source.name.split(":")[0]
    if name == "fashion-mnist" and in_channels == 1:
        return list(FASHION_MNIST_MEAN), list(FASHION_MNIST_STD)
    if source.array is not None:
        arr = source.array[:STATS_SAMPLE]
        x = convert_channels(arr, in_channels).astype(np.float64) / 255.0
        mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
        return [round(float(m), 4) for m in mean], [round(max(float(s), 1e-3), 4) for s in std]
    return ([0.449], [0.226]) if in_channels == 1 else (list(IMAGENET_MEAN), list(IMAGENET_STD))


def detect_channels(source: ImageSource) -> int:
    if source.channels in (1, 3):
        return int(source.channels)
    img = source.image(0)
    return 1 if img.mode in ("L", "I", "I;16", "F", "1", "LA") else 3


@dataclass
class Batch:
    views: list[torch.Tensor]
    labels: torch.Tensor | None


class StepBatches:
    """Base: global batch `batch_size`, this rank's share `local_batch`, `steps_per_epoch` full batches."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        if batch_size % world_size:
            raise DataSpecError(f"global batch size {batch_size} is not divisible by {world_size} ranks")
        if length < batch_size:
            raise DataSpecError(f"the data has {length} images, fewer than one batch of {batch_size}")
        self.length = length
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = length // batch_size
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def indices(self, step: int) -> torch.Tensor:
        """This rank's sample indices for global step `step` (drop_last: every batch is full)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch, 0xDA7A))
            self._perm = torch.randperm(self.length, generator=gen)
            self._perm_epoch = epoch
        start = pos * self.batch_size + self.rank * self.local_batch
        return self._perm[start : start + self.local_batch]

    def view_generator(self, step: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(_mix(self.seed, step, self.rank, 0xA06))


class ArrayBatches(StepBatches):
    """In-memory uint8 images (Fashion-MNIST, MNIST, CIFAR, STL-10): views made batched on the device."""

    def __init__(
        self,
        source: ImageSource,
        maker: ViewMaker,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        subset: int = 0,
    ) -> None:
        assert source.array is not None
        arr = source.array[:subset] if subset else source.array
        super().__init__(len(arr), batch_size, seed, rank, world_size)
        nhwc = convert_channels(arr, maker.in_channels)
        self.images = torch.from_numpy(np.array(nhwc, copy=True)).permute(0, 3, 1, 2).contiguous().to(device)
        labels = None if source.labels is None else source.labels[: len(arr)]
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64, device=device)
        self.maker = maker
        self.device = device

    def batch(self, step: int) -> Batch:
        idx = self.indices(step).to(self.device)
        views = self.maker(self.images.index_select(0, idx), self.view_generator(step, self.device))
        return Batch(views, None if self.labels is None else self.labels.index_select(0, idx))

    def iterate(self, start_step: int, end_step: int) -> Iterator[Batch]:
        for step in range(start_step, end_step):
            yield self.batch(step)


class _FileViews(Dataset):
    """Per-image decode + crop + flip (in workers); colour is left to the batched ViewMaker.finish."""

    def __init__(self, source: ImageSource, maker: ViewMaker) -> None:
        self.source = source
        self.mode = pil_mode(maker.in_channels)
        plan: ViewPlan = maker.plan
        self.transforms = [
            view_geometry(maker.aug, size, scale) for size, scale in zip(plan.sizes, plan.scales, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        img, label = self.source[i]
        if img.mode != self.mode:
            img = img.convert(self.mode)
        return [t(img) for t in self.transforms], -1 if label is None else int(label)


class _StepSampler:
    """Batch sampler yielding this rank's indices for steps [start, end), so a DataLoader resumes mid-epoch."""

    def __init__(self, batches: StepBatches, start: int, end: int) -> None:
        self.batches, self.start, self.end = batches, start, end

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield self.batches.indices(step).tolist()

    def __len__(self) -> int:
        return self.end - self.start


class FileBatches(StepBatches):
    """Image files (ImageFolder trees, ImageNet-100): a DataLoader with workers decodes and crops per image."""

    def __init__(
        self,
        source: ImageSource,
        maker: ViewMaker,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        num_workers: int,
        subset: int = 0,
    ) -> None:
        length = min(len(source), subset) if subset else len(source)
        super().__init__(length, batch_size, seed, rank, world_size)
        self.dataset = _FileViews(source, maker)
        self.maker, self.device, self.num_workers = maker, device, num_workers
        self.has_labels = source.labels is not None

    def iterate(self, start_step: int, end_step: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(_mix(self.seed, start_step, self.rank, 0xF11E))
        loader = DataLoader(
            self.dataset,
            batch_sampler=_StepSampler(self, start_step, end_step),
            num_workers=self.num_workers,
            generator=gen,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )
        for step, (views, labels) in enumerate(loader, start=start_step):
            views = [v.to(self.device, non_blocking=True) for v in views]
            out = self.maker.finish(views, self.view_generator(step, self.device))
            yield Batch(out, labels.to(self.device) if self.has_labels else None)


class BatchRecipe(Protocol):
    """What batching reads of a training config (pretrain.config.TrainConfig is one)."""

    data: DataConfig
    augment: AugmentConfig
    model: Any  # image_size
    train: Any  # batch_size, seed


def build_batches(
    cfg: BatchRecipe,
    source: ImageSource,
    in_channels: int,
    mean: list[float],
    std: list[float],
    rank: int,
    world_size: int,
    device: torch.device,
) -> ArrayBatches | FileBatches:
    maker = ViewMaker(cfg.augment, cfg.model.image_size, in_channels, mean, std)
    common = (source, maker, cfg.train.batch_size, cfg.train.seed, rank, world_size, device)
    if source.array is not None:
        return ArrayBatches(*common, cfg.data.subset)
    return FileBatches(*common, cfg.data.num_workers, cfg.data.subset)
