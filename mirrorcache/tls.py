"""Serving HTTPS: the server-side TLS context built from the ``tls`` config section."""

from __future__ import annotations

import ssl

from mirrorcache.config import ConfigError, TlsConfig


def server_ssl_context(tls_cfg: TlsConfig | None) -> ssl.SSLContext | None:
    """A TLS 1.2+ server context for ``tls: {cert, key}``, or None to serve plain HTTP."""
    if tls_cfg is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls_cfg.cert), str(tls_cfg.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"tls: cannot load certificate {tls_cfg.cert} with key "
                           f"{tls_cfg.key}: {exc}"]) from None
    return ctx
