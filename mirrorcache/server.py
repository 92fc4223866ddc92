"""Running the app: one process, or a supervisor with N worker processes on one port.

Workers bind the same address with SO_REUSEPORT, so the kernel spreads connections over all
cores. They share the cache directory; a blob fetch in flight in one worker is claimed with a
lock file that the other workers tail (see storage/fs.py), so coalescing holds across them.
The supervisor cleans crash leftovers once before any worker starts, forwards SIGTERM/SIGINT
(graceful stop) and SIGHUP (reload) to the workers, and restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import multiprocess as prometheus_multiprocess

from mirrorcache.app import create_app
from mirrorcache.config import Config
from mirrorcache.connections import GuardedAppRunner
from mirrorcache.log import configure_logging
from mirrorcache.storage.fs import FilesystemBlobStore
from mirrorcache.tls import server_ssl_context

log = structlog.get_logger("mirrorcache.server")

#: Listen backlog: CI fleets open hundreds of connections at once (aiohttp's default is 128,
#: which drops SYNs under 200 simultaneous pulls; nginx uses 511).
LISTEN_BACKLOG = 1024
#: A worker that dies sooner than this after its start is restarted only after a pause.
RESTART_BACKOFF = 1.0


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """asyncio's loop by default: it sends files with zero-copy ``sendfile``, which uvloop
    lacks (aiohttp then copies every blob through user space). ``event_loop: uvloop`` (the
    ``speed`` extra) is faster for small requests such as manifests."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("server.uvloop_missing", hint="pip install 'mirrorcache[speed]'")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def serve_one(config: Config, *, worker: int | None = None) -> None:
    """Run the app in this process until SIGTERM/SIGINT (graceful: in-flight pulls finish
    within ``shutdown_grace``)."""
    configure_logging(config.log.level, config.log.format)
    check_fd_limit(config.limits.max_connections)
    app = create_app(config, clean_temp=worker is None)
    if worker is not None:
        structlog.contextvars.bind_contextvars(worker=worker)
    loop = _new_loop(config.event_loop)
    asyncio.set_event_loop(loop)
    main = loop.create_task(_run(app, config, reuse_port=worker is not None))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _run(app: web.Application, config: Config, *, reuse_port: bool) -> None:
    """What ``web.run_app`` does, with the runner that counts client connections."""
    runner = GuardedAppRunner(app, access_log=None, shutdown_timeout=config.shutdown_grace,
                              handle_signals=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.listen_host, config.listen_port,
                           ssl_context=server_ssl_context(config.tls), backlog=LISTEN_BACKLOG,
                           reuse_port=reuse_port or None)
        await site.start()
        await asyncio.Event().wait()  # until a signal raises GracefulExit
    finally:
        await runner.cleanup()


#: File descriptors kept for everything but client connections (upstream connections,
#: cache files being written and sent, the metadata store, logs).
FD_RESERVE = 256


def check_fd_limit(max_connections: int) -> None:
    """Raise the soft open-files limit towards the hard one if ``max_connections`` needs it;
    warn if even that is too low (the cap would then not stop a flood before fds run out)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = (max_connections or 0) + FD_RESERVE
    if max_connections == 0 or soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < need:
        log.warning("server.fd_limit_low", open_files=soft, max_connections=max_connections,
                    hint=f"raise ulimit -n to {need} or lower limits.max_connections to "
                         f"{max(soft - FD_RESERVE, 0)}")


def _worker_main(config: Config, index: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns ^C into SIGTERM
    # A reload request that arrives before the app installs its handler must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    serve_one(config, worker=index)


def serve(config: Config) -> int:
    """Serve with ``config.workers`` processes; returns the exit code."""
    if config.workers <= 1:
        serve_one(config)
        return 0
    configure_logging(config.log.level, config.log.format)
    asyncio.run(FilesystemBlobStore(config.storage.local_root).cleanup_temp())
    metrics_dir = _multiprocess_metrics_dir()
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    started: dict[int, float] = {}
    stopping = False

    def start(index: int) -> None:
        p = ctx.Process(target=_worker_main, args=(config, index), name=f"mirrorcache-{index}",
                        daemon=False)
        p.start()
        procs[index] = p
        started[index] = time.monotonic()
        log.info("server.worker_started", worker=index, pid=p.pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs.values():
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(config.workers):
        start(i)
    log.info("server.started", workers=config.workers,
             listen=f"{config.listen_host}:{config.listen_port}")
    while procs:
        multiprocessing.connection.wait([p.sentinel for p in procs.values()], timeout=1.0)
        for index, p in list(procs.items()):
            if p.is_alive():
                continue
            del procs[index]
            if p.pid is not None:
                prometheus_multiprocess.mark_process_dead(p.pid)  # type: ignore[no-untyped-call]
            if stopping:
                continue
            log.error("server.worker_died", worker=index, exitcode=p.exitcode)
            if time.monotonic() - started[index] < RESTART_BACKOFF:
                time.sleep(RESTART_BACKOFF)
            start(index)
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("server.stopped")
    return 0


def _multiprocess_metrics_dir() -> str | None:
    """/metrics of any worker reports the whole process group: the workers (spawned, so they
    import prometheus_client afresh) keep their values in PROMETHEUS_MULTIPROC_DIR, a fresh
    directory of ours (returned, removed at exit) unless the environment names one (emptied
    of a previous run's files)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        for leftover in Path(given).glob("*.db"):
            leftover.unlink(missing_ok=True)
        return None
    path = tempfile.mkdtemp(prefix="mirrorcache-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: mirrorcache serve")
