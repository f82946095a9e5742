"""Dynamic batching: concurrent requests share one model call.

A model call costs much more per call than per image, so a single worker gathers whatever requests are waiting
(up to `max_batch` images), runs them as one batch in a thread, and hands each caller its rows. It waits for
company (at most `max_wait_ms` after the first request arrived) only while other requests are known to be on
their way, i.e. still being decoded: a lone request is never delayed, and under load the requests that arrive
while the model is busy form the next batch by themselves. The queue is bounded in images: past `max_queue`
new work is refused right away (OverloadedError; the API answers 503 + Retry-After) instead of piling up until every
caller times out.

A request may submit a callable (its decoding) that the model thread runs just before the model call, so a batch
of small images costs one thread hand-off, not one per request; the model's tuple output does per-batch work once.
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
from typing import Any

import numpy as np

from core.errors import LpjepaError, UnavailableError

log = logging.getLogger("lpjepa.serve")

RunFn = Callable[[np.ndarray], Any]  # (N, C, H, W) -> (N, ...) array, or a tuple of row-aligned parts (None allowed)
Work = np.ndarray | Callable[[], np.ndarray]  # a request's batch, or what prepares it in the model thread


def _rows(out: Any, start: int, stop: int) -> Any:
    """Rows start:stop of a model output (an array or a tuple of row-aligned sequences / None)."""
    if isinstance(out, tuple):
        return tuple(None if part is None else part[start:stop] for part in out)
    return out[start:stop]


def _concat(parts: list[Any]) -> Any:
    """The model outputs of consecutive chunks joined into one (the inverse of `_rows`)."""
    if isinstance(parts[0], tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(parts[0])))
    if parts[0] is None:
        return None
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0)
    return [row for part in parts for row in part]


class OverloadedError(UnavailableError):
    """The model queue is full, or the model did not answer within the request timeout: retry later."""


class ShuttingDownError(UnavailableError):
    """The batcher was stopped: the server is shutting down."""


class ModelFailedError(LpjepaError):
    """The model call failed; every request of that batch gets this error."""


SHUTTING_DOWN = "the server is shutting down"


@dataclass
class _Job:
    work: Work
    size: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    def materialize(self) -> np.ndarray:
        """The job's input batch; runs its preparation (decoding) when it was submitted as a callable."""
        batch = self.work() if callable(self.work) else self.work
        if batch.shape[0] != self.size:
            raise ValueError(f"a job announced {self.size} images but prepared {batch.shape[0]}")
        return batch


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

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        if self.enabled:
            self._worker = asyncio.create_task(self._loop(), name="lpjepa-batcher")

    async def stop(self) -> None:
        """Refuse new work, fail what is queued with ShuttingDownError, and wait for the running batch to finish."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDownError(SHUTTING_DOWN))
        self._pending_images = 0
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return not self._closed and (not self.enabled or (self._worker is not None and not self._worker.done()))

    @property
    def queued_images(self) -> int:
        return self._pending_images + self._inflight_images

    @contextlib.contextmanager
    def expecting(self) -> Iterator[Ticket]:
        """Announce a request that will `submit` soon (it is being decoded), so a forming batch waits for it."""
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            ticket.release()

    async def submit(self, batch: Work, ticket: Ticket | None = None, *, size: int | None = None) -> Any:
        """Embed a (N, C, H, W) batch; returns the model's rows for it ((N, dim), or a tuple of row-aligned parts).

        `batch` may be a callable that returns the batch; it then runs in the model thread just before the model
        call (its exception, e.g. a corrupt image's ImageRejected, fails this request only) and `size` must say
        how many images it will produce. Raises OverloadedError or ShuttingDownError.
        """
        if ticket is not None:
            ticket.release()
        if self._closed:
            raise ShuttingDownError(SHUTTING_DOWN)
        if callable(batch):
            if size is None:
                raise ValueError("submit(callable) needs size=")
            n = int(size)
        else:
            n = int(batch.shape[0])
        if n == 0:
            raise ValueError("empty batch")
        if self.queued_images + n > self.max_queue:
            raise OverloadedError(
                f"model queue is full ({self.queued_images} images waiting, limit {self.max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        job = _Job(batch, n, loop.create_future())
        if not self.enabled:
            return await self._run_alone(job)
        self._pending.append(job)
        self._pending_images += n
        self._observer.queue_depth(self.queued_images)
        assert self._wakeup is not None, "DynamicBatcher.start() was not awaited"
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except asyncio.TimeoutError as err:
            job.future.cancel()  # still queued: the worker drops it instead of computing for nobody
            raise OverloadedError(f"the model did not answer within {self.timeout_s:g} s; retry later") from err
        except asyncio.CancelledError:  # the client went away
            job.future.cancel()
            raise

    async def _run_alone(self, job: _Job) -> Any:
        n = job.size
        self._inflight_images += n
        self._observer.queue_depth(self.queued_images)
        loop = asyncio.get_running_loop()
        try:
            fut = loop.run_in_executor(self._executor, lambda: self._run_chunked(job.materialize()))
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except asyncio.TimeoutError as err:
            raise OverloadedError(f"the model did not answer within {self.timeout_s:g} s; retry later") from err
        finally:
            self._inflight_images -= n
            self._observer.queue_depth(self.queued_images)

    def _timed_run(self, batch: np.ndarray) -> Any:
        start = time.perf_counter()
        out = self._run(batch)
        self._observer.batch_run(int(batch.shape[0]), time.perf_counter() - start)
        return out

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
                out, failed = await loop.run_in_executor(self._executor, self._run_jobs, jobs)
            except asyncio.CancelledError:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(ShuttingDownError(SHUTTING_DOWN))
                raise
            except Exception as err:  # the model failed: every caller of this batch gets the error
                log.exception("model batch of %d images failed", n)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(ModelFailedError(f"model inference failed: {err}"))
            else:
                offset = 0
                for i, job in enumerate(jobs):
                    if i in failed:  # this request's own preparation failed (e.g. a corrupt image)
                        if not job.future.done():
                            job.future.set_exception(failed[i])
                        continue
                    if not job.future.done():
                        job.future.set_result(_rows(out, offset, offset + job.size))
                    offset += job.size
            finally:
                self._inflight_images -= n
                self._observer.queue_depth(self.queued_images)

    def _run_jobs(self, jobs: list[_Job]) -> tuple[Any, dict[int, BaseException]]:
        """Model thread: prepare every job (a failure fails that job alone), then one model call for the rest."""
        batches: list[np.ndarray] = []
        failed: dict[int, BaseException] = {}
        for i, job in enumerate(jobs):
            try:
                batches.append(job.materialize())
            except Exception as err:  # noqa: BLE001 - handed to that job's caller, who maps it to a response
                failed[i] = err
        if not batches:
            return None, failed
        stacked = batches[0] if len(batches) == 1 else np.concatenate(batches, axis=0)
        return self._run_chunked(stacked), failed

    def _run_chunked(self, stacked: np.ndarray) -> Any:
        if stacked.shape[0] <= self.max_batch:
            return self._timed_run(stacked)
        return _concat(
            [self._timed_run(stacked[i : i + self.max_batch]) for i in range(0, stacked.shape[0], self.max_batch)]
        )
