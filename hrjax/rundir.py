"""Directories a run writes to: checked before anything is written, and locked while in use.

A run directory (`--workdir`) is a local path or a `gs://` URL (read and written through
`etils.epath`, which needs `gcsfs` and Google credentials: both are checked first, within
`REMOTE_CHECK_S`). Caches (`config.train.cache_dir`) stay local: SQLite needs a local file system.
A local run directory is locked (`hrjax.locking`) while a run uses it, by the chief alone in a
multi-process job; a bucket has no `flock`, so a `gs://` one is not locked: two jobs on one bucket
path must be kept apart by whoever launches them. Files of a run directory are written through
`open_for_writing`: atomically when local, as one whole object upload on gs://.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
from pathlib import Path, PurePath
from typing import IO, Iterator, Union

from hrjax.errors import HrjaxError
from hrjax.fsutil import atomic_file
from hrjax.locking import LockedError, exclusive

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCK_NAME = ".lock"
REMOTE_CHECK_S = 30.0  # how long the first look at a gs:// run directory may take before it is an error

RunPath = Union[Path, "os.PathLike"]  # a pathlib.Path, or an etils.epath.Path for gs://


class RunDirError(HrjaxError, ValueError):
    """A run directory that cannot be used as given."""


def is_remote(path: str | os.PathLike) -> bool:
    return bool(_URL.match(os.fspath(path)))


def local_dir(raw: str | os.PathLike, name: str) -> Path:
    """`raw` as a local directory path (`~` expanded), refused with a one-line reason when it is a
    URL (a `gs://` bucket would silently become a local folder 'gs:') or an existing non-directory.
    `name` is how the user set it, e.g. 'config.train.cache_dir'."""
    text = os.fspath(raw)
    if not text:
        raise RunDirError(f"{name} is empty: pass a local directory path.")
    if _URL.match(text):
        raise RunDirError(f"{name}={text}: must be a local directory (the response cache is an SQLite database, "
                          "which needs a local file system); pass a local path.")
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


def run_dir(raw: str | os.PathLike, name: str = "--workdir", timeout_s: float = REMOTE_CHECK_S,
            write: bool = True) -> RunPath:
    """`raw` as a run directory: a checked local path (`local_dir`), or for `gs://` an `etils.epath.Path`
    once a test object written there (and removed) has gone through within `timeout_s` (no gcsfs, no
    credentials, no network: one clear error naming the fix, never a hang). Other schemes are refused.
    `write=False` (a reader: `hrjax export`): a gs:// directory is listed instead, and TensorBoard's
    package is not asked for."""
    text = os.fspath(raw)
    if not _URL.match(text):
        return local_dir(text, name)
    if not text.startswith("gs://"):
        raise RunDirError(f"{name}={text}: the only remote run directories are gs:// buckets; pass a gs:// URL or "
                          "a local path.")
    from etils import epath

    path, answer = epath.Path(text), {}

    def look() -> None:  # a file test swallows errors (fsspec): writing a first object does not
        try:
            answer["is_file"] = path.is_file()
            if not write:
                next(iter(path.iterdir()), None)  # listing raises what a file test swallows
            elif not answer["is_file"]:
                path.mkdir(parents=True, exist_ok=True)
                probe = path / f".hrjax-write-test.{os.getpid()}"
                probe.write_text("ok")
                probe.unlink()
        except BaseException as e:  # noqa: BLE001 - reported below, in the caller's thread
            answer["error"] = e

    thread = threading.Thread(target=look, daemon=True)  # a daemon: a stuck look-up cannot keep the process alive
    thread.start()
    thread.join(timeout_s)
    fix = ("authenticate (`gcloud auth application-default login`, or GOOGLE_APPLICATION_CREDENTIALS naming a "
           "service-account key; on a TPU/GCE VM its service account needs storage access) and check that the "
           "bucket exists and this host can reach storage.googleapis.com")
    if thread.is_alive():
        raise RunDirError(f"{name}={text}: Google Cloud Storage did not answer within {timeout_s:g} s: {fix}.")
    error = answer.get("error")
    if isinstance(error, ImportError):
        raise RunDirError(f"{name}={text}: gs:// run directories need gcsfs ({error}): `pip install gcsfs "
                          f"google-cloud-storage`, then {fix}.")
    if error is not None:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise RunDirError(f"{name}={text}: cannot read the bucket ({type(error).__name__}: {detail}): {fix}.")
    import importlib.util

    if write and importlib.util.find_spec("google.cloud.storage") is None:  # tensorboardX writes gs:// through it
        raise RunDirError(f"{name}={text}: gs:// run directories need google-cloud-storage for TensorBoard: "
                          "`pip install google-cloud-storage`.")
    if answer["is_file"]:
        raise RunDirError(f"{name}={text} is a file, not a directory: pass a directory path (a new one is created).")
    return path


def as_path(raw: str | os.PathLike) -> RunPath:
    """`raw` as a path object, unchecked (`run_dir` checks): an `etils.epath.Path` for a URL (also when
    given as one), else a `pathlib.Path` (`~` expanded)."""
    text = os.fspath(raw)
    if _URL.match(text):
        if isinstance(raw, PurePath):
            return raw
        from etils import epath

        return epath.Path(text)
    return raw if isinstance(raw, Path) else Path(text).expanduser()


@contextlib.contextmanager
def open_for_writing(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file (`mode` "wb", or "w" for text) that becomes `path` of a run directory when the block succeeds,
    and nothing when it fails: locally `hrjax.fsutil.atomic_file` (a temp file renamed onto it); on
    gs:// an in-memory buffer uploaded as one object (which appears whole when its upload completes)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_for_writing writes whole files: mode 'wb' or 'w', not {mode!r}.")
    path = as_path(path)
    if isinstance(path, Path):
        with atomic_file(path, mode) as f:
            yield f
        return
    buffer = io.BytesIO() if mode == "wb" else io.StringIO()
    yield buffer
    data = buffer.getvalue()
    with path.open("wb") as f:  # one open, one write: the object is uploaded whole at close
        f.write(data.encode("utf-8") if mode == "w" else data)


def write_text(path: RunPath, text: str) -> None:
    """Writes `text` to a file of a run directory (`open_for_writing`)."""
    with open_for_writing(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def locked_run_dir(raw: str | os.PathLike, name: str = "--workdir") -> Iterator[RunPath]:
    """The checked run directory (created), held exclusively for the block: a second job on it fails
    at once with a line naming the holder's pid. In a multi-process job the chief alone takes the
    lock (every process must enter: whether it got it is agreed collectively). gs:// is not locked."""
    from hrjax.parallel import all_processes, is_chief

    path = run_dir(raw, name)
    path.mkdir(parents=True, exist_ok=True)
    if not isinstance(path, Path):
        from absl import logging

        logging.warning("%s is not locked (a bucket has no file locks): do not start a second job on it while "
                        "this one runs.", path)
        yield path
        return
    with contextlib.ExitStack() as stack:
        refused = None
        if is_chief():
            try:
                stack.enter_context(exclusive(path / LOCK_NAME, f"run directory {path}"))
            except LockedError as e:
                refused = e
        if not all_processes(refused is None):
            raise refused or LockedError(f"run directory {path} is in use by another job: the chief (process 0) "
                                         "could not lock it (see its error).")
        yield path
