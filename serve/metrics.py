"""Prometheus metrics, one registry per app so several apps (tests, workers) never collide in the global one."""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.batching import BatchObserver

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# l0 as the fraction of active dimensions: the quantity the training target prescribes (docs/METHOD.md, section 1).
L0_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


class ServeMetrics(BatchObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        counter = functools.partial(Counter, registry=self.registry)
        gauge = functools.partial(Gauge, registry=self.registry)
        histogram = functools.partial(Histogram, registry=self.registry)
        labels = ["route", "method", "status"]
        self.requests = counter("lpjepa_http_requests", "HTTP requests by route template, method and status", labels)
        self.latency = histogram(
            "lpjepa_http_request_duration_seconds",
            "HTTP request latency by route and status",
            labels,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = histogram("lpjepa_model_batch_size", "Images per model call", buckets=BATCH_BUCKETS)
        self.batch_seconds = histogram(
            "lpjepa_model_batch_duration_seconds", "Seconds per model call", buckets=LATENCY_BUCKETS
        )
        self.queue = gauge("lpjepa_model_queue_images", "Images queued or running in the model")
        self.index_size = gauge("lpjepa_index_items", "Items in the index")
        self.l0 = histogram(
            "lpjepa_embedding_l0_fraction", "Fraction of active dimensions per embedded image", buckets=L0_BUCKETS
        )
        self.images = counter("lpjepa_images_embedded", "Images embedded")
        self.ood = counter("lpjepa_ood_flagged", "Images flagged out-of-distribution")
        self.wal_records = counter("lpjepa_wal_records", "Write-ahead-log records written")
        self.compactions = counter("lpjepa_index_snapshots", "Index snapshots (WAL compactions)")
        self.drift_pvalue = gauge("lpjepa_drift_pvalue", "Drift monitor p-value of the current window (NaN until full)")
        self.drift_alarm = gauge("lpjepa_drift_alarm", "1 while the drift monitor is alarmed")
        self.drift_window_l0 = gauge(
            "lpjepa_drift_window_l0", "Mean fraction of active dimensions over the drift window"
        )

        # Collector pauses stop the event loop and every request in flight: the full (generation 2) ones walk every
        # tracked object, which is why the app freezes what start-up loaded (serve/app.py).
        self.gc_pause = histogram(
            "lpjepa_gc_pause_seconds",
            "Cyclic garbage collector pauses by generation",
            ["generation"],
            buckets=GC_BUCKETS,
        )
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - self._gc_started)

    def watch_gc(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def attach_drift(self, monitor) -> None:
        """Gauges read the monitor at scrape time, so requests never pay for the p-value."""

        def nan_if_none(read: Callable[[], float | None]) -> Callable[[], float]:
            return lambda: float("nan") if (value := read()) is None else value

        self.drift_pvalue.set_function(nan_if_none(lambda: monitor.pvalues()[0]))
        self.drift_alarm.set_function(lambda: 1.0 if monitor.alarm else 0.0)
        self.drift_window_l0.set_function(nan_if_none(monitor.window_l0))

    # BatchObserver hooks
    def batch_run(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def queue_depth(self, images: int) -> None:
        self.queue.set(images)

    def observe_l0(self, fractions) -> None:
        for f in fractions:
            self.l0.observe(float(f))
        self.images.inc(len(fractions))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streaming and background tasks are untouched.

    The route label is the matched route template (/v1/items/{item_id}), never the raw path, so a client probing
    random ids cannot blow up the label cardinality; unmatched paths count as "unmatched".
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = (template, scope.get("method", ""), str(status["code"]))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
