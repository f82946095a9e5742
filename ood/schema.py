"""The OOD calibration file as pydantic models: the one schema `calibrate` writes and every reader validates.

A calibration travels as JSON in the model's ONNX metadata (`ood_calibration`) or its `<model>.ood.json` sidecar,
so it may come from another build or a hand edit. Each section is a model here and `parse_calibration` the one
way in: a bad file fails as CalibrationError naming the field (`l0.bandwidth`, `detectors.pattern_mixture.rates`).
Version 1 (activation scores only; it serves `combined`) and version 2 both load. Keys this build does not know
are kept, so a file read and written again is unchanged.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from core.errors import InvalidError

CALIBRATION_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: activation scores only, served `combined`

Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
InputName = Literal["active", "codes", "features"]


class CalibrationError(InvalidError):
    """A calibration dict that is missing, of another version, or inconsistent; the message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class EncodedArray(Section):
    """A float32 array as little-endian base64 plus its shape, so that a calibration stays one JSON object."""

    dtype: Literal["float32"]
    shape: list[Annotated[int, Field(ge=0)]]
    b64: str
    _array: NDArray[np.float64] = PrivateAttr()

    @model_validator(mode="after")
    def _decode(self) -> EncodedArray:
        try:
            raw = base64.b64decode(self.b64.encode("ascii"), validate=True)
            self._array = np.frombuffer(raw, dtype="<f4").reshape(tuple(self.shape)).astype(np.float64)
        except ValueError as err:
            raise ValueError(f"cannot be decoded as a float32 array: {err}") from err
        if not np.all(np.isfinite(self._array)):
            raise ValueError("holds non-finite values")
        return self

    @property
    def array(self) -> NDArray[np.float64]:
        return self._array


def encode_array(arr: NDArray[Any]) -> dict[str, Any]:
    a = np.ascontiguousarray(arr, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


class MixtureState(Section):
    type: Literal["bernoulli_mixture"]
    input: InputName
    log_weights: list[Finite] = Field(min_length=1)
    rates: EncodedArray

    @model_validator(mode="after")
    def _shapes(self) -> MixtureState:
        if self.rates.array.ndim != 2 or self.rates.array.shape[0] != len(self.log_weights):
            raise ValueError(f"rates must be K x D with K = {len(self.log_weights)} (the log_weights)")
        return self


class LowRankState(Section):
    type: Literal["lowrank_gaussian"]
    input: InputName
    mean: EncodedArray
    components: EncodedArray
    eigvals: list[Positive]
    noise: Positive

    @model_validator(mode="after")
    def _shapes(self) -> LowRankState:
        comps, mean = self.components.array, self.mean.array
        if mean.ndim != 1 or comps.ndim != 2 or comps.shape[1] != mean.size or len(self.eigvals) != comps.shape[0]:
            raise ValueError("mean (D), components (r x D) and eigvals (r) have inconsistent shapes")
        return self


class GaussianState(Section):
    type: Literal["gaussian"]
    input: InputName
    mean: EncodedArray
    whitening: EncodedArray
    shrinkage: Finite = 0.0

    @model_validator(mode="after")
    def _shapes(self) -> GaussianState:
        d = self.mean.array.size
        if self.mean.array.ndim != 1 or self.whitening.array.shape != (d, d):
            raise ValueError(f"whitening must be D x D with D = {d} (the mean)")
        return self


DetectorState = Annotated[MixtureState | LowRankState | GaussianState, Field(discriminator="type")]
DETECTOR_STATE: TypeAdapter[Any] = TypeAdapter(DetectorState)


class L0Section(Section):
    knots: list[Finite] = Field(min_length=1)
    bandwidth: Positive
    mean: Finite | None = None
    std: Finite | None = None
    quantiles: dict[str, Finite] | None = None
    expected: Finite | None = None  # the model's analytic E[l0], when it has one


class Moments(Section):
    mean: Finite
    std: Finite


class Normalization(Section):
    rate: Moments
    pattern: Moments


class Thresholds(Section):
    rate: Finite
    pattern: Finite
    combined: Finite


class ScoreEntry(Section):
    threshold: Finite
    holdout_tpr: Finite | None = None
    needs: str | None = None


class Selection(Section):
    served: str
    rule: str
    reason: str
    validation_sets: list[str]
    table: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]


