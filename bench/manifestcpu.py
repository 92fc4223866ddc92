"""Warm manifest GETs, CPU first: CPU-seconds of mirrorcache (user+sys of its process tree,
from /proc) per 10,000 ``GET /v2/bench/small/manifests/latest`` served from cache within
tag_ttl, ``wrk -t2 -c32``. A/B of source trees in one run.

Usage::

    python bench/manifestcpu.py [--reps 4] [-d 8] [--tree LABEL=DIR ...] [--pyspy DIR]
                                [--log-level warning] [--cold-first MIB]

Wall-clock req/s on a shared 2-core machine is noise; CPU per request of the serving process
much less so. Each repetition starts every tree's mirrorcache afresh on an empty cache
(alternating A B A B ...), warms the tag (one upstream GET), runs wrk for 2 s unmeasured, then
``-d`` seconds measured. ``--pyspy DIR`` records a py-spy raw profile of each tree's last
repetition into DIR. The measured seconds run as 1 s wrk batches, each counted apart: the
report gives the median over repetitions and the 10th-percentile batch, the least disturbed
by whatever else the machine runs. ``--cold-first MIB`` pulls a cold blob through 50 clients
first, as bench/run.py's phase 3 does on the mirror phase 4 then measures. Reuses bench/run.py's
process helpers; everything on 127.0.0.1 under a temporary directory, removed at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run  # noqa: E402
import yaml  # noqa: E402

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
    ap.add_argument("--log-level", default="warning",
                    help="mirrorcache's log.level (info writes the access log)")
    ap.add_argument("--cold-first", type=int, default=0, metavar="MIB",
                    help="first pull a cold blob of MIB through 50 clients at once, as "
                         "bench/run.py's phase 3 does before phase 4 on the same mirror")
    ap.add_argument("--json")
    a = ap.parse_args()
    trees = [t.split("=", 1) for t in a.tree] or [["this", str(BENCH_DIR.parent)]]
    work = Path(tempfile.mkdtemp(prefix="manifestcpu-"))
    procs: list[Any] = []
    results: dict[str, list[dict[str, float]]] = {}
    batches: dict[str, list[float]] = {}
    try:
        images = run.make_images(work / "blobs", 64 << 10, max(a.cold_first, 1) * MiB, 7)
        img = images[2]  # bench/small, as in bench/run.py phase 4
        (work / "upstream").mkdir()
        up = run.RegistryProcess(workdir=work / "upstream", log_level="warn").start()
        procs.append(up)
        asyncio.run(run._push(up.url, [img, images[1]] if a.cold_first else [img]))
        path = f"/v2/{img.repo}/manifests/latest"
        n = 0
        for rep in range(a.reps):
            for label, tree in trees:
                n += 1
                m = run.Mirror(work, up.url, 1, n, extra_env={"PYTHONPATH": tree})
                cfg = yaml.safe_load(m.config_path.read_text())
                cfg["log"]["level"] = a.log_level
                m.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                m.start()
                spy = None
                try:
                    if a.cold_first:
                        mid, blob = images[1], images[1].layers[0]
                        out = subprocess.run(
                            [sys.executable, str(BENCH_DIR / "fetch.py"), "--hash", "first",
                             *[f"{m.url}/v2/{mid.repo}/blobs/{blob.digest}"] * 50],
                            capture_output=True, check=True, timeout=600)
                        bad = [t for t in json.loads(out.stdout)["transfers"]
                               if t["error"] or t["bytes"] != blob.size]
                        if bad:
                            raise RuntimeError(f"cold pull failed: {bad[:2]}")
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
                    cpu, requests, wall = 0.0, 0, 0.0
                    for _ in range(int(a.seconds)):  # 1 s batches: the quietest shows through
                        c0, t0 = run.cpu_seconds(pids), time.monotonic()
                        r = wrk(m.url + path, 1)
                        c1, t1 = run.cpu_seconds(pids), time.monotonic()
                        if r["bad"]:
                            raise RuntimeError(f"{label}: {r['bad']} bad responses")
                        cpu, requests, wall = cpu + c1 - c0, requests + r["requests"], \
                            wall + t1 - t0
                        batches.setdefault(label, []).append((c1 - c0) * 10000 / r["requests"])
                    if spy:
                        spy.wait(timeout=60)
                finally:
                    m.stop()
                res = {"cpu": cpu, "requests": requests, "rps": requests / wall,
                       "cpu_per_10k": cpu * 10000 / requests}
                results.setdefault(label, []).append(res)
                print(f"rep {rep + 1} {label:10}: {res['cpu_per_10k']:.3f} cpu-s/10k "
                      f"({cpu:.2f} cpu-s, {requests} req, {res['rps']:.0f} req/s)", flush=True)
        print("\ncpu-s per 10k warm manifest GETs: median of the repetitions, and the 1 s batch "
              "at the 10th percentile (the least disturbed); req/s median")
        for label, rs in results.items():
            bs = sorted(batches[label])
            print(f"  {label:10} {statistics.median(r['cpu_per_10k'] for r in rs):.3f}"
                  f"  p10 batch {bs[len(bs) // 10]:.3f}"
                  f"  {statistics.median(r['rps'] for r in rs):6.0f} req/s")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    finally:
        run.stop_all(procs, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
