"""One daemon per state directory: an advisory lock on ``state_dir/daemon.lock``.

Two daemons on one ``state_dir`` (the systemd unit's, and one started by hand in a terminal to
look at something) would both read the documents topic, both write the checkpoint over each
other, both write the steering agents' zarr stores and both send plans. The daemon therefore
holds an exclusive ``flock`` on ``state_dir/daemon.lock`` from its start to its close; a second
one is refused at start, told who holds it. The kernel releases the lock when the holding
process ends, however it ends (a SIGKILL included), so a stale lock file never blocks a restart.
The file names the holder (pid, host, since) for that message; it is left in place.

On a file system that cannot lock (``flock`` fails other than by being held), the daemon warns
and runs without the lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from agents.errors import AgentError

__all__ = ["LOCK_NAME", "StateDirLock"]

logger = logging.getLogger(__name__)

LOCK_NAME = "daemon.lock"


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that did not say which"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {since}"


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode()) if raw else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class StateDirLock:
    """The exclusive lock of one daemon on ``state_dir``.

    >>> lock = StateDirLock(state_dir).acquire()  # doctest: +SKIP
    >>> lock.release()  # doctest: +SKIP
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateDirLock:
        """Take the lock, and write who holds it into the file.

        Raises
        ------
        AgentError
            Another daemon holds it; the message names it (pid, host, since).
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise AgentError(
                f"state_dir {self.state_dir} is in use by another beampilot daemon ({_describe(holder)}): two "
                "daemons on one state_dir would overwrite each other's checkpoint and stores and both send "
                "plans. Stop that one first (systemctl stop beampilot, or Ctrl-C where it runs), or give "
                "this one a state_dir of its own") from None
        except OSError as err:  # a file system without locks (some network mounts)
            os.close(fd)
            logger.warning("cannot lock %s (%s): make sure no other daemon uses state_dir %s", self.path, err,
                           self.state_dir)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the lock go (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    @staticmethod
    def holder(state_dir: Path) -> str | None:
        """Who holds ``state_dir``'s lock now (``None``: nobody), without taking it for longer
        than the look and without creating anything (for ``run --check``)."""
        path = Path(state_dir) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(_read_holder(fd))
        except OSError:
            return None
        finally:
            os.close(fd)
        return None
