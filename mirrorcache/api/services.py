"""What the HTTP layer needs from the rest of the app, hung off the app under one key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from mirrorcache.lifecycle.access import AccessTracker
from mirrorcache.metrics import Metrics
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.blobs import BlobService
from mirrorcache.proxy.manifests import ManifestService
from mirrorcache.proxy.passthrough import PassthroughService
from mirrorcache.proxy.routing import Router


@dataclass(frozen=True)
class Services:
    """The services behind the routes."""

    router: Router
    manifests: ManifestService
    blobs: BlobService
    passthrough: PassthroughService
    metrics: Metrics
    #: None when ready, else the reason the mirror is degraded.
    ready: Callable[[], Awaitable[str | None]]
    #: Pull counts and times for eviction (a dict update per request).
    access: AccessTracker = field(default_factory=lambda: AccessTracker(None))
    #: Redirect mode (``storage.s3.redirect``): a presigned URL a cached blob's GET is
    #: answered with (307), after the policy and the repository gate admitted it.
    redirect: Callable[[Digest], Awaitable[str]] | None = None


SERVICES = web.AppKey("services", Services)
