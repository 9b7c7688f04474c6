"""Atomic file-system writes: a reader never sees a half-written file or directory.

Files and directories get the modes the process umask allows (0666 / 0777 minus the umask), as
`open` and `mkdir` would give them. A write goes to a temp entry beside the target named
`.<target>.tmp.<host tag>.<pid>.<random>`; a writer killed mid-write leaves it behind, and the
first atomic write of a process into a directory sweeps the ones whose writer is gone: on this
host (and pid namespace) with a dead pid, or, from anywhere, untouched for `STALE_AFTER_S`. A
live writer's temp entry is never removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

STALE_AFTER_S = 7 * 86400  # temp entries of other hosts (or of older hrjax versions) are swept after a week
_TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)\.(?:(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}$")
_swept: set[Path] = set()


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _host_tag() -> str:
    """8 hex digits naming this host, boot and pid namespace: where a pid means the same process."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    ident = "\0".join((socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), namespace))
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


_HOST = _host_tag()


def _temp_path(target: Path, kind: str = "tmp") -> Path:
    return target.parent / f".{target.name}.{kind}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Removes the temp entries of dead writers from `directory` (see the module docstring); -> them."""
    removed = []
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            match = _TEMP_NAME.match(entry.name)
            if not match:
                continue
            dead = match["host"] == _HOST and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))
            with contextlib.suppress(FileNotFoundError):
                if dead or now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
                    _remove(Path(entry.path))
                    removed.append(Path(entry.path))
    return removed


def _prepare(target: Path) -> None:
    """Creates the target's directory; sweeps it on this process's first write there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = target.parent.resolve()
    if folder not in _swept:
        _swept.add(folder)
        sweep_stale_temps(folder)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yields a temp dir beside `target`; it replaces `target` only if the block succeeds."""
    target = Path(target)
    _prepare(target)
    tmp = _temp_path(target)
    os.mkdir(tmp, 0o777)  # the umask applies
    try:
        yield tmp
        if target.exists():
            old = _temp_path(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "wb"):
    """Yields an open temp file beside `target`; fsynced and renamed onto it on success."""
    target = Path(target)
    _prepare(target)
    tmp = _temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