class ScaledChi2(Section):
    """The shift + g chi2_h null of a drift statistic, matched to its bootstrap mean, variance and skewness
    (calibrations written before the shift was fitted have none: their g chi2_h matched two moments)."""

    scale: Positive
    df: Positive
    shift: Finite = 0.0
    mean: Finite
    var: Finite
    skew: Finite | None = None


class Principal(ScaledChi2):
    components: EncodedArray  # m x D, in the standardised space
    eigvals: list[Positive]


class DriftSection(Section):
    window: int = Field(ge=2)
    l0_pmf: list[Finite]
    principal: Principal
    residual: ScaledChi2
    bootstrap_windows: int | None = None
    test: str | None = None


class CalibrationV1(Section):
    """What the activation scores (scores.OODScorer) need; all of a version 1 file."""

    version: Literal[1]
    kind: str | None = None
    created: str | None = None
    dim: int = Field(ge=1)
    tpr: Rate = 0.95
    seed: int | None = None
    alpha: Positive | None = None
    n: int | None = None
    n_fit: int | None = None
    n_holdout: int | None = None
    rates: list[Rate]
    l0: L0Section
    dead_dims: int | None = None
    normalization: Normalization
    thresholds: Thresholds
    holdout_tpr: dict[str, Finite] | None = None

    @model_validator(mode="after")
    def _dimensions(self) -> CalibrationV1:
        if len(self.rates) != self.dim:
            raise ValueError(f"'rates' must hold {self.dim} numbers (one per dimension, 'dim'), got {len(self.rates)}")
        return self


class CalibrationV2(CalibrationV1):
    """Version 2: every score's fitted state and threshold, the served one and why, and the drift null."""

    version: Literal[2]
    feature_dim: int | None = None
    detectors: dict[str, DetectorState]
    scores: dict[str, ScoreEntry]
    served: str
    selection: Selection | None = None
    drift: DriftSection | None = None
    source: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationV2:
        for name, det in self.detectors.items():
            dim = det.rates.array.shape[1] if isinstance(det, MixtureState) else det.mean.array.size
            if det.input != "features" and dim != self.dim:
                raise ValueError(f"'detectors.{name}' has {dim} dimensions; the calibration has {self.dim}")
        drift = self.drift
        if drift is not None:
            comps = drift.principal.components.array
            if len(drift.l0_pmf) != self.dim + 1:
                raise ValueError(f"'drift.l0_pmf' must hold dim + 1 = {self.dim + 1} numbers")
            if comps.ndim != 2 or comps.shape[1] != self.dim or len(drift.principal.eigvals) != comps.shape[0]:
                raise ValueError("'drift.principal' components (m x dim) and eigvals (m) have inconsistent shapes")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored with the model (fields in the order declared, unset optional ones left out)."""
        return self.model_dump(exclude_unset=True)


Calibration = CalibrationV1 | CalibrationV2


def describe(err: ValidationError, where: str = "") -> str:
    """One line naming the first bad field, e.g. "calibration field 'l0.bandwidth': Input should be greater than 0"."""
    first = err.errors(include_url=False)[0]
    tags = {"bernoulli_mixture", "lowrank_gaussian", "gaussian"}  # pydantic puts the union's tag in the path
    loc = ".".join(str(p) for p in (where, *first["loc"]) if p != "" and p not in tags)
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        msg = "has no known detector type (bernoulli_mixture, lowrank_gaussian, gaussian)"
    return f"calibration field {loc!r}: {msg}" if loc else f"calibration: {msg}"


def validate(schema: Any, data: Any, where: str = "") -> Any:
    """`schema` (a model or TypeAdapter) applied to `data`, with a ValidationError turned into CalibrationError."""
    try:
        return schema.validate_python(data) if isinstance(schema, TypeAdapter) else schema.model_validate(data)
    except ValidationError as err:
        raise CalibrationError(describe(err, where)) from None


def parse_calibration(cal: Any) -> Calibration:
    """The validated calibration of either readable version."""
    if not isinstance(cal, dict):
        raise CalibrationError(f"calibration must be a JSON object, got {type(cal).__name__}")
    version = cal.get("version")
    if version not in READABLE_VERSIONS:
        raise CalibrationError(
            f"calibration version {version!r} is not supported (this build reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); run `lpjepa ood calibrate` again"
        )
    return validate(CalibrationV1 if version == 1 else CalibrationV2, cal)
