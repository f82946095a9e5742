"""The metadata an exported model carries, so a served file is self-describing without the checkpoint.

ONNX keeps it in `metadata_props` (string key -> string value). Values are encoded per key: strings as-is (so
Netron and `onnx` tooling show them readably), everything else as JSON, which round-trips floats exactly. A
TensorRT engine has no metadata slot, so the same dictionary lives in a sidecar `<engine>.meta.json`.

OOD calibration is written after export by the OOD stage (it needs the exported model to score data), hence
`write_ood_calibration`, which rewrites the ONNX file atomically with one extra key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.atomic_io import DEFAULT_FILE_MODE, atomic_path, atomic_write_text
from core.errors import first_error
from export.errors import ModelLoadError

FORMAT = "lpjepa-onnx/1"
OOD_KEY = "ood_calibration"
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class ModelMetadata(BaseModel):
    """The typed metadata of an export. A field may be absent (the check of REQUIRED is `validate`'s, so that a
    partial update such as the parity summary encodes key by key) but never null, except `expected_l0`. Other
    keys are kept (JSON-decoded if they parse), so files written by a newer exporter still load."""

    model_config = ConfigDict(extra="allow")

    format: str = Field(default=None)
    dim: int = Field(default=None)
    method: str = Field(default=None)
    backbone: str = Field(default=None)
    rectify: bool = Field(default=None)
    target_p: float = Field(default=None)
    target_mu: float = Field(default=None)
    target_sigma: float = Field(default=None)
    expected_l0: float | None = None  # None: the target says nothing about the served embedding's sparsity
    image_size: int = Field(default=None)
    in_channels: int = Field(default=None)
    mean: list[float] = Field(default=None)
    std: list[float] = Field(default=None)
    input_name: str = Field(default=None)
    output_name: str = Field(default=None)
    checkpoint_sha256: str = Field(default=None)
    checkpoint_name: str = Field(default=None)
    precision: str = Field(default=None)
    opset: int = Field(default=None)
    exporter: str = Field(default=None)
    created_at: str = Field(default=None)
    encoder_config: dict[str, Any] = Field(default=None, alias="model_config")  # models.config.ModelConfig
    parity: dict[str, Any] = Field(default=None)
    tensorrt_profile: dict[str, int] = Field(default=None)
    ood_calibration: Any = None


REQUIRED = ("format", "dim", "image_size", "in_channels", "mean", "std", "input_name", "output_name", "precision")
KEYS = frozenset(field.alias or name for name, field in ModelMetadata.model_fields.items())
RAW_KEYS = frozenset(
    field.alias or name for name, field in ModelMetadata.model_fields.items() if field.annotation is str
)


def _typed(values: dict[str, Any], where: str, error: type[Exception] = ModelLoadError) -> dict[str, Any]:
    """`values` with each known key's value validated and coerced to its field's type (same keys, same order)."""
    try:
        dumped = ModelMetadata.model_validate(values).model_dump(by_alias=True, exclude_unset=True)
    except ValidationError as err:
        key, msg = first_error(err)
        raise error(f"{where}: metadata key {key!r}: {msg}") from None
    return {key: dumped[key] for key in values}


def save_onnx_atomic(model: Any, path: str | os.PathLike[str]) -> Path:
    """onnx.save through a temp file + fsync + rename, keeping the old file's mode (or the umask default)."""
    import onnx

    target = Path(path)
    mode = target.stat().st_mode & 0o777 if target.exists() else DEFAULT_FILE_MODE
    with atomic_path(target) as tmp:
        onnx.save(model, str(tmp))
        os.chmod(tmp, mode)
    return target


def engine_sidecar(model_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(model_path)}.meta.json")


def ood_sidecar(model_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(model_path)}.ood.json")


def _finite_json(value: Any) -> str:
    # NaN/Infinity are not JSON; other readers (browsers, jq) would choke on them.
    return json.dumps(value, sort_keys=True, allow_nan=False)


