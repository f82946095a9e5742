"""Turning a model path and a data spec (or image paths) into embeddings, with progress and per-image errors.

A user's folder may hold a truncated JPEG or a file that only looks like an image; one bad file must not sink a
calibration over thousands, so undecodable images are skipped and reported by name instead of raising.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse

from core.errors import InvalidError
from ood.detectors import Inputs


class InputError(InvalidError):
    """A model path, data spec or image path that cannot be used; the CLI prints the message on one line."""


@dataclass
class Embedded:
    """Embeddings of the images that decoded, the source indices they came from, and what failed and why."""

    matrix: sparse.csr_matrix
    indices: NDArray[np.int64]
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image name, reason)
    features: NDArray[np.float32] | None = None  # encoder features, when the model exports them

    def inputs(self) -> Inputs:
        """The rows as `detectors.Inputs`, what every OOD score takes."""
        return Inputs.from_arrays(self.matrix, self.features)

    @property
    def n(self) -> int:
        return int(self.matrix.shape[0])


def open_runtime(model_path: str | Path) -> Any:
    """EmbeddingRuntime for an exported model, with a missing or unreadable file reported as InputError."""
    from export.runtime import EmbeddingRuntime

    path = Path(model_path)
    if not path.is_file():
        raise InputError(f"no model at {model_path} (expected an exported .onnx file)")
    try:
        return EmbeddingRuntime(str(path))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise InputError(f"cannot load model {model_path}: {err}") from err
    except Exception as err:  # onnxruntime raises its own exception types for a corrupt or foreign file
        raise InputError(f"cannot load model {model_path}: {type(err).__name__}: {err}") from err


def embed_images(
    runtime: Any, loaders: list[tuple[str, Any]], *, batch_size: int = 256, progress: bool = True, desc: str = "embed"
) -> Embedded:
    """Embed images given as (name, zero-argument loader) pairs; loaders that raise are skipped and reported."""
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    blocks: list[sparse.csr_matrix] = []
    feat_blocks: list[Any] = []
    kept: list[int] = []
    failed: list[tuple[int, str, str]] = []
    batch: list[Any] = []
    batch_idx: list[int] = []

    def keep(images: list[Any], positions: list[int]) -> None:
        if getattr(runtime, "feature_dim", None):
            emb, feats = runtime.embed_with_features(images)
        else:
            out, feats = runtime.embed(images), None
            emb = out.tocsr() if sparse.issparse(out) else sparse.csr_matrix(np.asarray(out, dtype=np.float32))
        blocks.append(emb)
        feat_blocks.append(feats)
        kept.extend(positions)

    def flush() -> None:
        if not batch:
            return
        try:
            keep(batch, batch_idx)
        except ValueError:
            # The runtime refuses the whole batch for one image it cannot convert: redo it image by image so
            # only the culprit is dropped (and named).
            for img, pos in zip(batch, batch_idx, strict=True):
                try:
                    keep([img], [pos])
                except ValueError as err:
                    failed.append((pos, loaders[pos][0], f"{type(err).__name__}: {err}"))
        batch.clear()
        batch_idx.clear()

    with tqdm(total=len(loaders), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for pos, (name, load) in enumerate(loaders):
            try:
                img = load()
                if not isinstance(img, Image.Image):
                    raise TypeError(f"loader returned {type(img).__name__}, not an image")
                img.load()
            except (OSError, UnidentifiedImageError, ValueError, TypeError, Image.DecompressionBombError) as err:
                failed.append((pos, name, f"{type(err).__name__}: {err}"))
            else:
                batch.append(img)
                batch_idx.append(pos)
                if len(batch) >= batch_size:
                    flush()
            bar.update(1)
        flush()
    dim = int(getattr(runtime, "dim", 0))
    matrix = sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix((0, dim), dtype=np.float32)
    failures = [(name, reason) for _, name, reason in sorted(failed)]  # in input order
    features = None
    fdim = getattr(runtime, "feature_dim", None)
    if fdim:
        features = np.concatenate(feat_blocks) if feat_blocks else np.zeros((0, int(fdim)), dtype=np.float32)
    return Embedded(matrix=matrix, indices=np.asarray(kept, dtype=np.int64), failed=failures, features=features)


def embed_source(
    runtime: Any,
    source: Any,
    indices: NDArray[Any] | None = None,
    *,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "embed",
    what: str | None = None,
) -> Embedded:
    """Embed `indices` of an ImageSource; `Embedded.indices` maps rows back to source indices. With `what` (how
    an error names the set), a set none of whose images decode is an InputError."""
    idx = np.arange(len(source), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    loaders = [(f"{source.name}[{i}]", (lambda i=int(i): source.image(i))) for i in idx]
    out = embed_images(runtime, loaders, batch_size=batch_size, progress=progress, desc=desc)
    if what is not None and out.n == 0:
        raise InputError(f"no image of {what} could be decoded ({len(out.failed)} failed)")
    out.indices = idx[out.indices]
    return out


def image_paths(paths: list[str]) -> list[Path]:
    """Expand files and folders (recursively, image extensions only) into a sorted list of image files."""
    from data.sources import IMAGE_EXTENSIONS

    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise InputError(f"{raw} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"no such file or folder: {raw}")
    return files
