"""OCI error codes, relaying upstream errors, and the error middleware."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import mypy.api
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirrorcache.api.inflight import InflightBlobResponse
from mirrorcache.api.middleware import access_log_middleware
from mirrorcache.errors import (
    CODES,
    ErrorCode,
    OCIError,
    error_from_upstream,
    error_middleware,
    error_response,
)
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.download import Download
from mirrorcache.proxy.routing import Target

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


@pytest.mark.parametrize(
    ("code", "status"),
    [("NAME_UNKNOWN", 404), ("UNSUPPORTED", 405), ("TOOMANYREQUESTS", 429), ("DENIED", 403),
     ("UNAUTHORIZED", 401), ("DIGEST_INVALID", 400), ("NAME_INVALID", 400),
     ("MANIFEST_UNKNOWN", 404), ("BLOB_UNKNOWN", 404), ("RANGE_INVALID", 416),
     ("UNAVAILABLE", 503), ("UNKNOWN", 500), ("PAGINATION_NUMBER_INVALID", 400)],
)
def test_status_table(code: str, status: int) -> None:
    err = OCIError(code)
    assert err.status == status
    assert CODES[code].status == status
    assert err.message == CODES[code].message


def test_body_shape() -> None:
    err = OCIError("NAME_UNKNOWN", "no such repo")
    assert err.body() == {"errors": [{"code": "NAME_UNKNOWN", "message": "no such repo"}]}
    with_detail = OCIError("DIGEST_INVALID", detail={"digest": "sha256:x"})
    assert with_detail.body() == {"errors": [{
        "code": "DIGEST_INVALID",
        "message": "provided digest did not match uploaded content",
        "detail": {"digest": "sha256:x"},
    }]}
    assert str(err) == "NAME_UNKNOWN: no such repo"


def test_status_override_and_unknown_code() -> None:
    assert OCIError("NAME_UNKNOWN", status=410).status == 410
    bogus = OCIError("NOT_A_CODE", "x")
    assert (bogus.code, bogus.status) == ("UNKNOWN", 500)


def test_error_response_render() -> None:
    resp = error_response(OCIError("TOOMANYREQUESTS", headers={"Retry-After": "7"}))
    assert resp.status == 429
    assert resp.content_type == "application/json"
    assert resp.headers["Retry-After"] == "7"
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert resp.body is not None
    assert json.loads(bytes(resp.body))["errors"][0]["code"] == "TOOMANYREQUESTS"
    head = error_response(OCIError("NAME_UNKNOWN"), head=True)
    assert head.status == 404 and head.body is None


# --- error_from_upstream -----------------------------------------------------------------


def test_relays_oci_json_code_and_message() -> None:
    body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN",
                                   "message": "manifest unknown: tag 9.9"}]}).encode()
    err = error_from_upstream(404, body, "NAME_UNKNOWN")
    assert (err.code, err.message, err.status) == ("MANIFEST_UNKNOWN",
                                                   "manifest unknown: tag 9.9", 404)


def test_relays_denied_and_unauthorized_statuses() -> None:
    body = json.dumps({"errors": [{"code": "DENIED", "message": "nope"}]}).encode()
    err = error_from_upstream(403, body, "NAME_UNKNOWN")
    assert (err.code, err.message, err.status) == ("DENIED", "nope", 403)
    err = error_from_upstream(401, b"", "NAME_UNKNOWN")
    assert (err.code, err.status) == ("UNAUTHORIZED", 401)


def test_plain_text_429_is_toomanyrequests() -> None:
    err = error_from_upstream(429, b"Too Many Requests - slow down", "MANIFEST_UNKNOWN")
    assert (err.code, err.status) == ("TOOMANYREQUESTS", 429)
    assert err.message == "upstream answered 429: Too Many Requests - slow down"


def test_upstream_500_is_our_502() -> None:
    err = error_from_upstream(500, b"<html>Internal Server Error</html>", "BLOB_UNKNOWN")
    assert (err.code, err.status) == ("UNKNOWN", 502)
    assert "500" in err.message
    oci = json.dumps({"errors": [{"code": "UNKNOWN", "message": "db down"}]}).encode()
    assert error_from_upstream(500, oci, "BLOB_UNKNOWN").message == "db down"


def test_upstream_503_stays_unavailable() -> None:
    err = error_from_upstream(503, b"", "BLOB_UNKNOWN")
    assert (err.code, err.status) == ("UNAVAILABLE", 503)


def test_404_without_body_uses_default_code() -> None:
    err = error_from_upstream(404, b"", "BLOB_UNKNOWN")
    assert (err.code, err.status) == ("BLOB_UNKNOWN", 404)
    assert err.message == "upstream answered 404"
    err = error_from_upstream(404, b"", "MANIFEST_UNKNOWN")
    assert err.code == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize("body", [b"[]", b'"text"', b'{"errors": []}', b'{"errors": [1]}',
                                  b'{"errors": "x"}', b'{"errors": {"0": 1}}', b"\xff\xfe",
                                  b'{"errors": [{"code": "MADE_UP", "message": 5}]}'])
def test_odd_bodies_fall_back_to_status(body: bytes) -> None:
    err = error_from_upstream(404, body, "NAME_UNKNOWN")
    assert (err.code, err.status) == ("NAME_UNKNOWN", 404)
    assert err.message


def test_long_upstream_message_is_truncated() -> None:
    body = json.dumps({"errors": [{"code": "DENIED", "message": "x" * 5000}]}).encode()
    assert len(error_from_upstream(403, body, "NAME_UNKNOWN").message) == 500
    assert len(error_from_upstream(400, b"y" * 5000, "NAME_UNKNOWN").message) < 400


def test_deeply_nested_upstream_body_is_relayed() -> None:
    err = error_from_upstream(404, b"[" * 16384, "MANIFEST_UNKNOWN")
    assert (err.code, err.status) == ("MANIFEST_UNKNOWN", 404)


# --- the middleware ----------------------------------------------------------------------


async def _oci(request: web.Request) -> web.Response:
    raise OCIError("MANIFEST_UNKNOWN", "tag 1.0 not found", headers={"X-Extra": "1"})


async def _crash(request: web.Request) -> web.Response:
    raise RuntimeError("secret internals /etc/passwd Traceback")


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _forbidden(request: web.Request) -> web.Response:
    raise web.HTTPForbidden()


@pytest.fixture
async def client(aiohttp_client: ClientFactory) -> TestClient[Any, Any]:
    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/oci", _oci)
    app.router.add_get("/crash", _crash)
    app.router.add_get("/ok", _ok)
    app.router.add_get("/forbidden", _forbidden)
    return await aiohttp_client(app)


async def test_middleware_renders_oci_error(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/oci")
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Extra"] == "1"
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert await resp.json() == {"errors": [{"code": "MANIFEST_UNKNOWN",
                                             "message": "tag 1.0 not found"}]}


async def test_middleware_hides_unexpected_errors(client: TestClient[Any, Any]) -> None:
    with structlog.testing.capture_logs() as logs:
        resp = await client.get("/crash")
        body = await resp.read()
    assert resp.status == 500
    assert json.loads(body) == {"errors": [{"code": "UNKNOWN", "message": "internal error"}]}
    for leak in (b"Traceback", b"RuntimeError", b"secret", b"/etc/passwd", b"File \""):
        assert leak not in body
    events = [e for e in logs if e["event"] == "request.unhandled_error"]
    assert len(events) == 1
    assert events[0]["path"] == "/crash"


async def test_middleware_head_has_no_body(client: TestClient[Any, Any]) -> None:
    resp = await client.head("/oci")
    assert resp.status == 404
    assert await resp.read() == b""
    with structlog.testing.capture_logs():
        resp = await client.head("/crash")
    assert resp.status == 500
    assert await resp.read() == b""


async def test_middleware_maps_router_errors(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/no/such/route")
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    resp = await client.post("/ok")
    assert resp.status == 405
    assert (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"
    resp = await client.get("/forbidden")
    assert resp.status == 403
    assert (await resp.json())["errors"][0]["code"] == "DENIED"


async def test_middleware_passes_success_through(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/ok")
    assert resp.status == 200
    assert await resp.json() == {"ok": True}


# --- the ErrorCode enum ------------------------------------------------------------------


def test_every_code_has_a_table_entry() -> None:
    assert set(CODES) == set(ErrorCode)
    assert all(spec.code is code for code, spec in CODES.items())


def test_codes_render_as_plain_strings() -> None:
    err = OCIError(ErrorCode.BLOB_UNKNOWN)
    assert json.dumps(err.body()) == ('{"errors": [{"code": "BLOB_UNKNOWN", '
                                      '"message": "blob unknown to registry"}]}')
    assert f"{err.code}" == "BLOB_UNKNOWN"


def test_codes_read_back_from_elsewhere_are_parsed_leniently() -> None:
    assert ErrorCode.from_wire("DENIED") is ErrorCode.DENIED
    for odd in ("MADE_UP", None, 404, "denied"):
        assert ErrorCode.from_wire(odd) is ErrorCode.UNKNOWN


def test_a_misspelt_code_is_a_type_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the enum: mypy refuses a typo instead of it becoming a silent 500."""
    monkeypatch.setenv("MYPYPATH", str(Path(__file__).resolve().parents[2]))  # this tree
    snippet = tmp_path / "typo.py"
    snippet.write_text("from mirrorcache.errors import ErrorCode, OCIError\n"
                       "OCIError(ErrorCode.BLOB_UNKNOWN)\n"
                       "OCIError(ErrorCode.BLOB_UNKNWON)\n"
                       'OCIError("BLOB_UNKNOWN")\n')
    out, _, status = mypy.api.run(["--strict", "--no-incremental", "--follow-imports=silent",
                                   str(snippet)])
    assert status == 1
    errors = [line.split(":", 2)[1] for line in out.splitlines() if ": error:" in line]
    assert errors == ["3", "4"], out


