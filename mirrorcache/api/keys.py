"""What a request carries between middlewares and handlers, as typed ``web.RequestKey`` s.

Set by the handlers and the auth middleware, read by the access log and the policy check.
Imports only for typing, so any layer that handles requests may use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from mirrorcache.auth.identity import Identity
    from mirrorcache.proxy.routing import Target

#: The (upstream, repository) the request resolved to.
TARGET_KEY: web.RequestKey[Target] = web.RequestKey("target")
#: How it was answered, for logs and metrics: hit, miss, relay, bypass, ...
CACHE_KEY: web.RequestKey[str] = web.RequestKey("cache")
#: The endpoint kind: manifest, blob, tags, referrers, base, write.
KIND_KEY: web.RequestKey[str] = web.RequestKey("kind")
#: The response was cut after its status line went out (the connection was aborted).
ABORTED_KEY: web.RequestKey[bool] = web.RequestKey("aborted")
#: Body bytes handed to the kernel so far, for responses the access log cannot measure
#: itself (sendfile, and bodies cut short).
SENT_KEY: web.RequestKey[int] = web.RequestKey("sent")
#: A streamed response, once its status line is out (the access log reports its status
#: even if the client goes away mid-body).
RESPONSE_KEY: web.RequestKey[web.StreamResponse] = web.RequestKey("response")
#: Who is calling (None: anonymous), set by the client-auth middleware.
IDENTITY_KEY: web.RequestKey[Identity | None] = web.RequestKey("identity")
