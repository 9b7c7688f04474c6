"""Exclusive locks between processes on one machine: a run directory, a path-tree or pool build.

`exclusive(path, what)` takes an advisory `flock` on `path` (created if absent) and writes the
holder's pid and command line into it. The kernel drops the lock when its holder exits, however it
exits (SIGKILL included), so a lock file left behind by a killed process is simply taken over: the
file's content only names the holder for the message a second process prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from hrjax.errors import HrjaxError


class LockedError(HrjaxError, RuntimeError):
    """Another live process holds the lock."""


def holder(path: str | os.PathLike) -> str:
    """Who wrote the lock file last ('pid N on HOST: COMMAND'), or 'an unknown process'."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "an unknown process"


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Holds an exclusive lock on `path` for the block. `what` names the guarded thing in messages.

    wait=False: raise `LockedError` naming the holder when another process holds it.
    wait=True: print one line naming the holder to stderr and block until it is released.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise LockedError(f"{what} is in use by {holder(path)} (lock {path}). Wait for that process to "
                                  "finish or stop it; a lock left by a process that died is taken over "
                                  "automatically.") from None
            print(f"hrjax: waiting for {what}, in use by {holder(path)} (lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
