"""The model side of a request: loading the runtime, scorer and store, decoding images off the event loop,
dynamic-batched inference, and turning dense rows into the API's sparse embeddings with OOD scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
import numpy as np

from serve.batching import DynamicBatcher
from serve.errors import ApiError
from serve.images import PixelGate, load_images, open_images, thumbnail_png
from serve.metrics import ServeMetrics
from serve.schemas import EmbeddingOut
from serve.settings import ServeSettings
from serve.store import ItemStore


@dataclass
class ServeState:
    """Everything a request handler needs; one per app."""

    settings: ServeSettings
    metrics: ServeMetrics
    runtime: Any = None
    scorer: Any = None
    store: ItemStore | None = None
    batcher: DynamicBatcher | None = None
    draining: bool = False
    pixel_gate: PixelGate | None = None
    drift: Any = None  # serve.drift.DriftMonitor when the calibration has a drift section

    def __post_init__(self) -> None:
        if self.pixel_gate is None:
            self.pixel_gate = PixelGate(self.settings.decode_pixels_in_flight)

    @property
    def dim(self) -> int:
        return int(self.runtime.dim)


def load_runtime(settings: ServeSettings) -> Any:
    from export.runtime import EmbeddingRuntime

    return EmbeddingRuntime(str(settings.model_path), batch_size=settings.max_batch, num_threads=settings.model_threads)


def load_scorer(runtime: Any) -> Any:
    """The OOD score suite from the calibration stored with the model (it flags with its served score), or None
    when the model was never calibrated."""
    cal = getattr(runtime, "ood_calibration", None)
    if cal is None:
        return None
    from serve.ood.suite import ScoreSuite

    scorer = ScoreSuite.from_calibration(cal)
    if scorer.dim != int(runtime.dim):
        raise ValueError(f"the OOD calibration has {scorer.dim} dimensions but the model has {runtime.dim}")
    if scorer.needs_features() and not getattr(runtime, "feature_dim", None):
        raise ValueError(
            f"the calibration serves {scorer.served}, which needs the encoder features, but the model has no "
            "feature output (re-export without --no-features, or recalibrate)"
        )
    return scorer


def load_drift(scorer: Any, settings: ServeSettings) -> Any:
    """The drift monitor for the calibration's drift section, or None (no calibration, or one without it)."""
    if scorer is None:
        return None
    from serve.drift import DriftMonitor

    return DriftMonitor.from_calibration(scorer.calibration, false_alarm_rate=settings.drift_false_alarm_rate)


def model_runner(state: ServeState) -> Any:
    """What the batcher calls: embedding only, or embedding and features side by side (split in embed_blobs)
    when the served OOD score needs the features."""
    if state.scorer is not None and state.scorer.needs_features():
        return state.runtime.run_joint
    return state.runtime.run


class EmbedOutput(NamedTuple):
    dense: np.ndarray  # (N, dim) float32
    thumbnails: list[bytes | None]
    features: np.ndarray | None  # (N, feature_dim) when the served OOD score needs them


def open_store(settings: ServeSettings, dim: int, metrics: ServeMetrics | None = None) -> ItemStore | None:
    if settings.index_backend == "milvus":
        return ItemStore.open_backend(milvus_index(settings, dim), dim=dim, metrics=metrics)
    if settings.index_dir is None:
        return None
    return ItemStore.open(
        settings.index_dir,
        dim=dim,
        backend=settings.index_backend,
        metric=settings.index_metric,
        compact_every=settings.compact_every,
        metrics=metrics,
    )


def milvus_index(settings: ServeSettings, dim: int) -> Any:
    """The collection the settings name, created (empty) when missing; a model of another dimension is refused."""
    from index.factory import create_index

    return create_index(
        "milvus",
        dim,
        settings.index_metric,
        uri=settings.milvus_uri,
        collection=settings.milvus_collection,
        token=settings.milvus_token,
        index=settings.milvus_index,
        timeout_s=settings.milvus_timeout_s,
    )


