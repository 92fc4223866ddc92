"""The test suite's own gate: integration tests may be skipped locally, never on CI."""

from __future__ import annotations

import pytest

from tests.conftest import NO_REGISTRY, NO_SKOPEO, in_ci, integration_gate


def test_missing_tools_skip_locally_with_the_reason() -> None:
    assert integration_gate([NO_REGISTRY, NO_SKOPEO], {}) == f"{NO_REGISTRY}; {NO_SKOPEO}"
    assert integration_gate([NO_SKOPEO], {"CI": "false"}) == NO_SKOPEO


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_missing_tools_fail_the_run_on_ci(value: str) -> None:
    with pytest.raises(pytest.UsageError, match="skopeo binary not installed"):
        integration_gate([NO_SKOPEO], {"CI": value})


def test_all_tools_present_runs_everything_on_ci_and_locally() -> None:
    assert integration_gate([], {"CI": "true"}) is None
    assert integration_gate([], {}) is None
    assert in_ci({"CI": "true"}) and not in_ci({}) and not in_ci({"CI": ""})
