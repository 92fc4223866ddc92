"""Request hygiene before any routing or authentication: what no registry client sends.

aiohttp's parser already refuses malformed request lines, unknown method tokens, CR/LF/NUL in
header values, obs-folding, conflicting Content-Length/Transfer-Encoding, duplicate Host,
header lines over ``max_field_size`` and more than ``max_headers`` headers (400, plain text,
before the app sees anything). This middleware refuses, as OCI errors,
what gets through: absolute-form and asterisk-form request targets (we are not a forward
proxy), methods no registry API uses, percent-encoded control characters (``%0d%0a``,
``%00``) in the path (query values are checked by their own grammars in the handler),
oversized header sections, and repeated query parameters that would make ``ns``/``n``/``last``
ambiguous.
"""

from __future__ import annotations

import re

from aiohttp import web

from mirrorcache.errors import ErrorCode, Handler, OCIError

#: Methods of the distribution API (writes are refused later, with 405, by the /v2 handler).
KNOWN_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})
MAX_HEADER_BYTES = 32 * 1024
_SINGLE_PARAMS = {
    "ns": ErrorCode.NAME_INVALID,
    "n": ErrorCode.PAGINATION_NUMBER_INVALID,
    "last": ErrorCode.PAGINATION_NUMBER_INVALID,
    "artifactType": ErrorCode.UNSUPPORTED,
}
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@web.middleware
async def request_guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in KNOWN_METHODS:
        raise OCIError(ErrorCode.UNSUPPORTED, f"method {request.method[:16]} is not supported",
                       headers={"Allow": "GET, HEAD"})
    raw = request.raw_path
    if not raw.startswith("/") or raw.startswith("//"):
        raise OCIError(ErrorCode.UNSUPPORTED,
                       "only origin-form request targets (/v2/...) are accepted: "
                       "this mirror is not a forward proxy", status=400)
    if _has_control(request.path):
        raise OCIError(ErrorCode.NAME_INVALID,
                       "control characters (CR, LF, NUL, ...) in the request "
                       "path", status=400)
    size = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
    if size > MAX_HEADER_BYTES:
        raise OCIError(ErrorCode.UNSUPPORTED, f"request headers over {MAX_HEADER_BYTES} bytes",
                       status=431)
    if request.query_string:
        for name, code in _SINGLE_PARAMS.items():
            if len(request.query.getall(name, ())) > 1:
                raise OCIError(code, f"query parameter {name} given more than once", status=400)
    return await handler(request)


def _has_control(text: str) -> bool:
    return _CONTROL_RE.search(text) is not None
