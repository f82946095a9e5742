"""Everything an operator can tune about the server, validated once at start-up.

Limits live here (not scattered through handlers) so the CLI flags, the environment, the tests and /v1/info all
read the same numbers, and a bad value fails at start-up with a message instead of surfacing as odd behaviour
under load. Every field can be set as an environment variable LPJEPA_<FIELD> (LPJEPA_API_KEY, LPJEPA_MAX_BATCH, ...;
pydantic-settings): `lpjepa serve` flags override those, and they override the defaults here.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as EnvParseError

from core.errors import InvalidError

ENV_PREFIX = "LPJEPA_"
# The settings a client needs to size its requests (/v1/info "limits"; never the key).
PUBLIC_LIMITS = {
    "max_body_bytes", "max_image_pixels", "max_request_pixels", "max_images_per_request", "max_items_per_request",
    "max_k", "max_payload_bytes", "image_formats", "batching", "max_batch", "max_wait_ms", "max_queue", "max_inflight",
}  # fmt: skip

# Formats PIL decodes that make sense as photos; anything else (EPS, PDF, ICO, ...) is refused up front because
# some of PIL's plug-ins shell out or are rarely exercised, which is not what a public endpoint should run.
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")


class SettingsInvalid(InvalidError):
    """A server setting (a flag or an LPJEPA_* environment variable, named in the message) is out of range."""


class ServeSettings(BaseSettings):
    """Configuration of one server instance; `lpjepa serve` builds it from flags over the environment, tests build
    it directly (the environment applies there too; a worker of `--workers N` gets its settings as JSON, without)."""

    # An empty variable counts as unset (`LPJEPA_API_KEY= lpjepa serve ...` must not set an empty key).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True)

    model_path: Path
    index_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    api_key: str | None = None
    auth_reads: bool = False

    # Request limits.
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # Decoded pixels per request, checked from the image headers before any decoding (413 beyond). A decoded
    # pixel costs at most ~10 bytes at the peak (RGBA decode + RGB copy + resize), so a maximal request takes
    # ~0.4 GB; at most `concurrent_decodes` such requests decode at once (the rest wait, then get 503), which
    # bounds decoding memory by concurrent_decodes x max_request_pixels x 10 B (~3.2 GB with the defaults).
    max_request_pixels: int = Field(40_000_000, ge=1)
    concurrent_decodes: int = Field(8, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    max_k: int = Field(1000, ge=1, le=100_000)
    max_payload_bytes: int = Field(16 * 1024, ge=2)
    max_items_per_request: int = Field(256, ge=1)
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS
    max_inflight: int = Field(256, ge=1)  # concurrent /v1 requests; beyond it 503 + Retry-After

    # Model execution.
    model_threads: int | None = Field(None, ge=1)  # ONNX Runtime intra-op threads; None = one per core
    # ONNX Runtime's idle threads spin-wait for work by default: on a dedicated machine that shaves microseconds,
    # on a small or shared one the spinning threads take the cores the event loop needs (measured: 2 spinning
    # threads ran the demo model 4-6x slower than 2 sleeping ones under load). Off unless asked for.
    model_spin: bool = False
    # BLAS (OpenBLAS) threads for the OOD scores' small matrix products (a batch x D times D x D): threading them
    # buys nothing at this size, and OpenBLAS's idle threads busy-wait on the cores the event loop and the model
    # need (measured: two of them took ~25% of the server's CPU under load). None leaves the library's default.
    blas_threads: int | None = Field(1, ge=1)
    # A request whose images hold at most this many pixels together (from their headers) is decoded by the model
    # thread as part of its batch (one thread hand-off per batch); larger ones decode in the thread pool. 0: always
    # the pool.
    batch_decode_pixels: int = Field(65_536, ge=0)

    # Dynamic batching.
    batching: bool = True
    max_batch: int = Field(64, ge=1)
    max_wait_ms: float = Field(5.0, ge=0.0)
    max_queue: int = Field(1024, ge=1)  # images waiting for the model; beyond it requests get 503
    request_timeout_s: float = Field(30.0, gt=0.0)

    # Index durability.
    compact_every: int = Field(1000, ge=1)  # stored writes between index snapshots
    index_backend: str = "csr"  # used only when --index names a directory that does not exist yet
    index_metric: str = "cosine"  # for a new index: an image's own item ranks first whatever its norm
    thumbnail_px: int = Field(48, ge=0, le=256)  # 0 disables thumbnails of indexed images
    # Milvus (index_backend="milvus"): the server keeps no state of its own; any number of replicas share it.
    milvus_uri: str | None = None  # a .db file (embedded, this process only) or http://host:port
    milvus_token: str | None = None  # never reported by /v1/info
    milvus_collection: str = "lpjepa"
    milvus_index: str = "exact"  # for a new collection: exact or wand
    milvus_timeout_s: float = Field(5.0, gt=0.0)  # per Milvus call; a dead Milvus is a 503 after ~2x this
    # Drift monitor (ood/drift.py): probability that one evaluation on in-distribution traffic raises the alarm.
    drift_false_alarm_rate: float = Field(1e-4, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _milvus_needs_uri(self) -> ServeSettings:
        if self.index_backend == "milvus" and not self.milvus_uri:
            raise ValueError("index_backend 'milvus' needs milvus_uri (a .db file or http://host:port)")
        return self

    @property
    def has_index(self) -> bool:
        """Whether this server serves an index: a directory, or a Milvus collection."""
        return self.index_dir is not None or self.index_backend == "milvus"

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("api_key must not be empty")
        return value

    @field_validator("image_formats")
    @classmethod
    def _upper_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.upper() for v in value)

    @classmethod
    def with_env(cls, **given: object) -> ServeSettings:
        """`given` (None: not given) over the LPJEPA_* environment over the defaults, so e.g. the API key need not
        appear in `ps` output. A bad value is a SettingsInvalid naming the field, or the variable it came from."""
        given = {name: value for name, value in given.items() if value is not None}
        try:
            return cls(**given)
        except ValidationError as err:
            first = err.errors()[0]
            loc = [str(p) for p in first.get("loc", ())]
            where = ".".join(loc) if not loc or loc[0] in given else f"{ENV_PREFIX}{loc[0].upper()}"
            raise SettingsInvalid(f"invalid value for {where or 'the settings'}: {first.get('msg')}") from err
        except EnvParseError as err:  # a list-valued variable that is not JSON
            field = re.search(r'field "(\w+)"', str(err))
            where = f"{ENV_PREFIX}{field.group(1).upper()}" if field else "an LPJEPA_* environment variable"
            raise SettingsInvalid(f"invalid value for {where}: {err} (expected JSON)") from err

    def public_limits(self) -> dict[str, object]:
        keyed = self.api_key is not None
        return {
            **self.model_dump(mode="json", include=PUBLIC_LIMITS),
            "auth_writes": keyed,
            "auth_reads": keyed and self.auth_reads,
        }
