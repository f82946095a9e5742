"""Frozen features for evaluation: backbone features and projector outputs of a data source, in eval mode.

In-memory uint8 sources (Fashion-MNIST, MNIST, CIFAR) skip PIL: decoding 60k images one by one costs more than
the network on a small CPU model. The batched path must still produce exactly what `models.preprocess.
eval_transform` produces from a PIL image, because the ONNX runtime and the server reproduce that transform;
a probe on slightly different pixels would measure a different model. So each step either is the same
torchvision kernel applied to a batch (crop, scale, normalise) or reproduces PIL exactly (mode conversion, in
integer arithmetic), and a resize, when one is needed at all, is done by PIL itself per image.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from data.sources import DataSpecError, ImageSource
from models.config import ModelConfig
from models.preprocess import eval_transform, pil_mode

# ITU-R 601-2 luma in Pillow's 16-bit fixed point (libImaging/Convert.c, L24): L = (R*19595 + G*38470 +
# B*7471 + 0x8000) >> 16. Using floats here would differ from PIL by one grey level on some pixels.
_LUMA_WEIGHTS = np.array([19595, 38470, 7471], dtype=np.uint32)


def convert_mode_array(images: np.ndarray, in_channels: int) -> np.ndarray:
    """PIL's `convert("L")` / `convert("RGB")` on a uint8 batch (N, H, W) or (N, H, W, 3), bit for bit.

    Grey data into a 3-channel model replicates the grey level into R, G and B, as PIL does; colour data into
    a 1-channel model uses Pillow's fixed-point luma. Returns (N, H, W, C).
    """
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, H, W) or (N, H, W, 3), got {images.shape}")
    channels = images.shape[-1]
    if channels == in_channels:
        return images
    if in_channels == 3:
        return np.repeat(images, 3, axis=-1)
    luma = (images.astype(np.uint32) @ _LUMA_WEIGHTS + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def transform_array_batch(images: np.ndarray, config: ModelConfig) -> torch.Tensor:
    """The eval transform on a uint8 batch; equal, element for element, to stacking eval_transform(PIL image)."""
    images = convert_mode_array(images, config.in_channels)
    size = int(config.image_size)
    n, height, width, _ = images.shape
    # Resize(int) scales the shorter side to `size`; PIL returns an unchanged copy when the size already matches.
    if min(height, width) != size:
        mode = pil_mode(config.in_channels)
        resized = []
        for img in images:
            pil = Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode)
            out = TF.resize(pil, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            arr = np.asarray(out)
            resized.append(arr[..., None] if arr.ndim == 2 else arr)
        images = np.stack(resized)
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # IDX data is a read-only frombuffer view; torch wants to own writable memory
        images = images.copy()
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    batch = TF.center_crop(batch, [size, size])
    batch = TF.to_dtype(batch.contiguous(), torch.float32, scale=True)
    return TF.normalize(batch, mean=list(config.mean), std=list(config.std))


def _array_batches(
    source: ImageSource, indices: np.ndarray, config: ModelConfig, batch_size: int
) -> Iterator[torch.Tensor]:
    assert source.array is not None
    for start in range(0, len(indices), batch_size):
        yield transform_array_batch(source.array[indices[start : start + batch_size]], config)


def clean_batches(
    source: ImageSource, indices: np.ndarray, config: ModelConfig, batch_size: int
) -> Iterator[torch.Tensor]:
    """`source[indices]` through the deployed (eval) transform, in batches: what export and the server feed."""
    if source.array is not None:
        yield from _array_batches(source, indices, config, batch_size)
        return
    transform = eval_transform(config)
    for start in range(0, len(indices), batch_size):
        tensors = []
        for i in indices[start : start + batch_size]:
            try:
                image = source.image(int(i))
            except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
                raise DataSpecError(f"{source.name}: image {int(i)} cannot be read: {err}") from err
            tensors.append(transform(image))
        yield torch.stack(tensors)


@torch.no_grad()
def extract(
    model: nn.Module,
    source: ImageSource,
    config: ModelConfig,
    batch_size: int = 256,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    progress: bool = True,
    desc: str = "extract",
    train_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(backbone features, projector outputs, labels) of `source[indices]`, float32/int64 on the CPU.

    The model runs in eval mode (BatchNorm running statistics), and its previous mode is restored so a trainer
    can call this in the middle of training. Inputs go to the device the model's parameters live on.
    ``train_mode`` runs a throw-away copy in train mode instead (BatchNorm normalises each batch by its own
    statistics, as the training loss saw it): the l0 the objective was steering, beside the deployed one.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    idx = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError("indices must be one-dimensional")
    labels = None if source.labels is None else torch.from_numpy(np.asarray(source.labels)[idx].astype(np.int64))
    device = next((param.device for param in model.parameters()), torch.device("cpu"))
    encoder = getattr(model, "module", model)
    if train_mode:
        encoder = copy.deepcopy(encoder)  # its running statistics may move; the caller's must not
    was_training = encoder.training
    encoder.train(train_mode)
    feats_out: list[torch.Tensor] = []
    z_out: list[torch.Tensor] = []
    try:
        with tqdm(total=len(idx), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for batch in clean_batches(source, idx, config, batch_size):
                feats, z = encoder.forward_features(batch.to(device, non_blocking=True))
                feats_out.append(feats.float().cpu())
                z_out.append(z.float().cpu())
                bar.update(len(batch))
    finally:
        encoder.train(was_training)
    if not feats_out:
        return torch.empty(0, encoder.feature_dim), torch.empty(0, encoder.embed_dim), labels
    return torch.cat(feats_out), torch.cat(z_out), labels
