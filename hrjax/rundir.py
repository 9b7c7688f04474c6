"""Directories a run writes to: checked before anything is written, and locked while in use."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from hrjax.errors import HrjaxError
from hrjax.locking import exclusive

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCK_NAME = ".lock"


class RunDirError(HrjaxError, ValueError):
    """A run directory that cannot be used as given."""


def local_dir(raw: str | os.PathLike, name: str) -> Path:
    """`raw` as a local directory path (`~` expanded), refused with a one-line reason when it is a
    URL (a `gs://` bucket would silently become a local folder 'gs:') or an existing non-directory.
    `name` is how the user set it, e.g. '--workdir' or 'config.train.cache_dir'."""
    text = os.fspath(raw)
    if not text:
        raise RunDirError(f"{name} is empty: pass a local directory path.")
    if _URL.match(text):
        raise RunDirError(f"{name}={text}: remote paths are not supported yet (only local directories); pass a "
                          "local path, and copy the results to the bucket afterwards.")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{name}={text} is a file, not a directory: pass a directory path (a new one is created).")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"{name}={text}: {parent} is a file, so the directory cannot be created; pass "
                                  "another path.")
            break
    return path


@contextlib.contextmanager
def locked_run_dir(raw: str | os.PathLike, name: str = "--workdir") -> Iterator[Path]:
    """The checked run directory (created), held exclusively for the block: a second process on it
    fails at once with a line naming the holder's pid."""
    path = local_dir(raw, name)
    path.mkdir(parents=True, exist_ok=True)
    with exclusive(path / LOCK_NAME, f"run directory {path}"):
        yield path
