"""Server settings from flags, LPJEPA_* environment variables and defaults (pydantic-settings), and the one table
from product errors to HTTP answers (serve/errors.py)."""

from __future__ import annotations

import argparse

import pytest

from cli.main import main
from core.errors import InvalidError, LpjepaError, UnavailableError
from index.errors import BackendUnavailableError
from serve import cli as serve_cli
from serve.batching import ModelFailedError, OverloadedError
from serve.durable_log import StoreLockedError, WrongDimensionError
from serve.errors import HTTP_ERRORS, ApiError, http_error
from serve.images import TooManyPixelsError
from serve.settings import ServeSettings, SettingsInvalid
from serve.strict_json import MalformedJsonError


def _settings(*flags: str) -> ServeSettings:
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    return serve_cli.build_settings(parser.parse_args(["serve", "--model", "m.onnx", *flags]))


def test_an_environment_variable_sets_a_field_and_a_flag_overrides_it(monkeypatch):
    assert _settings().max_batch == 64 and _settings().max_body_bytes == 20 * 1024 * 1024
    monkeypatch.setenv("LPJEPA_MAX_BATCH", "7")
    monkeypatch.setenv("LPJEPA_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("LPJEPA_AUTH_READS", "true")
    monkeypatch.setenv("LPJEPA_MILVUS_COLLECTION", "from-env")
    env = _settings()
    assert (env.max_batch, env.max_body_bytes, env.auth_reads, env.milvus_collection) == (7, 4096, True, "from-env")
    flags = _settings("--max-batch", "9", "--max-body-mb", "1", "--collection", "from-flag")
    assert (flags.max_batch, flags.max_body_bytes, flags.milvus_collection) == (9, 1024 * 1024, "from-flag")
    assert flags.auth_reads is True  # a flag not given leaves the environment's value
    assert ServeSettings(model_path="m.onnx").max_batch == 7  # built directly, the environment applies too


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("LPJEPA_API_KEY", "")
    assert _settings().api_key is None


def test_a_bad_environment_value_names_the_variable(monkeypatch, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    monkeypatch.setenv("LPJEPA_MAX_BATCH", "0")
    with pytest.raises(SettingsInvalid, match="invalid value for LPJEPA_MAX_BATCH: Input should be greater than"):
        _settings()
    assert main(["serve", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "LPJEPA_MAX_BATCH" in err and err.count("\n") == 1
    with pytest.raises(SettingsInvalid, match="invalid value for max_batch"):  # given as a flag: the field's name
        _settings("--max-batch", "-1")
    monkeypatch.delenv("LPJEPA_MAX_BATCH")
    monkeypatch.setenv("LPJEPA_IMAGE_FORMATS", "PNG")  # a list: JSON expected
    with pytest.raises(SettingsInvalid, match="LPJEPA_IMAGE_FORMATS"):
        _settings()


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (OverloadedError("x"), 503, "overloaded"),
        (ModelFailedError("x"), 500, "model_error"),
        (StoreLockedError("x"), 409, "store_locked"),
        (WrongDimensionError("x"), 422, "wrong_dimension"),
        (TooManyPixelsError("x"), 413, "too_many_pixels"),
        (MalformedJsonError("x"), 400, "malformed_json"),
        (BackendUnavailableError("x"), 503, "backend_unavailable"),
        (type("SomeOutage", (UnavailableError,), {})("x"), 503, "unavailable"),  # a class no row names: its family
        (type("SomeBadInput", (InvalidError,), {})("x"), 422, "invalid_request"),
        (ApiError(404, "unknown_id", "x"), 404, "unknown_id"),
    ],
)
def test_the_error_table(error, status, code):
    got_status, got_code, headers = http_error(error)
    assert (got_status, got_code) == (status, code)
    assert headers.get("Retry-After") == {503: "2" if isinstance(error, BackendUnavailableError) else "1"}.get(status)


def test_every_row_is_a_product_error():
    assert all(issubclass(cls, LpjepaError) for cls in HTTP_ERRORS)
    assert HTTP_ERRORS[StoreLockedError][1] == StoreLockedError.code
