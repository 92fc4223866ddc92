"""Helpers for policy/auth/TLS tests: htpasswd files, a test CA, a mirror serving HTTPS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bcrypt
import trustme
from aiohttp.test_utils import TestServer

from mirrorcache.tls import server_ssl_context
from tests.support.mirror import Mirror


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """An htpasswd file with bcrypt ($2y$, cost 4: fast tests) entries."""
    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
        lines.append(f"{user}:{hashed.replace('$2b$', '$2y$', 1)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class TestCA:
    """A private CA (trustme) with a server certificate for 127.0.0.1.

    ``cert_dir`` holds only ``ca.crt`` (what skopeo's ``--src-cert-dir`` and Docker's
    ``/etc/docker/certs.d/<host:port>/`` expect); ``cert``/``key`` are for ``tls:``.
    """

    __test__ = False

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("127.0.0.1")
        self.cert = root / "server.pem"
        self.key = root / "server.key"
        leaf.private_key_pem.write_to_path(str(self.key))
        self.cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        self.cert_dir = root / "certs.d"
        self.cert_dir.mkdir(exist_ok=True)
        self.ca_file = self.cert_dir / "ca.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    @property
    def tls_config(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}


class TlsMirror(Mirror):
    """A :class:`Mirror` serving HTTPS with the context built from the config's ``tls``."""

    def __init__(self, raw: dict[str, Any], environ: dict[str, str] | None = None) -> None:
        super().__init__(raw, environ)
        self._ssl = server_ssl_context(self.config.tls)
        assert self._ssl is not None, "TlsMirror needs a tls: section"
        self._server = TestServer(self.app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    async def __aenter__(self) -> TlsMirror:
        await self._server.start_server(ssl=self._ssl)
        return self
