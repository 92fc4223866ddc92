"""A private dockerd for tests, a Debian base image made with debootstrap, the built image.

There is no Docker Hub here, so ``FROM python:...`` cannot be pulled. :func:`base_tarball`
runs ``debootstrap --variant=minbase bookworm`` from the Debian mirror this machine's apt uses
(with python3, venv and tini included) and caches the tarball per day under
``~/.cache/mirrorcache-tests``; :meth:`Dockerd.import_base` turns it into an image.

:class:`Dockerd` starts ``dockerd`` with its own data root, exec root, unix socket and pid
file, without iptables or a bridge (containers use ``--network host``) on the overlay2
storage driver (vfs where the kernel lacks overlayfs), and stops it again.
:func:`wheelhouse` builds the project's wheels on the host (whose pip reaches the package
index), and :class:`WheelServer` serves them on loopback so that ``docker build --network
host`` installs from them without the index.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mirrorcache-tests"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "tini", "ca-certificates")
BASE_IMAGE = f"mirrorcache-base:{SUITE}"
SLIM = ("var/lib/apt/lists/*_*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
        "usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class DockerUnavailable(RuntimeError):
    """dockerd, docker or debootstrap is missing, or dockerd did not come up."""


def debian_mirror() -> str:
    """The Debian archive URL this machine's apt uses for the main suite."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and "security" not in fields.get(
                    "URIs", ""):
                return fields["URIs"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        if path.is_file():
            m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", path.read_text(), re.M)
            if m and "security" not in m.group(1):
                return m.group(1)
    return DEFAULT_MIRROR


def base_tarball(log: Path) -> Path:
    """A tar of a minbase bookworm root with BASE_PACKAGES; cached for the day."""
    key = hashlib.sha256(" ".join((*BASE_PACKAGES, *SLIM)).encode()).hexdigest()[:8]
    out = CACHE / f"{SUITE}-minbase-{datetime.date.today():%Y%m%d}-{key}.tar"
    if out.is_file():
        return out
    debootstrap = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.access("/usr/sbin/debootstrap", os.X_OK) else None)
    if debootstrap is None:
        raise DockerUnavailable("debootstrap not installed (apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob(f"{SUITE}-minbase-*.tar"):
        old.unlink()
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp) / "root"
        with log.open("ab") as out_log:
            subprocess.run(
                [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 SUITE, str(root), debian_mirror()],
                stdout=out_log, stderr=subprocess.STDOUT, check=True, timeout=900)
        # A slim base, as the python slim images are: no apt lists, docs or translations.
        for pattern in SLIM:
            for path in root.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        partial = out.with_suffix(".part")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(out)
    return out


def _sbin(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


class Dockerd:
    """A dockerd of our own: ``with Dockerd(workdir) as d: d.docker("ps")``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock = workdir / "docker.sock"
        self.log_path = workdir / "dockerd.log"
        self.host = f"unix://{self.sock}"
        self._proc: subprocess.Popen[bytes] | None = None
        dockerd = _sbin("dockerd")
        client = _sbin("docker")
        if dockerd is None or client is None:
            raise DockerUnavailable("dockerd/docker not installed (apt-get install docker.io)")
        self.dockerd = dockerd
        # Prefer the client that came with the daemon (same API version, classic builder).
        self.client = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else client

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(DOCKER_HOST=self.host, DOCKER_BUILDKIT="0",
                   DOCKER_CONFIG=str(self.workdir / "client"))
        return env

    def start(self, timeout: float = 60.0) -> Dockerd:
        """Start on overlay2 where the kernel has overlayfs (fast), else on vfs."""
        drivers = ["vfs"]
        if "\toverlay\n" in Path("/proc/filesystems").read_text():
            drivers.insert(0, "overlay2")
        for driver in drivers:
            try:
                return self._start(driver, timeout)
            except DockerUnavailable:
                if driver == drivers[-1]:
                    raise
        raise AssertionError("unreachable")

    def _start(self, driver: str, timeout: float) -> Dockerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_driver = driver
        # Short paths: the exec root holds unix sockets (108-byte limit).
        self._exec_root = Path(tempfile.mkdtemp(prefix="mcd-", dir="/tmp"))
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [self.dockerd, "--data-root", str(self.workdir / "data"),
             "--exec-root", str(self._exec_root), "-H", self.host,
             "--pidfile", str(self.workdir / "dockerd.pid"),
             "--iptables=false", "--ip6tables=false", "--bridge=none",
             f"--storage-driver={driver}", "--log-level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                self.stop()  # its mounts, the exec root
                raise DockerUnavailable(f"dockerd ({driver}) exited {rc}:\n" + self.log_tail())
            if self.sock.exists() and self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise DockerUnavailable(f"dockerd ({driver}) did not answer in {timeout:.0f}s:\n"
                                + self.log_tail())

    def _answers(self) -> bool:
        try:
            return self.docker("version", check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def docker(self, *args: str, check: bool = True, timeout: float = 300.0,
               input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run the docker client against this daemon; raise with its output on failure."""
        proc = subprocess.run([self.client, *args], env=self.env, capture_output=True,
                              timeout=timeout, input=input.decode() if input else None,
                              text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} -> {proc.returncode}\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def import_base(self, tarball: Path) -> str:
        """``docker import`` the debootstrap tarball as BASE_IMAGE (once per daemon)."""
        if self.docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
            with tarball.open("rb") as f:
                proc = subprocess.run([self.client, "import", "-", BASE_IMAGE], stdin=f,
                                      env=self.env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"docker import failed: {proc.stderr}")
        return BASE_IMAGE

    def stop(self) -> None:
        """Remove leftover containers, SIGTERM dockerd (SIGKILL its process group after
        30 s), then detach every mount it left under its data and exec roots (a killed
        dockerd leaves its self-bind-mounted data root and netns files mounted, which makes
        the directories impossible to delete) and delete both roots."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, check=False, timeout=60)
            except subprocess.TimeoutExpired:
                pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for root in (self.workdir / "data", self._exec_root):
            unmount_under(root)
            shutil.rmtree(root, ignore_errors=True)
        left = mounts_under(self.workdir) + mounts_under(self._exec_root)
        if left:
            raise RuntimeError(f"dockerd left mounts that would not detach: {left}")

    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo path field (spaces and the like are octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` in this mount namespace, deepest first."""
    prefix = str(root.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=len, reverse=True)


def unmount_under(root: Path) -> None:
    """Lazily detach every mount at or below ``root`` (what dockerd left behind)."""
    for point in mounts_under(root):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)


def wheelhouse(dest: Path, extras: str = "speed") -> Path:
    """Wheels of this project, its dependencies and its build backend (the host's pip)."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for args in (["wheel", "--wheel-dir", str(dest), f"{REPO}[{extras}]"],
                 ["download", "--only-binary=:all:", "--dest", str(dest),
                  "setuptools>=68", "wheel"]):
        proc = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=600,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"pip {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return dest


class WheelServer:
    """Serve a directory over http on 127.0.0.1 (a ``--find-links`` page for pip)."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WheelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def build_image(dockerd: Dockerd, tag: str, base: str, wheels: Path,
                extra: Sequence[str] = ()) -> str:
    """``docker build`` the repository's Dockerfile on ``base``, pip reading ``wheels``."""
    with WheelServer(wheels) as server:
        dockerd.docker("build", "--network", "host", "-t", tag,
                       "--build-arg", f"BASE_IMAGE={base}",
                       "--build-arg", f"PIP_FIND_LINKS={server.url}",
                       "--build-arg", "PIP_NO_INDEX=1", *extra, str(REPO), timeout=900)
    return tag