def _failed_download(error: OCIError) -> Download:
    dl = Download(Target("docker.io", "library/x"), Digest.parse("sha256:" + "a" * 64))
    dl.size = 1000
    dl.error = error  # failed after the handler returned it as an in-flight blob
    return dl


async def _no_remainder(start: int, end: int) -> AsyncGenerator[bytes]:
    raise AssertionError("not a storage failure")
    yield b""  # pragma: no cover


@pytest.mark.parametrize(("error", "status", "logged"), [
    (OCIError(ErrorCode.UNAVAILABLE, "owner stream broke, upstream down", status=503), 503,
     False),
    (OCIError(ErrorCode.UNKNOWN, "in-flight blob shorter than announced"), 500, True),
])
async def test_response_failing_before_its_head_is_an_oci_error(
        aiohttp_client: ClientFactory, error: OCIError, status: int, logged: bool) -> None:
    """The access log sends the handler's response outside the error middleware: an in-flight
    blob whose download fails before the status line went out (a cluster peer's stream that
    broke, say) is answered as OCI JSON with the download's status, not aiohttp's bare 500
    logged as nothing but a protocol note; and a 500 logs an error event."""

    async def inflight(request: web.Request) -> web.StreamResponse:
        return InflightBlobResponse(_failed_download(error), {}, _no_remainder)

    app = web.Application(middlewares=[access_log_middleware, error_middleware])
    app.router.add_get("/inflight", inflight)
    client = await aiohttp_client(app)
    with structlog.testing.capture_logs() as logs:
        resp = await client.get("/inflight")
        body = await resp.json()
    assert resp.status == status
    assert body == {"errors": [{"code": error.code, "message": error.message}]}
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == (["request.server_error"] if logged else [])
    assert [e["event"] for e in logs if e["event"] == "http.protocol_error"] == []
