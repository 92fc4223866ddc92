"""Run the real CNCF Distribution registry (``/usr/bin/docker-registry``, 2.8.2) for tests.

:class:`RegistryProcess` writes a config into a work directory, starts
``docker-registry serve CONFIG`` on 127.0.0.1:<free port> and waits until ``GET /v2/``
answers. It can use a :class:`~tests.support.tokenserver.TokenServer` for token auth and can
run in Distribution's own pull-through proxy mode (``proxy_remote_url``), which benchmarks use
as the reference peer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from tests.support.ports import free_port
from tests.support.tokenserver import TokenServer

REGISTRY_BIN = "/usr/bin/docker-registry"
SERVICE = "test-registry"
#: urllib opener that ignores *_proxy environment variables (loopback only).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def registry_binary() -> str | None:
    """Path of the docker-registry binary, or None if it is not installed."""
    if os.access(REGISTRY_BIN, os.X_OK):
        return REGISTRY_BIN
    return shutil.which("docker-registry")


class RegistryProcess:
    """A docker-registry subprocess with filesystem storage in a work directory.

    Attributes: ``url`` (``http://127.0.0.1:PORT``), ``host`` (``127.0.0.1:PORT``),
    ``root`` (storage root directory), ``log_path`` (stdout+stderr of the process),
    ``config_path``. Use as a context manager or call :meth:`start` / :meth:`close`.
    """

    def __init__(
        self,
        *,
        token_server: TokenServer | None = None,
        proxy_remote_url: str | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
        workdir: Path | None = None,
        port: int | None = None,
        log_level: str = "info",
        extra_config: dict[str, Any] | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        self.token_server = token_server
        self.proxy_remote_url = proxy_remote_url
        self.proxy_username = proxy_username
        self.proxy_password = proxy_password
        self.log_level = log_level
        self.extra_config = extra_config or {}
        self.startup_timeout = startup_timeout
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="mirrorcache-registry-")
            workdir = Path(self._own_dir.name)
        self.workdir = Path(workdir)
        self.root = self.workdir / "storage"
        self.log_path = self.workdir / "registry.log"
        self.config_path = self.workdir / "config.yml"
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (for image references such as ``docker://HOST/repo:tag``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        """The registry configuration as a dict (written as YAML by :meth:`start`)."""
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {
                "level": self.log_level,
                "formatter": "text",
                "fields": {"service": "registry"},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.root)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                "secret": "mirrorcache-tests-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.token_server is not None:
            cfg["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": SERVICE,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(self.token_server.cert_path),
                }
            }
        if self.proxy_remote_url is not None:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remote_url}
            if self.proxy_username is not None:
                proxy["username"] = self.proxy_username
                proxy["password"] = self.proxy_password or ""
            cfg["proxy"] = proxy
        _deep_merge(cfg, self.extra_config)
        return cfg

    def start(self) -> RegistryProcess:
        """Write the config, start the process and wait until ``/v2/`` answers."""
        if self.running:
            return self
        binary = registry_binary()
        if binary is None:
            raise RuntimeError("docker-registry binary not found")
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(var, None)  # proxy mode must reach 127.0.0.1 directly
        self._log = self.log_path.open("ab")
        self._log.write(f"--- starting {binary} serve {self.config_path}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            [binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error = ""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with _OPENER.open(f"{self.url}/v2/", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as err:
                if err.code == 401:
                    return
                last_error = repr(err)
            except OSError as err:
                last_error = repr(err)
            time.sleep(0.05)
        raise TimeoutError(
            f"docker-registry on {self.url} not ready after {self.startup_timeout}s "
            f"({last_error}):\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the process log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL the process without waiting for a graceful shutdown (fault tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self.stop()

    def restart(self) -> RegistryProcess:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the work directory if this object created it."""
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> RegistryProcess:
        """Start in a worker thread, so the event loop keeps serving while we wait.

        Needed when the upstream of a proxy-mode registry lives in this loop (e.g. a
        CountingProxy): Distribution pings ``proxy.remoteurl`` during startup.
        """
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    async def arestart(self) -> RegistryProcess:
        """:meth:`restart` in a worker thread (for async tests)."""
        return await asyncio.to_thread(self.restart)

    def __repr__(self) -> str:
        return f"RegistryProcess(url={self.url!r}, running={self.running})"


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
