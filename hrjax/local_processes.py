"""Independent work split over child processes of this host, each pinned to its share of the cores.

On a CPU backend our programs (small models, short sequences) gain little from XLA's threads: on a
2-core Intel host the stacked specialist experts trained only 1.12x faster on both cores than
pinned to one, while two processes pinned to one core each did about 1.6x the work of one process.
`run_pinned("module:function", payloads, report)` starts `python -m hrjax.local_processes` once per
payload and sends it, pickled on stdin, first the cores it may run on (it pins itself before it
imports JAX, so XLA sizes its threads to them) and the file for its result, then the target and its
payload, plus `JAX_COMPILATION_CACHE_DIR` when this process compiles into a cache. The child calls
`function(payload, report)`, where `report(done, postfix)` prints a `PROGRESS` line; it ends with a
`RESULT` line (the return value pickled into its result file: tens of MB, as a line of text, took the
parent a second to read) or an `ERROR` line (the exception, pickled). The parent sums `done` over
the children into its own `report`, returns the results in payload order and, once every child has
ended, raises the first child's exception as its own type (any other death of a child becomes an
`HrjaxError` quoting its stderr).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import Any, Callable, Optional, Sequence

from hrjax.errors import HrjaxError

PROGRESS, RESULT, ERROR = "PROGRESS ", "RESULT ", "ERROR "
MAX_DEFAULT_PROCESSES = 8  # each child holds its own copy of the models it loads


def usable_cores() -> list[int]:
    """The cores this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_processes(requested: int = 0) -> int:
    """`requested` when above 0; else one per usable core (at most `MAX_DEFAULT_PROCESSES`) when JAX
    computes on the CPU in a one-process job, and 1 on an accelerator (one device, not to be shared
    between processes) or in a multi-process job (its processes already share the host's cores)."""
    if requested < 0:
        raise HrjaxError(f"local processes must be >= 0 (0: one per core on a CPU host), got {requested}.")
    if requested:
        return requested
    import jax

    if jax.default_backend() != "cpu" or jax.process_count() > 1:
        return 1
    return min(len(usable_cores()), MAX_DEFAULT_PROCESSES)


def run_pinned(target: str, payloads: Sequence[Any],
               report: Optional[Callable[[int, dict], None]] = None) -> list:
    """`module:function(payload, report)` in one child process per payload, child i pinned to cores
    i, i + P, ... of this process's (P children) -> the children's return values, in payload order.
    `report(work done summed over the children, the latest child's postfix dict)` as they progress.
    Children still running are killed if this process is interrupted."""
    cores, children, lines = usable_cores(), [], queue.Queue()
    env = dict(os.environ)
    cache_dir = compilation_cache_dir()
    if cache_dir and not env.get("JAX_COMPILATION_CACHE_DIR"):
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    results = tempfile.TemporaryDirectory(prefix="hrjax-children-")
    try:
        for index, payload in enumerate(payloads):
            stderr = tempfile.TemporaryFile()
            children.append((subprocess.Popen([sys.executable, "-m", "hrjax.local_processes"], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=stderr, env=env), stderr))
            child = children[-1][0]
            # each child's input written by a thread of its own: a child reads its payload while it imports the
            # modules the payload names (JAX: seconds), so one writer would start each child after the last one
            start = (set(cores[index::len(payloads)]) or None, _result_file(results.name, index))
            data = pickle.dumps(start) + pickle.dumps((target, payload))
            threading.Thread(target=_send, args=(child.stdin, data), daemon=True).start()
            threading.Thread(target=_forward_lines, args=(index, child.stdout, lines), daemon=True).start()
        done, outcomes, open_streams = [0] * len(payloads), [None] * len(payloads), len(payloads)
        while open_streams:
            index, line = lines.get()
            if line is None:
                open_streams -= 1
            elif line.startswith(PROGRESS):
                update = json.loads(line[len(PROGRESS):])
                done[index] = update["done"]
                if report is not None:
                    report(sum(done), update["postfix"])
            elif line.startswith((RESULT, ERROR)):
                try:
                    if line.startswith(RESULT):
                        with open(_result_file(results.name, index), "rb") as f:
                            outcomes[index] = (RESULT, pickle.load(f))
                    else:
                        outcomes[index] = (ERROR, pickle.loads(base64.b64decode(line[len(ERROR):])))
                except Exception as error:  # noqa: BLE001 (e.g. a class this process cannot import)
                    outcomes[index] = (ERROR, HrjaxError(f"{target} on payload {index}: its outcome could not be "
                                                         f"read here ({type(error).__name__}: {error})."))
        for index, (child, stderr) in enumerate(children):
            child.wait()
            if outcomes[index] is None:
                stderr.seek(0)
                tail = stderr.read().decode(errors="replace").strip().splitlines()[-12:]
                raise HrjaxError(f"The child process running {target} on payload {index} died (exit status "
                                 f"{child.returncode}); the end of its error output:\n" + "\n".join(tail))
        for kind, value in outcomes:
            if kind == ERROR:
                raise value
        return [value for _, value in outcomes]
    finally:
        for child, stderr in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            stderr.close()
        results.cleanup()


def compilation_cache_dir() -> Optional[str]:
    """The JAX compilation cache directory this process uses, if JAX is loaded and one is set."""
    jax = sys.modules.get("jax")
    return getattr(jax.config, "jax_compilation_cache_dir", None) if jax is not None else None


def _result_file(directory: str, index: int) -> str:
    return os.path.join(directory, f"{index}.pickle")


def _send(stdin, data: bytes) -> None:
    """Writes a child's input (its cores, read before it imports JAX, then its pickled target and payload). A
    child that died meanwhile is reported by `run_pinned` (no outcome, its error output quoted)."""
    try:
        with stdin:
            stdin.write(data)
    except OSError:  # BrokenPipeError among them
        pass


def _forward_lines(index: int, stream, lines: queue.Queue) -> None:
    """Puts (index, decoded line) for each line of `stream`, then (index, None) at its end."""
    for raw in stream:
        lines.put((index, raw.decode(errors="replace").rstrip("\n")))
    lines.put((index, None))


def _emit_error(error: Exception) -> None:
    print(ERROR + base64.b64encode(pickle.dumps(error)).decode(), flush=True)


def main() -> None:
    """The child: pins itself, runs its target, prints its progress and its outcome."""
    cores, result_file = pickle.load(sys.stdin.buffer)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    target, payload = pickle.load(sys.stdin.buffer)
    module, name = target.split(":")

    def report(done: int, postfix: dict):
        print(PROGRESS + json.dumps({"done": done, "postfix": postfix}), flush=True)

    try:
        result = getattr(importlib.import_module(module), name)(payload, report)
    except Exception as error:  # noqa: BLE001 (sent to the parent, which raises it)
        traceback.print_exc()
        try:
            _emit_error(error)
        except Exception:  # noqa: BLE001 (an exception that does not pickle: its text)
            _emit_error(HrjaxError(f"{type(error).__name__}: {error}"))
        return
    with open(result_file, "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    print(RESULT, flush=True)  # the parent reads the file once it sees this line


if __name__ == "__main__":
    main()
