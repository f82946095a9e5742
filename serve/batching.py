"""Dynamic batching: concurrent requests share one model call.

A model call costs much more per call than per image, so a single worker gathers whatever requests are waiting
(up to `max_batch` images), runs them as one batch in a thread, and hands each caller its rows. It waits for
company (at most `max_wait_ms` after the first request arrived) only while other requests are known to be on
their way, i.e. still being decoded: a lone request is never delayed, and under load the requests that arrive
while the model is busy form the next batch by themselves. The queue is bounded in images: past `max_queue`
new work is refused with 503 + Retry-After right away instead of piling up until every caller times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serve.errors import ApiError

log = logging.getLogger("lpjepa.serve")

RunFn = Callable[[np.ndarray], np.ndarray]


def overloaded(message: str) -> ApiError:
    return ApiError(503, "overloaded", message, {"Retry-After": "1"})


@dataclass
class _Job:
    batch: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return int(self.batch.shape[0])


class Ticket:
    """One announced request; releasing it (on submit, or when decoding failed) un-announces it exactly once."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher: DynamicBatcher | None = batcher
        batcher._incoming += 1

    def release(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher._incoming -= 1
            if batcher._wakeup is not None:
                batcher._wakeup.set()  # a worker waiting for this request re-checks at once


class BatchObserver:
    """Hooks for metrics; the default does nothing so the batcher has no hard dependency on Prometheus."""

    def batch_run(self, size: int, seconds: float) -> None:  # noqa: B027 - optional hook
        pass

    def queue_depth(self, images: int) -> None:  # noqa: B027 - optional hook
        pass


class DynamicBatcher:
    """Gather concurrent `submit` calls into model batches; with `enabled=False` each call runs alone.

    The unbatched mode is the benchmark baseline: same thread pool, same overload bound, one model call per
    request. Model calls always run in a single worker thread, because onnxruntime already uses every core for
    one call and two overlapping calls only contend.
    """

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        timeout_s: float = 30.0,
        enabled: bool = True,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.enabled = enabled
        self._observer = observer or BatchObserver()
        self._pending: deque[_Job] = deque()
        self._pending_images = 0
        self._inflight_images = 0  # images handed to the model but not yet returned (unbatched mode too)
        self._incoming = 0  # requests announced with `expecting()` that have not reached the queue yet
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lpjepa-model")
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        if self.enabled:
            self._worker = asyncio.create_task(self._loop(), name="lpjepa-batcher")

    async def stop(self) -> None:
        """Refuse new work, fail what is queued with 503, and wait for the running batch to finish."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ApiError(503, "shutting_down", "the server is shutting down"))
        self._pending_images = 0
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        if self._closed:
            return False
        return not self.enabled or (self._worker is not None and not self._worker.done())

    @property
    def queued_images(self) -> int:
        return self._pending_images + self._inflight_images

    # ------------------------------------------------------------------ submission
    @contextlib.contextmanager
    def expecting(self) -> Iterator[Ticket]:
        """Announce a request that will `submit` soon (it is being decoded), so a forming batch waits for it."""
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            ticket.release()

    async def submit(self, batch: np.ndarray, ticket: Ticket | None = None) -> np.ndarray:
        """Embed a (N, C, H, W) batch; returns (N, dim). Raises ApiError 503 when overloaded or stopping."""
        if ticket is not None:
            ticket.release()
        if self._closed:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        n = int(batch.shape[0])
        if n == 0:
            raise ValueError("empty batch")
        if self.queued_images + n > self.max_queue:
            raise overloaded(
                f"model queue is full ({self.queued_images} images waiting, limit {self.max_queue}); retry later"
            )
        if not self.enabled:
            return await self._run_alone(batch)
        loop = asyncio.get_running_loop()
        job = _Job(batch, loop.create_future())
        self._pending.append(job)
        self._pending_images += n
        self._observer.queue_depth(self.queued_images)
        assert self._wakeup is not None, "DynamicBatcher.start() was not awaited"
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except asyncio.TimeoutError as err:
            job.future.cancel()  # still queued: the worker drops it instead of computing for nobody
            raise overloaded(f"the model did not answer within {self.timeout_s:g} s; retry later") from err
        except asyncio.CancelledError:  # the client went away
            job.future.cancel()
            raise

    async def _run_alone(self, batch: np.ndarray) -> np.ndarray:
        n = int(batch.shape[0])
        self._inflight_images += n
        self._observer.queue_depth(self.queued_images)
        loop = asyncio.get_running_loop()
        try:
            fut = loop.run_in_executor(self._executor, self._timed_run, batch)
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except asyncio.TimeoutError as err:
            raise overloaded(f"the model did not answer within {self.timeout_s:g} s; retry later") from err
        finally:
            self._inflight_images -= n
            self._observer.queue_depth(self.queued_images)

    def _timed_run(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self._run(batch)
        self._observer.batch_run(int(batch.shape[0]), time.perf_counter() - start)
        return out

    # ------------------------------------------------------------------ worker
    def _take_batch(self) -> list[_Job]:
        """Pop whole jobs up to max_batch images (a job larger than max_batch runs alone, split by the runner)."""
        jobs: list[_Job] = []
        total = 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # caller gave up (timeout / disconnect): drop it without running
                self._pending.popleft()
                self._pending_images -= job.size
                continue
            if jobs and total + job.size > self.max_batch:
                break
            self._pending.popleft()
            self._pending_images -= job.size
            jobs.append(job)
            total += job.size
        return jobs

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for announced requests until the batch is full or the oldest request waited max_wait.
            deadline = self._pending[0].enqueued + self.max_wait
            while self._pending_images < self.max_batch and self._incoming > 0:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            jobs = self._take_batch()
            if not jobs:
                continue
            n = sum(job.size for job in jobs)
            self._inflight_images += n
            try:
                stacked = jobs[0].batch if len(jobs) == 1 else np.concatenate([j.batch for j in jobs], axis=0)
                out = await loop.run_in_executor(self._executor, self._run_chunked, stacked)
            except asyncio.CancelledError:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(ApiError(503, "shutting_down", "the server is shutting down"))
                raise
            except Exception as err:  # the model failed: every caller of this batch gets the error
                log.exception("model batch of %d images failed", n)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(ApiError(500, "model_error", f"model inference failed: {err}"))
            else:
                offset = 0
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(out[offset : offset + job.size])
                    offset += job.size
            finally:
                self._inflight_images -= n
                self._observer.queue_depth(self.queued_images)

    def _run_chunked(self, stacked: np.ndarray) -> np.ndarray:
        if stacked.shape[0] <= self.max_batch:
            return self._timed_run(stacked)
        parts = [self._timed_run(stacked[i : i + self.max_batch]) for i in range(0, stacked.shape[0], self.max_batch)]
        return np.concatenate(parts, axis=0)
