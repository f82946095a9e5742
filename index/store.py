"""On-disk layout of an index directory: data files plus one manifest that is the single commit point.

    INDEX_DIR/
      manifest.json                      format, version, backend, dim, metric, count, sha256 + size per file,
                                         and the sha256 of the manifest's own content
      g000003-1a2b3c4d-<role>.<ext>      data files of generation 3 (never rewritten once referenced)

Why this shape: a directory cannot be atomically renamed over a non-empty one, but a file can. Each save writes
its data files under fresh names (temporary name, fsync, rename), then replaces manifest.json in one
``os.replace`` and fsyncs the directory. Until that rename the old manifest still names the old files, which are
untouched, so a crash at any point leaves either the old or the new index loadable, never a mix. Files no
manifest refers to (left by a crash, or the previous generation) are deleted after the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from core.atomic_io import atomic_path, file_sha256, fsync_path
from core.errors import first_error
from index.errors import CorruptIndexError, IndexMismatchError, InvalidInputError

FORMAT = "lpjepa-vector-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# data files (and their temporary names), core.atomic_io's temporary manifest, and an older writer's one
_OWN_FILE = re.compile(r"^(g\d{6}-[0-9a-f]{8}-[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?(\.tmp)?|\.?manifest\.json(\.\w+)?\.tmp)$")

Writer = Callable[[Path], None]


class FileEntry(BaseModel):
    """One data file of a generation: its name in the directory, and what it must hash to and weigh."""

    name: str
    sha256: str
    bytes: int


class Manifest(BaseModel):
    """manifest.json. Keys it does not know (a newer writer's) are kept: the digest covers the whole object."""

    model_config = ConfigDict(extra="allow")

    format: str
    format_version: int
    backend: str
    dim: int
    metric: str
    count: int
    files: dict[str, FileEntry]
    generation: int | None = None
    created_utc: str | None = None
    options: dict[str, Any] | None = None  # the backend's own (index.<backend>_index._options)
    metadata: dict[str, Any] | None = None  # the caller's: model file and sha256, data spec (lpjepa index build)
    software: dict[str, str] | None = None
    manifest_sha256: str | None = None


def _check_manifest(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """``manifest`` as the model sees it (the given keys only); CorruptIndexError naming the field and the file."""
    try:
        return Manifest.model_validate(manifest).model_dump(mode="json", exclude_unset=True)
    except ValidationError as err:
        absent = [e["loc"][0] for e in err.errors() if e["type"] == "missing" and len(e["loc"]) == 1]
        if absent:
            raise CorruptIndexError(f"{path} lacks the fields {absent}") from None
        where, msg = first_error(err)
        raise CorruptIndexError(f"{path}: field {where!r}: {msg}") from None


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its own digest field, in canonical JSON.

    The data files' checksums live in the manifest, so without this a flipped digit in, say, ``dim`` or
    ``count`` would go unnoticed.
    """
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def read_npy(path: Path, *, dtype: Any, ndim: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CorruptIndexError(f"cannot read {path.name}: {err}") from None
    if arr.dtype != np.dtype(dtype) or arr.ndim != ndim:
        raise CorruptIndexError(f"{path.name} holds {arr.dtype} of shape {arr.shape}, expected {ndim}-D {dtype}")
    return arr


def _check_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise InvalidInputError(f"{directory} exists and is not a directory")
    if directory.is_dir() and not (directory / MANIFEST).exists():
        foreign = [p.name for p in directory.iterdir() if not _OWN_FILE.match(p.name)]
        if foreign:
            raise InvalidInputError(
                f"{directory} is not empty and holds no index ({', '.join(sorted(foreign)[:3])} ...);"
                " refusing to write into it"
            )


def _previous_generation(directory: Path) -> int:
    gens = [int(p.name[1:7]) for p in directory.iterdir() if _OWN_FILE.match(p.name) and p.name.startswith("g")]
    return max(gens, default=0)


def save_dir(directory: str | os.PathLike[str], header: dict[str, Any], writers: dict[str, tuple[str, Writer]]) -> dict:
    """Write a new generation of the index in ``directory`` and commit it by replacing the manifest.

    ``header`` holds the manifest fields (backend, dim, metric, count, options ...); ``writers`` maps a file
    role to (extension, function that writes the file at the given path).
    """
    root = Path(directory)
    fields = {"format": FORMAT, "format_version": FORMAT_VERSION, **header, "files": {}}
    fields = _check_manifest(fields, root / MANIFEST)  # before anything is written
    _check_target(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    if created:
        fsync_path(root.parent.resolve())
    generation = _previous_generation(root) + 1
    token = secrets.token_hex(4)
    files: dict[str, dict[str, Any]] = {}
    for role, (ext, write) in writers.items():
        name = f"g{generation:06d}-{token}-{role}{ext}"
        tmp = root / f"{name}.tmp"
        write(tmp)
        fsync_path(tmp)
        files[role] = {"name": name, "sha256": file_sha256(tmp), "bytes": tmp.stat().st_size}
        os.replace(tmp, root / name)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 - py3.10
    manifest = {**fields, "generation": generation, "created_utc": now, "files": files}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    fsync_path(root)  # the data files' renames must be durable before the manifest points at them
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    keep = {entry["name"] for entry in files.values()}
    for path in root.iterdir():
        if _OWN_FILE.match(path.name) and path.name not in keep:
            with contextlib.suppress(OSError):
                path.unlink()
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    root = Path(directory)
    if not root.is_dir():
        raise InvalidInputError(f"index directory {root} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise IndexMismatchError(f"{root} is not an index directory: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptIndexError(f"{path} is not valid JSON (truncated or corrupted?): {err}") from None
    if not isinstance(manifest, dict):
        raise CorruptIndexError(f"{path} does not hold a JSON object")
    if manifest.get("format") != FORMAT:
        raise IndexMismatchError(f"{path} is not an lpjepa index manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise IndexMismatchError(
            f"{path} has format version {version!r}; this program reads versions 1..{FORMAT_VERSION}"
        )
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise CorruptIndexError(f"{path} was altered or corrupted: its content does not match its sha256")
    return _check_manifest(manifest, path)


def verified_paths(
    directory: str | os.PathLike[str], manifest: dict[str, Any], roles: tuple[str, ...], *, verify: bool = True
) -> dict[str, Path]:
    """Paths of the manifest's files after checking presence, size and (if ``verify``) sha256."""
    root = Path(directory)
    out: dict[str, Path] = {}
    for role in roles:
        entry = manifest["files"].get(role)
        if entry is None:
            raise CorruptIndexError(f"{root / MANIFEST} has no valid entry for the {role!r} file")
        name = str(entry["name"])
        if not _OWN_FILE.match(name) or name.endswith(".tmp"):
            raise CorruptIndexError(f"{root / MANIFEST} names an unexpected file {name!r}")
        path = root / name
        if not path.is_file():
            raise CorruptIndexError(f"index file {name} ({role}) is missing from {root}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CorruptIndexError(
                f"index file {name} ({role}) is truncated or altered: {size} bytes, the manifest says {entry['bytes']}"
            )
        if verify and file_sha256(path) != entry["sha256"]:
            raise CorruptIndexError(f"index file {name} ({role}) is corrupted: its sha256 differs from the manifest")
        out[role] = path
    return out
