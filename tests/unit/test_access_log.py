"""The access log's metrics and event, whatever the log level (mirrorcache.api.middleware)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirrorcache.api.keys import CACHE_KEY, KIND_KEY
from mirrorcache.api.middleware import access_log_middleware
from mirrorcache.api.services import SERVICES
from mirrorcache.errors import error_middleware
from mirrorcache.metrics import MAX_CACHED_LABELS, Metrics

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
BODY = b'{"schemaVersion": 2}'


@pytest.fixture
def log_level() -> Iterator[Callable[[int], None]]:
    def set_level(level: int) -> None:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))

    yield set_level
    structlog.reset_defaults()


async def _client(aiohttp_client: ClientFactory, metrics: Metrics) -> TestClient[Any, Any]:
    async def manifest(request: web.Request) -> web.StreamResponse:
        request[KIND_KEY] = "manifest"
        request[CACHE_KEY] = "hit"
        return web.Response(body=BODY)

    app = web.Application(middlewares=[access_log_middleware, error_middleware])
    app[SERVICES] = SimpleNamespace(metrics=metrics)  # type: ignore[assignment]
    app.router.add_get("/v2/{tail:.*}", manifest)
    return await aiohttp_client(app)


def _value(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.mark.parametrize(("level", "events"), [(logging.INFO, 3), (logging.WARNING, 0)])
async def test_requests_are_counted_whether_or_not_the_event_is_written(
        aiohttp_client: ClientFactory, log_level: Callable[[int], None], level: int,
        events: int) -> None:
    """Above info the event's fields are not even built, but every request is still counted:
    requests, duration and bytes served, under the same labels."""
    log_level(level)
    metrics = Metrics()
    client = await _client(aiohttp_client, metrics)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            resp = await client.get("/v2/a/manifests/latest?token=hunter2")
            assert resp.status == 200
            assert await resp.read() == BODY
    finished = [e for e in logs if e["event"] == "request.finished"]
    assert len(finished) == events
    for e in finished:
        assert (e["status"], e["bytes"], e["cache"], e["path"]) == (
            200, len(BODY), "hit", "/v2/a/manifests/latest")
        assert e["query"] == "token=[REDACTED]"
        assert "error" not in e
    assert _value(metrics, "mirrorcache_requests_total", {
        "method": "GET", "kind": "manifest", "status": "200", "cache": "hit"}) == 3
    assert _value(metrics, "mirrorcache_request_duration_seconds_count",
                  {"kind": "manifest"}) == 3
    assert _value(metrics, "mirrorcache_served_bytes_total", {"cache": "hit"}) == 3 * len(BODY)


def test_request_finished_counts_like_the_collectors_and_keeps_few_children() -> None:
    metrics = Metrics()
    for i in range(MAX_CACHED_LABELS + 50):
        metrics.request_finished("GET", "blob", 200 + i, "miss", 0.5, 10)
        metrics.request_finished("GET", "blob", 200 + i, "miss", 0.25, 5)
    assert len(metrics._request_children) == MAX_CACHED_LABELS
    last = 200 + MAX_CACHED_LABELS + 49
    assert _value(metrics, "mirrorcache_requests_total", {
        "method": "GET", "kind": "blob", "status": str(last), "cache": "miss"}) == 2
    assert _value(metrics, "mirrorcache_request_duration_seconds_count",
                  {"kind": "blob"}) == 2 * (MAX_CACHED_LABELS + 50)
    assert _value(metrics, "mirrorcache_request_duration_seconds_sum",
                  {"kind": "blob"}) == 0.75 * (MAX_CACHED_LABELS + 50)
    assert _value(metrics, "mirrorcache_served_bytes_total",
                  {"cache": "miss"}) == 15 * (MAX_CACHED_LABELS + 50)
