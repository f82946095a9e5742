"""ASGI guards that run before any handler: body size and concurrent requests.

Both are plain ASGI middleware so they see every request, including ones no route matches, and so the size
check counts streamed (chunked) bodies as they arrive rather than after they were buffered.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import ApiError, error_response


class BodyLimitMiddleware:
    """413 as soon as Content-Length or the bytes received so far exceed `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await error_response(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
                    return
                if declared > self.max_bytes:
                    message = f"request body of {declared} bytes exceeds the limit of {self.max_bytes} bytes"
                    await error_response(413, "payload_too_large", message)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(
                        413, "payload_too_large", f"request body exceeds the limit of {self.max_bytes} bytes"
                    )
            return message

        await self.app(scope, limited_receive, send)


class ConcurrencyLimitMiddleware:
    """Answer 503 + Retry-After when more than `max_inflight` API requests are in progress.

    Every queue behind the API (decode threads, the model queue, the index lock) is bounded by this one number,
    so a flood of clients gets fast refusals instead of ever-growing latency and memory.
    """

    def __init__(self, app: ASGIApp, max_inflight: int, prefix: str = "/v1/") -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.prefix = prefix
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            response = error_response(
                503,
                "overloaded",
                f"server busy ({self.inflight} requests in progress); retry later",
                {"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
