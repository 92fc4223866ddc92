"""A Docker-registry bearer token server (the "realm" of token auth) for tests.

It runs a plain :class:`http.server.ThreadingHTTPServer` in a daemon thread on 127.0.0.1, so
it can be used from sync session-scoped fixtures as well as from async tests.

On start it creates an EC P-256 key and a self-signed X.509 certificate and writes the
certificate to :attr:`TokenServer.cert_path`; point docker-registry's
``auth.token.rootcertbundle`` at that file. Tokens are ES256 JWTs whose ``x5c`` header holds
that certificate; Distribution 2.8.2 accepts a self-signed leaf that is itself in the bundle.

Endpoints: ``GET /token?service=..&scope=..&account=..`` (Docker token spec) and
``POST /token`` with a form body (OAuth2 password / anonymous grant; same answer shape).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: ``grant(account, type, name, requested_actions) -> granted_actions``
GrantPolicy = Callable[[str, str, str, list[str]], list[str]]


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server received (recorded before it is answered)."""

    method: str
    path: str
    query: dict[str, list[str]]
    has_authorization: bool
    account: str
    scopes: tuple[str, ...]
    service: str
    status: int = 0
    time: float = field(default=0.0, compare=False)


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """Split ``repository:foo/bar:pull,push`` into ``("repository", "foo/bar", [...])``."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Bearer token server for docker-registry token auth, in a background thread.

    ``require_basic=(user, password)`` makes requests without those Basic credentials get 401;
    otherwise anonymous requests are granted every requested action (pull, push, ...).
    ``grant`` can override which actions are granted. Every request is recorded in
    :attr:`requests` (a snapshot list) so tests can count token fetches.
    """

    def __init__(
        self,
        *,
        issuer: str = "test-issuer",
        expires_in: int = 300,
        require_basic: tuple[str, str] | None = None,
        grant: GrantPolicy | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.issuer = issuer
        self.expires_in = expires_in
        self.require_basic = require_basic
        self.grant = grant
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="mirrorcache-tokens-")
            workdir = Path(self._own_dir.name)
        self.workdir = Path(workdir)
        self.cert_path = self.workdir / "token-cert.pem"
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _self_signed_cert(self._key, issuer)
        self._x5c = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> TokenServer:
        """Write the certificate and start serving on 127.0.0.1:<free port>."""
        if self._server is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="token-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (the certificate file stays until the object is closed)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        """Stop and remove the temporary directory if this object created it."""
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The port the server listens on (only while started)."""
        if self._server is None:
            raise RuntimeError("token server is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        """The token endpoint URL to configure as ``auth.token.realm``."""
        return f"{self.url}/token"

    # -- recording -------------------------------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        """Snapshot of every token request so far (thread-safe)."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        """Forget recorded requests."""
        with self._lock:
            self._requests.clear()

    def count(self, *, authorized: bool | None = None, scope_contains: str | None = None) -> int:
        """Number of recorded requests, optionally filtered."""
        return sum(
            1
            for r in self.requests
            if (authorized is None or r.has_authorization == authorized)
            and (scope_contains is None or any(scope_contains in s for s in r.scopes))
        )

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self._requests.append(req)

    # -- tokens ----------------------------------------------------------------------------

    def issue_token(
        self, scopes: Sequence[str], *, service: str = "test-registry", account: str = ""
    ) -> dict[str, Any]:
        """Build the JSON answer of the token endpoint for the given scopes."""
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            kind, name, actions = parsed
            granted = self.grant(account, kind, name, actions) if self.grant else actions
            access.append({"type": kind, "name": name, "actions": list(granted)})
        claims = {
            "iss": self.issuer,
            "sub": account,
            "aud": service,
            "exp": int(now.timestamp()) + self.expires_in,
            "nbf": int(now.timestamp()) - 5,
            "iat": int(now.timestamp()),
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": [self._x5c]})
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": now.isoformat().replace("+00:00", "Z"),
        }

    def _check_basic(self, header: str | None) -> tuple[bool, str]:
        """Return (allowed, account) for an Authorization header value."""
        user = ""
        password = None
        if header and header.lower().startswith("basic "):
            try:
                raw = base64.b64decode(header[6:].strip()).decode()
                user, _, password = raw.partition(":")
            except (ValueError, UnicodeDecodeError):
                return False, ""
        if self.require_basic is None:
            return True, user
        return (user, password) == self.require_basic, user


def _self_signed_cert(key: ec.EllipticCurvePrivateKey, issuer: str) -> x509.Certificate:
    """A self-signed cert (no EKU extension, so Go's chain check accepts any usage)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{issuer} token signer")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


class _QuietServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that does not print tracebacks when a client resets a socket."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _make_handler(owner: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the default stderr access log."""

        def do_GET(self) -> None:
            split = urlsplit(self.path)
            self._answer(split.path, parse_qs(split.query), "GET")

        def do_POST(self) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode()) if length else {}
            self._answer(split.path, form, "POST")

        def _answer(self, path: str, query: dict[str, list[str]], method: str) -> None:
            auth = self.headers.get("Authorization")
            service = (query.get("service") or ["test-registry"])[0]
            scopes = tuple(s for v in query.get("scope", []) for s in v.split(" ") if s)
            if method == "POST" and query.get("grant_type") == ["password"]:
                creds = f"{query.get('username', [''])[0]}:{query.get('password', [''])[0]}"
                auth = "Basic " + base64.b64encode(creds.encode()).decode()
            ok, user = owner._check_basic(auth)
            account = (query.get("account") or [user])[0] or user
            if path.rstrip("/") != "/token":
                status, body, extra = 404, {"errors": [{"code": "NOT_FOUND"}]}, {}
            elif not ok:
                status = 401
                body = {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
                extra = {"WWW-Authenticate": 'Basic realm="test-token-server"'}
            else:
                status, body, extra = (
                    200,
                    owner.issue_token(scopes, service=service, account=account),
                    {},
                )
            owner._record(
                TokenRequest(
                    method=method,
                    path=path,
                    query=query,
                    has_authorization=self.headers.get("Authorization") is not None,
                    account=account,
                    scopes=scopes,
                    service=service,
                    status=status,
                    time=dt.datetime.now(dt.UTC).timestamp(),
                )
            )
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler
