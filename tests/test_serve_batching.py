"""The batcher's model-thread preparation and batch-level scoring: under concurrency every caller gets its own rows,
a request whose image fails to decode fails alone, and results do not depend on how requests were grouped.

The first tests drive DynamicBatcher directly with a model function whose output identifies its input rows; the
last ones run the real app (in process, over ASGI) on a real exported, OOD-calibrated model.
"""

from __future__ import annotations

import asyncio
import io
import os

import httpx
import numpy as np
import pytest
from helpers import fashion_images, fashion_pngs, png_bytes
from PIL import Image
from pydantic import ValidationError

from export.runtime import EmbeddingRuntime
from ood.suite import ScoreSuite
from serve.app import create_app
from serve.batching import DynamicBatcher
from serve.errors import ApiError
from serve.settings import ServeSettings


def tagged(tag: float, n: int) -> np.ndarray:
    """n rows of shape (1, 2, 2) whose values say which request (tag) and which row (0..n-1) they are."""
    return (tag * 100 + np.arange(n, dtype=np.float32)).reshape(n, 1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)


def model(batch: np.ndarray) -> tuple[np.ndarray, None, list[float]]:
    """Row-aligned tuple output like the server's runner: (values, None, one Python object per row)."""
    calls.append(batch.shape[0])
    first = batch[:, 0, 0, 0]
    return first * 2, None, [float(v) for v in first]


calls: list[int] = []


async def _gather(batcher: DynamicBatcher, works: list, sizes: list[int]) -> list:
    await batcher.start()
    try:
        return await asyncio.gather(
            *(batcher.submit(w, size=n) for w, n in zip(works, sizes, strict=True)), return_exceptions=True
        )
    finally:
        await batcher.stop()


@pytest.mark.parametrize("enabled", [True, False])
def test_prepared_jobs_get_their_own_rows_and_a_failing_one_fails_alone(enabled):
    calls.clear()
    sizes = [1, 3, 2, 1, 4, 2]

    def prepare(tag: int, n: int):
        def work() -> np.ndarray:
            if tag == 3:
                raise ApiError(422, "corrupt_image", "request 3's image is corrupt")
            return tagged(tag, n)

        return work

    works = [prepare(i, n) if i % 2 else tagged(i, n) for i, n in enumerate(sizes)]  # callables and arrays mixed
    batcher = DynamicBatcher(model, max_batch=64, max_wait_ms=50.0, enabled=enabled)
    results = asyncio.run(_gather(batcher, works, sizes))
    for i, (n, result) in enumerate(zip(sizes, results, strict=True)):
        if i == 3:
            assert isinstance(result, ApiError) and result.status == 422
            continue
        values, features, objects = result
        expected = i * 100 + np.arange(n, dtype=np.float32)
        np.testing.assert_array_equal(values, expected * 2)
        assert features is None and objects == [float(v) for v in expected]
    assert sum(calls) == sum(sizes) - sizes[3]  # the failed request's rows never reached the model
    if not enabled:
        assert len(calls) == len(sizes) - 1


def test_batches_over_max_batch_are_chunked_and_tuple_parts_rejoined():
    calls.clear()
    sizes = [5, 7, 6]
    batcher = DynamicBatcher(model, max_batch=4, max_wait_ms=50.0)
    results = asyncio.run(_gather(batcher, [tagged(i, n) for i, n in enumerate(sizes)], sizes))
    assert max(calls) <= 4 and sum(calls) == sum(sizes)
    for i, (n, (values, _, objects)) in enumerate(zip(sizes, results, strict=True)):
        expected = i * 100 + np.arange(n, dtype=np.float32)
        np.testing.assert_array_equal(values, expected * 2)
        assert objects == [float(v) for v in expected]


def test_a_prepared_job_producing_the_wrong_number_of_rows_is_an_error_for_it_alone():
    sizes = [2, 2]
    batcher = DynamicBatcher(model, max_batch=64, max_wait_ms=50.0)
    results = asyncio.run(_gather(batcher, [lambda: tagged(0, 3), tagged(1, 2)], sizes))
    assert isinstance(results[0], ValueError) and "announced 2 images but prepared 3" in str(results[0])
    np.testing.assert_array_equal(results[1][0], (100 + np.arange(2, dtype=np.float32)) * 2)


