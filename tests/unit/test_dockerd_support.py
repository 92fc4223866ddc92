"""tests/support/dockerd.py's start and stop paths that the container tests rely on: a
dockerd that exits at once is a clear DockerUnavailable (the skip reason), and stop leaves
no mounts behind (pytest could not delete its temp directory otherwise)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.dockerd import Dockerd, DockerUnavailable, mounts_under

try:
    Dockerd(Path("/nonexistent"))
except DockerUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)


def test_a_dockerd_that_exits_at_once_is_a_clear_unavailable(tmp_path: Path) -> None:
    daemon = Dockerd(tmp_path / "d")
    daemon.dockerd = "/bin/false"
    with pytest.raises(DockerUnavailable, match=r"dockerd \(vfs\) exited 1"):
        daemon._start("vfs", timeout=10)
    assert not daemon._exec_root.exists()
    daemon.stop()  # again: nothing to do


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_stop_detaches_what_dockerd_left_mounted(tmp_path: Path) -> None:
    daemon = Dockerd(tmp_path / "d")
    daemon.dockerd = "/bin/sleep"  # stands in for a daemon that runs until SIGTERM
    daemon._exec_root = tmp_path / "exec"
    data = tmp_path / "d" / "data"
    for path in (data, daemon._exec_root / "netns"):
        path.mkdir(parents=True)
    # What a killed dockerd leaves: its data root bind-mounted on itself, a netns mount.
    subprocess.run(["mount", "--bind", str(data), str(data)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(daemon._exec_root / "netns")],
                   check=True)
    daemon._proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    assert len(mounts_under(tmp_path)) == 2
    daemon.stop()
    assert mounts_under(tmp_path) == []
    assert not data.exists() and not daemon._exec_root.exists()
