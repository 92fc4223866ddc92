#!/usr/bin/env python3
"""mirrorcache benchmark: mirrorcache side by side with Distribution's proxy mode and nginx.

Usage::

    python bench/run.py [--quick] [--workers N] [--big-mib 1024] [--mid-mib 200]
                        [--duration 10] [--reps 3] [--concurrency 50] [--clients 200]
                        [--workdir DIR] [--keep] [--results PATH] [--json PATH]
                        [--profile] [--no-uvloop] [--mirror-env K=V] [--quiet-wait S]
                        [--upstream-mibps N] [--https-upstream] [--seed N]

``--quick`` (256 MiB big blob, 50 MiB mid blob, 5 s load, 1 repetition) finishes in a
minute or two; the full run (1 GiB, 200 MiB, 10 s, 3 repetitions) in a few minutes on 2
cores.

Everything runs on 127.0.0.1, as processes of this script, under a work directory
(``bench/.work/run-<pid>``) that is removed at exit, Ctrl-C and errors included:

* the **upstream**: a Distribution 2.8.2 registry (``docker-registry``) holding three
  generated images, ``bench/big`` (one layer of ``--big-mib``), ``bench/mid`` (one layer of
  ``--mid-mib``) and ``bench/small`` (24 layers of 4 KiB to 4 MiB). Layers are random bytes
  (numpy's SFC64 generator, ~3 GB/s, else ``os.urandom``) written to files while hashing; each
  is pushed with one monolithic ``PUT`` streaming the file. The upstream logs every request
  as a JSON line (``log: {formatter: json}``; 2.8.2 writes ``"msg": "response completed"``
  with ``http.request.method`` / ``http.request.uri`` / ``http.request.useragent`` at level
  info, plus a combined-format line per request from ``accesslog``): requests that reach the
  upstream are counted from that log, per measurement window, leaving out this script's own
  client (User-Agent ``mirrorcache-bench``).
* the **reference peer**: Distribution in proxy mode (``proxy: remoteurl:`` the upstream).
* **nginx** serving the same blob files statically (``sendfile on``; ``worker_processes``
  = ``--workers``), config, pid and logs in the work directory.
* **mirrorcache**: ``python -m mirrorcache serve --config <yaml>`` with a filesystem cache in
  the work directory (``workers: N`` only when ``--workers`` > 1). Fresh caches mean a new
  process on an empty directory; mirrorcache and the peer are restarted that way before every
  cold measurement.

``--upstream-mibps N`` puts the upstream behind a second nginx, a reverse proxy sending at
most N MiB/s per connection, for mirrorcache, the peer and the direct pulls alike: an
upstream across a WAN link. On plain loopback the upstream serves from page cache faster than
any verifying proxy can hash (sha256 is ~1.7 GiB/s per core), and 50 clients of one blob need
50 times its bytes: goals 1 and 3 mean most with a realistic upstream link.

Clients: ``bench/fetch.py`` (one process, epoll, ``recv_into`` a 4 MiB buffer; reaches
~3 GB/s from nginx on one stream, where curl stops near 2 GB/s) for blob pulls; ``wrk -t2 -c32``
for manifest GETs; ``bench/loadgen.py`` (uvloop, 32 connections, matches wrk against nginx) for
manifest HEADs, because wrk 4.1 hangs on HEAD. nginx measured with the same clients shows
their ceiling. Warm measurements follow untimed warm-up pulls (some VMs, this one included,
reclaim idle page cache within a minute). Every blob served by mirrorcache is sha256-checked
at least once (the 50-way cold run hashes one of its streams: the in-flight path; the others
are hashed warm).

Measurements. Rows named ``10.`` are issue 10's goals, all judged in the same run:

* cold pull of the big blob (1 GiB), mirrorcache vs the peer, each started anew on an empty
  cache, once with a plain ``http`` upstream and once with an ``https`` one (the TLS front
  below): >= 1.2x the peer's MiB/s, for each scheme;
* CPU per cold GiB, per scheme: user+sys seconds of mirrorcache's process tree (from /proc)
  during its cold pull, per GiB of the blob: <= 2.0 s. The reference column is the peer's,
  "until served" (until its client had the last byte; the peer then fetches the blob a second
  time to store it, which "stored" adds);
* ``--concurrency`` (50) simultaneous cold GETs of the mid blob (200 MiB): exactly 1 upstream
  GET, and wall time <= 1.2x nginx serving the same bytes to the same 50 clients warm;
* warm pull of the big blob: >= 0.95x nginx and >= 1.2x the peer warm; a warm ``skopeo copy``
  of the mid image (manifest by tag, config, layer; into a ``dir:``) through mirrorcache vs
  straight from the upstream, alternated, ``--reps`` times after an untimed one each: median
  wall time <= 1.0x direct (min-max spread shown);
* no regression elsewhere: manifest GET by tag (wrk, 32 connections, ``--duration`` s) >= 0.95x
  the 7377 req/s of bench/RESULTS-history.md's full run of 2026-11-23 (``393fb4c``, before
  issue 10's work), and the rows below.

Info rows beside goal 1: the same cold pull over http through ``bench/floor_relay.c``, a C
relay doing only what a verifying cache must (``cache``: recv, sha256, pwrite, sendfile of
the spool; ``tee``: the client first, then hash and write), built with gcc when it can be:
the floor of the goal on this machine (``bench/floor.py`` measures it alone).

The other rows: 1. cold big pull over http, mirrorcache / the peer vs straight from the
upstream (info: the earlier >= 0.9x goal) and upstream GETs of the blob per scheme; 3. the
50 cold GETs: zero client errors, wall vs one cold pull (info: the earlier <= 1.3x goal), the
peer's figures; 4. manifest GET and HEAD by tag: requests/s vs the peer (>= 2x) and upstream
requests caused (0 within tag_ttl); 5. peak RSS of the mirrorcache process tree (VmHWM per
process <= 150 MB; the sum is reported too); 6. ``--clients`` (200) simultaneous warm pulls
(10% the mid blob, the rest small blobs): zero errors and aggregate throughput vs nginx
(>= 0.8x). Repeated figures (MiB/s, CPU per GiB) are medians over ``--reps``, of the quiet
repetitions where there are any (see below); the alternated skopeo pulls, of all.

Prints a table (measure, mirrorcache, reference, ratio, goal, pass/fail) and writes it with
the machine facts, per-process CPU seconds per measurement and upstream request breakdowns to
``bench/RESULTS.md`` (full runs; ``--quick`` writes ``bench/.work/RESULTS-quick.md``, unless
``--results`` says otherwise). ``bench/RESULTS-workers2.md`` and
``bench/RESULTS-upstream200.md`` hold full runs with ``--workers 2`` and
``--upstream-mibps 200``.

Every run also starts nginx terminating TLS (a certificate from a private trustme CA,
trusted through ``SSL_CERT_FILE`` by mirrorcache, the peer and skopeo) in front of the
upstream (or of the throttle): every real registry is HTTPS, and the cold big pulls are
measured over it as well as over plain HTTP. ``--https-upstream`` makes mirrorcache and the
peer use it for every other measurement too (warm, 50 cold clients, manifests, 200 clients;
the skopeo "direct" pulls then go to it as well). The fetch.py direct pulls stay plain HTTP
(fetch.py speaks no TLS). ``bench/coldcpu.py`` measures CPU-seconds per cold GiB alone, A/B
between source trees, over HTTP or HTTPS.

``--profile`` records mirrorcache with py-spy (``pip install py-spy``) during each of its
measurements into ``<workdir>/profiles`` as speedscope JSON (use with ``--keep``).
``--no-uvloop`` hides uvloop from mirrorcache (``bench/mcshim.py``) and ``--mirror-env``
adds environment variables: A/B runs.

The machine may be shared: before each measurement the script waits (``--quiet-wait``
budget) until other processes use < 0.15 CPUs, records the CPU every other process used
meanwhile (``/proc/stat``), marks a measurement noisy above 10% of all CPUs, and takes medians
over the quiet repetitions. Exit status: 0 when the run completed (goals may fail), 1 on an
error, 130 when interrupted; processes and the work directory are cleaned up in every case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from tests.support.images import MANIFEST_ACCEPT, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402

MiB = 1 << 20
CLIENT_UA = "mirrorcache-bench"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk")
PYSPY = shutil.which("py-spy")
SKOPEO = shutil.which("skopeo")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- test data

@dataclass
class BlobFile:
    """A generated blob on disk (named by its hex digest, so nginx serves it as /<hex>)."""

    path: Path
    digest: str
    size: int
    media_type: str

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass
class ImageSpec:
    repo: str
    config: BlobFile
    layers: list[BlobFile]
    manifest: bytes = b""

    @property
    def blobs(self) -> list[BlobFile]:
        return [self.config, *self.layers]


def _random_chunks(size: int, seed: int) -> Iterator[bytes]:
    chunk = 16 * MiB
    try:
        import numpy as np

        gen = np.random.Generator(np.random.SFC64(seed))
        left = size
        while left > 0:
            n = min(chunk, left)
            words = (n + 7) // 8
            data = gen.integers(0, 2**64 - 1, size=words, dtype=np.uint64,
                                endpoint=True).tobytes()
            yield data[:n]
            left -= n
    except ImportError:
        left = size
        while left > 0:
            n = min(chunk, left)
            yield os.urandom(n)
            left -= n


def write_blob(directory: Path, data: bytes | None, size: int, seed: int,
               media_type: str) -> BlobFile:
    """Write ``data`` (or ``size`` random bytes) to a temp file while hashing; rename to hex."""
    tmp = directory / f".tmp-{seed}"
    h = hashlib.sha256()
    with open(tmp, "wb", buffering=0) as f:
        for chunk in ([data] if data is not None else _random_chunks(size, seed)):
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[f.write(view):]
    final = directory / h.hexdigest()
    tmp.replace(final)
    return BlobFile(final, "sha256:" + h.hexdigest(), final.stat().st_size, media_type)


def make_images(directory: Path, big: int, mid: int, seed: int) -> list[ImageSpec]:
    directory.mkdir(parents=True, exist_ok=True)
    small_sizes = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20] * 4
    specs = [("bench/big", [big]), ("bench/mid", [mid]), ("bench/small", small_sizes)]
    images = []
    n = 0
    for repo, sizes in specs:
        layers = []
        for size in sizes:
            n += 1
            layers.append(write_blob(directory, None, size, seed * 1000 + n, OCI_LAYER))
        config_doc = {
            "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {"Labels": {"bench.repo": repo, "bench.seed": str(seed)}},
            "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layers]},
        }
        n += 1
        config = write_blob(directory, json.dumps(config_doc, indent=2).encode(), 0,
                            seed * 1000 + n, OCI_CONFIG)
        img = ImageSpec(repo, config, layers)
        img.manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
            "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size}
                       for b in layers],
        }, indent=2).encode()
        images.append(img)
    return images


async def _push(url: str, images: list[ImageSpec]) -> None:
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as s:
        for img in images:
            for blob in img.blobs:
                async with s.post(f"{url}/v2/{img.repo}/blobs/uploads/") as r:
                    if r.status != 202:
                        raise RuntimeError(f"upload start: {r.status} {await r.text()}")
                    loc = r.headers["Location"]
                if loc.startswith("/"):
                    loc = url + loc
                put = f"{loc}{'&' if '?' in loc else '?'}digest={quote(blob.digest, safe='')}"
                with open(blob.path, "rb") as f:  # streamed: one monolithic PUT, file body
                    async with s.put(put, data=f, headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Length": str(blob.size)}) as r:
                        if r.status != 201:
                            raise RuntimeError(f"blob PUT {blob.digest}: {r.status} "
                                               f"{await r.text()}")
            async with s.put(f"{url}/v2/{img.repo}/manifests/latest", data=img.manifest,
                             headers={"Content-Type": OCI_MANIFEST}) as r:
                if r.status != 201:
                    raise RuntimeError(f"manifest PUT {img.repo}: {r.status} {await r.text()}")


# --------------------------------------------------------------------------- /proc helpers

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now (cheap: /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo.extend(_children(p))
    return out


def system_cpu_seconds() -> tuple[float, float, float]:
    """(task time, irq+softirq time, steal time) of all CPUs since boot, from /proc/stat.

    Loopback TCP is mostly processed in softirq context, which the kernel accounts as
    softirq rather than to the sending or receiving process."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system) / TICK, (irq + softirq) / TICK, steal / TICK


