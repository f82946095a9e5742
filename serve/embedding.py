"""The model side of a request: loading the runtime, scorer and store, decoding images off the event loop,
dynamic-batched inference, and turning dense rows into the API's sparse embeddings with OOD scores."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import numpy as np

from index.thumbnails import thumbnail_png
from serve.images import ImageRejected, load_images, open_images
from serve.metrics import ServeMetrics
from serve.schemas import EmbeddingOut
from serve.settings import ServeSettings
from serve.store import ItemStore

if TYPE_CHECKING:
    from serve.dependencies import ServeState


def load_runtime(settings: ServeSettings) -> Any:
    from export.runtime import EmbeddingRuntime

    return EmbeddingRuntime(
        str(settings.model_path),
        batch_size=settings.max_batch,
        num_threads=settings.model_threads,
        spin=settings.model_spin,
    )


def load_scorer(runtime: Any) -> Any:
    """The OOD score suite from the calibration stored with the model (it flags with its served score), or None
    when the model was never calibrated."""
    cal = getattr(runtime, "ood_calibration", None)
    if cal is None:
        return None
    from ood.suite import ScoreSuite

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
    from ood.drift import DriftMonitor

    return DriftMonitor.from_calibration(scorer.calibration, false_alarm_rate=settings.drift_false_alarm_rate)


def model_runner(state: ServeState) -> Any:
    """What the batcher calls, once per model batch: the model (and its feature output when the served OOD score
    needs it), non-finite values zeroed, the l0 metrics and the OOD scores of the whole batch. Scoring a batch
    at once costs about what scoring one image does, so per-request work stays on the event loop only for
    HTTP and JSON. Returns row-aligned (dense (N, dim) float32, features or None, OOD records or None)."""
    runtime, metrics = state.runtime, state.metrics
    joint = state.scorer is not None and state.scorer.needs_features()

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]] | None]:
        if joint:
            out, features = runtime.run_with_features(batch)
        else:
            out, features = runtime.run(batch), None
        dense = np.asarray(out, dtype=np.float32)
        bad = ~np.isfinite(dense)
        if bad.any():
            dense = np.where(bad, np.float32(0.0), dense)
        metrics.observe_l0(np.count_nonzero(dense, axis=1) / max(dense.shape[1], 1))
        records = None if state.scorer is None else state.scorer.score(dense, features).to_records()
        return dense, features, records

    return run


class EmbedOutput(NamedTuple):
    dense: np.ndarray  # (N, dim) float32
    thumbnails: list[bytes | None]
    features: np.ndarray | None  # (N, feature_dim) when the served OOD score needs them
    ood: list[dict[str, Any]] | None = None  # per-image OOD records (scored with the batch), None uncalibrated


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


def _preprocess(state: ServeState, probed: list[Any], blobs: list[tuple[str, bytes]]) -> np.ndarray:
    return state.runtime.preprocess(load_images(probed, blobs))  # ImageDecodeError: 422 (serve/errors.py)


def _decode_and_preprocess(
    state: ServeState, blobs: list[tuple[str, bytes]], thumbs: bool, probed: list[Any], pixels: int
) -> tuple[np.ndarray, list[bytes | None]]:
    """Runs in a worker thread: PIL decode and resizing are CPU work that must not stall the event loop."""
    settings = state.settings
    with state.pixel_gate.hold(pixels, timeout=settings.request_timeout_s):
        if thumbs:
            images = load_images(probed, blobs)
            thumbnails = [thumbnail_png(img, settings.thumbnail_px) for img in images]
            del images
        else:
            thumbnails = [None] * len(blobs)
        batch = _preprocess(state, probed, blobs)  # PIL caches the decoded pixels: loading twice decodes once
        del probed  # the decoded pixels go before the gate opens for the next request
    return batch, thumbnails


async def embed_blobs(
    state: ServeState, blobs: list[tuple[str, bytes]], *, thumbs: bool = False, observe: bool = True
) -> EmbedOutput:
    """Decode, preprocess and embed (batcher) images. `observe` feeds them to the drift monitor (embed, search and
    ood requests do; item writes do not).

    Small images (their headers, read here, say at most `batch_decode_pixels` together) are decoded by the
    model thread as part of the batch: for a 28 px PNG a thread hand-off costs more than the decode. Larger
    ones, and requests that need thumbnails, decode in the thread pool under the decode gate.
    """
    if not blobs:
        raise ImageRejected("no images in the request", "missing_images")
    settings = state.settings
    if len(blobs) > settings.max_images_per_request:
        raise ImageRejected(f"at most {settings.max_images_per_request} images per request", "too_many_images")
    assert state.batcher is not None
    with state.batcher.expecting() as ticket:
        probed, pixels = open_images(blobs, settings)  # headers only: format and size checks, no pixel decoded
        if not thumbs and pixels <= settings.batch_decode_pixels:
            thumbnails: list[bytes | None] = [None] * len(blobs)
            work = functools.partial(_preprocess, state, probed, blobs)
            out = await state.batcher.submit(work, ticket, size=len(blobs))
        else:
            decode = functools.partial(_decode_and_preprocess, state, blobs, thumbs, probed, pixels)
            batch, thumbnails = await anyio.to_thread.run_sync(decode)
            out = await state.batcher.submit(batch, ticket)
    dense, features, records = out
    if observe:
        if records is not None:
            state.metrics.ood.inc(sum(1 for r in records if r["is_ood"]))
        if state.drift is not None:
            state.drift.observe_dense(dense)
    return EmbedOutput(dense, thumbnails, features, records)


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


def embedding_rows(
    state: ServeState, dense: np.ndarray, want_dense: bool, records: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The EmbeddingOut fields of each row as numpy arrays, for NumpyJSONResponse (serve/responses.py): the
    indices come ascending from flatnonzero, the values are the model's float32s, nothing is copied into Python
    lists. Same fields and values as `dense_to_outputs`."""
    dim = state.dim
    out = []
    for i, row in enumerate(dense):
        idx = np.flatnonzero(row)
        ood = None if records is None else records[i]
        out.append(
            {
                "indices": idx,
                "values": row[idx],
                "dim": dim,
                "nnz": int(idx.size),
                "l0": idx.size / dim,
                "dense": row if want_dense else None,
                "ood_score": None if ood is None else ood["score"],
                "is_ood": None if ood is None else ood["is_ood"],
                "ood_score_name": None if ood is None else ood["score_name"],
                "ood_threshold": None if ood is None else ood["threshold"],
            }
        )
    return out


def dense_to_outputs(
    state: ServeState, dense: np.ndarray, want_dense: bool, records: list[dict[str, Any]] | None
) -> list[EmbeddingOut]:
    """`records`: the OOD records embed_blobs scored with the batch (None for an uncalibrated model)."""
    out = []
    for i, row in enumerate(dense):
        idx = np.flatnonzero(row)
        out.append(
            embedding_out(idx, row[idx], state.dim, dense=want_dense, ood=None if records is None else records[i])
        )
    return out