def encode(metadata: dict[str, Any]) -> dict[str, str]:
    """Typed metadata (all keys or some) -> metadata_props strings; rejects values that would not survive the
    round trip (a ValueError naming the key)."""
    out: dict[str, str] = {}
    for key, value in _typed(metadata, "metadata", ValueError).items():
        try:
            out[key] = value if key in RAW_KEYS else _finite_json(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata key {key!r}: {err}") from err
    return out


def decode(props: dict[str, str], where: str = "model") -> dict[str, Any]:
    """metadata_props strings -> typed values (int, float, None, list[float], dict), by ModelMetadata."""
    out: dict[str, Any] = {}
    for key, text in props.items():
        if key in RAW_KEYS:
            out[key] = text
            continue
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            if key not in KEYS:  # someone else's free-text key
                out[key] = text
                continue
            raise ModelLoadError(f"{where}: metadata key {key!r} holds invalid JSON: {text[:80]!r}") from None
    return _typed(out, where)


def validate(metadata: dict[str, Any], where: str) -> dict[str, Any]:
    if metadata.get("format") != FORMAT:
        raise ModelLoadError(
            f"{where} is not an lpjepa export (metadata format {metadata.get('format')!r}, "
            f"expected {FORMAT!r}); export it with `lpjepa export`"
        )
    missing = [k for k in REQUIRED if k not in metadata]
    if missing:
        raise ModelLoadError(f"{where} lacks metadata keys: {', '.join(missing)}")
    return metadata


def set_onnx_metadata(model: Any, metadata: dict[str, Any]) -> None:
    """Replace our keys in an onnx.ModelProto's metadata_props, keeping any foreign keys."""
    encoded = encode(metadata)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in encoded]
    del model.metadata_props[:]
    for key, value in [*kept, *sorted(encoded.items())]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Typed metadata of an exported .onnx file or TensorRT engine (from its `.meta.json` sidecar)."""
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(f"no model file at {path}")
    if path.suffix.lower() in ENGINE_SUFFIXES:
        sidecar = engine_sidecar(path)
        if not sidecar.is_file():
            raise ModelLoadError(f"{path}: TensorRT engine without its metadata file {sidecar.name}")
        props = {str(k): str(v) for k, v in json_object(sidecar).items()}
        return validate(decode(props, str(path)), str(path))
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as err:
        raise ModelLoadError(f"{path} is not a readable ONNX model: {err}") from err
    return validate(decode({p.key: p.value for p in model.metadata_props}, str(path)), str(path))


def write_engine_metadata(engine_path: str | os.PathLike[str], metadata: dict[str, Any]) -> Path:
    sidecar = engine_sidecar(engine_path)
    atomic_write_text(sidecar, json.dumps(encode(metadata), indent=1, sort_keys=True) + "\n")
    return sidecar


def write_ood_calibration(model_path: str | os.PathLike[str], calibration: dict[str, Any]) -> Path:
    """Store OOD calibration inside the model (ONNX) or beside it (`<model>.ood.json` for engines).

    The ONNX file is rewritten atomically: a server reading it concurrently sees the old or the new file.
    """
    if not isinstance(calibration, dict):
        raise TypeError(f"calibration must be a dict, got {type(calibration).__name__}")
    text = _finite_json(calibration)  # fail before touching the file
    path = Path(model_path)
    read_metadata(path)  # refuse to decorate a missing or foreign file
    if path.suffix.lower() not in ONNX_SUFFIXES:
        atomic_write_text(ood_sidecar(path), text + "\n")
        return ood_sidecar(path)
    import onnx

    model = onnx.load(str(path))
    set_onnx_metadata(model, {OOD_KEY: calibration})
    return save_onnx_atomic(model, path)


def read_ood_calibration(
    model_path: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Embedded calibration wins over a sidecar file; None when neither exists."""
    meta = read_metadata(model_path) if metadata is None else metadata
    value = meta.get(OOD_KEY)
    if isinstance(value, dict):
        return value
    sidecar = ood_sidecar(model_path)
    return json_object(sidecar) if sidecar.is_file() else None


def json_object(path: Path, error: type[Exception] = ModelLoadError, name: str = "") -> dict[str, Any]:
    """The JSON object in the file `path` (named `name` + path in errors: a CLI flag), or `error` saying why not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise error(f"{name}{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise error(f"{name}{path} must hold a JSON object")
    return data