def _decode_and_preprocess(state: ServeState, blobs: list[tuple[str, bytes]], thumbs: bool):
    """Runs in a worker thread: PIL decode and resizing are CPU work that must not stall the event loop."""
    from export.runtime import ImageDecodeError

    settings = state.settings
    probed, pixels = open_images(
        blobs,
        max_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
        formats=settings.image_formats,
    )
    with state.pixel_gate.hold(pixels, timeout=settings.request_timeout_s):
        images = load_images(probed, blobs)
        thumbnails = [thumbnail_png(img, settings.thumbnail_px) for img in images] if thumbs else [None] * len(images)
        try:
            batch = state.runtime.preprocess(images)
        except ImageDecodeError as err:
            raise ApiError(422, "invalid_image", str(err)) from err
        del images, probed  # the decoded pixels go before the gate opens for the next request
    return batch, thumbnails


async def embed_blobs(
    state: ServeState, blobs: list[tuple[str, bytes]], *, thumbs: bool = False, observe: bool = True
) -> EmbedOutput:
    """Decode, preprocess (thread) and embed (batcher) images; returns (dense (N, dim) float32, thumbnails,
    features or None). `observe` feeds the images to the drift monitor (embed, search and ood requests do)."""
    if not blobs:
        raise ApiError(422, "missing_images", "no images in the request")
    if len(blobs) > state.settings.max_images_per_request:
        raise ApiError(413, "too_many_images", f"at most {state.settings.max_images_per_request} images per request")
    assert state.batcher is not None
    with state.batcher.expecting() as ticket:
        batch, thumbnails = await anyio.to_thread.run_sync(_decode_and_preprocess, state, blobs, thumbs)
        out = np.asarray(await state.batcher.submit(batch, ticket), dtype=np.float32)
    features = None
    if out.shape[1] > state.dim:  # the joint runner: embedding then features
        out, features = out[:, : state.dim], np.ascontiguousarray(out[:, state.dim :])
    dense = np.where(np.isfinite(out), out, 0.0).astype(np.float32)
    state.metrics.observe_l0(np.count_nonzero(dense, axis=1) / max(dense.shape[1], 1))
    if observe and state.drift is not None:
        state.drift.observe_dense(dense)
    return EmbedOutput(dense, thumbnails, features)


def ood_records(
    state: ServeState, dense: np.ndarray, features: np.ndarray | None = None
) -> list[dict[str, Any]] | None:
    if state.scorer is None:
        return None
    records = state.scorer.score(dense, features).to_records()
    flagged = sum(1 for r in records if r["is_ood"])
    if flagged:
        state.metrics.ood.inc(flagged)
    return records


def embedding_out(
    row_indices: np.ndarray, row_values: np.ndarray, dim: int, *, dense: bool = False, ood: dict[str, Any] | None = None
) -> EmbeddingOut:
    order = np.argsort(row_indices, kind="stable")  # the contract says ascending; csr/cosine rows come reversed
    row_indices, row_values = row_indices[order], row_values[order]
    full = None
    if dense:
        vec = np.zeros(dim, dtype=np.float32)
        vec[row_indices] = row_values
        full = vec.tolist()
    return EmbeddingOut(
        indices=row_indices.tolist(),
        values=row_values.astype(np.float32).tolist(),
        dim=dim,
        nnz=int(row_indices.size),
        l0=row_indices.size / dim,
        dense=full,
        ood_score=None if ood is None else ood["score"],
        is_ood=None if ood is None else ood["is_ood"],
        ood_score_name=None if ood is None else ood["score_name"],
        ood_threshold=None if ood is None else ood["threshold"],
    )


def dense_to_outputs(
    state: ServeState, dense: np.ndarray, want_dense: bool, features: np.ndarray | None = None
) -> list[EmbeddingOut]:
    records = ood_records(state, dense, features)
    out = []
    for i, row in enumerate(dense):
        idx = np.flatnonzero(row)
        out.append(
            embedding_out(idx, row[idx], state.dim, dense=want_dense, ood=None if records is None else records[i])
        )
    return out
