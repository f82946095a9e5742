"""Thumbnails: a small PNG per indexed image, kept beside the item's payload, so a result list can show pictures.

They are a per-item attribute of the index like the payload: replaced when the item is replaced, dropped when it
is removed, saved as one manifest-checked data file (role ``thumbnails``) of the index directory. The file is an
uncompressed ``.npz`` of three arrays, ``ids`` (sorted int64), ``offsets`` (int64, one more than ids) and ``data``
(uint8, the PNGs back to back): no base64 inflation, no pickles, readable with ``np.load``.

Bounded size: the longest side is at most ``MAX_PX`` pixels (images are shrunk, never enlarged), so one PNG is at
most a few tens of KB even for photos (Fashion-MNIST's 28 x 28 greyscale ones are ~0.3-0.6 KB), and
``index.validation.check_thumbnails`` refuses anything that is not a PNG or is over ``MAX_THUMBNAIL_BYTES``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

from index.errors import CorruptIndexError, InvalidInputError

DEFAULT_PX = 64
MAX_PX = 256
MAX_THUMBNAIL_BYTES = 256 * 1024  # a 256 x 256 RGB PNG of pure noise is ~197 KB; real images are far smaller
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def thumbnail_png(img: Any, px: int) -> bytes | None:
    """A PNG of ``img`` (a PIL image) with its longest side at most ``px`` pixels; None when ``px`` is 0.

    Also None when PIL cannot convert the image's mode to RGB (some 16-bit or exotic modes): a missing thumbnail
    must never fail the indexing of an image whose embedding was computed fine.
    """
    if not 0 <= px <= MAX_PX:
        raise InvalidInputError(f"thumbnail size must be in [0, {MAX_PX}] pixels, got {px}")
    if px == 0:
        return None
    try:
        thumb = img.convert("RGB") if img.mode not in ("L", "RGB") else img.copy()
        thumb.thumbnail((px, px))
        buf = io.BytesIO()
        thumb.save(buf, format="PNG", optimize=True)
    except (OSError, ValueError):
        return None
    return buf.getvalue()


def write_thumbnails(path: Path, thumbnails: dict[int, bytes]) -> None:
    """Write the id -> PNG map as the uncompressed npz described above (PNG data does not compress further)."""
    import numpy as np  # here, not at the top: `lpjepa --help` imports this module for its constants

    ids = np.array(sorted(thumbnails), dtype=np.int64)
    sizes = np.array([len(thumbnails[int(i)]) for i in ids], dtype=np.int64)
    offsets = np.zeros(ids.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.frombuffer(b"".join(thumbnails[int(i)] for i in ids), dtype=np.uint8)
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the temporary name
        np.savez(f, ids=ids, offsets=offsets, data=data)


def read_thumbnails(path: Path) -> dict[int, bytes]:
    """Inverse of :func:`write_thumbnails`, checking the structure (the sha256 was checked by the caller)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            ids, offsets, data = npz["ids"], npz["offsets"], npz["data"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptIndexError(f"cannot read {path.name}: {err}") from None
    ok = (
        ids.dtype == np.int64
        and ids.ndim == 1
        and offsets.dtype == np.int64
        and offsets.shape == (ids.size + 1,)
        and data.dtype == np.uint8
        and data.ndim == 1
        and offsets[0] == 0
        and offsets[-1] == data.size
        and bool(np.all(np.diff(offsets) > 0))
        and bool(np.all(np.diff(ids) > 0))
    )
    if not ok:
        raise CorruptIndexError(f"{path.name} is not a thumbnail file (bad ids/offsets/data arrays)")
    raw = data.tobytes()
    starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
    return {key: raw[a:b] for key, a, b in zip(ids.tolist(), starts, ends, strict=True)}
