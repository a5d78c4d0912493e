"""Property-based API fuzzing with schemathesis: valid and invalid inputs from the OpenAPI schema, no 5xx.

Uses schemathesis' strategies directly (its pytest fixture loader does not support this pytest version),
with a bounded number of cases per operation and mode.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from tests.helpers import ADMIN_TOKEN

MAX_EXAMPLES = 15


@pytest.fixture(scope="module")
def api_schema(service_settings):
    from transresnet.service.main import create_app

    return schemathesis.openapi.from_asgi("/openapi.json", create_app(service_settings))


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def test_schema_lists_every_endpoint(api_schema):
    labels = {op.label for op in _operations(api_schema)}
    assert labels >= {"POST /v1/captions", "GET /v1/personalities", "GET /healthz", "GET /readyz", "GET /metrics",
                      "POST /v1/admin/reload"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema, mode):
    checked: list[str] = []
    for operation in _operations(api_schema):
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if "admin" in operation.path else None
        strategy = operation.as_strategy(generation_mode=mode, headers=headers)

        @given(case=strategy)
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            response = case.call()
            assert response.status_code < 500, \
                f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
            if response.status_code >= 400:
                assert "message" in response.json(), response.text

        try:
            run()
        except Unsatisfiable:  # nothing to break in an operation without inputs (GET /healthz)
            assert mode is GenerationMode.NEGATIVE
            continue
        checked.append(operation.label)
    assert "POST /v1/captions" in checked
