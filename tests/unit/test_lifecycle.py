"""Lifecycle units: size/fraction parsing, config validation, pins, the planner, the
access tracker's merge across processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrorcache.config import ConfigError, parse_config, parse_fraction, parse_size
from mirrorcache.lifecycle.access import AccessTracker
from mirrorcache.lifecycle.db import LifecycleDB
from mirrorcache.lifecycle.pins import Pins
from mirrorcache.lifecycle.plan import build_units, plan_eviction
from mirrorcache.oci.reference import Digest


def test_sizes_binary_and_decimal() -> None:
    assert parse_size("500GiB") == 500 << 30
    assert parse_size("200GB") == 200 * 10**9
    assert parse_size("1.5MiB") == 3 << 19
    assert parse_size(1024) == 1024
    for bad in ("10 parsecs", "-1", True, "GiB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_fraction("90%") == 0.9
    assert parse_fraction(0.8) == 0.8
    with pytest.raises(ValueError):
        parse_fraction("120%")


def _raw(**extra: object) -> dict[str, object]:
    return {"storage": {"filesystem": {"path": "/tmp/x"}},
            "upstreams": {"docker.io": {"url": "https://registry-1.docker.io"}}, **extra}


def test_config_keys_and_problems() -> None:
    raw = _raw(retention={"unused_for": "30d"}, pins=["docker.io/library/python:3.12*"],
               lifecycle={"sweep_interval": "1m"})
    raw["storage"] = {"filesystem": {"path": "/tmp/x"}, "max_size": "1GiB",  # type: ignore[index]
                      "high_watermark": "90%", "low_watermark": "80%", "min_free": "1GB"}
    cfg = parse_config(raw, {})
    assert cfg.storage.limits.max_size == 1 << 30 and cfg.storage.limits.min_free == 10**9
    assert cfg.retention.unused_for == 30 * 86400 and cfg.lifecycle.sweep_interval == 60
    assert cfg.pins == ("docker.io/library/python:3.12*",)
    bad = _raw(pins=["python"], lifecycle={"protect_recent": "1s", "flush_interval": "10s"})
    bad["storage"] = {"filesystem": {"path": "/tmp/x"}, "max_size": "lots",  # type: ignore[index]
                      "high_watermark": "70%", "low_watermark": "80%"}
    with pytest.raises(ConfigError) as err:
        parse_config(bad, {})
    text = "\n".join(err.value.problems)
    for key in ("storage.max_size", "storage.low_watermark", "pins",
                "lifecycle.protect_recent"):
        assert key in text


def test_pins_globs_and_digests() -> None:
    d = Digest("sha256", "a" * 64)
    pins = Pins(["docker.io/library/python:3.12*", f"quay.io/org/app@{d}"])
    assert pins.matches("docker.io", "library/python", "3.12-slim", None)
    assert not pins.matches("docker.io", "library/python", "3.11", None)
    assert pins.matches("quay.io", "org/app", None, d)
    assert not pins.matches("quay.io", "org/app", "latest", Digest("sha256", "b" * 64))


def test_planner_lru_images_shared_blob_pins_and_retention() -> None:
    blobs = {"m1": 10, "m2": 10, "m3": 10, "a": 100, "b": 100, "c": 100, "shared": 100,
             "loose": 50}
    refs = {"m1": ["a", "shared"], "m2": ["b", "shared"], "m3": ["c"]}
    access = {"m1": (100.0, 1, True), "m2": (300.0, 1, True), "m3": (200.0, 1, True),
              "loose": (50.0, 0, False)}
    units = build_units(blobs, access, refs, {"m1", "m2", "m3"})
    plan = plan_eviction(blobs, units, now=1000.0, max_size=400, high=0.9, low=0.6,
                         free=None, min_free=0, unused_for=None, protect_recent=10,
                         recent_blobs=set())
    # loose (oldest), then m1 (its shared blob stays: m2 keeps it), then m3.
    assert [e.root for e in plan.evictions] == ["loose", "m1", "m3"]
    assert plan.evictions[1].delete == ("m1", "a")
    assert plan.after <= 240
    for u in units:
        u.pinned = "pin" if u.root == "m1" else None
    plan = plan_eviction(blobs, units, now=1000.0, max_size=None, high=0.9, low=0.8,
                         free=None, min_free=0, unused_for=750, protect_recent=10,
                         recent_blobs=set())
    assert [(e.root, e.reason) for e in plan.evictions] == [("loose", "retention"),
                                                            ("m3", "retention")]


def test_tracker_counts_from_two_processes_add_up(tmp_path: Path) -> None:
    import asyncio

    d = Digest("sha256", "c" * 64)
    db1, db2 = LifecycleDB(tmp_path), LifecycleDB(tmp_path)
    t1 = AccessTracker(db1, clock=lambda: 100.0)
    t2 = AccessTracker(db2, clock=lambda: 200.0)
    for _ in range(3):
        t1.manifest("docker.io", "library/x", "1", d)
    t2.manifest("docker.io", "library/x", "1", d)
    t2.blob("docker.io", "library/x", d)

    async def flush() -> None:
        await t1.flush()
        await t2.flush()

    asyncio.run(flush())
    assert db1.access()[str(d)] == (200.0, 5, True)
    assert [(t.tag, t.count, t.last) for t in db1.tags()] == [("1", 4, 200.0)]
    db1.close()
    db2.close()
