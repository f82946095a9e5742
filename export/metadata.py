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

from core.atomic_io import atomic_path
from export.errors import ModelLoadError

FORMAT = "lpjepa-onnx/1"
OOD_KEY = "ood_calibration"
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

# key -> type tag; "str" values are stored raw, the others as JSON. Unknown keys are kept, JSON-decoded if they
# parse, so files written by a newer exporter still load.
SCHEMA: dict[str, str] = {
    "format": "str",
    "dim": "int",
    "method": "str",
    "backbone": "str",
    "rectify": "bool",
    "target_p": "float",
    "target_mu": "float",
    "target_sigma": "float",
    "expected_l0": "float?",
    "image_size": "int",
    "in_channels": "int",
    "mean": "floats",
    "std": "floats",
    "input_name": "str",
    "output_name": "str",
    "checkpoint_sha256": "str",
    "checkpoint_name": "str",
    "precision": "str",
    "opset": "int",
    "exporter": "str",
    "created_at": "str",
    "model_config": "json",
    "parity": "json",
    "tensorrt_profile": "json",
    OOD_KEY: "json",
}
REQUIRED = ("format", "dim", "image_size", "in_channels", "mean", "std", "input_name", "output_name", "precision")


def _default_mode() -> int:
    """The mode a plain open() would create: mkstemp's 0600 would hide the model from a serving user."""
    try:  # Linux reports the umask without the set-and-restore race of os.umask()
        with open("/proc/self/status", encoding="ascii") as fh:
            umask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def save_onnx_atomic(model: Any, path: str | os.PathLike[str]) -> Path:
    """onnx.save through a temp file + fsync + rename, keeping the old file's mode (or the umask default)."""
    import onnx

    target = Path(path)
    mode = target.stat().st_mode & 0o777 if target.exists() else _default_mode()
    with atomic_path(target) as tmp:
        onnx.save(model, str(tmp))
        os.chmod(tmp, mode)
    return target


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, _default_mode())
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def engine_sidecar(model_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(model_path)}.meta.json")


def ood_sidecar(model_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(model_path)}.ood.json")


def _finite_json(value: Any) -> str:
    # NaN/Infinity are not JSON; other readers (browsers, jq) would choke on them.
    return json.dumps(value, sort_keys=True, allow_nan=False)


def encode(metadata: dict[str, Any]) -> dict[str, str]:
    """Typed metadata -> metadata_props strings; rejects values that would not survive the round trip."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        kind = SCHEMA.get(key, "json")
        try:
            if kind == "str":
                if not isinstance(value, str):
                    raise TypeError(f"expected a string, got {type(value).__name__}")
                out[key] = value
            elif kind in ("float", "float?") and value is not None:
                out[key] = _finite_json(float(value))
            else:
                out[key] = _finite_json(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata key {key!r}: {err}") from err
    return out


def decode(props: dict[str, str]) -> dict[str, Any]:
    """metadata_props strings -> typed values (int, float, None, list[float], dict), by SCHEMA."""
    out: dict[str, Any] = {}
    for key, text in props.items():
        kind = SCHEMA.get(key)
        if kind == "str":
            out[key] = text
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            if kind is None:  # someone else's free-text key
                out[key] = text
                continue
            raise ModelLoadError(f"metadata key {key!r} holds invalid JSON: {text[:80]!r}") from None
        if kind == "int":
            value = int(value)
        elif kind == "float":
            value = float(value)
        elif kind == "float?":
            value = None if value is None else float(value)
        elif kind == "floats":
            value = [float(v) for v in value]
        elif kind == "bool":
            value = bool(value)
        out[key] = value
    return out


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


def read_onnx_props(path: Path) -> dict[str, str]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as err:
        raise ModelLoadError(f"{path} is not a readable ONNX model: {err}") from err
    return {p.key: p.value for p in model.metadata_props}


def read_metadata(model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Typed metadata of an exported .onnx file or TensorRT engine (from its `.meta.json` sidecar)."""
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(f"no model file at {path}")
    if path.suffix.lower() in ENGINE_SUFFIXES:
        sidecar = engine_sidecar(path)
        if not sidecar.is_file():
            raise ModelLoadError(f"{path}: TensorRT engine without its metadata file {sidecar.name}")
        try:
            props = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{sidecar} is not valid JSON: {err}") from err
        if not isinstance(props, dict):
            raise ModelLoadError(f"{sidecar} must hold a JSON object")
        return validate(decode({str(k): str(v) for k, v in props.items()}), str(path))
    return validate(decode(read_onnx_props(path)), str(path))


def write_engine_metadata(engine_path: str | os.PathLike[str], metadata: dict[str, Any]) -> Path:
    sidecar = engine_sidecar(engine_path)
    write_text_atomic(sidecar, json.dumps(encode(metadata), indent=1, sort_keys=True) + "\n")
    return sidecar


def write_ood_calibration(model_path: str | os.PathLike[str], calibration: dict[str, Any]) -> Path:
    """Store OOD calibration inside the model (ONNX) or beside it (`<model>.ood.json` for engines).

    The ONNX file is rewritten atomically: a server reading it concurrently sees the old or the new file.
    """
    if not isinstance(calibration, dict):
        raise TypeError(f"calibration must be a dict, got {type(calibration).__name__}")
    text = _finite_json(calibration)  # fail before touching the file
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(f"no model file at {path}")
    if path.suffix.lower() not in ONNX_SUFFIXES:
        read_metadata(path)  # refuse to decorate a foreign file
        write_text_atomic(ood_sidecar(path), text + "\n")
        return ood_sidecar(path)
    import onnx

    read_metadata(path)
    model = onnx.load(str(path))
    entries = [(p.key, p.value) for p in model.metadata_props if p.key != OOD_KEY]
    del model.metadata_props[:]
    for key, value in [*entries, (OOD_KEY, text)]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
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
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{sidecar} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ModelLoadError(f"{sidecar} must hold a JSON object")
        return data
    return None
