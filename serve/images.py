"""Untrusted image bytes -> PIL images, with the checks a public endpoint needs before any pixel is decoded.

PIL parses the header lazily, so size and format are known before the (expensive, attackable) decode: a
decompression bomb is refused from its header, and formats outside the allow-list never reach their plug-in.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from serve.errors import ApiError


def decode_base64(text: str, where: str) -> bytes:
    """Standard or URL-safe base64, with or without a data: URL prefix (what browsers' FileReader produces)."""
    if not isinstance(text, str) or not text:
        raise ApiError(422, "invalid_image", f"{where}: expected a non-empty base64 string")
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    cleaned = "".join(text.split())
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(422, "invalid_base64", f"{where}: not valid base64 ({err})") from err


def open_image(data: bytes, where: str, *, max_pixels: int, formats: tuple[str, ...]) -> Image.Image:
    """Decode one image fully, refusing unknown formats (415), oversized images (413) and corrupt data (422)."""
    if not data:
        raise ApiError(422, "invalid_image", f"{where}: empty file")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's global one (a warning at 89 MP, an error at twice that).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=None)
            fmt = (img.format or "").upper()
            if fmt not in formats:
                raise ApiError(
                    415,
                    "unsupported_image_format",
                    f"{where}: image format {fmt or 'unknown'} is not accepted (accepted: {', '.join(formats)})",
                )
            width, height = img.size
            if width < 1 or height < 1:
                raise ApiError(422, "invalid_image", f"{where}: image has no pixels")
            if width * height > max_pixels:
                raise ApiError(
                    413,
                    "image_too_large",
                    f"{where}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                )
            img.load()
    except ApiError:
        raise
    except UnidentifiedImageError as err:
        raise ApiError(415, "unsupported_image_format", f"{where}: not a recognised image file") from err
    except Image.DecompressionBombError as err:
        raise ApiError(413, "image_too_large", f"{where}: {err}") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # truncated/corrupt data inside a known format
        raise ApiError(422, "corrupt_image", f"{where}: the image data is corrupt or truncated ({err})") from err
    return img


def thumbnail_png(img: Image.Image, px: int) -> bytes | None:
    """A small PNG (longest side `px`) for the web page's neighbour grid; bounded to a few KB per item.

    None when PIL cannot convert the image's mode to RGB (e.g. some 16-bit or exotic modes): a missing thumbnail
    must never fail a write whose embedding was computed fine.
    """
    try:
        thumb = img.convert("RGB") if img.mode not in ("L", "RGB") else img.copy()
        thumb.thumbnail((px, px))
        buf = io.BytesIO()
        thumb.save(buf, format="PNG", optimize=True)
    except (OSError, ValueError):
        return None
    return buf.getvalue()
