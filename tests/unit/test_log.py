"""Secret redaction in log events (mirrorcache.log.redact)."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from mirrorcache.log import REDACTED, redact


def run(**event: Any) -> dict[str, Any]:
    return dict(redact(None, "info", dict(event)))


@pytest.mark.parametrize("key", ["authorization", "Authorization", "password", "db_password",
                                 "token", "access_token", "passwd", "client_secret",
                                 "credentials", "cookie", "Set-Cookie", "proxy_authorization"])
def test_secret_keys_are_redacted_whatever_the_value(key: str) -> None:
    for value in ("hunter2", 12345, {"nested": "x"}, ["a"], None):
        out = run(event="upstream.request", **{key: value})
        assert out[key] == REDACTED
        assert out["event"] == "upstream.request"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer xyz", f"Bearer {REDACTED}"),
        ("Basic abc", f"Basic {REDACTED}"),
        ("bearer eyJhbGciOi.eyJzdWIi.sig-_~+/=", f"bearer {REDACTED}"),
        ("sent header Authorization: Basic YWxpY2U6czNjcmV0 to host",
         f"sent header Authorization: Basic {REDACTED} to host"),
        ("first Bearer aaa then Basic bbb", f"first Bearer {REDACTED} then Basic {REDACTED}"),
        ("BEARER\tTOKEN123", f"BEARER {REDACTED}"),
    ],
)
def test_bearer_and_basic_credentials_inside_strings(value: str, expected: str) -> None:
    out = run(event="x", message=value, path="/v2/a/manifests/latest")
    assert out["message"] == expected
    assert out["path"] == "/v2/a/manifests/latest"


def test_event_name_is_scanned_but_not_replaced_by_key() -> None:
    out = run(event="got Bearer abc123")
    assert out["event"] == f"got Bearer {REDACTED}"
    assert run(event="upstream.token_fetched")["event"] == "upstream.token_fetched"


def test_innocent_fields_untouched() -> None:
    event = {"event": "request.finished", "method": "GET", "status": 200, "bytes": 1024,
             "path": "/v2/library/alpine/blobs/sha256:abc", "cache": "hit",
             "client": "127.0.0.1", "note": "basically fine", "upstream": "docker.io"}
    assert run(**event) == event


def test_redact_within_structlog_pipeline() -> None:
    logger = structlog.get_logger("unit")
    with capture_logs(processors=[redact]) as logs:
        logger.warning("upstream.token_refused", realm="https://auth.example/token",
                       authorization="Basic YWxpY2U6czNjcmV0", password="s3cret",
                       token="tok-1", detail="retry with Bearer tok-2", status=401)
    assert logs == [{
        "event": "upstream.token_refused",
        "log_level": "warning",
        "realm": "https://auth.example/token",
        "authorization": REDACTED,
        "password": REDACTED,
        "token": REDACTED,
        "detail": f"retry with Bearer {REDACTED}",
        "status": 401,
    }]
    flat = repr(logs)
    for secret in ("YWxpY2U6czNjcmV0", "s3cret", "tok-1", "tok-2"):
        assert secret not in flat


def test_secrets_nested_in_containers_are_redacted() -> None:
    out = run(event="upstream.request",
              headers={"Authorization": "Bearer tok-secret", "Accept": "*/*"},
              args=["Basic YWxpY2U6czNjcmV0"])
    flat = repr(out)
    assert "tok-secret" not in flat
    assert "YWxpY2U6czNjcmV0" not in flat


def test_protocol_errors_become_one_line_events() -> None:
    from structlog.testing import capture_logs

    from mirrorcache.log import ProtocolLogger

    plog = ProtocolLogger()
    with capture_logs() as logs:
        try:
            raise ValueError("400, message:\n  Invalid header token:\n    b'Bad\\x00'")
        except ValueError:
            plog.exception("Error handling request from %s", "127.0.0.1")
    assert len(logs) == 1
    event = logs[0]
    assert event["event"] == "http.protocol_error"
    assert event["message"] == "Error handling request from 127.0.0.1"
    assert event["error_type"] == "ValueError"
    assert "Invalid header token" in event["error"] and "\n" not in event["error"]
    assert "exc_info" not in event and "exception" not in event


def test_query_strings_lose_secret_values_only() -> None:
    from mirrorcache.log import redact_query

    assert redact_query("ns=docker.io&n=10") == "ns=docker.io&n=10"
    assert redact_query("ns=quay.io&access_token=abc&password=x") == (
        f"ns=quay.io&access_token={REDACTED}&password={REDACTED}")
