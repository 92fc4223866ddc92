"""Run ``mirrorcache serve`` as a real process (for workers, kill -9 and SIGTERM tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

from tests.support.ports import free_port


class MirrorProcess:
    """``async with MirrorProcess(raw_config, workdir) as m:`` -> ``mirrorcache serve``."""

    def __init__(self, raw: dict[str, Any], workdir: Path, *, workers: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.env = env  # None: this process's environment
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        raw = {**raw, "listen": f"127.0.0.1:{self.port}", "workers": workers,
               "log": {"level": "info", "format": "json"}}
        self.config_path = workdir / "mirrorcache.yaml"
        self.config_path.write_text(yaml.safe_dump(raw))
        self.log_path = workdir / "mirrorcache.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    async def start(self, timeout: float = 20.0) -> None:
        self.started_before = len(self.events("app.started")) if self.log_path.exists() else 0
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mirrorcache", "serve", "--config",
                 str(self.config_path)],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mirrorcache exited: {self.log_tail()}")
                try:
                    async with http.get(f"{self.url}/healthz") as resp:
                        # Every worker must be listening, not just the first one up.
                        if resp.status == 200 and len(self.events("app.started")) >= \
                                self.started_before + self.workers:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"mirrorcache did not start: {self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def events(self, name: str) -> list[dict[str, Any]]:
        import json

        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("event") == name:
                out.append(doc)
        return out

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill_all(self) -> None:
        """kill -9 the whole process group (supervisor and workers)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            raise TimeoutError("mirrorcache did not exit")
        return self.proc.returncode

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            await self.wait(15)
        except TimeoutError:
            self.kill_all()

    async def __aenter__(self) -> MirrorProcess:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_all() if et is not None else await self.stop()
