"""Response-cache start-up: the wall time and resident memory a fresh process spends opening a cache
of N entries and reading one back, as every run on a shared cache directory does at start.

Entries are 128 generated tokens and ~400 characters of text each, flushed 512 at a time. The open is
measured in a new interpreter, so nothing is warm in memory but the OS page cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

from hrjax.benchmarks.common import host_info

_OPEN = """
import json, sys, time
from hrjax.env.cache import ResponseCache, cache_key

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

directory, n = sys.argv[1], int(sys.argv[2])
key = cache_key("model", "greedy", [n // 2, n // 2 + 1])
before, start = rss_mib(), time.perf_counter()
found = ResponseCache(directory).get(key)
print(json.dumps({"open_and_get_ms": (time.perf_counter() - start) * 1e3, "added_rss_mib": rss_mib() - before,
                  "found": found is not None}))
"""


def run(num_entries: int = 20_000) -> dict:
    from hrjax.env.cache import CachedResponse, ResponseCache, cache_key

    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        cache = ResponseCache(directory)
        for i in range(num_entries):
            cache.put(cache_key("model", "greedy", [i, i + 1]),
                      CachedResponse(tuple(range(i, i + 128)), f"answer {i} " + "lorem ipsum " * 33, "eos"))
            if (i + 1) % 512 == 0:
                cache.flush()
        cache.flush()
        fill_seconds = time.perf_counter() - start
        opened = json.loads(subprocess.run([sys.executable, "-c", _OPEN, directory, str(num_entries)], check=True,
                                           capture_output=True, text=True).stdout)
    if not opened["found"]:
        raise RuntimeError("The benchmark's entry was not found after reopening the cache.")
    return {**host_info(), "entries": num_entries, "fill_seconds": round(fill_seconds, 2),
            "open_and_get_ms": round(opened["open_and_get_ms"], 2),
            "added_rss_mib": round(opened["added_rss_mib"], 2)}
