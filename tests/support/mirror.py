"""Run mirrorcache in-process on a real loopback port, for real clients (skopeo) to use."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from mirrorcache.app import create_app
from mirrorcache.config import Config, parse_config
from mirrorcache.connections import GuardedAppRunner
from mirrorcache.storage.base import BlobStore


def mirror_config(root: Path, upstreams: dict[str, dict[str, Any]],
                  default: str | None = "docker.io", **extra: Any) -> dict[str, Any]:
    """A raw config dict for a mirror caching under ``root``."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "storage": {"filesystem": {"path": str(root / "cache")}},
        "upstreams": upstreams,
        "log": {"level": "warning", "format": "json"},
    }
    if default is not None:
        data["default_upstream"] = default
    data.update(extra)
    return data


class _Server(TestServer):
    """The test server with the production runner (connections counted by the app).

    aiohttp's test server cancels a handler whose client disconnects; the production server
    (``server.py``) does not, and with ``handler_cancellation=False`` neither does this one.
    """

    handler_cancellation = True

    async def _make_runner(self, **kwargs: Any) -> GuardedAppRunner:
        kwargs["handler_cancellation"] = self.handler_cancellation
        return GuardedAppRunner(self.app, **kwargs)


class Mirror:
    """``async with Mirror(raw_config) as m:`` -> a serving mirror at ``m.url`` / ``m.host``."""

    def __init__(self, raw: dict[str, Any], environ: dict[str, str] | None = None,
                 store: BlobStore | None = None, *, handler_cancellation: bool = True,
                 **app_kw: Any) -> None:
        self.config: Config = parse_config(raw, environ or {})
        self.app: web.Application = create_app(self.config, store=store, **app_kw)
        self._server = _Server(self.app, host="127.0.0.1")
        self._server.handler_cancellation = handler_cancellation

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    async def __aenter__(self) -> Mirror:
        await self._server.start_server()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._server.close()
