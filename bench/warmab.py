"""Warm big-blob pulls, A/B: mirrorcache trees and nginx (``sendfile on``, as in bench/run.py)
serving the same cached blob to bench/fetch.py, alternated, with the server's CPU per pull.

Usage::

    python bench/warmab.py [--mib 1024] [--clients N] [--rounds 7] [--tree LABEL=DIR ...]
                           [--peer] [--no-nginx] [--strace [--strace-args ARGS]] [--json FILE]

One upstream registry holds the blob; every mirrorcache tree (``--tree``: run from DIR with
``PYTHONPATH=DIR``, e.g. a ``git archive`` of main; default: this checkout) gets its own
mirror on its own empty cache, warmed by one untimed pull (digest checked). Each round pulls
the blob once from every server, the order rotated round by round so that load drifts hit
each alike. Per pull: wall (first request byte to last body byte, from fetch.py), the
server's CPU-seconds (user+sys of its process tree, /proc), the client's (fetch.py), and the
machine's softirq seconds (loopback TCP is mostly processed there) and TCP segments sent
(``OutSegs``: the data segments and the client's ACKs). ``--clients N`` pulls bench/run.py's
many-clients mix instead (N at once, a tenth of them the ``--mib`` blob, the rest small
blobs): wall is first request to last byte of all. ``--strace`` adds one pull per server
under ``strace -c -f`` (attached to the server's processes) and prints the syscall
summaries: counts, not timings (strace slows the server). ``--peer`` adds Distribution's
proxy mode, warm. ``--probe`` times small GETs back to back on one more connection during
each pull (``/v2/``; nginx: a small file): the longest shows how long a send keeps the
server from answering anyone else. The probes cost CPU too (the server's, more of them
the shorter its stalls): compare throughput and CPU from runs without ``--probe``.
Everything on 127.0.0.1 under a temporary directory, removed at exit. Reuses bench/run.py's
process helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run  # noqa: E402

MiB = 1 << 20


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tcp_out_segments() -> int:
    """Tcp OutSegs of the whole machine (on loopback: the data segments and the ACKs)."""
    lines = Path("/proc/net/snmp").read_text().splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("Tcp:"):
            return int(dict(zip(head.split()[1:], vals.split()[1:], strict=False))["OutSegs"])
    return 0


def fetch(urls: list[str], hash_mode: str = "none") -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH_DIR / "fetch.py"), "--hash", hash_mode,
           "--timeout", "120", *urls]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=150)
    res: dict[str, Any] = json.loads(out.stdout)
    return res


class Prober:
    """GETs ``url`` (a tiny response) back to back on one kept-alive connection while a pull
    runs: how long the server leaves other requests waiting while it sends."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        if self.url:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.url:
            self._thread.join()

    def _run(self) -> None:
        assert self.url is not None
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        while not self._stop.wait(0.002):
            t0 = time.monotonic()
            conn.request("GET", parts.path)
            conn.getresponse().read()
            self.latencies.append(time.monotonic() - t0)
        conn.close()


def pull(pids_of: Callable[[], list[int]], urls: list[str], blobs: list[run.BlobFile],
         hash_mode: str = "none", probe: str | None = None) -> dict[str, float]:
    """One fetch.py run of ``urls`` (all at once), ``blobs`` the blob each should bring;
    ``probe``: a URL to time small GETs of meanwhile."""
    pids = pids_of()
    c0, k0, s0 = run.cpu_seconds(pids), _children_cpu(), run.system_cpu_seconds()
    g0 = tcp_out_segments()
    with Prober(probe) as prober:
        res = fetch(urls, hash_mode)
    g1 = tcp_out_segments()
    c1, k1, s1 = run.cpu_seconds(pids), _children_cpu(), run.system_cpu_seconds()
    for t, blob in zip(res["transfers"], blobs, strict=True):
        if t["error"] or t["bytes"] != blob.size:
            raise RuntimeError(f"{t['url']}: {t['error']} ({t['bytes']} bytes)")
        if t["sha256"] is not None and t["sha256"] != blob.hex:
            raise RuntimeError(f"{t['url']}: digest mismatch {t['sha256']}")
    wall = max(t["end"] for t in res["transfers"]) - min(t["start"] for t in res["transfers"])
    size = sum(b.size for b in blobs)
    return {"wall": wall, "mibps": size / MiB / wall, "server_cpu": c1 - c0,
            "client_cpu": k1 - k0, "softirq": s1[1] - s0[1], "busy": s1[0] - s0[0],
            "segments": g1 - g0,
            "probe_max_ms": max(prober.latencies, default=0.0) * 1000,
            "probe_n": len(prober.latencies)}


