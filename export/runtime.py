"""The one inference path for exported models: index/ and serve/ both embed images through EmbeddingRuntime.

It reads everything it needs (input contract, embedding size, target, OOD calibration) from the model file's
metadata, preprocesses raw images exactly like training's evaluation transform (export.preprocess), runs
ONNX Runtime (CUDA first when present, else CPU) or a TensorRT engine in fixed-size chunks, and returns sparse
rows. Import cost is numpy + Pillow + scipy; onnxruntime and pydantic (export.metadata) are imported when a
runtime is created, torch only for TensorRT engines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from export.backends import OrtBackend, TensorRTBackend, default_providers
from export.errors import ImageDecodeError, ModelLoadError
from export.preprocess import ImageInput, Preprocessor

__all__ = ["EmbeddingRuntime", "ImageDecodeError", "ModelLoadError", "default_providers"]


class EmbeddingRuntime:
    """Load an exported model once; embed raw images or preprocessed batches many times (thread-compatible:
    ONNX Runtime sessions may be called concurrently)."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        batch_size: int = 64,
        num_threads: int | None = None,
        spin: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from export import metadata as meta_io  # pydantic: loaded with the first model, not on import

        self.path = Path(model_path)
        if not self.path.is_file():
            raise ModelLoadError(f"no model file at {self.path}")
        suffix = self.path.suffix.lower()
        if suffix in meta_io.ENGINE_SUFFIXES:
            self.metadata = meta_io.read_metadata(self.path)
            self._backend: Any = TensorRTBackend(self.path, self.metadata)
        elif suffix in meta_io.ONNX_SUFFIXES:
            self._backend = OrtBackend(self.path, providers, num_threads, spin)
            self.metadata = meta_io.validate(meta_io.decode(self._backend.props, str(self.path)), str(self.path))
        else:
            raise ModelLoadError(
                f"{self.path}: unsupported model file type {suffix or '(none)'!r}; expected "
                f".onnx or a TensorRT engine ({', '.join(meta_io.ENGINE_SUFFIXES)})"
            )
        m = self.metadata
        self._backend.bind(m["input_name"], m["output_name"])
        self.batch_size = int(batch_size)
        if self._backend.max_batch is not None:
            self.batch_size = min(self.batch_size, int(self._backend.max_batch))
        self.dim = int(m["dim"])
        self.image_size = int(m["image_size"])
        self.in_channels = int(m["in_channels"])
        self.input_shape = (self.in_channels, self.image_size, self.image_size)
        graph_dims = list(getattr(self._backend, "input_shape", []))[1:]
        if (
            len(graph_dims) == 3
            and all(isinstance(d, int) and d > 0 for d in graph_dims)
            and tuple(graph_dims) != self.input_shape
        ):
            raise ModelLoadError(
                f"{self.path}: graph input {graph_dims} disagrees with the metadata {list(self.input_shape)}"
            )
        try:
            self._preprocess = Preprocessor(self.image_size, self.in_channels, m["mean"], m["std"])
        except ValueError as err:
            raise ModelLoadError(f"{self.path}: inconsistent input metadata: {err}") from err
        self._ood: dict[str, Any] | None | bool = False  # False = not read yet
        # The optional second output (export --features, the default): backbone features for OOD scoring.
        self.features_name: str | None = None
        self.feature_dim: int | None = None
        fname = m.get("features_name")
        if isinstance(fname, str) and fname in getattr(self._backend, "outputs", ()) and m.get("feature_dim"):
            self.features_name, self.feature_dim = fname, int(m["feature_dim"])

    def __repr__(self) -> str:
        return (
            f"EmbeddingRuntime({str(self.path)!r}, dim={self.dim}, input={self.input_shape}, "
            f"precision={self.metadata.get('precision')!r}, providers={self.providers})"
        )

    @property
    def providers(self) -> list[str]:
        return list(self._backend.providers)

    @property
    def ood_calibration(self) -> dict[str, Any] | None:
        """Embedded `ood_calibration` metadata, else `<model>.ood.json`, else None (read once, then cached)."""
        from export import metadata as meta_io

        if self._ood is False:
            self._ood = meta_io.read_ood_calibration(self.path, self.metadata)
        return self._ood  # type: ignore[return-value]

    def preprocess(self, images: Sequence[ImageInput], *, offset: int = 0) -> np.ndarray:
        """Raw images -> (N, C, H, W) float32, identical to models.preprocess.eval_transform."""
        return self._preprocess(images, offset=offset)

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected input of shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(batch.shape)}"
            )
        return np.ascontiguousarray(batch, dtype=np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed (N, C, H, W) input -> (N, dim) float32 embeddings, in chunks of `batch_size`."""
        batch = self._checked(batch)
        out = np.empty((batch.shape[0], self.dim), dtype=np.float32)
        for start in range(0, batch.shape[0], self.batch_size):
            chunk = batch[start : start + self.batch_size]
            out[start : start + len(chunk)] = self._backend(chunk)
        return out

    def run_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like `run`, also returning the encoder features (N, feature_dim); needs a model exported with them."""
        if self.features_name is None:
            raise ValueError(f"{self.path} has no encoder-feature output; re-export it without --no-features")
        batch = self._checked(batch)
        out = np.empty((batch.shape[0], self.dim), dtype=np.float32)
        feats = np.empty((batch.shape[0], int(self.feature_dim or 0)), dtype=np.float32)
        names = [self._backend.output_name, self.features_name]
        for start in range(0, batch.shape[0], self.batch_size):
            chunk = batch[start : start + self.batch_size]
            emb, feat = self._backend.run_outputs(names, chunk)
            out[start : start + len(chunk)] = emb
            feats[start : start + len(chunk)] = feat
        return out, feats

    def embed_with_features(
        self, images: Sequence[ImageInput], *, batch_size: int | None = None
    ) -> tuple[sparse.csr_matrix, np.ndarray]:
        """Raw images -> (CSR embeddings, dense float32 features)."""
        step = int(batch_size or self.batch_size)
        embs, feats = [], []
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            emb, feat = self.run_with_features(self.preprocess(chunk, offset=start))
            embs.append(sparse.csr_matrix(emb, dtype=np.float32))
            feats.append(feat)
        if not embs:
            return sparse.csr_matrix((0, self.dim), dtype=np.float32), np.zeros((0, self.feature_dim or 0), np.float32)
        return sparse.vstack(embs, format="csr"), np.concatenate(feats)

    def embed_dense(
        self, images: Sequence[ImageInput], *, batch_size: int | None = None, progress: bool = False
    ) -> np.ndarray:
        """Raw images -> (N, dim) float32; preprocessing is chunked too, so memory stays O(batch)."""
        step = int(batch_size or self.batch_size)
        if step < 1:
            raise ValueError(f"batch_size must be >= 1, got {step}")
        n = len(images)
        out = np.empty((n, self.dim), dtype=np.float32)
        from tqdm import tqdm

        with tqdm(total=n, desc="embed", unit="img", disable=not progress) as bar:
            for start in range(0, n, step):
                chunk = images[start : start + step]
                out[start : start + len(chunk)] = self.run(self.preprocess(chunk, offset=start))
                bar.update(len(chunk))
        return out

    def embed(
        self, images: Sequence[ImageInput], *, batch_size: int | None = None, progress: bool = False
    ) -> sparse.csr_matrix:
        """Raw images -> CSR (N x dim, float32) holding only the non-zero activations."""
        dense = self.embed_dense(images, batch_size=batch_size, progress=progress)
        return sparse.csr_matrix(dense, dtype=np.float32)
