"""The one wiring point: routes, middlewares and every long-lived resource of the app."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import aiohttp
import structlog
from aiohttp import web

from mirrorcache.api.access import POLICY
from mirrorcache.api.guard import request_guard_middleware
from mirrorcache.api.handlers import add_routes
from mirrorcache.api.middleware import access_log_middleware
from mirrorcache.api.services import SERVICES, Services
from mirrorcache.auth.authenticator import Authenticator
from mirrorcache.auth.limiter import FailedLoginLimiter
from mirrorcache.auth.middleware import CLIENT_AUTH, ClientAuth, client_auth_middleware
from mirrorcache.cluster.client import PeerClient
from mirrorcache.cluster.endpoint import add_peer_routes
from mirrorcache.cluster.membership import Membership
from mirrorcache.coalesce import Coalescer
from mirrorcache.config import Config, S3StorageConfig
from mirrorcache.connections import CONNECTIONS, ConnectionGuard, connection_limit_middleware
from mirrorcache.errors import error_middleware
from mirrorcache.lifecycle.access import AccessTracker
from mirrorcache.lifecycle.db import LifecycleDB
from mirrorcache.lifecycle.space import SpaceGuard, SpaceGuardedStore
from mirrorcache.lifecycle.sweeper import Sweeper, background
from mirrorcache.log import ProtocolLogger
from mirrorcache.metrics import Metrics
from mirrorcache.oci.reference import Digest
from mirrorcache.policy_reload import PolicyHolder, policy_reloading
from mirrorcache.proxy.blobs import BlobService
from mirrorcache.proxy.manifests import ManifestService
from mirrorcache.proxy.passthrough import PassthroughService
from mirrorcache.proxy.routing import Router
from mirrorcache.proxy.upstreams import Upstreams
from mirrorcache.proxy.visibility import RepositoryGate
from mirrorcache.storage.base import BlobStore, FetchClaims, Janitor, StorageError
from mirrorcache.storage.fs import FilesystemBlobStore
from mirrorcache.storage.metadata import Metadata, MetadataStore
from mirrorcache.storage.s3 import S3BlobStore
from mirrorcache.storage.s3_metadata import S3Metadata
from mirrorcache.storage.tiered import TieredBlobStore, open_s3_store
from mirrorcache.upstream.client import UpstreamClient
from mirrorcache.upstream.registry import RegistryClient

log = structlog.get_logger("mirrorcache.app")

USER_AGENT = "mirrorcache/0.1 (+pull-through registry mirror)"


JANITOR_INTERVAL = 300.0
#: Bytes the readiness probe writes: an empty file can be created on a full disk.
PROBE_BYTES = 4096


def _probe_storage(tmp: os.PathLike[str]) -> None:
    fd, name = tempfile.mkstemp(dir=tmp, suffix=".probe")
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
    finally:
        os.close(fd)
        os.unlink(name)


async def _janitor(store: Janitor) -> None:
    """Periodically remove partial files orphaned by a crashed worker."""
    while True:
        await asyncio.sleep(JANITOR_INTERVAL)
        try:
            await store.cleanup_orphans()
        except (OSError, StorageError) as exc:
            log.warning("storage.janitor_failed", error=str(exc))


#: A readiness probe waits this long for HeadBucket (retries included).
READY_S3_TIMEOUT = 5.0
#: How often the S3 janitor looks for multipart uploads a crashed process left behind.
S3_JANITOR_INTERVAL = 3600.0


async def _abort_stale_uploads(s3: S3BlobStore, cfg: S3StorageConfig) -> None:
    try:
        await s3.abort_stale_uploads(cfg.stale_upload_age)
    except StorageError as exc:
        log.warning("storage.janitor_failed", error=str(exc))


async def _s3_janitor(s3: S3BlobStore, cfg: S3StorageConfig) -> None:
    """Abort stale multipart uploads (a crashed replica's), periodically."""
    while True:
        await asyncio.sleep(S3_JANITOR_INTERVAL)
        await _abort_stale_uploads(s3, cfg)


SWEEPER = web.AppKey("sweeper", Sweeper)
MEMBERSHIP = web.AppKey("membership", Membership)


def _lifecycle(config: Config, store: BlobStore, meta: Metadata, metrics: Metrics,
               wall_clock: Callable[[], float]) -> tuple[Sweeper | None, AccessTracker]:
    """The access tracker and the sweeper of the filesystem cache (tracking off, no
    sweeper, if the lifecycle database cannot be opened: the mirror serves regardless)."""
    try:
        db = LifecycleDB(config.storage.metadata_path)
    except (sqlite3.Error, OSError) as exc:
        log.error("lifecycle.db_unavailable", error=str(exc))
        return None, AccessTracker(None)
    tracker = AccessTracker(db, clock=wall_clock)
    root = config.storage.fs_path
    metrics.cache_limit.set(config.storage.limits.max_size or 0)
    return Sweeper(store, db, meta, limits=config.storage.limits,
                   retention=config.retention, lifecycle=config.lifecycle,
                   pins=config.pins, lock_dir=root, tracker=tracker, metrics=metrics,
                   free_path=root, clock=wall_clock), tracker


def _presigner(s3: S3BlobStore, expiry: float) -> Callable[[Digest], Awaitable[str]]:
    async def presign(digest: Digest) -> str:
        return await s3.presigned_url(digest, expiry)
    return presign


def create_app(config: Config, *, clean_temp: bool = True,
               store: BlobStore | None = None,
               clock: Callable[[], float] = time.monotonic,
               wall_clock: Callable[[], float] = time.time) -> web.Application:
    """Build the application for ``config``; resources open and close with the app.

    ``store`` replaces the configured blob store (tests inject failing stores here);
    ``clock`` times the storage-bypass window (tests inject a controllable one);
    ``wall_clock`` stamps pulls and decides retention (tests inject one).
    """
    app = web.Application(
        middlewares=[access_log_middleware, connection_limit_middleware, error_middleware,
                     request_guard_middleware, client_auth_middleware],
        client_max_size=1024 * 1024,
        handler_args={"max_line_size": 8190, "max_field_size": 8190,
                      "logger": ProtocolLogger()},
    )
    app[CONNECTIONS] = ConnectionGuard(config.limits.max_connections,
                                       config.limits.max_connections_per_client,
                                       config.limits.send_timeout)
    authenticator = Authenticator(config.auth.users, config.auth.tokens, config.auth.groups)
    app[CLIENT_AUTH] = ClientAuth(
        enabled=config.auth.enabled, realm=config.auth.realm, authenticator=authenticator,
        limiter=FailedLoginLimiter(config.auth.max_failed_logins,
                                   config.auth.failed_login_window),
    )
    app.on_cleanup.append(lambda _: authenticator.aclose())
    app[POLICY] = PolicyHolder(config.policy.policy, config.policy.file)
    add_routes(app)
    if config.cluster.enabled:
        add_peer_routes(app, config.cluster.secret)

    async def policy_reload(app: web.Application) -> AsyncIterator[None]:
        async with policy_reloading(app[POLICY], config.policy.reload_interval):
            membership = app.get(MEMBERSHIP)
            if membership is not None:
                # One SIGHUP handler reloads the policy and the static peer list.
                def reload_all() -> None:
                    app[POLICY].reload("sighup")
                    membership.reload()

                try:
                    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_all)
                except (NotImplementedError, RuntimeError, ValueError) as exc:
                    log.warning("cluster.sighup_unavailable", error=str(exc))
            yield

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            async for _ in _resources(app, stack):
                yield

    async def _resources(app: web.Application, stack: contextlib.AsyncExitStack
                         ) -> AsyncIterator[None]:
        s3cfg = config.storage.s3
        s3: S3BlobStore | None = None
        blob_store: BlobStore
        if store is not None:
            blob_store = store
        elif s3cfg is not None:
            if clean_temp:  # spools a killed process left in this host's tier / spool dir
                with contextlib.suppress(StorageError):
                    await FilesystemBlobStore(config.storage.local_root).cleanup_temp()
            opened = await stack.enter_async_context(
                open_s3_store(s3cfg, config.storage.local_root / "tmp"))
            s3 = opened.remote if isinstance(opened, TieredBlobStore) else opened
            blob_store = opened
        else:
            blob_store = FilesystemBlobStore(config.storage.fs_path)
        # The optional capabilities, wired here and nowhere else.
        claims = blob_store if isinstance(blob_store, FetchClaims) else None
        janitor_of = blob_store if isinstance(blob_store, Janitor) else None
        if clean_temp and janitor_of is not None:
            try:
                await janitor_of.cleanup_temp()
            except StorageError as exc:
                log.error("storage.cleanup_failed", error=str(exc))
        meta: MetadataStore
        if s3 is not None and s3cfg is not None:
            meta = S3Metadata(s3, ttl=s3cfg.metadata_ttl)
            await _abort_stale_uploads(s3, s3cfg)
        else:
            meta = Metadata(config.storage.metadata_path)
        metrics = Metrics()
        if config.storage.filesystem is not None and isinstance(meta, Metadata):
            sweeper, tracker = _lifecycle(config, blob_store, meta, metrics, wall_clock)
        else:
            # The sweeper deletes blobs: never let it loose on a bucket other replicas share.
            # The local tier is bounded by storage.s3.local_cache.max_size instead.
            log.info("lifecycle.disabled", reason="storage.s3: eviction and retention run on "
                     "the filesystem backend only; the local tier evicts by its own max_size")
            sweeper, tracker = None, AccessTracker(None)
        if sweeper is not None and config.storage.limits.limited:
            blob_store = cast(BlobStore, SpaceGuardedStore(
                blob_store, SpaceGuard(sweeper, config.storage.limits)))
        # No pool limit here: each UpstreamClient bounds its own requests in flight
        # (max_connections, waited for at most pool_timeout), so a wait for a connection is
        # never mistaken for an upstream failure. Bodies are asked for and read as identity.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
        session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            read_bufsize=1 << 20, trust_env=False, auto_decompress=False,
        )
        upstreams = Upstreams({
            name: RegistryClient(UpstreamClient(cfg, session, metrics))
            for name, cfg in config.upstreams.items()
        })
        configs = dict(config.upstreams)
        coalescer = Coalescer()
        gate = RepositoryGate(configs, meta)
        owners: PeerClient | None = None
        if config.cluster.enabled:
            membership = Membership(config.cluster, session, metrics,
                                    scheme="https" if config.tls else "http")
            app[MEMBERSHIP] = membership
            owners = PeerClient(membership, session, metrics)
        manifests = ManifestService(upstreams, configs, blob_store, meta, coalescer, metrics,
                                    gate, claims=claims, owners=owners)
        blobs = BlobService(upstreams, configs, blob_store, meta, metrics, gate, clock=clock,
                            claims=claims, owners=owners,
                            drop_behind=config.storage.drop_behind)

        async def ready() -> str | None:
            """None when ready, else why the mirror is degraded (it keeps serving)."""
            try:
                await asyncio.to_thread(_probe_storage, config.storage.local_root / "tmp")
            except OSError as exc:
                return f"storage not writable: {exc.strerror or exc}"
            if s3 is not None:
                try:
                    async with asyncio.timeout(READY_S3_TIMEOUT):
                        await s3.check()
                except StorageError as exc:
                    return f"S3 bucket unreachable, serving uncached: {exc}"
                except TimeoutError:
                    return (f"S3 bucket unreachable, serving uncached: HeadBucket took more "
                            f"than {READY_S3_TIMEOUT:g}s")
            return blobs.storage_problem() or meta.problem()

        app[SERVICES] = Services(
            router=Router(config.upstreams, config.default_upstream),
            manifests=manifests,
            blobs=blobs,
            passthrough=PassthroughService(upstreams, configs),
            metrics=metrics,
            ready=ready,
            access=tracker,
            redirect=(_presigner(s3, s3cfg.redirect_expiry)
                      if s3 is not None and s3cfg is not None and s3cfg.redirect else None),
        )
        # The loop really running (uvloop or asyncio), not the one configured.
        loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
        log.info("app.started", upstreams=sorted(config.upstreams),
                 storage=(f"s3://{s3cfg.bucket}/{s3.prefix}" if s3 is not None and s3cfg
                          else str(config.storage.local_root)), event_loop=loop)
        tasks = []
        if owners is not None:
            tasks.append(asyncio.create_task(owners.membership.run()))
            log.info("cluster.started", member=config.cluster.self_address,
                     members=owners.membership.configured(),
                     dns=config.cluster.dns)
        if s3 is not None and s3cfg is not None:
            tasks.append(asyncio.create_task(_s3_janitor(s3, s3cfg)))
        if janitor_of is not None:
            tasks.append(asyncio.create_task(_janitor(janitor_of)))
        if sweeper is not None:
            app[SWEEPER] = sweeper
            tasks.append(asyncio.create_task(background(
                sweeper, tracker, flush_interval=config.lifecycle.flush_interval,
                sweep_interval=config.lifecycle.sweep_interval)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await tracker.flush()
            if sweeper is not None:
                sweeper.db.close()
            await blobs.aclose()
            await manifests.aclose()
            await coalescer.aclose()
            await session.close()
            meta.close()
            log.info("app.stopped")

    app.cleanup_ctx.append(resources)
    app.cleanup_ctx.append(policy_reload)
    return app
