"""moto's standalone S3/ECR server as a separate process on a free loopback port.

:class:`MotoServer` runs ``python -m moto.server -H 127.0.0.1 -p PORT`` and waits until it
answers. Tests make their own bucket (``await make_bucket(session, server)``) so they never
share state. ``aws_env()`` is the environment (fake static credentials, no real config files)
for aiobotocore's default credential chain in test processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from aiobotocore.session import AioSession

from tests.support.ports import free_port

REGION = "us-east-1"
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def aws_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose default credential chain yields fake static credentials."""
    env = {k: v for k, v in (base if base is not None else os.environ).items()
           if not k.startswith("AWS_")}
    env.update({
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    return env


def aws_session() -> AioSession:
    """An aiobotocore session with the fake credentials (no environment needed)."""
    session = AioSession()
    session.set_credentials(ACCESS_KEY, SECRET_KEY)
    session.set_config_variable("region", REGION)
    return session


class MotoServer:
    """A moto server subprocess; ``url`` is its endpoint (``http://127.0.0.1:PORT``)."""

    def __init__(self, startup_timeout: float = 20.0) -> None:
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self._dir = tempfile.TemporaryDirectory(prefix="mirrorcache-moto-")
        self.log_path = Path(self._dir.name) / "moto.log"
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self._log = self.log_path.open("ab")
        env = aws_env()
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(var, None)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with _OPENER.open(f"{self.url}/moto-api/", timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self
            except OSError:
                time.sleep(0.05)
        self.close()
        raise TimeoutError(f"moto server on {self.url} not ready")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._dir.cleanup()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def unique_bucket() -> str:
    return f"mc-test-{uuid.uuid4().hex[:16]}"


async def make_bucket(server: MotoServer, name: str | None = None) -> str:
    """Create a fresh bucket on ``server``; return its name."""
    name = name or unique_bucket()
    async with aws_session().create_client("s3", endpoint_url=server.url,
                                           region_name=REGION) as s3:
        await s3.create_bucket(Bucket=name)
    return name


def s3_raw_config(server: MotoServer, bucket: str, **extra: Any) -> dict[str, Any]:
    """A raw ``storage.s3`` config section for ``bucket`` on ``server``."""
    return {"bucket": bucket, "endpoint_url": server.url, "region": REGION,
            "addressing_style": "path", **extra}