def tcp_counters() -> dict[str, int]:
    """System-wide TcpExt counters that reveal a full accept queue (dropped SYNs)."""
    want = ("ListenOverflows", "ListenDrops", "TCPSynRetrans")
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            pairs = dict(zip(head.split()[1:], vals.split()[1:], strict=False))
            return {k: int(pairs.get(k, 0)) for k in want}
    return {}


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem in kB ({} when gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class RssSampler:
    """Samples VmRSS/VmHWM of the current mirrorcache process tree every ``interval``."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.root: int | None = None
        self.hwm_kb: dict[int, int] = {}       # per pid, peak VmHWM seen
        self.label: dict[int, str] = {}
        self.peak_sum_kb = 0                   # peak of the summed VmRSS of one tree
        self.window_kb = 0                     # peak summed VmRSS since reset_window()
        self.peak_detail: dict[int, dict[str, int]] = {}  # /proc status at each pid's peak
        self.baseline_kb: list[int] = []       # summed VmRSS of each instance when it started
        self.seen_pids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def track(self, pid: int | None) -> None:
        with self._lock:
            if self.root is not None:
                self._sample_locked()
            self.root = pid
            if pid is not None:
                self.baseline_kb.append(self._sample_locked())

    def reset_window(self) -> None:
        with self._lock:
            self.window_kb = self._sample_locked()

    def sample(self) -> None:
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> int:
        if self.root is None:
            return 0
        total = 0
        for pid in process_tree(self.root):
            st = _status_kb(pid)
            if not st:
                continue
            if pid not in self.seen_pids:
                self.seen_pids.add(pid)
                self.label[pid] = "main" if pid == self.root else "worker"
            rss = st.get("VmRSS", 0)
            total += rss
            if rss >= self.peak_detail.get(pid, {}).get("VmRSS", 0):
                self.peak_detail[pid] = st
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), st.get("VmHWM", 0), rss)
        self.peak_sum_kb = max(self.peak_sum_kb, total)
        self.window_kb = max(self.window_kb, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)


# --------------------------------------------------------------------------- processes

class UpstreamLog:
    """Requests the upstream registry logged (JSON lines of Distribution 2.8.2)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, offset: int) -> list[dict[str, Any]]:
        out = []
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.startswith(b"{"):
                    continue
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if "http.request.uri" in doc and str(doc.get("msg", "")).startswith(
                        "response completed"):
                    out.append(doc)
        return [d for d in out if d.get("http.request.useragent") != CLIENT_UA]


def summarize_requests(reqs: list[dict[str, Any]]) -> dict[str, int]:
    """``"GET /v2/bench/mid/blobs/sha256:abcd…"`` -> count (digests shortened)."""
    out: dict[str, int] = {}
    for d in reqs:
        uri = re.sub(r"(sha256:[0-9a-f]{12})[0-9a-f]{52}", r"\1…", d["http.request.uri"])
        uri = re.sub(r"/blobs/uploads/.*", "/blobs/uploads/…", uri)
        key = f"{d['http.request.method']} {uri} -> {d.get('http.response.status')}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None,
              log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"{url}: process exited with {proc.returncode}\n{tail}")
        try:
            with _OPENER.open(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s ({last})")


def stop_all(procs: list[Any], workdir: Path) -> None:
    """Stop the harness processes started (newest first; registries ``close``, the others
    ``stop``), then remove their work directory."""
    for p in reversed(procs):
        (p.stop if hasattr(p, "stop") and not hasattr(p, "close") else p.close)()
    shutil.rmtree(workdir, ignore_errors=True)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=timeout)


