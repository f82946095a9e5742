"""The data side of the training config: where images come from and how views are made (pydantic models).

They live here, not in pretrain.config, because data/loader.py and data/augment.py consume them and the data
package sits below pretrain. `Section` is the strict base every training-config section shares: JSON types
only (no "3" for 3, no 1 for true), unknown keys refused, non-finite numbers refused, so a typo or a wrong
type is an error naming the key rather than a silently ignored or coerced value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


class Section(BaseModel):
    """A strict, mutable config section (the trainer fills 'auto' fields in place)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def _whole(value: Any) -> Any:
    """JSON has one number type: 3.0 is an integer, 3.5 is not (and true is not one at all)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _range(lo_hi: list[float]) -> list[float]:
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise ValueError("must be [low, high], 0 < low <= high")
    return lo_hi


def _scale(lo_hi: list[float]) -> list[float]:
    if lo_hi[1] > 1:
        raise ValueError("scales must be <= 1")
    return lo_hi


Int = Annotated[int, BeforeValidator(_whole)]
Count = Annotated[Int, Field(ge=0)]
Unit = Annotated[float, Field(ge=0, le=1)]  # a probability or a [0, 1] strength
Range = Annotated[list[float], AfterValidator(_range)]
Scale = Annotated[Range, AfterValidator(_scale)]


def _spec(spec: str) -> str:
    if not spec.strip():
        raise ValueError("must name a data set")
    return spec


class DataConfig(Section):
    """Where training images come from (a data spec of data.sources) and how they are batched."""

    spec: Annotated[str, AfterValidator(_spec)] = "fashion-mnist"
    # Use only the first N images (0 = all): smoke tests and quick sweeps on a small CPU.
    subset: Count = 0
    # DataLoader workers for file-backed sources; in-memory arrays are augmented in-process as whole batches.
    num_workers: Count = 0


class AugmentConfig(Section):
    """Multi-view augmentation (docs/METHOD.md §3 CIFAR recipe by default); 'grey' drops hue/saturation/grayscale."""

    recipe: Literal["auto", "grey", "color"] = "auto"
    global_views: Annotated[Int, Field(ge=2)] = 2  # the loss compares two views
    small_views: Count = 0
    small_size: Int = 0  # 0 -> about 0.57 x image_size (96 -> 224 ratio of the multi-crop papers)
    crop_scale: Scale = Field(default_factory=lambda: [0.2, 1.0])
    small_crop_scale: Scale = Field(default_factory=lambda: [0.05, 0.2])
    ratio: Range = Field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_p: Unit = 0.5
    jitter_p: Unit = 0.8
    brightness: Unit = 0.4
    contrast: Unit = 0.4
    saturation: Unit = 0.2
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    grayscale_p: Unit = 0.2
    solarize_p: Unit = 0.1
    blur_p: Unit = 0.0
