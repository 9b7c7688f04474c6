"""The response cache: greedy decoding is deterministic, so a (model, context, decoding settings)
triple is generated once, ever, and persisted.

Entries live in memory and are flushed to append-only JSONL shards under the cache directory, each
shard written atomically, so a crash never leaves a half-written shard and never loses a flushed one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from hrjax.errors import HrjaxError
from hrjax.fsutil import atomic_file


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
    """sha256 over the model, the decoding settings and the exact context token ids."""
    payload = json.dumps([model_fingerprint, decoding, list(map(int, context_tokens))], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


class ResponseCache:
    """key -> `CachedResponse`, persisted under `directory` (None: in memory only)."""

    def __init__(self, directory: Optional[str | os.PathLike] = None):
        self.directory = None if directory is None else Path(directory)
        self.entries: dict[str, CachedResponse] = {}
        self.pending: dict[str, CachedResponse] = {}
        self.stats = CacheStats()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for shard in sorted(self.directory.glob("shard-*.jsonl")):
                self._load_shard(shard)

    def _load_shard(self, shard: Path) -> None:
        with open(shard, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = CachedResponse(tuple(row["tokens"]), row["text"], row["finish_reason"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise HrjaxError(
                        f"{shard}:{line_no}: corrupt response-cache entry ({e}). Shards are written "
                        "atomically, so this file was edited or damaged: delete it (its responses will "
                        "be generated again).") from e

    def get(self, key: str) -> Optional[CachedResponse]:
        """The cached response or None; counts a hit or a miss."""
        found = self.entries.get(key)
        if found is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return found

    def put(self, key: str, response: CachedResponse) -> None:
        self.entries[key] = response
        self.pending[key] = response
        self.stats.generated_tokens += len(response.tokens)

    def flush(self) -> None:
        """Writes the entries added since the last flush as one new shard (atomically)."""
        if self.directory is None or not self.pending:
            return
        name = f"shard-{time.time_ns():020d}-{os.getpid()}.jsonl"  # unique, sorts by time
        with atomic_file(self.directory / name, "w") as f:
            for key, r in self.pending.items():
                f.write(json.dumps({"key": key, "tokens": list(r.tokens), "text": r.text,
                                    "finish_reason": r.finish_reason}) + "\n")
        self.pending = {}

    def __len__(self) -> int:
        return len(self.entries)