def straced(pids: list[int], urls: list[str], blobs: list[run.BlobFile], out: Path,
            how: list[str]) -> str:
    """One pull with ``strace -f`` (and ``how``, e.g. ``-c``) attached to ``pids``; its
    output."""
    args = ["strace", *how, "-f", "-o", str(out)]
    for p in pids:
        args += ["-p", str(p)]
    st = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached
        pull(lambda: pids, urls, blobs)
        time.sleep(0.3)
    finally:
        st.send_signal(signal.SIGINT)
        st.wait(timeout=30)
    return out.read_text()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024,
                    help="the blob's size (with --clients: the mid blob's; default 1024)")
    ap.add_argument("--clients", type=int, default=0,
                    help="N clients at once, bench/run.py's warm mix (a tenth the --mib blob, "
                         "the rest its small blobs) instead of one client of the --mib blob")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tree", action="append", default=[],
                    help="LABEL=DIR: a mirrorcache run from DIR (default: this checkout)")
    ap.add_argument("--peer", action="store_true", help="Distribution's proxy mode too")
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--probe", action="store_true",
                    help="time small GETs (/v2/; nginx: a small file) during each pull")
    ap.add_argument("--strace", action="store_true", help="one more pull each, straced")
    ap.add_argument("--strace-args", default="-c",
                    help="strace options for --strace (default -c: a summary)")
    ap.add_argument("--json")
    a = ap.parse_args()
    trees = [t.split("=", 1) for t in a.tree] or [["this", str(BENCH_DIR.parent)]]
    work = Path(tempfile.mkdtemp(prefix="warmab-"))
    procs: list[Any] = []
    try:
        if a.clients:  # bench/run.py's many-clients mix: a tenth the mid blob, small blobs
            images = run.make_images(work / "blobs", 4 * MiB, a.mib * MiB, 7)[1:]
            n_mid = max(1, a.clients // 10)
            smalls = images[1].blobs
            plan = [(images[0], images[0].layers[0])] * n_mid + [
                (images[1], smalls[i % len(smalls)]) for i in range(a.clients - n_mid)]
            what = f"{a.clients} clients, {n_mid} of them the {a.mib} MiB blob, warm"
        else:
            images = run.make_images(work / "blobs", a.mib * MiB, 4 * MiB, 7)[:1]
            plan = [(images[0], images[0].layers[0])]
            what = f"{a.mib} MiB blob, warm, one client"
        blobs = [b for _, b in plan]
        up = run.RegistryProcess(workdir=work / "upstream", log_level="warn")
        (work / "upstream").mkdir()
        up.start()
        procs.append(up)
        asyncio.run(run._push(up.url, images))
        servers: dict[str, tuple[list[str], Callable[[], list[int]]]] = {}
        probes: dict[str, str] = {}
        if not a.no_nginx:
            ngx = run.Nginx(work, "nginx", 1, f"root {work / 'blobs'};").start()
            procs.append(ngx)
            servers["nginx"] = ([f"{ngx.url}/{b.hex}" for b in blobs], ngx.tree)
            probes["nginx"] = f"{ngx.url}/{images[0].config.hex}"
        for n, (label, tree) in enumerate(trees, 1):
            m = run.Mirror(work, up.url, 1, n, extra_env={"PYTHONPATH": tree}).start()
            procs.append(m)
            servers[f"mc[{label}]"] = (
                [f"{m.url}/v2/{i.repo}/blobs/{b.digest}" for i, b in plan], m.tree)
            probes[f"mc[{label}]"] = f"{m.url}/v2/"
        if a.peer:
            d = work / "peer"
            d.mkdir()
            peer = run.RegistryProcess(
                proxy_remote_url=up.url, workdir=d, log_level="warn",
                extra_config={"log": {"accesslog": {"disabled": True}}}).start()
            procs.append(peer)
            servers["peer"] = ([f"{peer.url}/v2/{i.repo}/blobs/{b.digest}" for i, b in plan],
                               lambda p=peer: run.registry_pids(p))
            probes["peer"] = f"{peer.url}/v2/"
        for urls, pids_of in servers.values():  # warm (and check) every server, blob by blob
            for u, b in dict(zip(urls, blobs, strict=True)).items():
                pull(pids_of, [u], [b], "all")
            pull(pids_of, urls, blobs)
        names = list(servers)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in names}
        for rnd in range(a.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                urls, pids_of = servers[name]
                r = pull(pids_of, urls, blobs, probe=probes[name] if a.probe else None)
                results[name].append(r)
                print(f"round {rnd + 1} {name:14} {r['mibps']:6.0f} MiB/s  server "
                      f"{r['server_cpu']:.2f} s  client {r['client_cpu']:.2f} s  softirq "
                      f"{r['softirq']:.2f} s  segments {r['segments']}"
                      + (f"  probe max {r['probe_max_ms']:.1f} ms of {r['probe_n']}"
                         if a.probe else ""), flush=True)
        print(f"\nmedians of {a.rounds} ({what}):")
        ref = statistics.median(r["mibps"] for r in results[names[0]])
        for name in names:
            rs = results[name]
            med = statistics.median(r["mibps"] for r in rs)
            print(f"  {name:14} MiB/s {med:6.0f} ({min(r['mibps'] for r in rs):.0f}-"
                  f"{max(r['mibps'] for r in rs):.0f}, {med / ref:.2f}x {names[0]})"
                  f"  server cpu-s {statistics.median(r['server_cpu'] for r in rs):.2f}"
                  f"  client {statistics.median(r['client_cpu'] for r in rs):.2f}"
                  f"  softirq {statistics.median(r['softirq'] for r in rs):.2f}"
                  f"  segments {statistics.median(r['segments'] for r in rs):.0f}"
                  + (f"  probe max ms {statistics.median(r['probe_max_ms'] for r in rs):.1f}"
                     if a.probe else ""))
        if a.strace:
            for name, (urls, pids_of) in servers.items():
                print(f"\n== strace {a.strace_args} -f, one pull from {name}")
                print(straced(pids_of(), urls, blobs, work / f"strace-{names.index(name)}.txt",
                              a.strace_args.split()))
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    finally:
        run.stop_all(procs, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
