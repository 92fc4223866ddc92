"""Warm manifest GETs, CPU first: CPU-seconds of mirrorcache (user+sys of its process tree,
from /proc) per 10,000 ``GET /v2/bench/small/manifests/latest`` served from cache within
tag_ttl, ``wrk -t2 -c32``. A/B of source trees in one run.

Usage::

    python bench/manifestcpu.py [--reps 4] [-d 8] [--tree LABEL=DIR ...] [--pyspy DIR]

Wall-clock req/s on a shared 2-core machine is noise; CPU per request of the serving process
much less so. Each repetition starts every tree's mirrorcache afresh on an empty cache
(alternating A B A B ...), warms the tag (one upstream GET), runs wrk for 2 s unmeasured, then
``-d`` seconds measured. ``--pyspy DIR`` records a py-spy raw profile of each tree's last
repetition into DIR. Reuses bench/run.py's process helpers; everything on 127.0.0.1 under a
temporary directory, removed at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run  # noqa: E402

MiB = 1 << 20


def wrk(url: str, seconds: float) -> dict[str, Any]:
    cmd = ["wrk", "-t2", "-c32", f"-d{seconds:.0f}s", "-H", f"Accept: {run.MANIFEST_ACCEPT}",
           url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "bad": (int(non2xx.group(1)) if non2xx else 0)
            + (sum(map(int, sock.groups())) if sock else 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("-d", "--seconds", type=float, default=8)
    ap.add_argument("--tree", action="append", default=[],
                    help="LABEL=DIR: run mirrorcache from DIR (default: this checkout)")
    ap.add_argument("--pyspy", help="directory for py-spy raw profiles (last rep of each tree)")
    ap.add_argument("--json")
    a = ap.parse_args()
    trees = [t.split("=", 1) for t in a.tree] or [["this", str(BENCH_DIR.parent)]]
    work = Path(tempfile.mkdtemp(prefix="manifestcpu-"))
    procs: list[Any] = []
    results: dict[str, list[dict[str, float]]] = {}
    try:
        images = run.make_images(work / "blobs", 64 << 10, 64 << 10, 7)
        img = images[2]  # bench/small, as in bench/run.py phase 4
        (work / "upstream").mkdir()
        up = run.RegistryProcess(workdir=work / "upstream", log_level="warn").start()
        procs.append(up)
        asyncio.run(run._push(up.url, [img]))
        path = f"/v2/{img.repo}/manifests/latest"
        n = 0
        for rep in range(a.reps):
            for label, tree in trees:
                n += 1
                m = run.Mirror(work, up.url, 1, n, extra_env={"PYTHONPATH": tree}).start()
                spy = None
                try:
                    req = urllib.request.Request(m.url + path,
                                                 headers={"Accept": run.MANIFEST_ACCEPT})
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        if resp.read() != img.manifest:
                            raise RuntimeError("manifest differs")
                    wrk(m.url + path, 2)
                    pids = m.tree()
                    if a.pyspy and rep == a.reps - 1:
                        Path(a.pyspy).mkdir(parents=True, exist_ok=True)
                        spy = subprocess.Popen(
                            ["py-spy", "record", "-f", "raw", "-r", "200", "-d",
                             str(int(a.seconds)), "-o", f"{a.pyspy}/{label}.txt", "-p",
                             str(m.proc.pid)],  # type: ignore[union-attr]
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    c0 = run.cpu_seconds(pids)
                    r = wrk(m.url + path, a.seconds)
                    c1 = run.cpu_seconds(pids)
                    if spy:
                        spy.wait(timeout=60)
                finally:
                    m.stop()
                if r["bad"]:
                    raise RuntimeError(f"{label}: {r['bad']} bad responses")
                res = {"cpu": c1 - c0, "requests": r["requests"], "rps": r["rps"],
                       "cpu_per_10k": (c1 - c0) * 10000 / r["requests"]}
                results.setdefault(label, []).append(res)
                print(f"rep {rep + 1} {label:10}: {res['cpu_per_10k']:.3f} cpu-s/10k "
                      f"({res['cpu']:.2f} cpu-s, {r['requests']} req, {r['rps']:.0f} req/s)",
                      flush=True)
        print("\nmedians (cpu-s per 10k warm manifest GETs, req/s):")
        for label, rs in results.items():
            print(f"  {label:10} {statistics.median(r['cpu_per_10k'] for r in rs):.3f}"
                  f"  {statistics.median(r['rps'] for r in rs):6.0f}"
                  f"  (min {min(r['cpu_per_10k'] for r in rs):.3f})")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    finally:
        for p in reversed(procs):
            p.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
