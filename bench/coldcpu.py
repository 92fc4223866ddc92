"""Cold pulls, CPU first: CPU-seconds per cold GiB of mirrorcache (user+sys of its process
tree, from /proc) and of Distribution's proxy mode, over plain HTTP and HTTPS upstreams, with
1 and with N simultaneous clients of the same cold blob. A/B of source trees in one run.

Usage::

    python bench/coldcpu.py [--mib 512] [--reps 3] [--waiters 1,50] [--https] [--peer]
                            [--tree LABEL=DIR ...] [--perf-dir DIR]

Throughput on a shared machine is noise; CPU-seconds of the process doing the work are much
less so (still inflated a little by cache and scheduler contention), so this harness reports
both, per repetition, alternating the trees (A B A B ...) so that load drifts hit each alike.
``--tree`` runs mirrorcache from another checkout (``PYTHONPATH=DIR``), e.g. a ``git archive``
of main next to the working tree. ``--https`` puts nginx with TLS (a trustme CA, trusted via
``SSL_CERT_FILE`` by mirrorcache and the peer alike) in front of the upstream registry.
Everything on 127.0.0.1 under a temporary directory, removed at exit. Reuses bench/run.py's
process helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run  # noqa: E402

MiB = 1 << 20


def fetch(urls: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH_DIR / "fetch.py"), "--hash", "first", "--timeout", "300",
           *urls]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=330)
    res: dict[str, Any] = json.loads(out.stdout)
    return res


def measure(pids_of: Any, urls: list[str], blob: run.BlobFile,
            perf_to: Path | None = None) -> dict[str, float]:
    pids = pids_of()
    recorder = None
    if perf_to is not None:  # the whole machine, this pull only (perf report --sort comm)
        recorder = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "999", "-q", "-o",
                                     str(perf_to)], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
    c0 = run.cpu_seconds(pids)
    s0 = run.system_cpu_seconds()
    t0 = time.monotonic()
    res = fetch(urls)
    wall = time.monotonic() - t0
    c1 = run.cpu_seconds(pids)
    s1 = run.system_cpu_seconds()
    if recorder is not None:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(60)
    bad = [t for t in res["transfers"] if t["error"] or t["bytes"] != blob.size]
    if bad:
        raise RuntimeError(f"failed transfers: {bad[:2]}")
    first = res["transfers"][0]
    if first.get("sha256") not in (None, blob.hex):
        raise RuntimeError(f"digest mismatch: {first.get('sha256')}")
    busy = (s1[0] - s0[0])  # all CPUs busy seconds, machine-wide
    return {"wall": wall, "cpu": c1 - c0, "cpu_per_gib": (c1 - c0) * (1 << 30) / blob.size,
            "mibps": blob.size / MiB / wall, "machine_busy": busy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--waiters", default="1,50")
    ap.add_argument("--https", action="store_true")
    ap.add_argument("--peer", action="store_true", help="measure Distribution's proxy too")
    ap.add_argument("--tree", action="append", default=[],
                    help="LABEL=DIR: run mirrorcache from DIR (default: this checkout)")
    ap.add_argument("--json")
    ap.add_argument("--perf-dir", type=Path,
                    help="record each pull machine-wide with perf (perf.<label>.<rep>.data)")
    a = ap.parse_args()
    trees = [t.split("=", 1) for t in a.tree] or [["this", str(BENCH_DIR.parent)]]
    waiters = [int(w) for w in a.waiters.split(",")]
    work = Path(tempfile.mkdtemp(prefix="coldcpu-", dir=BENCH_DIR / ".work"
                                 if (BENCH_DIR / ".work").is_dir() else None))
    procs: list[Any] = []
    results: dict[str, list[dict[str, float]]] = {}
    try:
        images = run.make_images(work / "blobs", a.mib * MiB, 4 * MiB, 7)
        img, blob = images[0], images[0].layers[0]
        up = run.RegistryProcess(workdir=work / "upstream", log_level="warn")
        (work / "upstream").mkdir()
        up.start()
        procs.append(up)
        asyncio.run(run._push(up.url, images[:1]))
        up_url = up.url
        env: dict[str, str] = {}
        if a.https:
            ngx, ca_file = run.tls_upstream(work, up.url)
            ngx.start()
            procs.append(ngx)
            up_url = ngx.url
            os.environ["SSL_CERT_FILE"] = str(ca_file)  # the peer (Go) and mirrorcache
        n = 0
        for rep in range(a.reps):
            for label, tree in trees:
                for w in waiters:
                    n += 1
                    env = {"PYTHONPATH": tree}
                    m = run.Mirror(work, up_url, 1, n, extra_env=env).start()
                    try:
                        url = f"{m.url}/v2/{img.repo}/blobs/{blob.digest}"
                        perf_to = (a.perf_dir / f"perf.{label}.x{w}.{rep + 1}.data"
                                   if a.perf_dir else None)
                        r = measure(m.tree, [url] * w, blob, perf_to)
                    finally:
                        m.stop()
                    key = f"mirrorcache[{label}] x{w}"
                    results.setdefault(key, []).append(r)
                    print(f"rep {rep + 1} {key}: {r['cpu']:.2f} cpu-s, "
                          f"{r['cpu_per_gib']:.2f} cpu-s/GiB, {r['mibps']:.0f} MiB/s, "
                          f"machine busy {r['machine_busy']:.1f} s", flush=True)
            if a.peer:
                n += 1
                d = work / f"peer-{n}"
                d.mkdir()
                peer = run.RegistryProcess(
                    proxy_remote_url=up_url, workdir=d, log_level="warn",
                    extra_config={"log": {"accesslog": {"disabled": True}}}).start()
                try:
                    url = f"{peer.url}/v2/{img.repo}/blobs/{blob.digest}"

                    def peer_pids(p: Any = peer) -> list[int]:
                        return run.registry_pids(p)
                    r = measure(peer_pids, [url], blob,
                                a.perf_dir / f"perf.peer.{rep + 1}.data" if a.perf_dir else None)
                finally:
                    peer.close()
                results.setdefault("peer x1", []).append(r)
                print(f"rep {rep + 1} peer x1: {r['cpu']:.2f} cpu-s (until served; the peer "
                      f"fetches again to store), {r['mibps']:.0f} MiB/s", flush=True)
        print(f"\nmedians ({a.mib} MiB blob, {'https' if a.https else 'http'} upstream):")
        for key, rs in results.items():
            print(f"  {key:28} cpu-s/GiB {statistics.median(r['cpu_per_gib'] for r in rs):5.2f}"
                  f"  MiB/s {statistics.median(r['mibps'] for r in rs):6.0f}"
                  f"  wall s {statistics.median(r['wall'] for r in rs):5.2f}")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    finally:
        run.stop_all(procs, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