class FloorRelay:
    """``bench/floor_relay.c`` (gcc, OpenSSL's libcrypto), built in the work directory: the
    least work a cold pull needs from a mirror that verifies and caches, in C (see the C
    file and bench/floor.py). ``exe`` is None where it cannot be built."""

    def __init__(self, workdir: Path) -> None:
        self.exe: Path | None = workdir / "floor_relay"
        gcc = shutil.which("gcc")
        try:
            if gcc is None:
                raise OSError("no gcc")
            subprocess.run([gcc, "-O2", "-pthread", "-o", str(self.exe),
                            str(BENCH_DIR / "floor_relay.c"), "-lcrypto"], check=True,
                           capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"floor relay not built ({exc}): its rows are left out")
            self.exe = None
        self.spool = workdir / "floor-spool"
        #: CPU seconds (user+sys) of the last relay, as it reported them.
        self.cpu: float | None = None

    @contextlib.contextmanager
    def serving(self, upstream_blob_url: str, mode: str, digest_hex: str) -> Iterator[str]:
        """A relay for one GET of the blob at ``upstream_blob_url`` (plain http): yields the
        URL to pull; afterwards checks the digest it computed (modes cache and tee)."""
        assert self.exe is not None
        parts = urlsplit(upstream_blob_url)
        port = free_port()
        proc = subprocess.Popen([str(self.exe), str(port), str(parts.port), parts.path,
                                 str(self.spool), mode], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("floor_relay did not start")
            yield f"http://127.0.0.1:{port}/{digest_hex}"
            out = json.loads(proc.stdout.readline())
            self.cpu = out["user"] + out["sys"]
            proc.wait(30)
            if mode != "pipe" and out["sha256"] != digest_hex:
                raise RuntimeError(f"floor relay computed {out['sha256']}, not {digest_hex}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            self.spool.unlink(missing_ok=True)


class Mirror:
    """mirrorcache as a subprocess on an empty cache directory."""

    def __init__(self, workdir: Path, upstream_url: str, workers: int, n: int,
                 no_uvloop: bool = False, extra_env: dict[str, str] | None = None) -> None:
        self.no_uvloop = no_uvloop
        self.extra_env = extra_env or {}
        self.dir = workdir / f"mirrorcache-{n}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "storage": {"filesystem": {"path": str(self.dir / "cache")}},
            "upstreams": {"docker.io": {"url": upstream_url, "tag_ttl": "10m"}},
            "default_upstream": "docker.io",
            "log": {"level": "warning"},
            "shutdown_grace": "3s",
        }
        if workers > 1:
            cfg["workers"] = workers
        self.config_path = self.dir / "mirrorcache.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.log_path = self.dir / "mirrorcache.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()

    def start(self) -> Mirror:
        env = {k: v for k, v in os.environ.items()
               if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        env.update(self.extra_env)
        with open(self.log_path, "ab") as logf:
            entry = ([str(BENCH_DIR / "mcshim.py")] if self.no_uvloop
                     else ["-m", "mirrorcache"])
            self.proc = subprocess.Popen(
                [sys.executable, *entry, "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                cwd=self.dir)
        wait_http(f"{self.url}/v2/", 60, self.proc, self.log_path)
        self.pids.update(process_tree(self.proc.pid))
        return self

    def tree(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        pids = process_tree(self.proc.pid)
        self.pids.update(pids)
        return pids

    def stop(self) -> None:
        if self.proc is None:
            return
        self.tree()
        stop_process(self.proc)
        for pid in self.pids:  # workers left behind by a crashed parent: ours, by pid
            if pid != self.proc.pid and "mirrorcache" in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None
        shutil.rmtree(self.dir / "cache", ignore_errors=True)


class Nginx:
    """nginx as our own process: ``server`` is the body of its one server block."""

    def __init__(self, workdir: Path, name: str, workers: int, server: str,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        listen = f"127.0.0.1:{self.port}"
        if tls:
            listen += f" ssl;\n    ssl_certificate {tls[0]};\n    ssl_certificate_key {tls[1]}"
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the blob files
        d = self.dir
        (d / "nginx.conf").write_text(f"""{user}worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  default_type application/octet-stream;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen {listen};
    {server}
  }}
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        d = self.dir
        with open(d / "stderr.log", "ab") as logf:
            self.proc = subprocess.Popen(
                [NGINX, "-c", str(d / "nginx.conf"), "-p", str(d), "-e", str(d / "error.log"),
                 "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited: "
                                   + (d / "error.log").read_text(errors="replace")[-2000:])
            try:
                if self.tls:  # the CA is the clients' business: a listening port will do
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                with _OPENER.open(f"{self.url}/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # 403/404 for the directory: it answers
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return self

    def tree(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGQUIT)
            self.proc = None


def throttle_server(upstream_url: str, mibps: int) -> str:
    """A reverse proxy to the upstream sending at most ``mibps`` MiB/s per connection: an
    upstream across a WAN link rather than on loopback."""
    return f"""location / {{
      proxy_pass {upstream_url};
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      proxy_set_header Connection "";
      proxy_buffering on;
      proxy_buffer_size 64k;
      proxy_buffers 16 1m;
      proxy_busy_buffers_size 2m;
      proxy_max_temp_file_size 0;
      proxy_read_timeout 600s;
      send_timeout 600s;
      limit_rate {mibps * MiB};
    }}"""


def tls_upstream(workdir: Path, upstream_url: str) -> tuple[Nginx, Path]:
    """nginx terminating TLS in front of ``upstream_url`` with a certificate from a private CA
    (trustme); returns it (not started) and the CA file, for ``SSL_CERT_FILE``."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    d = workdir / "pki"
    d.mkdir()
    cert, key, ca_file = d / "server.pem", d / "server.key", d / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    body = f"""location / {{
      proxy_pass {upstream_url};
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
      send_timeout 600s;
    }}"""
    return Nginx(workdir, "tls", 1, body, tls=(cert, key)), ca_file


def peer_blob_path(peer: RegistryProcess, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return peer.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def registry_pids(reg: RegistryProcess | None) -> list[int]:
    proc = getattr(reg, "_proc", None) if reg is not None else None
    return [proc.pid] if proc is not None and proc.poll() is None else []


# --------------------------------------------------------------------------- the benchmark

@dataclass
class Row:
    measure: str
    mine: str
    ref: str
    ratio: str
    goal: str
    ok: bool | None  # None: informational

    @property
    def result(self) -> str:
        return "info" if self.ok is None else ("PASS" if self.ok else "FAIL")


@dataclass
class Meas:
    """One measured block; ``noisy`` when other processes on the machine took a noticeable
    share of the CPU meanwhile (this machine may be shared)."""

    name: str
    noisy: bool = False
    waited: float = 0.0
    tcp: dict[str, int] = field(default_factory=dict)  # TcpExt counter deltas, when non-zero
    used: dict[str, float] = field(default_factory=dict)  # CPU seconds per server (tree)
    wall: float = 0.0


def quiet_median(samples: list[tuple[float, Meas]]) -> float:
    """Median of the samples measured on a quiet machine (of all, if none was)."""
    quiet = [v for v, m in samples if not m.noisy]
    return statistics.median(quiet or [v for v, _ in samples])


#: Seconds any one skopeo copy may take (the mid image warm: seconds).
SKOPEO_TIMEOUT = 180.0

#: A measurement is noisy when foreign processes used more than this share of all CPUs.
NOISE_SHARE = 0.10

#: Issue 10's "no regression" reference for manifest GETs: bench/RESULTS-history.md's full run of
#: 2026-11-23 (commit 393fb4c, quiet machine, wrk -t2 -c32 10 s), before issue 10's work.
MANIFEST_GET_REFERENCE_RPS = 7377.0
MANIFEST_GET_REFERENCE = "7377 req/s (RESULTS-history.md: full run 2026-11-23, 393fb4c)"


@dataclass
class Settings:
    quick: bool
    workers: int
    big: int
    mid: int
    duration: float
    reps: int
    concurrency: int
    clients: int
    workdir: Path
    keep: bool
    results: Path
    json_path: Path | None
    profile: bool
    seed: int
    no_uvloop: bool
    mirror_env: dict[str, str]
    quiet_wait: float
    upstream_mibps: int
    https_upstream: bool = False


@dataclass
class Bench:
    s: Settings
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    cpu: list[tuple[Meas, dict[str, float], float, float]] = field(default_factory=list)
    verified: dict[str, str] = field(default_factory=dict)
    mirror: Mirror | None = None
    peer: RegistryProcess | None = None
    upstream: RegistryProcess | None = None
    nginx: Nginx | None = None
    images: list[ImageSpec] = field(default_factory=list)
    _n: int = 0

    def __post_init__(self) -> None:
        self.throttle: Nginx | None = None
        self.tls_front: Nginx | None = None
        self.quiet_budget = self.s.quiet_wait
        self.sampler = RssSampler()
        self.ulog: UpstreamLog | None = None

    # -- process management
    def restart_mirror(self, upstream_url: str | None = None) -> Mirror:
        """A new mirrorcache on an empty cache, its upstream ``upstream_url`` (default
        ``up_url``)."""
        if self.mirror is not None:
            self.sampler.track(None)
            self.mirror.stop()
        self._n += 1
        self.mirror = Mirror(self.s.workdir, upstream_url or self.up_url, self.s.workers,
                             self._n, self.s.no_uvloop, self.s.mirror_env).start()
        self.sampler.track(self.mirror.proc.pid if self.mirror.proc else None)
        return self.mirror

    def restart_peer(self, upstream_url: str | None = None) -> RegistryProcess:
        if self.peer is not None:
            self.peer.close()
            shutil.rmtree(self.peer.workdir, ignore_errors=True)
        self._n += 1
        d = self.s.workdir / f"peer-{self._n}"
        d.mkdir()
        self.peer = RegistryProcess(
            proxy_remote_url=upstream_url or self.up_url, workdir=d, log_level="warn",
            extra_config={"log": {"accesslog": {"disabled": True}}}).start()
        return self.peer

    def restart_both(self, upstream_url: str | None = None) -> None:
        """Both proxies anew on empty caches, reaching the upstream at ``upstream_url``
        (default ``up_url``; the https cold pulls pass ``https_url``)."""
        self.restart_mirror(upstream_url)
        self.restart_peer(upstream_url)

    @property
    def _up(self) -> RegistryProcess:
        assert self.upstream is not None
        return self.upstream

    @property
    def direct_url(self) -> str:
        """Where the direct pulls reach the upstream (through the throttle with
        --upstream-mibps; plain HTTP: fetch.py speaks no TLS)."""
        return self.throttle.url if self.throttle is not None else self._up.url

    @property
    def https_url(self) -> str:
        """nginx terminating TLS in front of the direct URL (started in every run: the cold
        pulls are measured over both schemes)."""
        assert self.tls_front is not None
        return self.tls_front.url

    @property
    def up_url(self) -> str:
        """Where the proxies reach the upstream outside the cold big pulls: the direct URL,
        or with --https-upstream the TLS front."""
        return self.https_url if self.s.https_upstream else self.direct_url

    def scheme_url(self, scheme: str) -> str:
        return self.https_url if scheme == "https" else self.direct_url

    @property
    def _m(self) -> Mirror:
        assert self.mirror is not None
        return self.mirror

    @property
    def _p(self) -> RegistryProcess:
        assert self.peer is not None
        return self.peer

    def close(self) -> None:
        self.sampler.track(None)
        self.sampler.stop()
        if self.mirror is not None:
            self.mirror.stop()
        if self.peer is not None:
            self.peer.close()
        if self.nginx is not None:
            self.nginx.stop()
        if self.throttle is not None:
            self.throttle.stop()
        if self.tls_front is not None:
            self.tls_front.stop()
        if self.upstream is not None:
            self.upstream.close()

    # -- clients
    def _cpu_snapshot(self) -> dict[str, float]:
        return {
            "mirrorcache": cpu_seconds(self.mirror.tree()) if self.mirror else 0.0,
            "peer": cpu_seconds(registry_pids(self.peer)),
            "upstream": cpu_seconds(registry_pids(self.upstream)),
            "nginx": cpu_seconds(self.nginx.tree()) if self.nginx else 0.0,
            "throttle": cpu_seconds(self.throttle.tree()) if self.throttle else 0.0,
            "tls front": cpu_seconds(self.tls_front.tree()) if self.tls_front else 0.0,
        }

    def _wait_quiet(self) -> float:
        """Wait (within the run's budget) until the rest of the machine uses < 0.15 CPUs."""
        t0 = time.monotonic()
        limit = min(15.0, self.quiet_budget)
        while limit > 0:
            a = system_cpu_seconds()[0]
            time.sleep(0.3)
            if (system_cpu_seconds()[0] - a) / 0.3 < 0.15:
                break
            if time.monotonic() - t0 > limit:
                break
        waited = max(time.monotonic() - t0 - 0.3, 0.0)
        self.quiet_budget -= waited
        return waited

    @contextlib.contextmanager
    def measured(self, name: str) -> Iterator[Meas]:
        """CPU seconds of every server (and this script's children: the clients) in a block;
        with --profile, py-spy records mirrorcache meanwhile."""
        meas = Meas(name)
        os.sync()  # write-back of the previous step must not land in this one
        meas.waited = self._wait_quiet()
        spy = (self._start_profile(name)
               if self.s.profile and "mirrorcache" in name else None)
        before = self._cpu_snapshot()
        self.sampler.reset_window()
        ru = os.times()
        sys0 = system_cpu_seconds()
        tcp0 = tcp_counters()
        t0 = time.monotonic()
        try:
            yield meas
        finally:
            wall = time.monotonic() - t0
            after = self._cpu_snapshot()
            ru2 = os.times()
            used = {k: round(after[k] - before[k], 2) for k in after
                    if after[k] - before[k] >= 0.005}
            used["clients"] = round((ru2.children_user + ru2.children_system)
                                    - (ru.children_user + ru.children_system), 2)
            used["bench"] = round(max(ru2.user + ru2.system - ru.user - ru.system, 0), 2)
            tasks, irq, steal = (b - a for a, b in zip(sys0, system_cpu_seconds(), strict=True))
            used["softirq"] = round(irq, 2)
            if steal > 0.05:
                used["steal"] = round(steal, 2)
            # Every other process on the machine (other users' jobs, kernel threads): noise.
            used["other"] = round(max(tasks - sum(v for k, v in used.items()
                                                   if k not in ("softirq", "steal")), 0), 2)
            tcp1 = tcp_counters()
            meas.tcp = {k: tcp1[k] - tcp0.get(k, 0) for k in tcp1 if tcp1[k] - tcp0.get(k, 0)}
            meas.noisy = used["other"] > max(NOISE_SHARE * wall * (os.cpu_count() or 1), 0.05)
            self.sampler.sample()
            # Unrounded, per server, for figures derived from them (CPU per GiB).
            meas.used = {k: after[k] - before[k] for k in after}
            meas.wall = wall
            self.cpu.append((meas, used, round(wall, 2), round(self.sampler.window_kb / 1024, 1)))
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(timeout=20)
                if spy.poll() is None:
                    spy.kill()

    def _start_profile(self, name: str) -> subprocess.Popen[bytes] | None:
        if PYSPY is None or self.mirror is None or self.mirror.proc is None:
            return None
        out = self.s.workdir / "profiles"
        out.mkdir(exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return subprocess.Popen(
            [PYSPY, "record", "--pid", str(self.mirror.proc.pid), "--subprocesses",
             "--rate", "250", "--format", "speedscope", "-o", str(out / f"{slug}.json")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def fetch(self, urls: list[str], hash_mode: str = "none",
              timeout: float = 300.0) -> dict[str, Any]:
        cmd = [sys.executable, str(BENCH_DIR / "fetch.py"), "--hash", hash_mode,
               "--timeout", str(timeout), *urls]
        out = subprocess.run(cmd, capture_output=True, check=True, timeout=timeout + 30)
        res: dict[str, Any] = json.loads(out.stdout)
        return res

    def get_manifest(self, base: str, img: ImageSpec) -> None:
        """What a client does before pulling blobs (untimed; warms connection pools)."""
        req = urllib.request.Request(f"{base}/v2/{img.repo}/manifests/latest",
                                     headers={"Accept": MANIFEST_ACCEPT, "User-Agent": "warm-up"})
        with _OPENER.open(req, timeout=30) as resp:
            if resp.read() != img.manifest:
                raise RuntimeError(f"manifest of {img.repo} from {base} differs")

    def pull_one(self, url: str, expect: BlobFile, label: str) -> float:
        """Seconds for one GET of ``expect`` (raises on any error or short body)."""
        res = self.fetch([url])
        t = res["transfers"][0]
        if t["error"] or t["bytes"] != expect.size:
            raise RuntimeError(f"{label}: {url}: {t['error']} ({t['bytes']} bytes)")
        seconds: float = t["end"] - t["start"]
        return seconds

    def verify(self, url: str, blob: BlobFile, how: str) -> None:
        res = self.fetch([url], hash_mode="all")
        self._check_digest(res["transfers"][0], blob, how)

    def _check_digest(self, t: dict[str, Any], blob: BlobFile, how: str) -> None:
        if t["error"] or t["sha256"] != blob.hex:
            self.verified[blob.digest] = f"MISMATCH ({how}: {t['error'] or t['sha256']})"
            raise RuntimeError(f"digest check failed for {blob.digest} ({how}): {t}")
        self.verified.setdefault(blob.digest, how)

    # -- URLs
    @staticmethod
    def blob_url(base: str, img: ImageSpec, blob: BlobFile) -> str:
        return f"{base}/v2/{img.repo}/blobs/{blob.digest}"

    def ngx_url(self, blob: BlobFile) -> str:
        assert self.nginx is not None
        return f"{self.nginx.url}/{blob.hex}"

    def upstream_requests(self, mark: int) -> list[dict[str, Any]]:
        assert self.ulog is not None
        return self.ulog.since(mark)

    def wait_peer_stored(self, blob: BlobFile, timeout: float = 120.0,
                         settle: float = 0.2) -> None:
        """Distribution's proxy stores a blob in a background fetch: wait for it to land
        (and ``settle`` seconds more, for the upstream to log that fetch)."""
        path = peer_blob_path(self._p, blob.digest)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size == blob.size:
                    time.sleep(settle)
                    return
            time.sleep(0.05)
        raise TimeoutError(f"peer did not store {blob.digest} within {timeout}s")

    # -- phases
    def setup(self) -> None:
        s = self.s
        blobs_dir = s.workdir / "blobs"
        t0 = time.monotonic()
        self.images = make_images(blobs_dir, s.big, s.mid, s.seed)
        log(f"generated {sum(b.size for i in self.images for b in i.blobs) / MiB:.0f} MiB of "
            f"blobs in {time.monotonic() - t0:.1f}s")
        self.upstream = RegistryProcess(
            workdir=s.workdir / "upstream", log_level="info",
            extra_config={"log": {"formatter": "json", "accesslog": {"disabled": False}}})
        (s.workdir / "upstream").mkdir()
        self.upstream.start()
        self.ulog = UpstreamLog(self.upstream.log_path)
        t0 = time.monotonic()
        asyncio.run(_push(self.upstream.url, self.images))
        log(f"pushed to the upstream {self.upstream.url} in {time.monotonic() - t0:.1f}s")
        self.nginx = Nginx(s.workdir, "nginx", s.workers, f"root {blobs_dir};").start()
        if s.upstream_mibps:
            self.throttle = Nginx(s.workdir, "throttle", 1,
                                  throttle_server(self.upstream.url, s.upstream_mibps)).start()
        # Always: the cold big pull is measured over https too (--https-upstream: every
        # other measurement as well).
        self.tls_front, ca_file = tls_upstream(s.workdir, self.direct_url)
        self.tls_front.start()
        # Trusted by mirrorcache (Python's default verify paths) and the peer (Go) alike.
        os.environ["SSL_CERT_FILE"] = str(ca_file)
        self.sampler.start()
        # No proxies yet: phase_cold_big starts both anew per upstream scheme.

    @property
    def big(self) -> tuple[ImageSpec, BlobFile]:
        return self.images[0], self.images[0].layers[0]

    @property
    def mid(self) -> tuple[ImageSpec, BlobFile]:
        return self.images[1], self.images[1].layers[0]

    @property
    def small(self) -> ImageSpec:
        return self.images[2]

    def phase_cold_big(self) -> None:
        """Cold pulls of the big blob through mirrorcache and the peer, each started anew on
        an empty cache, over a plain http upstream and over https (the TLS front) alike;
        per repetition also straight from the upstream (plain http: fetch.py speaks no TLS).
        The scheme of ``up_url`` goes last, so the later phases find both proxies warm."""
        img, blob = self.big
        schemes = ("http", "https") if self.s.https_upstream else ("https", "http")
        log(f"1/10. cold pull of the {blob.size // MiB} MiB blob over "
            f"{' and '.join(schemes)} ({self.s.reps}x)")
        up_url = self.blob_url(self.direct_url, img, blob)
        self.pull_one(up_url, blob, "upstream warm-up")
        up: list[tuple[float, Meas]] = []
        mc: dict[str, list[tuple[float, Meas]]] = {k: [] for k in schemes}
        peer: dict[str, list[tuple[float, Meas]]] = {k: [] for k in schemes}
        # CPU seconds per GiB of the blob: mirrorcache's process tree over its measurement;
        # the peer's until its client had the last byte ("until served": it then fetches the
        # blob a second time to store it) and until stored.
        mc_cpu: dict[str, list[tuple[float, Meas]]] = {k: [] for k in schemes}
        peer_cpu: dict[str, list[tuple[float, Meas]]] = {k: [] for k in schemes}
        peer_cpu_stored: dict[str, list[tuple[float, Meas]]] = {k: [] for k in schemes}
        mc_gets: dict[str, list[int]] = {k: [] for k in schemes}
        peer_gets: dict[str, list[int]] = {k: [] for k in schemes}
        # The floor (bench/floor_relay.c): the same verify-and-cache work in C, and with the
        # client first (tee), over plain http: how far this machine lets any mirror go.
        floor = FloorRelay(self.s.workdir)
        floors: dict[str, list[tuple[float, Meas]]] = {"cache": [], "tee": []}
        floor_cpu: dict[str, list[tuple[float, Meas]]] = {"cache": [], "tee": []}
        per_gib = (1 << 30) / blob.size
        for rep in range(self.s.reps):
            with self.measured(f"cold big: upstream direct #{rep + 1}") as m:
                up.append((self.pull_one(up_url, blob, "upstream"), m))
            for mode in floors if floor.exe is not None else ():
                # The relay is reaped inside the measurement: its CPU counts with the clients
                # (this script's children), not as another process's noise.
                with self.measured(f"cold big http: C floor relay ({mode}) #{rep + 1}") as m, \
                        floor.serving(up_url, mode, blob.hex) as relay_url:
                    floors[mode].append((self.pull_one(relay_url, blob, f"floor {mode}"), m))
                floor_cpu[mode].append(((floor.cpu or 0.0) * per_gib, m))
            for scheme in schemes:
                self.restart_both(self.scheme_url(scheme))
                self.get_manifest(self._m.url, img)
                self.get_manifest(self._p.url, img)
                mark = self.ulog.mark() if self.ulog else 0
                with self.measured(f"cold big {scheme}: mirrorcache #{rep + 1}") as m:
                    mc[scheme].append((self.pull_one(self.blob_url(self._m.url, img, blob),
                                                     blob, f"mirrorcache cold {scheme}"), m))
                mc_cpu[scheme].append((m.used.get("mirrorcache", 0.0) * per_gib, m))
                reqs = self.upstream_requests(mark)
                mc_gets[scheme].append(_count_gets(reqs, blob))
                self.details.setdefault(f"upstream requests: cold big {scheme} via mirrorcache",
                                        summarize_requests(reqs))
                mark = self.ulog.mark() if self.ulog else 0
                with self.measured(f"cold big {scheme}: peer #{rep + 1}") as m:
                    c0 = cpu_seconds(registry_pids(self.peer))
                    peer[scheme].append((self.pull_one(self.blob_url(self._p.url, img, blob),
                                                       blob, f"peer cold {scheme}"), m))
                    served = cpu_seconds(registry_pids(self.peer)) - c0
                    self.wait_peer_stored(blob)
                peer_cpu[scheme].append((served * per_gib, m))
                peer_cpu_stored[scheme].append((m.used.get("peer", 0.0) * per_gib, m))
                reqs = self.upstream_requests(mark)
                peer_gets[scheme].append(_count_gets(reqs, blob))
                self.details.setdefault(f"upstream requests: cold big {scheme} via peer",
                                        summarize_requests(reqs))
        self.details["cold big samples (s)"] = {
            "upstream direct (http)": _fmt(up),
            **{f"{who} {k}": _fmt(v[k]) for who, v in (("mirrorcache", mc), ("peer", peer))
               for k in schemes}}
        self.details["cold big CPU seconds per GiB"] = {
            **{f"mirrorcache {k}": _fmt(mc_cpu[k]) for k in schemes},
            **{f"peer {k} (until served)": _fmt(peer_cpu[k]) for k in schemes},
            **{f"peer {k} (until stored)": _fmt(peer_cpu_stored[k]) for k in schemes}}
        size = _size_label(blob.size)
        t_up = _mibps(blob.size, quiet_median(up))
        for scheme in ("http", "https"):
            t_mc = _mibps(blob.size, quiet_median(mc[scheme]))
            t_pr = _mibps(blob.size, quiet_median(peer[scheme]))
            self.rows.append(_ratio_row(f"10. cold {size} {scheme}: mirrorcache vs peer",
                                        t_mc, t_pr, "MiB/s", 1.2))
        if floors["cache"]:
            t_pr = _mibps(blob.size, quiet_median(peer["http"]))
            t_mc = _mibps(blob.size, quiet_median(mc["http"]))
            for mode, what in (("cache", "verify+cache, as mirrorcache"),
                               ("tee", "client first, then hash+write")):
                t_fl = _mibps(blob.size, quiet_median(floors[mode]))
                c_fl = quiet_median(floor_cpu[mode])
                self.rows.append(Row(f"10. cold {size} http: C floor relay ({what}) vs peer",
                                     f"{t_fl:.0f} MiB/s ({c_fl:.2f} cpu-s/GiB)",
                                     f"{t_pr:.0f} MiB/s", f"{t_fl / t_pr:.2f}x", "info", None))
            t_fl = _mibps(blob.size, quiet_median(floors["cache"]))
            self.rows.append(Row(f"10. cold {size} http: mirrorcache vs the C floor relay",
                                 f"{t_mc:.0f} MiB/s", f"{t_fl:.0f} MiB/s",
                                 f"{t_mc / t_fl:.2f}x", "info", None))
            self.details["cold big samples (s)"].update(
                {f"C floor relay {k} http": _fmt(v) for k, v in floors.items()})
        for scheme in ("http", "https"):
            c_mc = quiet_median(mc_cpu[scheme])
            c_pr = quiet_median(peer_cpu[scheme])
            c_st = quiet_median(peer_cpu_stored[scheme])
            self.rows.append(Row(f"10. CPU per cold GiB {scheme}: mirrorcache",
                                 f"{c_mc:.2f} cpu-s/GiB",
                                 f"{c_pr:.2f} cpu-s/GiB (peer until served; {c_st:.2f} stored)",
                                 f"{c_mc / c_pr:.2f}x" if c_pr else "", "<= 2.0 s",
                                 c_mc <= 2.0))
        self.rows.append(_ratio_row(f"1. cold pull {size} http: mirrorcache vs upstream direct",
                                    _mibps(blob.size, quiet_median(mc["http"])), t_up, "MiB/s",
                                    None))
        self.rows.append(_ratio_row(f"1. cold pull {size} http: peer vs upstream direct",
                                    _mibps(blob.size, quiet_median(peer["http"])), t_up,
                                    "MiB/s", None))
        self.rows.append(Row(f"1. cold pull {size}: upstream GETs of the blob (http; https)",
                             "; ".join("/".join(map(str, mc_gets[k])) for k in ("http", "https")),
                             "; ".join("/".join(map(str, peer_gets[k]))
                                       for k in ("http", "https")) + " (peer)",
                             "", "info", None))

    def phase_warm_big(self) -> None:
        img, blob = self.big
        log(f"2. warm pull of the {blob.size // MiB} MiB blob ({self.s.reps}x)")
        mc_url = self.blob_url(self._m.url, img, blob)
        peer_url = self.blob_url(self._p.url, img, blob)
        self.verify(mc_url, blob, "warm, mirrorcache")
        self.pull_one(self.ngx_url(blob), blob, "nginx warm-up")
        self.pull_one(peer_url, blob, "peer warm-up")
        mc: list[tuple[float, Meas]] = []
        ngx: list[tuple[float, Meas]] = []
        peer: list[tuple[float, Meas]] = []
        for rep in range(self.s.reps):
            with self.measured(f"warm big: mirrorcache #{rep + 1}") as m:
                mc.append((self.pull_one(mc_url, blob, "mirrorcache warm"), m))
            with self.measured(f"warm big: nginx #{rep + 1}") as m:
                ngx.append((self.pull_one(self.ngx_url(blob), blob, "nginx"), m))
            with self.measured(f"warm big: peer #{rep + 1}") as m:
                peer.append((self.pull_one(peer_url, blob, "peer warm"), m))
        self.details["warm big samples (s)"] = {
            "mirrorcache": _fmt(mc), "nginx": _fmt(ngx), "peer": _fmt(peer)}
        t_mc = _mibps(blob.size, quiet_median(mc))
        size = _size_label(blob.size)
        # Issue 10's goals (tighter than the earlier >= 0.9x nginx, >= 1x the peer).
        self.rows.append(_ratio_row(f"10. warm {size}: mirrorcache vs nginx", t_mc,
                                    _mibps(blob.size, quiet_median(ngx)), "MiB/s", 0.95))
        self.rows.append(_ratio_row(f"10. warm {size}: mirrorcache vs peer warm", t_mc,
                                    _mibps(blob.size, quiet_median(peer)), "MiB/s", 1.2))

    def phase_concurrent_cold(self) -> None:
        img, blob = self.mid
        n = self.s.concurrency
        size = _size_label(blob.size)
        log(f"3. {n} concurrent cold GETs of the {size} blob")
        singles: dict[str, list[tuple[float, Meas]]] = {"mirrorcache": [], "peer": []}
        for rep in range(self.s.reps):
            self.restart_both()
            self.get_manifest(self._m.url, img)
            self.get_manifest(self._p.url, img)
            with self.measured(f"cold mid single: mirrorcache #{rep + 1}") as m:
                singles["mirrorcache"].append((self.pull_one(
                    self.blob_url(self._m.url, img, blob), blob, "mirrorcache cold single"), m))
            with self.measured(f"cold mid single: peer #{rep + 1}") as m:
                singles["peer"].append((self.pull_one(
                    self.blob_url(self._p.url, img, blob), blob, "peer cold single"), m))
                self.wait_peer_stored(blob)
        self.restart_both()
        self.get_manifest(self._m.url, img)
        self.get_manifest(self._p.url, img)
        results: dict[str, dict[str, Any]] = {}
        for who, base in (("mirrorcache", self._m.url), ("peer", self._p.url)):
            mark = self.ulog.mark() if self.ulog else 0
            url = self.blob_url(base, img, blob)
            with self.measured(f"cold mid x{n}: {who}"):
                res = self.fetch([url] * n, hash_mode="first", timeout=600)
                if who == "peer":
                    self.wait_peer_stored(blob)
            reqs = self.upstream_requests(mark)
            errors = [t for t in res["transfers"] if t["error"] or t["bytes"] != blob.size]
            if who == "mirrorcache" and not errors:
                self._check_digest(res["transfers"][0], blob, f"cold, one of {n} concurrent")
            durations = [r.get("http.response.duration", "?") for r in reqs
                         if r["http.request.method"] == "GET"
                         and r["http.request.uri"].endswith(blob.digest)]
            results[who] = {"wall": res["wall"], "gets": _count_gets(reqs, blob),
                            "errors": len(errors), "upstream_get_durations": durations,
                            "bytes": res["bytes"],
                            "connect_s_max": max((t["connect"] or 0) for t in res["transfers"])}
            self.details[f"upstream requests: {n} concurrent cold via {who}"] = \
                summarize_requests(reqs)
        # The floor on this machine: the same bytes to the same client, from nginx, warm.
        self.pull_one(self.ngx_url(blob), blob, "nginx warm-up")
        with self.measured(f"warm mid x{n}: nginx (floor)"):
            floor = self.fetch([self.ngx_url(blob)] * n, hash_mode="first", timeout=600)
        results["nginx warm"] = {"wall": floor["wall"], "bytes": floor["bytes"]}
        self.details[f"cold mid: single pulls (s), {n}-way results"] = {
            "single": {k: _fmt(v) for k, v in singles.items()}, "concurrent": results}
        mc, pr = results["mirrorcache"], results["peer"]
        self.rows.append(Row(f"10. {n}x cold GET {size}: upstream GETs of the blob",
                             str(mc["gets"]), f"{pr['gets']} (peer)", "", "== 1",
                             mc["gets"] == 1))
        fl = results["nginx warm"]["wall"]
        ratio = mc["wall"] / fl
        self.rows.append(Row(f"10. {n}x cold GET {size}: wall vs nginx {n}x warm",
                             f"{mc['wall']:.2f} s", f"{fl:.2f} s (nginx)", f"{ratio:.2f}x",
                             "<= 1.2x", ratio <= 1.2))
        self.rows.append(Row(f"3. {n}x cold GET {size}: client errors", str(mc["errors"]),
                             f"{pr['errors']} (peer)", "", "== 0", mc["errors"] == 0))
        s_mc = quiet_median(singles["mirrorcache"])
        s_pr = quiet_median(singles["peer"])
        # The earlier goal (<= 1.3x one cold pull), now information: on loopback one cold
        # pull is far faster than delivering its bytes 50 times, which nginx bounds.
        self.rows.append(Row(f"3. {n}x cold GET {size}: wall vs one cold pull",
                             f"{mc['wall']:.2f} s", f"{s_mc:.2f} s (1 pull)",
                             f"{mc['wall'] / s_mc:.2f}x", "info", None))
        self.rows.append(Row(f"3. {n}x cold GET {size}: peer wall vs its one cold pull",
                             f"{pr['wall']:.2f} s", f"{s_pr:.2f} s (1 pull)",
                             f"{pr['wall'] / s_pr:.2f}x", "(peer)", None))
        agg = _mibps(mc["bytes"], mc["wall"])
        self.rows.append(Row(f"3. {n}x cold GET {size}: aggregate delivered", f"{agg:.0f} MiB/s",
                             f"{_mibps(pr['bytes'], pr['wall']):.0f} MiB/s (peer)",
                             f"{agg / _mibps(pr['bytes'], pr['wall']):.2f}x", "info", None))

    def phase_manifests(self) -> None:
        img = self.small
        d = self.s.duration
        log(f"4. manifest GET/HEAD by tag, 32 connections, {d:.0f}s each")
        path = f"/v2/{img.repo}/manifests/latest"
        accept = f"Accept: {MANIFEST_ACCEPT}"
        # First fetch (counted apart), and every small blob through both: warm for phase 6,
        # and mirrorcache's bytes are hashed.
        mark = self.ulog.mark() if self.ulog else 0
        for base in (self._m.url, self._p.url):
            for method in ("GET", "HEAD"):
                req = urllib.request.Request(base + path, method=method,
                                             headers={"Accept": MANIFEST_ACCEPT,
                                                      "User-Agent": "warm-up"})
                with _OPENER.open(req, timeout=30) as resp:
                    body = resp.read()
                    if method == "GET" and body != img.manifest:
                        raise RuntimeError(f"manifest from {base} differs")
        for b in img.blobs:
            self.verify(self.blob_url(self._m.url, img, b), b, "warm, mirrorcache")
            self.pull_one(self.blob_url(self._p.url, img, b), b, "peer warm-up")
        # The peer's background store fetches must not land in mirrorcache's load window.
        for i, b in enumerate(img.blobs):
            self.wait_peer_stored(b, settle=0.2 if i == len(img.blobs) - 1 else 0.0)
        mid_img, mid = self.mid
        self.pull_one(self.blob_url(self._p.url, mid_img, mid), mid, "peer warm-up")
        self.details["upstream requests: manifest warm-up + small blobs, both"] = \
            summarize_requests(self.upstream_requests(mark))
        out: dict[str, dict[str, Any]] = {}
        for who, base in (("mirrorcache", self._m.url), ("peer", self._p.url)):
            mark = self.ulog.mark() if self.ulog else 0
            with self.measured(f"manifest GET x32 {d:.0f}s: {who}"):
                get = self.wrk(base + path, [accept], d)
            with self.measured(f"manifest HEAD x32 {d:.0f}s: {who}"):
                head = self.loadgen(base + path, "HEAD", [accept], d)
            reqs = self.upstream_requests(mark)
            out[who] = {"get": get, "head": head, "upstream": len(reqs)}
            self.details[f"upstream requests: manifest load via {who}"] = \
                summarize_requests(reqs)
        # The clients' ceiling: nginx serving the manifest bytes as a static file.
        assert self.nginx is not None
        mfile = self.s.workdir / "blobs" / "manifest.json"
        mfile.write_bytes(img.manifest)
        cal = min(d, 3.0)
        ceiling = {"wrk GET": self.wrk(f"{self.nginx.url}/manifest.json", [accept], cal)["rps"],
                   "loadgen HEAD": self.loadgen(f"{self.nginx.url}/manifest.json", "HEAD",
                                                [accept], cal)["rps"]}
        self.details["manifest load results"] = out
        self.details["client ceiling (nginx static file, req/s)"] = ceiling
        mc, pr = out["mirrorcache"], out["peer"]
        for kind, key in (("GET (wrk)", "get"), ("HEAD (loadgen)", "head")):
            a, b = mc[key], pr[key]
            bad = a["errors"] + a["non2xx"]
            self.rows.append(_ratio_row(f"4. manifest {kind} by tag, 32 conns", a["rps"], b["rps"],
                                        "req/s", 2.0, extra_ok=bad == 0,
                                        note=f" ({bad} errors)" if bad else ""))
        bad = mc["get"]["errors"] + mc["get"]["non2xx"]
        self.rows.append(_ratio_row(
            f"10. manifest GET (wrk) by tag vs {MANIFEST_GET_REFERENCE}",
            mc["get"]["rps"], MANIFEST_GET_REFERENCE_RPS, "req/s", 0.95, extra_ok=bad == 0,
            note=f" ({bad} errors)" if bad else ""))
        self.rows.append(Row("4. upstream requests during manifest load", str(mc["upstream"]),
                             f"{pr['upstream']} (peer)", "", "== 0", mc["upstream"] == 0))

    def wrk(self, url: str, headers: list[str], duration: float) -> dict[str, Any]:
        if WRK is None:
            return self.loadgen(url, "GET", headers, duration)
        cmd = [WRK, "-t2", "-c32", f"-d{duration:.0f}s"]
        for h in headers:
            cmd += ["-H", h]
        out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True,
                             timeout=duration + 60).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                         out)
        return {"rps": rps, "non2xx": int(non2xx.group(1)) if non2xx else 0,
                "errors": sum(map(int, sock.groups())) if sock else 0,
                "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
                "latency": re.search(r"Latency\s+(\S+)", out).group(1)}  # type: ignore[union-attr]

    def loadgen(self, url: str, method: str, headers: list[str],
                duration: float) -> dict[str, Any]:
        cmd = [sys.executable, str(BENCH_DIR / "loadgen.py"), url, "--method", method,
               "-c", "32", "-d", str(duration)]
        for h in headers:
            cmd += ["--header", h]
        res: dict[str, Any] = json.loads(subprocess.run(
            cmd, capture_output=True, check=True, timeout=duration + 60).stdout)
        res["non2xx"] = sum(n for code, n in res["statuses"].items() if code[0] != "2")
        return res

    def phase_many_clients(self) -> None:
        n = self.s.clients
        mid_img, mid = self.mid
        small = self.small
        n_mid = max(1, n // 10)
        plan: list[tuple[ImageSpec, BlobFile]] = [(mid_img, mid)] * n_mid
        smalls = small.blobs
        plan += [(small, smalls[i % len(smalls)]) for i in range(n - n_mid)]
        total = sum(b.size for _, b in plan)
        log(f"6. {n} concurrent warm pulls ({n_mid} of the mid blob), "
            f"{total / MiB:.0f} MiB in all ({self.s.reps}x)")
        res: dict[str, list[dict[str, Any]]] = {"mirrorcache": [], "nginx": [], "peer": []}
        urls = {
            "mirrorcache": [self.blob_url(self._m.url, i, b) for i, b in plan],
            "nginx": [self.ngx_url(b) for _, b in plan],
            "peer": [self.blob_url(self._p.url, i, b) for i, b in plan],
        }
        by_url = {self.blob_url(self._m.url, i, b): b for i, b in plan}
        for who in urls:  # warm-up: page cache of every server (this VM reclaims idle pages)
            for u in dict.fromkeys(urls[who]):
                self.fetch([u])
        tcp_drops: dict[str, int] = {}
        for rep in range(self.s.reps):
            for who in ("mirrorcache", "nginx", "peer"):
                with self.measured(f"{n} clients warm: {who} #{rep + 1}") as m:
                    r = self.fetch(urls[who], hash_mode="first", timeout=600)
                tcp_drops[who] = tcp_drops.get(who, 0) + m.tcp.get("ListenOverflows", 0)
                sizes = {u: b.size for u, (_, b) in zip(urls[who], plan, strict=True)}
                errors = [t for t in r["transfers"]
                          if t["error"] or t["bytes"] != sizes[t["url"]]]
                if who == "mirrorcache":
                    for t in r["transfers"]:
                        if t["sha256"] is not None:
                            self._check_digest(t, by_url[t["url"]], f"warm, {n} concurrent")
                res[who].append({"wall": r["wall"], "bytes": r["bytes"], "errors": len(errors),
                                 "noisy": m.noisy,
                                 "first_errors": [e["error"] for e in errors[:3]],
                                 "connect_s_max": max((t["connect"] or 0)
                                                      for t in r["transfers"]),
                                 "connects_over_0.5s": sum(1 for t in r["transfers"]
                                                           if (t["connect"] or 0) > 0.5),
                                 "slowest": round(max((t["end"] or 0) - t["start"]
                                                      for t in r["transfers"]), 3)})
        self.details[f"{n} clients warm results"] = res

        def tput(who: str) -> float:
            return quiet_median([(_mibps(x["bytes"], x["wall"]), Meas("", x["noisy"]))
                                 for x in res[who]])

        errs = sum(x["errors"] for x in res["mirrorcache"])
        self.rows.append(Row(f"6. {n} clients warm: errors", str(errs),
                             f"{sum(x['errors'] for x in res['nginx'])} (nginx)", "", "== 0",
                             errs == 0))
        slow = sum(x["connects_over_0.5s"] for x in res["mirrorcache"])
        self.rows.append(Row(f"6. {n} clients warm: SYNs dropped by a full accept queue",
                             f"{tcp_drops.get('mirrorcache', 0)} ({slow} connects > 0.5 s)",
                             f"{tcp_drops.get('nginx', 0)} (nginx)", "", "info", None))
        self.rows.append(_ratio_row(f"6. {n} clients warm: aggregate throughput vs nginx",
                                    tput("mirrorcache"), tput("nginx"), "MiB/s", 0.8))
        self.rows.append(_ratio_row(f"6. {n} clients warm: aggregate throughput vs peer",
                                    tput("mirrorcache"), tput("peer"), "MiB/s", None))

    def skopeo_copy(self, base: str, img: ImageSpec, dest: Path, label: str) -> float:
        """Seconds for ``skopeo copy`` of ``img``'s tag from the registry at ``base`` into a
        fresh ``dir:`` directory; checks the layer files landed whole (skopeo checks their
        digests itself)."""
        assert SKOPEO is not None
        shutil.rmtree(dest, ignore_errors=True)
        ref = f"{urlsplit(base).netloc}/{img.repo}:latest"
        env = {k: v for k, v in os.environ.items()
               if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        cmd = [SKOPEO, "copy", "--quiet", "--retry-times", "0", "--src-tls-verify=false",
               "--src-no-creds", f"docker://{ref}", f"dir:{dest}"]
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                             timeout=SKOPEO_TIMEOUT)
        seconds = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(f"{label}: skopeo copy {ref} exited {out.returncode}: "
                               f"{out.stderr.strip()[-1000:]}")
        for b in img.blobs:
            got = dest / b.hex
            if not got.exists() or got.stat().st_size != b.size:
                raise RuntimeError(f"{label}: skopeo copy {ref}: {b.digest} missing or short")
        shutil.rmtree(dest, ignore_errors=True)
        return seconds

    def phase_skopeo_warm(self) -> None:
        """Warm pulls of the mid image with skopeo (a real client: manifest by tag, config,
        layer), through mirrorcache and straight from its upstream, alternated."""
        img, blob = self.mid
        size = _size_label(blob.size)
        measure = f"10. warm skopeo pull {size} (the mid image): mirrorcache vs direct"
        if SKOPEO is None:
            self.rows.append(Row(measure, "skopeo not installed", "", "", "<= 1.0x", None))
            return
        log(f"7. warm skopeo pull of the mid image ({size}), through mirrorcache and direct,"
            f" alternated ({self.s.reps}x)")
        dest = self.s.workdir / "skopeo"
        bases = {"mirrorcache": self._m.url, "direct": self.up_url}
        for who, base in bases.items():  # untimed: mirrorcache's config blob, page cache
            self.skopeo_copy(base, img, dest, f"{who} warm-up")
        samples: dict[str, list[tuple[float, Meas]]] = {k: [] for k in bases}
        upstream_reqs: list[dict[str, Any]] = []
        for rep in range(self.s.reps):
            order = list(bases) if rep % 2 == 0 else list(bases)[::-1]
            for who in order:
                mark = self.ulog.mark() if self.ulog else 0
                with self.measured(f"skopeo warm mid: {who} #{rep + 1}") as m:
                    samples[who].append((self.skopeo_copy(bases[who], img, dest, who), m))
                if who == "mirrorcache":
                    upstream_reqs += self.upstream_requests(mark)
        self.details["skopeo warm mid samples (s)"] = {k: _fmt(v) for k, v in samples.items()}
        self.details["upstream requests: skopeo warm pulls via mirrorcache"] = \
            summarize_requests(upstream_reqs)
        # Plain medians over every repetition, noisy or not: the two sides alternate, so load
        # drifts hit both alike, and quiet_median could compare different sample sets.
        mc, direct = (statistics.median(v for v, _ in samples[k]) for k in bases)

        def spread(who: str) -> str:
            vals = [v for v, _ in samples[who]]
            return f" ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else ""

        ratio = mc / direct if direct else 0.0
        self.rows.append(Row(measure, f"{mc:.2f} s{spread('mirrorcache')}",
                             f"{direct:.2f} s{spread('direct')} (direct)", f"{ratio:.2f}x",
                             "<= 1.0x", ratio <= 1.0))

    def phase_rss(self) -> None:
        self.sampler.sample()
        hwm = self.sampler.hwm_kb
        peak = max(hwm.values()) / 1024 if hwm else 0.0
        per = sorted(((v / 1024, self.sampler.label.get(p, "?")) for p, v in hwm.items()),
                     reverse=True)
        self.details["mirrorcache peak RSS per process (MiB, all instances)"] = [
            f"{label}: {mb:.1f}" for mb, label in per]
        self.details["mirrorcache /proc status at the peak (kB), largest process"] = max(
            self.sampler.peak_detail.values(), key=lambda d: d.get("VmRSS", 0), default={})
        self.details["mirrorcache RSS just after start (MiB, each instance)"] = [
            round(kb / 1024, 1) for kb in self.sampler.baseline_kb]
        self.rows.append(Row("5. mirrorcache peak RSS per process (VmHWM)", f"{peak:.1f} MB",
                             "", "", "<= 150 MB", peak <= 150))
        self.rows.append(Row("5. mirrorcache peak RSS, sum over its processes",
                             f"{self.sampler.peak_sum_kb / 1024:.1f} MB",
                             f"{self.s.workers} worker(s)", "", "info", None))

    def phase_digests(self) -> None:
        blobs = {b.digest: b for i in self.images for b in i.blobs}
        missing = [d for d in blobs if d not in self.verified]
        for img in self.images:  # anything not yet hashed from mirrorcache: do it now
            for b in img.blobs:
                if b.digest in missing and self.mirror is not None:
                    self.verify(self.blob_url(self._m.url, img, b), b, "warm, final check")
        bad = [d for d, how in self.verified.items() if how.startswith("MISMATCH")]
        self.details["digest checks (sha256 of the bytes mirrorcache served)"] = {
            d[:19] + "…": how for d, how in self.verified.items()}
        self.rows.append(Row("digests of bytes served by mirrorcache",
                             f"{len(self.verified) - len(bad)}/{len(blobs)} ok", "", "",
                             "all", not bad and len(self.verified) == len(blobs)))


def _fmt(samples: list[tuple[float, Meas]]) -> list[str]:
    return [f"{v:.3f}" + (" (noisy)" if m.noisy else "") for v, m in samples]


def _count_gets(reqs: list[dict[str, Any]], blob: BlobFile) -> int:
    return sum(1 for r in reqs if r["http.request.method"] == "GET"
               and r["http.request.uri"].endswith(f"/blobs/{blob.digest}"))


def _mibps(size: int, seconds: float) -> float:
    return size / MiB / seconds if seconds > 0 else 0.0


def _size_label(size: int) -> str:
    return f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size / MiB:g} MiB"


def _ratio_row(measure: str, mine: float, ref: float, unit: str, goal: float | None, *,
               peer_row: bool = False, extra_ok: bool = True, note: str = "") -> Row:
    ratio = mine / ref if ref else 0.0
    ok = None if goal is None else (ratio >= goal and extra_ok)
    return Row(measure, f"{mine:.0f} {unit}{note}", f"{ref:.0f} {unit}", f"{ratio:.2f}x",
               f">= {goal:g}x" + (" (peer)" if peer_row else "") if goal is not None else "info",
               ok)


# --------------------------------------------------------------------------- reporting

def machine_facts() -> dict[str, str]:
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "HEAD", "--", "mirrorcache"],
                           capture_output=True).stdout
    registry = subprocess.run(["docker-registry", "--version"], capture_output=True,
                              text=True).stdout.strip()
    nginx = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    buf = os.urandom(4 * MiB)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(64):
        h.update(buf)
    sha = 256 / (time.perf_counter() - t0)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uv,
        "mirrorcache commit": commit + (
            f" + uncommitted changes in mirrorcache/ (diff sha256 "
            f"{hashlib.sha256(dirty).hexdigest()[:12]})" if dirty else ""),
        "upstream / peer": registry,
        "nginx": nginx.replace("nginx version: ", ""),
        "sha256 (hashlib, one core)": f"{sha:.0f} MiB/s: the ceiling of any verifying cold path",
    }


def noise_summary(b: Bench) -> str:
    noisy = [m.name for m, *_ in b.cpu if m.noisy]
    waited = sum(m.waited for m, *_ in b.cpu)
    text = (f"Noise: {len(noisy)} of {len(b.cpu)} measurements ran while other processes on"
            f" the machine used more than {NOISE_SHARE:.0%} of its CPUs (waited {waited:.0f} s"
            " in all for quiet before measuring).")
    if noisy:
        text += (" Medians use the quiet repetitions where there are any; noisy: "
                 + ", ".join(noisy) + ".")
    return text


def table(rows: list[Row]) -> str:
    head = ("measure", "mirrorcache", "reference", "ratio", "goal", "result")
    data = [head] + [(r.measure, r.mine, r.ref, r.ratio, r.goal, r.result) for r in rows]
    widths = [max(len(x[i]) for x in data) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) + " |"
             for x in data]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_results(b: Bench, facts: dict[str, str], elapsed: float, argv: list[str]) -> str:
    s = b.s
    loop = ("asyncio (uvloop hidden: --no-uvloop)" if s.no_uvloop
            else "mirrorcache's default")
    env = " ".join(f"{k}={v}" for k, v in s.mirror_env.items())
    lines = [
        "# mirrorcache benchmark results",
        "",
        f"Latest run of `python bench/run.py {' '.join(argv)}`"
        f" ({'quick' if s.quick else 'full'} mode), {elapsed:.0f} s in all."
        " Regenerate with the same command; see the docstring of `bench/run.py` for what is"
        " measured and how.",
        "",
        "| fact | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts.items()],
        f"| workers | {s.workers} (nginx worker_processes {s.workers}) |",
        f"| event loop | {loop} |",
        "| upstream link | " + (f"nginx reverse proxy, limit_rate {s.upstream_mibps} MiB/s per"
                                " connection (--upstream-mibps)" if s.upstream_mibps
                                else "loopback, unthrottled")
        + "; HTTPS: nginx with TLS (trustme CA) in front, for mirrorcache and the peer: the"
        " cold big pulls over both schemes, "
        + ("every other measurement over HTTPS too (--https-upstream)" if s.https_upstream
           else "every other measurement over HTTP")
        + " (fetch.py's direct pulls stay plain HTTP) |",
        *([f"| mirrorcache extra environment | {env} |"] if env else []),
        f"| load average at start / end | {b.details.get('loadavg', '?')} |",
        f"| sizes | big {_size_label(s.big)}, mid {_size_label(s.mid)}, 24 small (4 KiB-4 MiB);"
        f" load {s.duration:g} s; {s.reps} rep(s), medians |",
        "",
        "## Results",
        "",
        table(b.rows),
        "",
        noise_summary(b),
        "",
        "## CPU seconds per measurement",
        "",
        "Per process (tree) during each measurement; `clients` is fetch.py / wrk / loadgen,"
        " `bench` this script (its RSS sampler), `softirq` the kernel's interrupt time (loopback"
        " TCP, mostly), `other` every other process on the machine (from /proc/stat: not"
        " started by the benchmark, i.e. noise)."
        " `mirrorcache peak RSS` is the peak of its summed VmRSS (sampled every 100 ms) during"
        " the measurement; `TCP drops` the system-wide TcpExt counters ListenOverflows /"
        " ListenDrops / TCPSynRetrans that moved (a full accept backlog drops SYNs, and each"
        " costs the client a 1 s retransmit timeout).",
        "",
        "| measurement | wall s | cpu s | mirrorcache peak RSS MB | TCP drops |",
        "|---|---|---|---|---|",
        *[f"| {m.name}{' **(noisy)**' if m.noisy else ''} | {wall} | "
          + ", ".join(f"{k} {v}" for k, v in used.items())
          + f" | {rss} | " + (", ".join(f"{k} {v}" for k, v in m.tcp.items()) or "-") + " |"
          for m, used, wall, rss in b.cpu],
        "",
        "## Details",
        "",
        "```json",
        json.dumps(b.details, indent=1, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="256 MiB / 50 MiB blobs, 5 s load, 1 repetition (about a minute)")
    p.add_argument("--workers", type=int, default=1,
                   help="mirrorcache worker processes (config key workers; nginx gets as many)")
    p.add_argument("--big-mib", type=int, help="big blob size (default 1024, quick 256)")
    p.add_argument("--mid-mib", type=int, help="mid blob size (default 200, quick 50)")
    p.add_argument("--duration", type=float, help="seconds per manifest load (10, quick 5)")
    p.add_argument("--reps", type=int, help="repetitions of the pulls (3, quick 1)")
    p.add_argument("--concurrency", type=int, default=50, help="concurrent cold GETs (50)")
    p.add_argument("--clients", type=int, default=200, help="concurrent warm clients (200)")
    p.add_argument("--workdir", type=Path, help="default bench/.work/run-<pid>")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--results", type=Path,
                   help="markdown report (default bench/RESULTS.md; quick: bench/.work/)")
    p.add_argument("--json", type=Path, help="also write rows and details as JSON")
    p.add_argument("--profile", action="store_true",
                   help="py-spy record mirrorcache during each measurement (workdir/profiles)")
    p.add_argument("--seed", type=int, help="random seed of the generated blobs")
    p.add_argument("--no-uvloop", action="store_true",
                   help="run mirrorcache with uvloop hidden (bench/mcshim.py): A/B of the loop")
    p.add_argument("--quiet-wait", type=float, metavar="S",
                   help="before each measurement wait for other processes to go quiet, at most"
                   " S seconds over the run (default 120, quick 30; 0: never)")
    p.add_argument("--upstream-mibps", type=int, default=0, metavar="N",
                   help="put the upstream behind an nginx reverse proxy sending at most N MiB/s"
                   " per connection (a WAN upstream; default: straight loopback)")
    p.add_argument("--https-upstream", action="store_true",
                   help="mirrorcache and the peer reach the upstream over HTTPS (nginx with "
                        "TLS and a trustme CA in front of it) in every measurement; without "
                        "it only the cold big pulls are measured over HTTPS (besides HTTP)")
    p.add_argument("--mirror-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for mirrorcache (A/B runs, e.g. MALLOC_ARENA_MAX=2)")
    a = p.parse_args(argv)
    q = a.quick
    work = a.workdir or BENCH_DIR / ".work" / f"run-{os.getpid()}"
    results = a.results or (BENCH_DIR / ".work" / "RESULTS-quick.md" if q
                            else BENCH_DIR / "RESULTS.md")
    if a.workers < 1:
        p.error("--workers must be >= 1")
    return Settings(
        quick=q, workers=a.workers,
        big=(a.big_mib or (256 if q else 1024)) * MiB,
        mid=(a.mid_mib or (50 if q else 200)) * MiB,
        duration=a.duration or (5.0 if q else 10.0),
        reps=a.reps or (1 if q else 3),
        concurrency=a.concurrency, clients=a.clients,
        workdir=work.resolve(), keep=a.keep, results=results, json_path=a.json,
        profile=a.profile, seed=a.seed if a.seed is not None else int.from_bytes(os.urandom(3)),
        no_uvloop=a.no_uvloop,
        mirror_env=dict(kv.split("=", 1) for kv in a.mirror_env),
        upstream_mibps=a.upstream_mibps,
        https_upstream=a.https_upstream,
        quiet_wait=a.quiet_wait if a.quiet_wait is not None else (30.0 if q else 120.0),
    )


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    started = time.monotonic()
    s.workdir.mkdir(parents=True, exist_ok=False)
    bench = Bench(s)
    bench.details["loadavg"] = _loadavg()
    phases: list[Callable[[], None]] = [
        bench.setup, bench.phase_cold_big, bench.phase_warm_big, bench.phase_concurrent_cold,
        bench.phase_manifests, bench.phase_many_clients, bench.phase_skopeo_warm,
        bench.phase_rss, bench.phase_digests,
    ]
    try:
        log(f"work directory {s.workdir}; {'quick' if s.quick else 'full'} run, "
            f"workers={s.workers}")
        for phase in phases:
            phase()
        bench.sampler.track(None)
        # Issue 10's goals first, side by side; the rest in the order measured.
        bench.rows.sort(key=lambda r: not r.measure.startswith("10."))
        bench.details["loadavg"] = f"{bench.details['loadavg']} / {_loadavg()}"
        elapsed = time.monotonic() - started
        facts = machine_facts()
        print(table(bench.rows))
        print("\n" + noise_summary(bench))
        print(f"\nrun time {elapsed:.0f} s; {facts['nproc']} CPUs, {facts['memory']}, "
              f"kernel {facts['kernel']}, Python {facts['python']}, aiohttp {facts['aiohttp']}")
        s.results.parent.mkdir(parents=True, exist_ok=True)
        s.results.write_text(write_results(bench, facts, elapsed, argv))
        print(f"wrote {s.results}")
        if s.json_path is not None:
            s.json_path.write_text(json.dumps(
                {"facts": facts, "rows": [r.__dict__ | {"result": r.result} for r in bench.rows],
                 "cpu": [{"measurement": m.name, "noisy": m.noisy, "cpu": used, "wall": wall,
                          "mirrorcache_rss_mb": rss} for m, used, wall, rss in bench.cpu],
                 "details": bench.details}, indent=1, default=str))
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    except Exception:
        import traceback
        traceback.print_exc()
        if bench.mirror is not None and bench.mirror.log_path.exists():
            log("mirrorcache log tail:\n"
                + bench.mirror.log_path.read_text(errors="replace")[-2000:])
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        try:
            bench.close()
        finally:
            if not s.keep:
                shutil.rmtree(s.workdir, ignore_errors=True)
            else:
                log(f"kept {s.workdir}")
            signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
