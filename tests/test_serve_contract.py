"""The OpenAPI contract, fuzzed: schemathesis generates requests for every operation of the real server (a
`lpjepa serve` process on loopback) and checks that none answers 5xx, that every status is documented, and that
every response matches its declared schema and content type. Bounded: a fixed number of examples per operation,
derandomized, so the run is reproducible and takes well under two minutes on two cores."""

from __future__ import annotations

import pytest
import schemathesis
from helpers import ServerProcess
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

KEY = "contract-key"
EXAMPLES = 25  # per operation and generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    positive_data_acceptance,
    ignored_auth,
    missing_required_header,
]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    index = tmp_path_factory.mktemp("contract") / "index"
    proc = ServerProcess("--model", str(model_path), "--index", str(index), "--api-key", KEY, "--max-inflight", "64")
    yield proc
    proc.stop()


# What a schema cannot say: that a base64 string must hold a decodable image of an accepted format, that sparse
# indices must be below the model's dimension, that a query must have a non-zero value. For the operations that
# take images or embeddings a schema-valid request may therefore be refused with 413/415/422 (still checked to
# be documented and to carry the error schema); everywhere else schema-valid data must be accepted.
CONFIG = """
[[operations]]
include-path-regex = "^/v1/(embed|ood|search|items)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "413", "415", "422"]
"""


@pytest.fixture(scope="module")
def api_schema(server):
    config = SchemathesisConfig.from_str(CONFIG)
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) of every documented operation, read from the app's own spec (no model needed for
    that); negative cases only where there is an input to get wrong."""
    from pathlib import Path

    from serve.app import create_app
    from serve.settings import ServeSettings

    spec = create_app(ServeSettings(model_path=Path("unused.onnx"), api_key=KEY)).openapi()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method not in ("get", "post", "put", "delete"):
                continue
            out.append((method.upper(), path, GenerationMode.POSITIVE))
            if op.get("parameters") or op.get("requestBody"):
                out.append((method.upper(), path, GenerationMode.NEGATIVE))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), _operations())
def test_every_operation_honours_its_contract(api_schema, method, path, mode):
    """(schemathesis' own pytest plugin does not run under pytest 9, so the strategy is driven with @given.)"""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS, timeout=30)

    run()


def test_the_server_survived_the_fuzzing(server):
    with server.client() as c:
        assert c.get("/readyz").status_code == 200
    assert "unhandled error" not in server.logs()
