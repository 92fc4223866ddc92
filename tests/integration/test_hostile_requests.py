"""A table of hostile requests against a running mirror, sent as raw bytes.

Each case asserts the status and, where the body is OCI JSON, the error code. At the end no
request has reached an upstream, nothing was created outside (or inside) the cache root, and
no response leaked a file from outside it. Cases aiohttp's parser refuses before the app sees
them (CR/LF/NUL in header values, folding, over-long lines, too many headers, smuggling
attempts) get a plain-text 400 (``code=PROTOCOL``: status asserted, no JSON expected).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.countingproxy import CountingProxy
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.secure import write_htpasswd

pytestmark = pytest.mark.integration

PROTOCOL = "PROTOCOL"  # refused by the HTTP parser: plain-text 400, no OCI body
SHA = "sha256:" + "a" * 64
SECRET = "TOP-SECRET-OUTSIDE-CACHE"


@dataclass(frozen=True)
class Case:
    raw: bytes
    status: int
    code: str | None

    @property
    def label(self) -> str:
        return self.raw.split(b"\r\n", 1)[0][:100].decode("latin-1")


def req(target: str | bytes, method: str = "GET", headers: bytes = b"") -> bytes:
    t = target.encode("latin-1") if isinstance(target, str) else target
    return (method.encode() + b" " + t + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers
            + b"Connection: close\r\n\r\n")


def case(target: str | bytes, status: int, code: str | None, method: str = "GET",
         headers: bytes = b"") -> list[Case]:
    """The request as GET (and as HEAD, which has no body to check) unless ``method``."""
    cases = [Case(req(target, method, headers), status, code)]
    if method == "GET":
        cases.append(Case(req(target, "HEAD", headers), status,
                          PROTOCOL if code == PROTOCOL else None))
    return cases


BAD_NAMES = [
    "Library/alpine", "library/ALPINE", "-alpine", "alpine-", "_alpine", "a..b", "a/-b",
    "a/.b", "a/b.", "a___b", "a/b/", "a" * 256, "/".join(["abcdefghij"] * 24) + "/abcdefghijk",
    "library/alp:ine", "docker.io/UPPER/x", "docker.io/a_-b",
]
PATH_ESCAPES = [
    "/v2/../../etc/passwd/manifests/latest", "/v2/library/../../x/manifests/v1",
    "/v2/./library/alpine/manifests/v1", "/v2/library/./alpine/blobs/" + SHA,
    "/v2/library//alpine/manifests/v1", "/v2/%2e%2e/%2e%2e/secret/manifests/v1",
    "/v2/%2E%2E/secret/manifests/v1", "/v2/library%2falpine/manifests/v1",
    "/v2/library%2Falpine/manifests/v1", "/v2/library/alpine/manifests/..%2f..%2fsecret",
    "/v2/library/alpine/blobs/..%2F" + SHA, "/v2/%252e%252e/secret/manifests/v1",
    "/v2/library/alpine%00/manifests/v1", "/v2/library/alpine/manifests/v1%00",
    "/v2/library\\alpine/manifests/v1", "/v2/library/alpine/manifests/v1;x=y",
    "/v2/library/alpine/manifests/%0d%0aSet-Cookie:x", "/v2/..%c0%af../secret/manifests/v1",
    "/v2/library/alpine/manifests/v1#frag", "/v2/~root/manifests/v1",
    "/v2/library/alpine/manifests/v1%20", "/v2/library/alpine/manifests/%2e%2e",
    "/v2/..", "/v2/../", "/v2/library/alpine/..", "/v2/library/alpine/blobs/..",
    "/v2/library/alpine/manifests/..", "/v2/library/alpine/blobs/uploads/",
    "/v2/library/alpine/blobs/uploads/abc",
]
# Neither a tag nor a digest, in characters a path may hold: no such manifest (404, as the
# OCI conformance suite expects for ".INVALID_MANIFEST_NAME"), without asking upstream.
UNNAMEABLE_TAGS = [".x", "-x", "x" * 129, ".INVALID_MANIFEST_NAME", "-", ".v1.0"]
# Characters no name, tag or digest may hold: the path itself is refused.
BAD_TAGS = ["v1+build", "v1@x", "v1!", "v1$", "v1%2F", "v1%2e%2e", "%2e%2e", ".", ".."]
BAD_DIGESTS = [
    "sha1:" + "a" * 40, "md5:" + "a" * 32, "sha384:" + "a" * 96, "sha256:" + "a" * 63,
    "sha256:" + "a" * 65, "sha256:" + "A" * 64, "sha256:" + "g" * 64, "sha512:" + "a" * 64,
    "sha256:", ":" + "a" * 64, "SHA256:" + "a" * 64, "sha256+b64:" + "a" * 64,
    "sha256:" + "a" * 64 + ":x", "sha256:" + "a" * 32 + "..",
]
BAD_NS = [
    "docker.io%0d%0aX-Injected:1", "docker.io%00", "..", "a" * 300,
    "127.0.0.1:99999999", "docker.io/../x", "docker.io%2F..%2Fx", "-bad.io", "docker.io:",
    "http://docker.io", "%2e%2e",
]
BAD_PAGE = [
    ("n=-1", "PAGINATION_NUMBER_INVALID"), ("n=abc", "PAGINATION_NUMBER_INVALID"),
    ("n=10001", "PAGINATION_NUMBER_INVALID"), ("n=1e3", "PAGINATION_NUMBER_INVALID"),
    ("n=99999999999999999999", "PAGINATION_NUMBER_INVALID"), ("n=", "PAGINATION_NUMBER_INVALID"),
    ("n=%0d%0a1", "PAGINATION_NUMBER_INVALID"), ("n=%C2%B2", "PAGINATION_NUMBER_INVALID"),
    ("n=%EF%BC%91", "PAGINATION_NUMBER_INVALID"), ("n=1&n=2", "PAGINATION_NUMBER_INVALID"),
    ("last=..%2f..%2fx", "TAG_INVALID"), ("last=" + "x" * 200, "TAG_INVALID"),
    ("last=a%0d%0ab", "TAG_INVALID"), ("last=", "TAG_INVALID"), ("last=a&last=b",
                                                                 "PAGINATION_NUMBER_INVALID"),
]


def table() -> list[Case]:
    cases: list[Case] = []
    for name in BAD_NAMES:
        for suffix in ("manifests/v1", f"blobs/{SHA}", "tags/list", f"referrers/{SHA}"):
            cases += case(f"/v2/{name}/{suffix}", 400, "NAME_INVALID")
    for target in PATH_ESCAPES:
        cases += case(target, 405 if "/uploads" in target else 400, None)
    for tag in UNNAMEABLE_TAGS:
        cases += case(f"/v2/library/alpine/manifests/{tag}", 404, "MANIFEST_UNKNOWN")
    for tag in BAD_TAGS:
        cases += case(f"/v2/library/alpine/manifests/{tag}", 400, "NAME_INVALID")
    for digest in BAD_DIGESTS:
        for suffix in ("manifests", "blobs", "referrers"):
            cases += case(f"/v2/library/alpine/{suffix}/{digest}", 400, "DIGEST_INVALID"
                          if ":" in digest[:8] and "+" not in digest and "SHA" not in digest
                          and not digest.startswith(":") else None)
    for ns in BAD_NS:
        cases += case(f"/v2/library/alpine/manifests/v1?ns={ns}", 400, "NAME_INVALID")
    cases += case("/v2/library/alpine/manifests/v1?ns=quay.io&ns=docker.io", 400, "NAME_INVALID")
    for ns in ("evil.example.com", "127.0.0.1:1", "169.254.169.254", "localhost"):
        cases += case(f"/v2/library/alpine/manifests/v1?ns={ns}", 404, "NAME_UNKNOWN")
        cases += case(f"/v2/{ns}/library/alpine/blobs/{SHA}", 404, "NAME_UNKNOWN")
    for query, code in BAD_PAGE:
        cases += case(f"/v2/library/alpine/tags/list?{query}", 400, code)
    for at in ("x", "a/b/c", "%0d%0a", "a" * 300 + "/b", "../x"):
        cases += case(f"/v2/library/alpine/referrers/{SHA}?artifactType={at}", 400,
                      "UNSUPPORTED")
    cases += case(f"/v2/library/alpine/referrers/{SHA}?artifactType=a/b&artifactType=c/d", 400,
                  "UNSUPPORTED")
    # Methods: writes 405 UNSUPPORTED (on the /v2/ ping an anonymous caller is first asked
    # to authenticate); methods no registry uses, 405; unknown tokens never pass the parser.
    for method in ("PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "MKCOL",
                   "LOCK", "COPY", "MOVE"):
        writes = method in ("PUT", "POST", "PATCH", "DELETE", "OPTIONS")
        cases += case("/v2/", 401 if writes else 405, "UNAUTHORIZED" if writes else
                      "UNSUPPORTED", method=method)
        for target in ("/v2/library/alpine/manifests/v1", f"/v2/library/alpine/blobs/{SHA}",
                       "/v2/library/alpine/blobs/uploads/", "/healthz"):
            cases += case(target, 405, "UNSUPPORTED", method=method)
    cases += case("/v2/", 405, "UNSUPPORTED", method="CONNECT")
    cases += case("127.0.0.1:443", 405, "UNSUPPORTED", method="CONNECT")
    for method in ("FOO", "get", "G\x00T", "GET\x7f"):
        cases += case("/v2/", 400, PROTOCOL, method=method)
    # Request targets: absolute-form and asterisk-form are refused, as are broken lines.
    for target in ("http://evil.example/v2/library/alpine/manifests/v1",
                   "https://127.0.0.1/v2/", "http://127.0.0.1:1/v2/library/alpine/blobs/" + SHA,
                   "//evil.example/v2/"):
        cases += case(target, 400, "UNSUPPORTED")
    cases += case("*", 400, PROTOCOL)
    cases += case("*", 400, "UNSUPPORTED", method="OPTIONS")
    for raw_line in (b"v2/", b"/v2/\t", b"/v2/library/\xc3\xa4/manifests/v1", b"/v2/ x",
                     b"/v2/" + b"a" * 9000, b"/v2/\x00"):
        cases += case(raw_line, 400, PROTOCOL)
    for version in (b"HTTP/9.9", b"HTTP/1.1x", b"HTTPS/1.1", b"HTTP/1"):
        cases.append(Case(b"GET /v2/ " + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n",
                          400, PROTOCOL))
    # Headers: CRLF injection, NUL, folding, over-long and too many, smuggling attempts.
    for header in (b"X-A: a\rb\r\n", b"X-A: a\nInjected: b\r\n", b"X-A: a\x00b\r\n",
                   b"X-A: a\r\n folded\r\n", b"Bad Header: x\r\n", b"X-A: " + b"a" * 9000 +
                   b"\r\n", b"".join(b"X-%d: a\r\n" % i for i in range(200)),
                   b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                   b"Content-Length: 1\r\nContent-Length: 2\r\n", b"Host: evil\r\n",
                   b"Content-Length: -1\r\n", b"Transfer-Encoding: gzip, chunked, x\r\n",
                   b"Authorization: Basic Og==\r\n\r\n"[:-2] + b"\x01\r\n"):
        for target in ("/v2/", "/v2/library/alpine/manifests/v1"):
            cases += case(target, 400, PROTOCOL, headers=header)
    # Many mid-sized headers, each under the line limit: refused by total size.
    cases += case("/v2/library/alpine/manifests/v1", 431, "UNSUPPORTED",
                  headers=b"".join(b"X-%d: %s\r\n" % (i, b"a" * 4000) for i in range(20)))
    # Garbage credentials: 401 with the challenge, whatever the path.
    for auth in (b"Basic !!!", b"Basic " + b"QQ==", b"Digest x", b"Bearer nope",
                 b"Basic YWxpY2U6d3Jvbmc=", b"Bearer " + b"x" * 4000, b"Negotiate abc"):
        for target in ("/v2/", "/v2/library/alpine/manifests/v1",
                       f"/v2/library/alpine/blobs/{SHA}"):
            cases += case(target, 401, "UNAUTHORIZED",
                          headers=b"Authorization: " + auth + b"\r\n")
    return cases


TABLE = table()


async def send_raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def snapshot(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.stat().st_size
    return out


@pytest.fixture
async def mirror(tmp_path: Path, registry: RegistryProcess) -> AsyncIterator[
        tuple[Mirror, CountingProxy, CountingProxy]]:
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "manifest").write_text(SECRET)
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "pw"})
    async with CountingProxy(registry.url) as hub, CountingProxy(registry.url) as quay:
        raw = mirror_config(tmp_path, {"docker.io": {"url": hub.url}, "quay.io": {"url": quay.url}},
                            auth={"enabled": True, "htpasswd": str(htpasswd),
                                  "max_failed_logins": 0},
                            policy={"rules": [{"allow": "docker.io/**", "anonymous": True},
                                              {"allow": "quay.io/**", "anonymous": True}]})
        async with Mirror(raw) as m:
            yield m, hub, quay


def test_table_is_big() -> None:
    assert len(TABLE) >= 300


async def test_hostile_requests(mirror: tuple[Mirror, CountingProxy, CountingProxy],
                                tmp_path: Path) -> None:
    m, hub, quay = mirror
    port = int(m.host.rsplit(":", 1)[1])
    before = snapshot(tmp_path)
    failures = []
    for c in TABLE:
        status, headers, body = await send_raw(port, c.raw)
        problem = None
        if status != c.status:
            problem = f"status {status} != {c.status}"
        elif c.code == PROTOCOL:
            if headers.get("content-type", "").startswith("application/json"):
                problem = "expected a parser-level refusal"
        elif body or c.raw.startswith(b"GET"):
            try:
                code = json.loads(body)["errors"][0]["code"]
            except (ValueError, KeyError, IndexError):
                problem = f"no OCI error body: {body[:80]!r}"
            else:
                if c.code is not None and code != c.code:
                    problem = f"code {code} != {c.code}"
        if status == 401 and "www-authenticate" not in headers:
            problem = "401 without a challenge"
        if SECRET.encode() in body:
            problem = "leaked a file from outside the cache root"
        if problem:
            failures.append(f"{c.label!r}: {problem}")
    assert failures == [], "\n".join(failures)
    assert hub.requests == [] and quay.requests == []
    assert snapshot(tmp_path) == before


async def test_table_control(mirror: tuple[Mirror, CountingProxy, CountingProxy]) -> None:
    """The same harness, a well-formed request: it does reach the upstream (so zero above
    means refused, not miswired)."""
    m, hub, _ = mirror
    port = int(m.host.rsplit(":", 1)[1])
    status, _, _ = await send_raw(port, req("/v2/library/nosuchimage/manifests/v1"))
    assert status == 404
    assert hub.count(kind="manifest") >= 1
