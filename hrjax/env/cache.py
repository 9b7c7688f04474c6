"""The response cache: greedy decoding is deterministic, so a (model, context, decoding settings)
triple is generated once, ever, and persisted.

Entries are indexed on disk in one SQLite database, `<directory>/responses.sqlite3`, that every run
on the machine shares: opening it reads nothing, a look-up reads one row, so start-up time and memory
do not grow with the cache. Entries put since the last `flush` are held in memory; a flush writes them
in one transaction (all or nothing, whatever kills the process). Several processes may read and write
at once (write-ahead log; a writer waits up to `BUSY_TIMEOUT_S` for another's transaction). The
directory must be on a local file system: SQLite's write-ahead log needs shared memory.

Older hrjax versions wrote JSONL shards (`shard-*.jsonl`); their keys predate `FORMAT_VERSION` 2
(content-based model fingerprints), so no look-up could hit them: they are ignored, with a warning
naming them, and can be deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from hrjax.errors import HrjaxError

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # part of every key: bump it when what a key identifies or an entry holds changes
# 3: a stop string found only in the decoded text trims the entry's tokens (`Sampler.with_text`)
BUSY_TIMEOUT_S = 120.0
DB_NAME = "responses.sqlite3"
_SCHEMA = ("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, tokens BLOB NOT NULL, "
           "text TEXT NOT NULL, finish_reason TEXT NOT NULL) WITHOUT ROWID")


@dataclasses.dataclass(frozen=True)
class CachedResponse:
    tokens: tuple[int, ...]  # generated token ids (the model's own tokenizer)
    text: str  # decoded response, cut at the first stop string
    finish_reason: str


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    generated_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def cache_key(model_fingerprint: str, decoding: str, context_tokens: Sequence[int]) -> str:
    """sha256 over the format version, the model, the decoding settings and the exact context ids."""
    payload = json.dumps([FORMAT_VERSION, model_fingerprint, decoding, list(map(int, context_tokens))],
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _row(response: CachedResponse) -> tuple[bytes, str, str]:
    return np.asarray(response.tokens, "<i4").tobytes(), response.text, response.finish_reason


def _response(tokens: bytes, text: str, finish_reason: str) -> CachedResponse:
    return CachedResponse(tuple(np.frombuffer(tokens, "<i4").tolist()), text, finish_reason)


class ResponseCache:
    """key -> `CachedResponse`, persisted under `directory` (None: in memory only, for this process)."""

    def __init__(self, directory: Optional[str | os.PathLike] = None):
        self.directory = None if directory is None else Path(directory).expanduser()
        self.pending: dict[str, CachedResponse] = {}
        self.stats = CacheStats()
        self._lock = threading.Lock()
        if self.directory is None:
            self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._warn_about_old_shards()
            self._db = self._open(self.directory / DB_NAME)
        self._db.execute(_SCHEMA)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        try:
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            while True:
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    return db
                except sqlite3.OperationalError as e:
                    # Two processes opening a new cache at once both ask to switch it to WAL; SQLite answers
                    # one of them "locked" at once (its busy handler would deadlock): retry, it is WAL then.
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        except sqlite3.DatabaseError as e:
            raise HrjaxError(f"{path}: the response cache cannot be opened ({e}). If it is damaged, delete it "
                             "(with its -wal and -shm files; its responses will be generated again).") from e

    def _warn_about_old_shards(self) -> None:
        shards = sorted(self.directory.glob("shard-*.jsonl"))
        if shards:
            mib = sum(s.stat().st_size for s in shards) / 2**20
            log.warning("%d response-cache shard(s) of an older hrjax in %s (shard-*.jsonl, %.1f MiB) are ignored: "
                        "their keys predate cache format %d, so they can never be hit. Delete them to free the "
                        "space.", len(shards), self.directory, mib, FORMAT_VERSION)

    def _stored(self, key: str) -> Optional[CachedResponse]:
        with self._lock:
            row = self._db.execute("SELECT tokens, text, finish_reason FROM responses WHERE key = ?",
                                   (key,)).fetchone()
        return None if row is None else _response(*row)

    def get(self, key: str) -> Optional[CachedResponse]:
        """The cached response or None; counts a hit or a miss."""
        found = self.pending.get(key) or self._stored(key)
        if found is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return found

    def put(self, key: str, response: CachedResponse) -> None:
        self.pending[key] = response
        self.stats.generated_tokens += len(response.tokens)

    def flush(self) -> None:
        """Stores the entries put since the last flush, in one transaction."""
        if not self.pending:
            return
        rows = [(key, *_row(r)) for key, r in self.pending.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.pending = {}

    @property
    def entries(self) -> Mapping[str, CachedResponse]:
        """A read-only view of every entry, stored or pending (rows are read as they are visited)."""
        return _Entries(self)

    def __len__(self) -> int:
        """Stored entries plus the pending ones not stored yet."""
        with self._lock:
            stored = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        return stored + sum(self._stored(k) is None for k in self.pending)


class _Entries(Mapping):
    def __init__(self, cache: ResponseCache):
        self.cache = cache

    def __getitem__(self, key: str) -> CachedResponse:
        found = self.cache.pending.get(key) or self.cache._stored(key)
        if found is None:
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator[str]:
        with self.cache._lock:
            stored = [k for (k,) in self.cache._db.execute("SELECT key FROM responses")]
        yield from stored
        yield from (k for k in list(self.cache.pending) if self.cache._stored(k) is None)

    def __len__(self) -> int:
        return len(self.cache)
