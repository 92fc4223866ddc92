"""Warm pulls with a real client: ``skopeo copy`` of a one-layer image through a warm
mirrorcache vs straight from the upstream registry, alternated, wall times and medians.

Usage::

    python bench/skopeo_warm.py [--mib 200] [--reps 7] [--dest dir|oci] [--trace] [--tcp]
                                [--tree LABEL=DIR ...] [--variant LABEL=JSON ...]
                                [--log-level info]

Everything on 127.0.0.1 under a temporary directory, removed at exit: a Distribution
registry (the upstream) holding ``bench/mid:latest`` (one layer of ``--mib`` random MiB), and
mirrorcache (``bench/run.py``'s ``Mirror``) in front of it, warmed by one untimed skopeo pull
(and one untimed direct pull, so both start from a warm page cache). Then ``--reps`` rounds
of: skopeo through each mirrorcache tree, skopeo direct (the order alternates per round),
each into a fresh destination directory on the same filesystem (removed after the pull:
skopeo's own write of the layer is part of both figures). ``--tree`` runs mirrorcache from
another checkout (``PYTHONPATH=DIR``), for before/after in one run; ``--variant`` adds a
mirrorcache of this checkout with config keys merged in (e.g. ``{"event_loop": "uvloop"}``).
Per pull: wall time, skopeo's CPU (user+sys), the server's CPU (/proc), the other processes'
CPU (noise), and how long the server took to send the layer (its own log). ``--tcp`` adds,
from ``ss -ti`` of the server's end of the layer's connection, segments out, ACKs in and the
sender's MSS (Linux caps it at half the largest window the client advertised, so a small
MSS means a small client receive buffer): see bench/RESULTS-cold-path.md; and from skopeo's
end (``ss -tim``), the largest receive buffer (``rb``), ``rcv_space`` and ``rcv_ssthresh``
seen. The sampling (``ss`` every 50 ms) shows in "other" CPU.

``--trace`` also prints, for one pull of each, the request sequence seen by each server
(mirrorcache's ``request.finished`` events, the upstream's access log) with durations,
and skopeo's ``--debug`` lines about HTTP requests; the number of requests that reached the
upstream during the timed warm pulls through mirrorcache is printed in every case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run  # noqa: E402
import yaml  # noqa: E402

from tests.support.skopeo import _env, _skopeo_env_dir, skopeo_binary  # noqa: E402

MiB = 1 << 20


def skopeo(src: str, dest: Path, fmt: str, debug: bool = False
           ) -> tuple[float, float, str]:
    d = _skopeo_env_dir()
    argv = [skopeo_binary() or "skopeo", "--policy", str(d / "policy.json"),
            "--tmpdir", str(d / "tmp")]
    if debug:
        argv.append("--debug")
    argv += ["copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
             "--src-no-creds", src, f"{fmt}:{dest}"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, env=_env(), timeout=300, check=False)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"skopeo failed: {p.stderr.decode(errors='replace')[-2000:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu, p.stderr.decode(errors="replace")


def check_layer(dest: Path, fmt: str, blob: run.BlobFile) -> None:
    path = (dest / "blobs" / "sha256" / blob.hex) if fmt == "oci" else dest / blob.hex
    if path.stat().st_size != blob.size:
        raise RuntimeError(f"layer size {path.stat().st_size} != {blob.size}")


class TcpSampler:
    """Polls ``ss -ti`` for the server side of the connection sending the layer (the one
    with the most bytes acked): segments out, ACKs in, the sender's MSS (Linux bounds it by
    half the largest window the receiver advertised) and the receiver's window."""

    FIELDS = ("mss", "segs_out", "segs_in", "snd_wnd", "bytes_acked", "rwnd_limited")
    #: The client's end of the same connection: its receive buffer (``rb`` of skmem) and
    #: receive-side autotuning state, largest seen.
    CLIENT_FIELDS = ("rcv_space", "rcv_ssthresh", "rb", "rcv_wnd")

    def __init__(self, port: int) -> None:
        self.port = port
        self.best: dict[str, str] = {}
        self.client: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TcpSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            out = subprocess.run(["ss", "-tinH", "state", "established",
                                  f"( sport = :{self.port} )"], capture_output=True,
                                 text=True, check=False).stdout
            for conn in re.split(r"\n(?=\S)", out):
                vals = dict(re.findall(r"\b(\w+):(\S+)", conn))
                acked = int(vals.get("bytes_acked", 0))
                if acked >= int(self.best.get("bytes_acked", 0)) and acked > 0:
                    self.best = {k: vals.get(k, "") for k in self.FIELDS}
            out = subprocess.run(["ss", "-tinmH", "state", "established",
                                  f"( dport = :{self.port} )"], capture_output=True,
                                 text=True, check=False).stdout
            for conn in re.split(r"\n(?=\S)", out):
                vals = dict(re.findall(r"\b(\w+)[:](\d+)\b", conn))
                vals.update(re.findall(r"\b(rb)(\d+)\b", conn))
                for k in self.CLIENT_FIELDS:
                    if k in vals:
                        self.client[k] = max(self.client.get(k, 0), int(vals[k]))


