"""``mirrorcache gc``, ``inventory``, ``pin`` and ``unpin``: run against the cache directory,
beside a running server or not (sweeps never overlap: see sweeper.py)."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from mirrorcache.config import Config
from mirrorcache.lifecycle.db import LifecycleDB
from mirrorcache.lifecycle.pins import Pins, parse_pin
from mirrorcache.lifecycle.plan import Plan
from mirrorcache.lifecycle.sweeper import Sweeper
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.routing import Router
from mirrorcache.storage.fs import FilesystemBlobStore
from mirrorcache.storage.metadata import Metadata


def open_sweeper(config: Config) -> Sweeper:
    root = config.storage.fs_path
    return Sweeper(FilesystemBlobStore(root), LifecycleDB(config.storage.metadata_path),
                   Metadata(config.storage.metadata_path), limits=config.storage.limits,
                   retention=config.retention, lifecycle=config.lifecycle, pins=config.pins,
                   lock_dir=root, free_path=root)


def _close(sweeper: Sweeper) -> None:
    sweeper.db.close()
    if sweeper.meta is not None:
        sweeper.meta.close()


def run_gc(config: Config, *, dry_run: bool, out: Callable[[str], None]) -> int:
    """Print the plan image by image, then carry it out (not with ``dry_run``)."""
    sweeper = open_sweeper(config)

    def show(plan: Plan) -> None:
        for line in plan.lines():
            out(line)

    try:
        result = asyncio.run(sweeper.sweep(force=True, trigger="gc", dry_run=dry_run,
                                           show=show))
    finally:
        _close(sweeper)
    if result is None:
        out("another sweep is running; try again")
        return 1
    out("dry run: nothing deleted" if dry_run
        else f"freed {result.freed} bytes in {result.images} images")
    return 0


@dataclass(frozen=True)
class Row:
    upstream: str
    repository: str
    tag: str | None
    digest: str
    size: int
    last_pulled: float
    pulls: int
    pinned: str | None


SORTS: dict[str, tuple[Callable[[Row], object], bool]] = {
    "last-pulled": (lambda r: r.last_pulled, True),
    "size": (lambda r: r.size, True),
    "pulls": (lambda r: r.pulls, True),
    "name": (lambda r: (r.upstream, r.repository, r.tag or "", r.digest), False),
}


def inventory_rows(config: Config, *, pattern: str | None, sort: str) -> list[Row]:
    sweeper = open_sweeper(config)
    try:
        g = asyncio.run(sweeper.gather(save=False))
        pins = Pins([*config.pins, *sweeper.db.pins()])
    finally:
        _close(sweeper)
    wanted = parse_pin(pattern) if pattern else None

    def size_of(d: str, seen: set[str]) -> int:
        if d in seen or d not in g.blobs:
            return 0
        seen.add(d)
        return g.blobs[d] + sum(size_of(c, seen) for c in g.refs.get(d, ()))

    rows = []
    for t in g.tags:
        if t.digest not in g.blobs:
            continue  # evicted, or not committed
        digest = Digest(*t.digest.split(":", 1))
        if wanted is not None and not wanted.matches(t.upstream, t.repo, t.tag or None, digest):
            continue
        rows.append(Row(t.upstream, t.repo, t.tag or None, t.digest, size_of(t.digest, set()),
                        t.last, t.count, pins.matches(t.upstream, t.repo, t.tag or None,
                                                      digest)))
    key, reverse = SORTS[sort]
    rows.sort(key=key, reverse=reverse)  # type: ignore[arg-type]
    return rows


def render_inventory(rows: list[Row], *, as_json: bool, tty: bool) -> str:
    if as_json:
        return json.dumps([asdict(r) for r in rows], indent=2)
    table = [("REFERENCE", "DIGEST", "SIZE", "LAST PULLED", "PULLS", "PINNED")]
    for r in rows:
        ref = f"{r.upstream}/{r.repository}" + (f":{r.tag}" if r.tag else "")
        when = datetime.datetime.fromtimestamp(r.last_pulled, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        table.append((ref, r.digest[:19] if tty else r.digest,
                      _human(r.size) if tty else str(r.size), when, str(r.pulls),
                      r.pinned or "-"))
    if not tty:
        return "\n".join("\t".join(row) for row in table[1:])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def canonical_pin(config: Config, ref: str) -> str:
    """``python:3.12`` -> ``docker.io/library/python:3.12``; globs are taken as written.
    Raises ValueError."""
    if "*" not in ref:
        name, at, digest = ref.partition("@")
        tag = None
        if not at and name.rfind(":") > name.rfind("/"):
            name, tag = name.rsplit(":", 1)
        try:
            target = Router(config.upstreams, config.default_upstream).resolve(name)
        except Exception as exc:
            raise ValueError(f"{ref!r}: {getattr(exc, 'message', exc)}") from None
        ref = f"{target.upstream}/{target.repository}" + (
            f"@{digest}" if at else f":{tag}" if tag else "")
    parse_pin(ref)
    return ref


def pin(config: Config, ref: str, *, remove: bool) -> tuple[bool, str]:
    text = canonical_pin(config, ref)
    db = LifecycleDB(config.storage.metadata_path)
    try:
        changed = db.unpin(text) if remove else db.pin(text, datetime.datetime.now().timestamp())
    finally:
        db.close()
    return changed, text
