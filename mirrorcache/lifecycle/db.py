"""The lifecycle's own sqlite file beside the metadata store: shared by every worker.

Tables: ``access`` (per digest: last pull, pull count, kind), ``tags`` (per upstream,
repository, tag or '' for a pull by digest, and manifest digest: last pull, count: the
inventory), ``blob_repos`` (which repositories pulled a blob: links to drop on eviction),
``refs`` (manifest -> child manifest or blob, parsed once, manifests are immutable),
``parsed`` (digests already looked at), ``pins`` (``mirrorcache pin``), ``state``.

Deltas from several processes merge in the upsert itself: counts add up, times take the max.
Everything here can be re-learnt; it never fails a request (the tracker drops a failed flush).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_FILE = "lifecycle.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS access (digest TEXT PRIMARY KEY, last REAL NOT NULL,
    count INTEGER NOT NULL, manifest INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tags (upstream TEXT NOT NULL, repo TEXT NOT NULL,
    tag TEXT NOT NULL, digest TEXT NOT NULL, last REAL NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (upstream, repo, tag, digest)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_digest ON tags (digest);
CREATE TABLE IF NOT EXISTS blob_repos (digest TEXT NOT NULL, upstream TEXT NOT NULL,
    repo TEXT NOT NULL, PRIMARY KEY (digest, upstream, repo)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refs (parent TEXT NOT NULL, child TEXT NOT NULL,
    PRIMARY KEY (parent, child)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS parsed (digest TEXT PRIMARY KEY, manifest INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pins (text TEXT PRIMARY KEY, added REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value REAL NOT NULL) WITHOUT ROWID;
"""

#: (digest, count delta, last, is_manifest)
AccessRow = tuple[str, int, float, int]
#: (upstream, repo, tag or '', digest, count delta, last)
TagRow = tuple[str, str, str, str, int, float]


@dataclass(frozen=True)
class TagEntry:
    upstream: str
    repo: str
    tag: str  # '' for a pull by digest
    digest: str
    last: float
    count: int


class LifecycleDB:
    """One connection per process (used from worker threads, serialised by a lock)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_FILE
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                     isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: Iterable[object] = ()) -> list[Any]:
        with self._lock:
            return list(self._conn.execute(sql, tuple(args)))

    # -- access deltas from the tracker
    def add_access(self, access: list[AccessRow], tags: list[TagRow],
                   blob_repos: list[tuple[str, str, str]]) -> None:
        with self._tx() as c:
            c.executemany(
                "INSERT INTO access (digest, count, last, manifest) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (digest) DO UPDATE SET count = count + excluded.count, "
                "last = max(last, excluded.last), manifest = max(manifest, excluded.manifest)",
                access)
            c.executemany(
                "INSERT INTO tags (upstream, repo, tag, digest, count, last) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (upstream, repo, tag, digest) DO UPDATE "
                "SET count = count + excluded.count, last = max(last, excluded.last)", tags)
            c.executemany("INSERT OR IGNORE INTO blob_repos (digest, upstream, repo) "
                          "VALUES (?, ?, ?)", blob_repos)

    def first_seen(self, digests: Iterable[str], now: float) -> None:
        """Give digests nobody pulled yet (crash leftovers, caches from before tracking) an
        access time: the moment the sweeper first saw them."""
        with self._tx() as c:
            c.executemany("INSERT OR IGNORE INTO access (digest, count, last) VALUES (?, 0, ?)",
                          ((d, now) for d in digests))

    def access(self) -> dict[str, tuple[float, int, bool]]:
        return {str(d): (float(last), int(count), bool(m))
                for d, last, count, m in self._query(
                    "SELECT digest, last, count, manifest FROM access")}

    def tags(self) -> list[TagEntry]:
        return [TagEntry(*row) for row in self._query(
            "SELECT upstream, repo, tag, digest, last, count FROM tags")]

    # -- the manifest graph
    def parsed(self) -> dict[str, bool]:
        return {str(d): bool(m) for d, m in self._query("SELECT digest, manifest FROM parsed")}

    def set_parsed(self, results: list[tuple[str, bool, list[str]]]) -> None:
        with self._tx() as c:
            c.executemany("INSERT OR REPLACE INTO parsed (digest, manifest) VALUES (?, ?)",
                          ((d, int(m)) for d, m, _ in results))
            c.executemany("INSERT OR IGNORE INTO refs (parent, child) VALUES (?, ?)",
                          ((d, child) for d, _, children in results for child in children))

    def refs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for parent, child in self._query("SELECT parent, child FROM refs"):
            out.setdefault(str(parent), []).append(str(child))
        return out

    # -- eviction
    def forget(self, digests: list[str]) -> list[tuple[str, str, str, str]]:
        """Drop what is known of evicted digests; return the (upstream, repo, tag, digest)
        and (upstream, repo, '', digest) rows whose tag records and links must go too."""
        with self._tx() as c:
            gone: list[tuple[str, str, str, str]] = []
            for d in digests:
                gone += [(str(u), str(r), str(t), d) for u, r, t in c.execute(
                    "SELECT upstream, repo, tag FROM tags WHERE digest = ?", (d,))]
                gone += [(str(u), str(r), "", d) for u, r in c.execute(
                    "SELECT upstream, repo FROM blob_repos WHERE digest = ?", (d,))]
            for table, col in (("access", "digest"), ("tags", "digest"),
                               ("blob_repos", "digest"), ("parsed", "digest"),
                               ("refs", "parent")):
                c.executemany(f"DELETE FROM {table} WHERE {col} = ?", ((d,) for d in digests))
        return gone

    # -- pins and state
    def pins(self) -> list[str]:
        return [str(t) for (t,) in self._query("SELECT text FROM pins ORDER BY text")]

    def pin(self, text: str, now: float) -> bool:
        with self._tx() as c:
            return c.execute("INSERT OR IGNORE INTO pins (text, added) VALUES (?, ?)",
                             (text, now)).rowcount > 0

    def unpin(self, text: str) -> bool:
        with self._tx() as c:
            return c.execute("DELETE FROM pins WHERE text = ?", (text,)).rowcount > 0

    def set_state(self, key: str, value: float) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    def set_used(self, used: float, counted_at: float) -> None:
        """The cache's size as a sweep counted it, and when (one write: read together)."""
        with self._tx() as c:
            c.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                          (("used_bytes", used), ("used_counted_at", counted_at)))

    def used(self) -> tuple[float, float] | None:
        """(bytes, counted at) of the last count, None before the first sweep."""
        rows = {str(k): float(v) for k, v in self._query(
            "SELECT key, value FROM state WHERE key IN ('used_bytes', 'used_counted_at')")}
        if "used_bytes" not in rows:
            return None
        return rows["used_bytes"], rows.get("used_counted_at", 0.0)

    def state(self, key: str) -> float | None:
        rows = self._query("SELECT value FROM state WHERE key = ?", (key,))
        return float(rows[0][0]) if rows else None
