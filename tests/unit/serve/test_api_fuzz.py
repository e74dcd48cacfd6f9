"""API fuzzing with Schemathesis against the live app's own OpenAPI document.

A real server (loopback, the tiny bundle) is driven with requests Schemathesis generates from
/openapi.json, valid (positive) and invalid (negative), for every operation, and each response goes
through Schemathesis's checks: no 5xx, status codes, content types, headers and bodies as the
document says. COVID_CXR_FUZZ_EXAMPLES sets the examples per operation and mode (default 20, so the
unit tier stays quick; the note reports a longer run).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

EXAMPLES = int(os.environ.get("COVID_CXR_FUZZ_EXAMPLES", "20"))


@pytest.fixture(scope="module")
def api_schema(tiny_models):
    with running_server(ServeSettings(models=tiny_models, rescan_seconds=0.5)) as base:
        yield schemathesis.openapi.from_url(f"{base}/openapi.json")


def fuzz_operation(operation, mode: GenerationMode) -> int:
    """Run the generated cases for one operation; returns how many were sent (0: an operation
    without parameters or body has no invalid form to generate)."""
    sent = [0]
    # A schema-valid predict body or upload need not hold a decodable image of the model's shape:
    # no JSON Schema can say that, so "valid data must be accepted" is not checked there.
    semantic = operation.path.endswith((":predict", "/infer")) or operation.path == "/api/v1/predict"
    excluded = [positive_data_acceptance] if semantic else []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        sent[0] += 1
        case.call_and_validate(timeout=30, excluded_checks=excluded)

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE and sent[0] == 0
    return sent[0]


@pytest.mark.slow  # in `make test`, not in `make test-fast`
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_api_conforms_to_its_openapi_document(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    counts = {op.label: fuzz_operation(op, mode) for op in operations}
    print(f"schemathesis {mode.value}: {sum(counts.values())} cases over {len(counts)} operations: {counts}")
    # The cases must have run: every operation gets valid cases, and the predict operations (the
    # parsers that matter) get invalid ones too; a run that sent nothing would prove nothing.
    predicts = [label for label in counts if label.startswith("POST")]
    assert len(predicts) >= 5 and all(counts[label] >= min(EXAMPLES, 5) for label in predicts), counts
    if mode == GenerationMode.POSITIVE:
        assert all(n >= 1 for n in counts.values()), counts
