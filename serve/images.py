"""Untrusted image bytes -> PIL images, with the checks a public endpoint needs before any pixel is decoded.

PIL parses the header lazily, so size and format are known before the (expensive, attackable) decode: a
decompression bomb is refused from its header, and formats outside the allow-list never reach their plug-in.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import threading
import warnings
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError

from core.errors import RejectedInput, UnavailableError
from serve.settings import ServeSettings


class ImageRejected(RejectedInput):
    """Images the server will not decode; `code` names the reason (invalid_image, invalid_base64, corrupt_image,
    unsupported_image_format, image_too_large, missing_images, too_many_images) and serve/errors.py its status."""

    code = "invalid_image"


class TooManyPixelsError(ImageRejected):
    """The request's images together exceed the per-request pixel budget."""

    code = "too_many_pixels"


class DecodeBusyError(UnavailableError):
    """The decode pixel budget stayed full for the whole request timeout: retry later."""


def decode_base64(text: str, where: str) -> bytes:
    """Standard or URL-safe base64, with or without a data: URL prefix (what browsers' FileReader produces)."""
    if not isinstance(text, str) or not text:
        raise ImageRejected(f"{where}: expected a non-empty base64 string")
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    cleaned = "".join(text.split())
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageRejected(f"{where}: not valid base64 ({err})", "invalid_base64") from err


def encode_base64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _probe(data: bytes, where: str, limits: ServeSettings) -> Image.Image:
    """Open lazily: the format and the size come from the header, before a single pixel is decoded."""
    if not data:
        raise ImageRejected(f"{where}: empty file")
    try:
        with warnings.catch_warnings():
            # Our own limits replace PIL's global one (a warning at 89 MP, an error at twice that).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError as err:
        raise ImageRejected(f"{where}: not a recognised image file", "unsupported_image_format") from err
    except Image.DecompressionBombError as err:
        raise ImageRejected(f"{where}: {err}", "image_too_large") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageRejected(f"{where}: the image header is corrupt or truncated ({err})", "corrupt_image") from err
    fmt = (img.format or "").upper()
    if fmt not in limits.image_formats:
        accepted = ", ".join(limits.image_formats)
        message = f"{where}: image format {fmt or 'unknown'} is not accepted (accepted: {accepted})"
        raise ImageRejected(message, "unsupported_image_format")
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageRejected(f"{where}: image has no pixels")
    if width * height > limits.max_image_pixels:
        message = f"{where}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_image_pixels}"
        raise ImageRejected(message, "image_too_large")
    return img


def _load(img: Image.Image, where: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as err:
        raise ImageRejected(f"{where}: {err}", "image_too_large") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # truncated/corrupt data inside a known format
        raise ImageRejected(f"{where}: the image data is corrupt or truncated ({err})", "corrupt_image") from err
    return img


class PixelGate:
    """Bounds the pixels being decoded at once across all requests, so memory stays bounded under any load.

    A request takes its header-computed pixel count before decoding and returns it when its images are freed;
    one that cannot get its share within `timeout` seconds is refused with 503 (the client retries), never queued
    without bound.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, timeout: float) -> Iterator[None]:
        pixels = min(pixels, self.capacity)
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use + pixels <= self.capacity, timeout=timeout):
                raise DecodeBusyError("too many images are being decoded right now; retry later")
            self.in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


def open_images(blobs: list[tuple[str, bytes]], limits: ServeSettings) -> tuple[list[Image.Image], int]:
    """Probe every image's header, refuse the request (413) when their pixels together exceed the per-request
    budget, and only then decode. Returns the lazily opened images (load them with `load_images`) and the total."""
    probed = [_probe(data, where, limits) for where, data in blobs]
    total = sum(img.size[0] * img.size[1] for img in probed)
    if total > limits.max_request_pixels:
        raise TooManyPixelsError(
            f"the request's {len(probed)} images hold {total} pixels together; the limit per request is "
            f"{limits.max_request_pixels} (send fewer or smaller images)",
        )
    return probed, total


def load_images(images: list[Image.Image], blobs: list[tuple[str, bytes]]) -> list[Image.Image]:
    return [_load(img, where) for img, (where, _) in zip(images, blobs, strict=True)]