def test_submit_of_a_callable_needs_its_size():
    async def scenario():
        batcher = DynamicBatcher(model)
        await batcher.start()
        try:
            await batcher.submit(lambda: tagged(0, 1))
        finally:
            await batcher.stop()

    with pytest.raises(ValueError, match="size="):
        asyncio.run(scenario())


def test_settings_refuse_a_negative_decode_threshold(tmp_path):
    with pytest.raises(ValidationError, match="batch_decode_pixels"):
        ServeSettings(model_path=tmp_path / "m.onnx", batch_decode_pixels=-1)
    assert ServeSettings(model_path=tmp_path / "m.onnx").model_spin is False


# ------------------------------------------------------------------------------------------ the real app
@pytest.fixture(scope="module")
def calibrated(calibrated_model):
    return calibrated_model[0]


async def _post_all(app, bodies: list[bytes]) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/embed", files=[("files", ("x.png", b, "image/png"))]) for b in bodies)
            )


@pytest.mark.parametrize("batch_decode_pixels", [65_536, 0])  # decoded in the model thread / in the decode pool
def test_concurrent_embeds_match_one_image_at_a_time_with_ood_scored_per_batch(calibrated, batch_decode_pixels):
    images = fashion_images(10, offset=700)
    bodies = [png_bytes(img) for img in images]
    corrupt = 4
    bodies[corrupt] = bodies[corrupt][: len(bodies[corrupt]) // 2]  # a truncated PNG amid good ones
    settings = ServeSettings(
        model_path=calibrated, max_wait_ms=200.0, batch_decode_pixels=batch_decode_pixels, max_image_pixels=10**6
    )
    responses = asyncio.run(_post_all(create_app(settings), bodies))

    runtime = EmbeddingRuntime(str(calibrated))
    suite = ScoreSuite.from_calibration(runtime.ood_calibration)
    for i, (img, response) in enumerate(zip(images, responses, strict=True)):
        if i == corrupt:
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "corrupt_image"
            continue
        assert response.status_code == 200, response.text
        got = response.json()["embeddings"][0]
        x = runtime.preprocess([img])  # this image alone, outside the server
        feats = runtime.run_with_features(x)[1] if suite.needs_features() else None
        alone = runtime.run(x)[0]
        idx = np.flatnonzero(alone)
        assert got["indices"] == idx.tolist()
        np.testing.assert_allclose(got["values"], alone[idx], rtol=1e-4, atol=1e-5)
        record = suite.score(alone[None, :], feats).to_records()[0]
        assert got["ood_score_name"] == record["score_name"] and got["is_ood"] == record["is_ood"]
        np.testing.assert_allclose(got["ood_score"], record["score"], rtol=1e-3, atol=1e-4)


def test_a_large_image_still_decodes_in_the_pool_and_embeds_the_same(calibrated):
    """An image over batch_decode_pixels takes the decode-pool path; a 28 px image the model-thread path."""
    small = fashion_pngs(1, offset=900)[0]
    big = png_bytes(fashion_images(1, offset=900)[0].resize((300, 300)))
    settings = ServeSettings(model_path=calibrated, batch_decode_pixels=28 * 28)
    small_r, big_r = asyncio.run(_post_all(create_app(settings), [small, big]))
    assert small_r.status_code == 200 and big_r.status_code == 200
    runtime = EmbeddingRuntime(str(calibrated))
    expected = runtime.run(runtime.preprocess([Image.open(io.BytesIO(big))]))[0]
    np.testing.assert_allclose(big_r.json()["embeddings"][0]["values"], expected[expected != 0], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS runs one thread on one core anyway")
def test_the_server_caps_blas_threads_for_its_lifetime(calibrated):
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    async def scenario():
        app = create_app(ServeSettings(model_path=calibrated, blas_threads=1))
        async with app.router.lifespan_context(app):
            return blas_threads()

    threadpool_limits(2, user_api="blas")  # what OpenBLAS picks by itself on this 2-core machine
    try:
        assert blas_threads() == {2}
        assert asyncio.run(scenario()) == {1}
    finally:
        threadpool_limits(1, user_api="blas")
