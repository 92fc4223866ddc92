"""The floor of a cold pull on this machine: what any verifying, caching mirror can reach,
side by side with Distribution's proxy mode and mirrorcache, in one run.

Usage::

    python bench/floor.py [--mib 1024] [--reps 5]

Issue 10 asks a cold 1 GiB pull through mirrorcache to reach 1.2x the Distribution proxy's
MiB/s. This harness asks whether any program can, here: it builds ``bench/floor_relay.c``
(gcc, OpenSSL's libcrypto) and measures, alternated, ``--reps`` times, each against the same
upstream registry and with the same client (``bench/fetch.py``, which sha256-checks the body):

* **direct**: straight from the upstream registry (the ceiling);
* **peer**: Distribution's proxy, started anew on an empty cache each time (it relays the
  body to the client unverified and fetches the blob a second time to store it);
* **floor relay (cache)**: the least work a mirror that verifies and caches before the last
  byte must do, in C: one thread recv()s 1 MiB at a time, sha256-hashes and pwrite()s it
  (with mirrorcache's drop-behind), another sendfile()s the spool to the client as it
  grows, the last byte held until the digest is known;
* **floor relay (tee)**: the same work with the client first, in C: recv() 1 MiB and send()
  it to the client at once (the last byte held until the digest is known), then a second
  thread hashes and writes it: no hash or file write on the client's path, all of it still
  on the machine's two cores;
* **relay (pipe)**: recv() and send(), no hash, no file (streaming only, in C);
* **mirrorcache**: started anew on an empty cache each time.

Prints MiB/s and CPU seconds per GiB (user+sys of the relaying process, from /proc or
getrusage) per repetition and as medians, with each one's ratio to the peer. Everything on
127.0.0.1 under a temporary directory, removed at exit. Reuses bench/run.py's process helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run  # noqa: E402
from coldcpu import fetch, measure  # noqa: E402

MiB = 1 << 20


def relay_pull(relay: run.FloorRelay, up_blob_url: str, mode: str,
               blob: run.BlobFile) -> dict[str, float]:
    """One pull through the C relay (coldcpu's measurement; CPU as the relay reports it)."""
    with relay.serving(up_blob_url, mode, blob.hex) as url:
        r = measure(lambda: [], [url], blob)
    assert relay.cpu is not None
    r["cpu_per_gib"] = relay.cpu * (1 << 30) / blob.size
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="floor-", dir=BENCH_DIR / ".work"
                                 if (BENCH_DIR / ".work").is_dir() else None))
    procs: list[Any] = []
    results: dict[str, list[dict[str, float]]] = {}
    try:
        relay = run.FloorRelay(work)
        if relay.exe is None:
            return 1
        images = run.make_images(work / "blobs", a.mib * MiB, 4 * MiB, 7)
        img, blob = images[0], images[0].layers[0]
        up = run.RegistryProcess(workdir=work / "upstream", log_level="warn")
        (work / "upstream").mkdir()
        up.start()
        procs.append(up)
        asyncio.run(run._push(up.url, images[:1]))
        path = f"/v2/{img.repo}/blobs/{blob.digest}"
        fetch([up.url + path])  # upstream page cache warm for everyone
        n = 0
        for rep in range(a.reps):
            r = measure(lambda: run.registry_pids(up), [up.url + path], blob)
            results.setdefault("direct", []).append(r)
            n += 1
            d = work / f"peer-{n}"
            d.mkdir()
            peer = run.RegistryProcess(
                proxy_remote_url=up.url, workdir=d, log_level="warn",
                extra_config={"log": {"accesslog": {"disabled": True}}}).start()
            try:
                r = measure(lambda p=peer: run.registry_pids(p), [peer.url + path], blob)
            finally:
                peer.close()
            results.setdefault("peer", []).append(r)
            for mode in ("cache", "tee", "pipe"):
                r = relay_pull(relay, up.url + path, mode, blob)
                results.setdefault(f"floor relay ({mode})", []).append(r)
            m = run.Mirror(work, up.url, 1, n).start()
            try:
                r = measure(m.tree, [m.url + path], blob)
            finally:
                m.stop()
            results.setdefault("mirrorcache", []).append(r)
            print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]['mibps']:.0f} MiB/s"
                                                 for k, v in results.items()), flush=True)
        peer_mibps = statistics.median(r["mibps"] for r in results["peer"])
        print(f"\nmedians of {a.reps} ({a.mib} MiB blob, cold, http upstream, one client):")
        for key, rs in results.items():
            mibps = statistics.median(r["mibps"] for r in rs)
            cpu = statistics.median(r["cpu_per_gib"] for r in rs)
            print(f"  {key:22} {mibps:6.0f} MiB/s  {mibps / peer_mibps:5.2f}x the peer"
                  f"  {cpu:5.2f} cpu-s/GiB  (MiB/s {min(r['mibps'] for r in rs):.0f}-"
                  f"{max(r['mibps'] for r in rs):.0f})")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    finally:
        run.stop_all(procs, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