def mirror_events(log_path: Path, offset: int) -> list[dict[str, Any]]:
    out = []
    with open(log_path, "rb") as f:
        f.seek(offset)
        for line in f:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == "request.finished":
                out.append(doc)
    return out


def upstream_lines(log_path: Path, offset: int) -> list[str]:
    """Combined-format access lines of Distribution (one per request) since ``offset``:
    skopeo's own (direct) or mirrorcache's (User-Agent ``mirrorcache/…``)."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [ln for ln in text.splitlines() if re.search(r'"(GET|HEAD|POST|PUT) /v2', ln)]


def short(s: str) -> str:
    return re.sub(r"(sha256:[0-9a-f]{8})[0-9a-f]{56}", r"\1…", s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dest", choices=["dir", "oci"], default="dir")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--tcp", action="store_true", help="sample ss -ti of the layer's connection")
    ap.add_argument("--log-level", default="info",
                    help="mirrorcache log level (info: its access log, as deployed)")
    ap.add_argument("--tree", action="append", default=[],
                    help="LABEL=DIR: run mirrorcache from DIR (default: this checkout)")
    ap.add_argument("--variant", action="append", default=[],
                    help='LABEL=JSON: one more mirrorcache (this checkout) with JSON merged into '
                    'its config, e.g. uvloop=\'{"event_loop": "uvloop"}\'')
    a = ap.parse_args()
    trees = [t.split("=", 1) for t in a.tree] or [["this", str(BENCH_DIR.parent)]]
    variants = [(lb, str(BENCH_DIR.parent), json.loads(js))
                for lb, js in (v.split("=", 1) for v in a.variant)]
    work = Path(tempfile.mkdtemp(prefix="skopeo-warm-", dir=BENCH_DIR / ".work"
                                 if (BENCH_DIR / ".work").is_dir() else None))
    procs: list[Any] = []
    mirrors: dict[str, run.Mirror] = {}
    try:
        images = run.make_images(work / "blobs", 1 * MiB, a.mib * MiB, 11)
        img = images[1]
        blob = img.layers[0]
        up = run.RegistryProcess(workdir=work / "upstream", log_level="info")
        (work / "upstream").mkdir()
        up.start()
        procs.append(up)
        asyncio.run(run._push(up.url, [img]))
        for n, (label, tree, extra) in enumerate([(lb, t, {}) for lb, t in trees] + variants):
            m = run.Mirror(work, up.url, 1, n, extra_env={"PYTHONPATH": tree})
            cfg = yaml.safe_load(m.config_path.read_text())
            cfg["log"] = {"level": a.log_level, "format": "json"}
            cfg.update(extra)
            m.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            mirrors[label] = m.start()
            procs.append(m)
        host_of = {label: f"127.0.0.1:{m.port}" for label, m in mirrors.items()}
        host_of["direct"] = up.host
        ref = f"{img.repo}:latest"
        dest_root = work / "dest"
        dest_root.mkdir()
        k = 0

        def server_pids(label: str) -> list[int]:
            return run.registry_pids(up) if label == "direct" else mirrors[label].tree()

        def blob_ms(label: str, m_off: int, u_off: int) -> float | None:
            """How long the server took to send the layer (its own log)."""
            if label == "direct":
                with open(up.log_path, "rb") as f:
                    f.seek(u_off)
                    text = f.read().decode(errors="replace")
                for ln in text.splitlines():
                    if blob.hex in ln and "response completed" in ln:
                        mt = re.search(r"http\.response\.duration=([0-9.]+)(ms|s)", ln)
                        if mt:
                            return float(mt[1]) * (1 if mt[2] == "ms" else 1000)
                return None
            for e in mirror_events(mirrors[label].log_path, m_off):
                if blob.hex in e["path"]:
                    return float(e["duration_ms"])
            return None

        def pull(label: str, debug: bool = False) -> dict[str, Any]:
            nonlocal k
            k += 1
            dest = dest_root / f"{k}"
            pids = server_pids(label)
            m_off = mirrors[label].log_path.stat().st_size if label != "direct" else 0
            u_off = up.log_path.stat().st_size
            c0, s0 = run.cpu_seconds(pids), run.system_cpu_seconds()
            port = up.port if label == "direct" else mirrors[label].port
            with TcpSampler(port) if a.tcp else contextlib.nullcontext() as tcp:
                wall, cpu, err = skopeo(f"docker://{host_of[label]}/{ref}", dest, a.dest,
                                        debug)
            c1, s1 = run.cpu_seconds(pids), run.system_cpu_seconds()
            check_layer(dest, a.dest, blob)
            shutil.rmtree(dest)
            server = c1 - c0
            busy = s1[0] - s0[0]
            return {"wall": wall, "skopeo_cpu": cpu, "server_cpu": server,
                    "blob_ms": blob_ms(label, m_off, u_off),
                    "other_cpu": max(busy - server - cpu, 0.0), "err": err,
                    "tcp": {**tcp.best, **{f"client_{k}": str(v) for k, v in tcp.client.items()}}
                    if tcp is not None else {}}

        for label in [*mirrors, "direct"]:  # warm-up: mirror cache, page cache, both sides
            r = pull(label)
            print(f"warm-up {label}: {r['wall']:.2f} s", flush=True)
        if a.trace:
            for label in [*mirrors, "direct"]:
                m_off = {lb: m.log_path.stat().st_size for lb, m in mirrors.items()}
                u_off = up.log_path.stat().st_size
                r = pull(label, debug=True)
                print(f"\n=== trace {label}: {r['wall']:.2f} s")
                for lb, m in mirrors.items():
                    for e in mirror_events(m.log_path, m_off[lb]):
                        print(f"  mirror[{lb}] {e['method']} {short(e['path'])} -> "
                              f"{e['status']} {e['bytes']} B {e['duration_ms']} ms "
                              f"cache={e['cache']} t={e.get('timestamp', '')}")
                for ln in upstream_lines(up.log_path, u_off):
                    print(f"  upstream {short(ln)[:220]}")
                for ln in r["err"].splitlines():
                    if any(w in ln for w in ("GET ", "HEAD ", "Ping", "Downloading", "Detected",
                                             "Using blob", "Manifest", "Accept")):
                        print(f"  skopeo {short(ln)[:240]}")
        order = [*mirrors, "direct"]
        res: dict[str, list[dict[str, Any]]] = {label: [] for label in order}
        up_reqs = 0
        for rep in range(a.reps):
            seq = order if rep % 2 == 0 else order[::-1]
            for label in seq:
                u_off = up.log_path.stat().st_size
                r = pull(label)
                res[label].append(r)
                if label != "direct":
                    up_reqs += len(upstream_lines(up.log_path, u_off))
            print(f"rep {rep + 1}: " + "  ".join(
                f"{lb} {res[lb][-1]['wall']:.2f} s (blob {res[lb][-1]['blob_ms'] or 0:.0f} ms, "
                f"skopeo cpu {res[lb][-1]['skopeo_cpu']:.2f}, server cpu "
                f"{res[lb][-1]['server_cpu']:.2f}, other {res[lb][-1]['other_cpu']:.2f}"
                + "".join(f", {k} {v}" for k, v in res[lb][-1]["tcp"].items()
                          if k in ("mss", "segs_out", "segs_in") or k.startswith("client_"))
                + ")"
                for lb in seq), flush=True)

        def med(label: str, key: str) -> float:
            return statistics.median(r[key] or 0.0 for r in res[label])

        d = med("direct", "wall")
        print(f"\n{a.mib} MiB one-layer image, skopeo copy to {a.dest}:, {a.reps} reps, "
              f"load {os.getloadavg()[0]:.1f}; medians:")
        for label in order:
            ws = [r["wall"] for r in res[label]]
            print(f"  {label:10} wall {med(label, 'wall'):5.2f} s (min {min(ws):4.2f} max "
                  f"{max(ws):4.2f})  vs direct {med(label, 'wall') / d:4.2f}x  "
                  f"blob sent in {med(label, 'blob_ms'):5.0f} ms  skopeo cpu "
                  f"{med(label, 'skopeo_cpu'):4.2f} s  server cpu {med(label, 'server_cpu'):4.2f} s"
                  f"  other cpu {med(label, 'other_cpu'):4.2f} s")
            print(f"  {'':10} walls [{' '.join(f'{w:.2f}' for w in ws)}]")
            if a.tcp:
                tcp = [r["tcp"] for r in res[label] if r["tcp"].get("segs_out")]
                if tcp:
                    print(f"  {'':10} layer connection: segments out median "
                          f"{statistics.median(int(t['segs_out']) for t in tcp)}, ACKs in "
                          f"{statistics.median(int(t['segs_in']) for t in tcp)}, sender MSS "
                          f"[{' '.join(t['mss'] for t in tcp)}]")
        print(f"  requests reaching the upstream during the timed mirror pulls: {up_reqs}")
    finally:
        run.stop_all(procs, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
