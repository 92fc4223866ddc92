"""The eviction planner, pure: images, least recently used first, shared blobs kept.

An *image* is a root manifest (an index or a single manifest no present index names) with
its child manifests and the blobs (config, layers) they reference. A blob no known manifest
references is a unit of its own. A unit's last use is the latest pull of any of its
manifests (a shared base layer pulled through another image does not make this one recent).

Eviction deletes a unit's manifests first (no new pull of it can start from the cache),
then those of its blobs no kept unit references. Units whose manifests were pulled within
``protect_recent`` seconds are never chosen (a pull may be running in some worker), nor
blobs served that recently; pinned units never are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class Unit:
    root: str
    manifests: list[str]
    blobs: list[str]
    last: float
    pulls: int
    names: list[str] = field(default_factory=list)
    pinned: str | None = None


@dataclass(frozen=True)
class Eviction:
    root: str
    reason: str  # size | retention
    names: tuple[str, ...]
    last: float
    pulls: int
    delete: tuple[str, ...]  # manifests first, then blobs
    freed: int


@dataclass(frozen=True)
class Plan:
    total: int
    limit: int | None
    evictions: tuple[Eviction, ...]
    kept_pinned: int
    kept_recent: int
    #: When ``total`` was counted (wall time, comparable across processes; 0: unknown).
    counted_at: float = 0.0

    @property
    def freed(self) -> int:
        return sum(e.freed for e in self.evictions)

    @property
    def after(self) -> int:
        return self.total - self.freed

    def lines(self) -> list[str]:
        """The plan as text, one line per image (what ``gc`` prints)."""
        out = []
        for e in self.evictions:
            names = ", ".join(e.names) if e.names else e.root
            out.append(f"evict {e.root} ({names}): {e.freed} bytes in {len(e.delete)} "
                       f"blobs, reason {e.reason}, last pulled {e.last:.0f}, "
                       f"{e.pulls} pulls")
        out.append(f"total {self.total} bytes -> {self.after} bytes "
                   f"(limit {self.limit if self.limit is not None else 'none'}); "
                   f"{len(self.evictions)} images, {self.freed} bytes freed; "
                   f"kept: {self.kept_pinned} pinned, {self.kept_recent} recently pulled")
        return out


def build_units(blobs: Mapping[str, int], access: Mapping[str, tuple[float, int, bool]],
                refs: Mapping[str, list[str]], manifests: set[str]) -> list[Unit]:
    """Group the blobs present into images and loose blobs."""
    present_manifests = [m for m in manifests if m in blobs]
    children: set[str] = set()
    for m in present_manifests:
        for c in refs.get(m, ()):
            if c in manifests:
                children.add(c)
    units: list[Unit] = []
    covered: set[str] = set()
    for root in sorted(m for m in present_manifests if m not in children):
        mans = [root] + [c for c in refs.get(root, ()) if c in manifests]
        blob_set: dict[str, None] = {}
        for m in mans:
            for c in refs.get(m, ()):
                if c not in manifests and c in blobs:
                    blob_set[c] = None
        present = [m for m in mans if m in blobs]
        last = max((access.get(m, (0.0, 0, True))[0] for m in present), default=0.0)
        pulls = access.get(root, (0.0, 0, True))[1]
        units.append(Unit(root, present, list(blob_set), last, pulls))
        covered.update(present)
        covered.update(blob_set)
    for d in sorted(blobs):
        if d not in covered:
            last, pulls, _ = access.get(d, (0.0, 0, False))
            if d in manifests:  # a child manifest whose index is gone
                units.append(Unit(d, [d], [c for c in refs.get(d, ()) if c in blobs
                                           and c not in covered], last, pulls))
                covered.update(units[-1].blobs)
            else:
                units.append(Unit(d, [], [d], last, pulls))
            covered.add(d)
    return units


def plan_eviction(blobs: Mapping[str, int], units: list[Unit], *, now: float,
                  max_size: int | None, high: float, low: float,
                  free: int | None, min_free: int, unused_for: float | None,
                  protect_recent: float, recent_blobs: set[str],
                  force: bool = False, reserve: int = 0) -> Plan:
    """Which units to evict. ``force``: evict down to the low watermark even if the high
    one is not crossed (``mirrorcache gc``). ``reserve``: bytes a write is about to add (the
    space guard asks for room): eviction also goes on until they fit under the high
    watermark (and ``min_free``), not further than the low watermark otherwise asks."""
    total = sum(blobs.values())
    refcount: dict[str, int] = {}
    for u in units:
        for d in u.manifests + u.blobs:
            refcount[d] = refcount.get(d, 0) + 1
    order = sorted(units, key=lambda u: (u.last, u.root))
    evictions: list[Eviction] = []
    kept_pinned = sum(1 for u in units if u.pinned)
    kept_recent = 0
    current = total
    free_now = free

    def candidate(u: Unit) -> bool:
        nonlocal kept_recent
        if u.pinned:
            return False
        if u.last >= now - protect_recent:
            kept_recent += 1
            return False
        return True

    def evict(u: Unit, reason: str) -> None:
        nonlocal current, free_now
        gone: list[str] = []
        for d in u.manifests + u.blobs:
            refcount[d] -= 1
            if refcount[d] == 0 and d not in recent_blobs:
                gone.append(d)
        freed = sum(blobs[d] for d in gone)
        current -= freed
        if free_now is not None:
            free_now += freed
        evictions.append(Eviction(u.root, reason, tuple(sorted(set(u.names))), u.last,
                                  u.pulls, tuple(gone), freed))

    rest: list[Unit] = []
    for u in order:
        if unused_for is not None and u.last < now - unused_for and candidate(u):
            evict(u, "retention")
        else:
            rest.append(u)

    def over(threshold: float, extra: int = 0) -> bool:
        if max_size is not None and current + extra > max_size * threshold:
            return True
        return free_now is not None and min_free > 0 and free_now - extra < min_free

    if over(high, reserve) or (force and over(low)):
        kept_recent = 0
        for u in rest:
            if not over(low) and not over(high, reserve):
                break
            if candidate(u):
                evict(u, "size")
    return Plan(total, max_size, tuple(evictions), kept_pinned, kept_recent)
