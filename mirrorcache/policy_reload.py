"""The policy in force, and reloading it from ``policy.file`` on SIGHUP or when it changes.

:class:`PolicyHolder` keeps one reference, ``current``; a reload parses the whole new file
first and swaps the reference only if it is valid, so a request sees either the old rules or
the new ones, never a mix, and a broken file leaves the old rules in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from mirrorcache.config import ConfigError
from mirrorcache.policy import Policy, load_policy_file

log = structlog.get_logger("mirrorcache.policy")


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten or a ConfigMap swaps its symlink."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyHolder:
    """The policy in force (``current``), swapped atomically by :meth:`reload`."""

    def __init__(self, policy: Policy, file: Path | None = None) -> None:
        self.current = policy
        self.file = file
        self._seen = _signature(file) if file is not None else None

    def reload(self, trigger: str = "manual") -> bool:
        """Re-read ``file``; True if the new rules are now in force."""
        if self.file is None:
            log.info("policy.reload_skipped", trigger=trigger, reason="no policy.file configured")
            return False
        self._seen = _signature(self.file)
        try:
            policy = load_policy_file(self.file)
        except ConfigError as exc:
            log.error("policy.reload_failed", file=str(self.file), trigger=trigger,
                      problems=exc.problems, rules_in_force=len(self.current.rules))
            return False
        self.current = policy
        log.info("policy.reloaded", file=str(self.file), trigger=trigger,
                 rules=len(policy.rules), default=policy.effective_default)
        return True

    def changed(self) -> bool:
        """Whether the file looks different from the last time it was read."""
        return self.file is not None and _signature(self.file) != self._seen

    async def watch(self, interval: float) -> None:
        """Poll the file every ``interval`` seconds and reload it when it changes."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.reload("file_changed")


@contextlib.asynccontextmanager
async def policy_reloading(holder: PolicyHolder, interval: float) -> AsyncIterator[None]:
    """While open: SIGHUP and file changes reload ``holder``.

    SIGHUP is handled even without a policy file, so ``kill -HUP`` never stops the server.
    """
    loop = asyncio.get_running_loop()
    hup = False
    try:
        loop.add_signal_handler(signal.SIGHUP, holder.reload, "sighup")
        hup = True
    except (NotImplementedError, RuntimeError, ValueError) as exc:  # not the main thread
        log.warning("policy.sighup_unavailable", error=str(exc))
    task = None
    if holder.file is not None:
        task = asyncio.create_task(holder.watch(interval), name="policy-watch")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
