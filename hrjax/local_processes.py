"""Independent work split over child processes of this host, each pinned to its share of the cores.

On a CPU backend our programs (small models, short sequences) gain little from XLA's threads: on a
2-core Intel host the stacked specialist experts trained only 1.12x faster on both cores than
pinned to one, while two processes pinned to one core each did about 1.6x the work of one process.
`run_pinned("module:function", payloads, report)` starts `python -m hrjax.local_processes` once per
payload (`PinnedChildren`: children that live on for further jobs) and sends it, pickled on stdin, first
the cores it may run on (it pins itself before it imports JAX, so XLA sizes its threads to them), then
each job: the target, its payload and the file for its result; the children get
`JAX_COMPILATION_CACHE_DIR` when this process compiles into a cache. The child calls
`function(payload, report)`, where `report(done, postfix)` prints a `PROGRESS` line; the job ends with a
`RESULT` line (the return value pickled into its result file: tens of MB, as a line of text, took the
parent a second to read) or an `ERROR` line (the exception, pickled). The parent sums `done` over
the children into its own `report`, returns the results in payload order and, once every child has
answered, raises the first child's exception as its own type (a child that dies becomes an `HrjaxError`
quoting its stderr).
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
    with PinnedChildren(len(payloads)) as children:
        return children.run(target, payloads, report)


class PinnedChildren:
    """`count` child processes of this host, child i pinned to cores i, i + count, ... of this process's, each
    running the jobs it is sent one after another: what a child imported, and what its targets keep in memory
    (`hrjax.pipeline`'s programs compiled ahead), lives on from one job to the next. Use it as a context
    manager; once `run` has raised, close it."""

    def __init__(self, count: int):
        cores, env = usable_cores(), dict(os.environ)
        cache_dir = compilation_cache_dir()
        if cache_dir and not env.get("JAX_COMPILATION_CACHE_DIR"):
            env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        self._results, self._lines, self._jobs = tempfile.TemporaryDirectory(prefix="hrjax-children-"), queue.Queue(), 0
        self._children, self._ended = [], set()
        try:
            for index in range(count):
                stderr = tempfile.TemporaryFile()
                child = subprocess.Popen([sys.executable, "-m", "hrjax.local_processes"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, env=env)
                self._children.append((child, stderr))
                _send(child.stdin, pickle.dumps(set(cores[index::count]) or None))  # read before it imports JAX
                threading.Thread(target=_forward_lines, args=(index, child.stdout, self._lines), daemon=True).start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "PinnedChildren":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(kill=exc_info[0] is not None)

    def __len__(self) -> int:
        return len(self._children)

    def run(self, target: str, payloads: Sequence[Any], report: Optional[Callable[[int, dict], None]] = None,
            children: Optional[Sequence[int]] = None) -> list:
        """`module:function(payload, report)` for payload i in child `children[i]` (default: child i) -> the
        return values in payload order (`run_pinned`); the other children stay idle."""
        children = list(range(len(payloads)) if children is None else children)
        if self._ended & set(children):
            raise HrjaxError(f"Child processes {sorted(self._ended & set(children))} have ended; start new ones.")
        files = {}
        for index, payload in zip(children, payloads, strict=True):
            self._jobs += 1
            files[index] = os.path.join(self._results.name, f"{self._jobs}.pickle")
            # each child's job written by a thread of its own: a child reads its payload while it imports the
            # modules the payload names (JAX: seconds), so one writer would start each child after the last one
            threading.Thread(target=_send, args=(self._children[index][0].stdin,
                                                 pickle.dumps((target, payload, files[index]))), daemon=True).start()
        done, outcomes = dict.fromkeys(children, 0), {}
        while len(outcomes) < len(children):
            index, line = self._lines.get()
            if line is None:
                self._ended.add(index)
            elif line.startswith(PROGRESS):
                update = json.loads(line[len(PROGRESS):])
                done[index] = update["done"]
                if report is not None:
                    report(sum(done.values()), update["postfix"])
            elif line.startswith((RESULT, ERROR)):
                outcomes[index] = _outcome(line, files[index], f"{target} on payload {children.index(index)}")
            if index in self._ended and index in files and index not in outcomes:
                child, stderr = self._children[index]
                child.wait()
                stderr.seek(0)
                tail = stderr.read().decode(errors="replace").strip().splitlines()[-12:]
                raise HrjaxError(f"The child process running {target} on payload {children.index(index)} died (exit "
                                 f"status {child.returncode}); the end of its error output:\n" + "\n".join(tail))
        for index in children:
            if outcomes[index][0] == ERROR:
                raise outcomes[index][1]
        return [outcomes[index][1] for index in children]

    def close(self, kill: bool = True) -> None:
        """Ends the children (`kill`: at once; else once their current job ends) and removes their files."""
        for child, stderr in self._children:
            if kill and child.poll() is None:
                child.kill()
            try:
                child.stdin.close()  # a child waiting for its next job ends
            except OSError:
                pass
            child.wait()
            stderr.close()
        self._children = []
        self._results.cleanup()


def _outcome(line: str, result_file: str, job: str) -> tuple:
    """(RESULT, the value in `result_file`) or (ERROR, the exception) of a child's last line."""
    try:
        if line.startswith(RESULT):
            with open(result_file, "rb") as f:
                return RESULT, pickle.load(f)
        return ERROR, pickle.loads(base64.b64decode(line[len(ERROR):]))
    except Exception as error:  # noqa: BLE001 (e.g. a class this process cannot import)
        return ERROR, HrjaxError(f"{job}: its outcome could not be read here ({type(error).__name__}: {error}).")


def compilation_cache_dir() -> Optional[str]:
    """The JAX compilation cache directory this process uses, if JAX is loaded and one is set."""
    jax = sys.modules.get("jax")
    return getattr(jax.config, "jax_compilation_cache_dir", None) if jax is not None else None


def _send(stdin, data: bytes) -> None:
    """Writes one message to a child's stdin. A child that died meanwhile is reported by `PinnedChildren.run`
    (no outcome, its error output quoted)."""
    try:
        stdin.write(data)
        stdin.flush()
    except (OSError, ValueError):  # BrokenPipeError among them; ValueError: closed meanwhile
        pass


def _forward_lines(index: int, stream, lines: queue.Queue) -> None:
    """Puts (index, decoded line) for each line of `stream`, then (index, None) at its end."""
    for raw in stream:
        lines.put((index, raw.decode(errors="replace").rstrip("\n")))
    lines.put((index, None))


def _emit_error(error: Exception) -> None:
    print(ERROR + base64.b64encode(pickle.dumps(error)).decode(), flush=True)


def main() -> None:
    """The child: pins itself, then runs each job it is sent (its progress, then its outcome), until its stdin
    ends."""
    cores = pickle.load(sys.stdin.buffer)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)

    def report(done: int, postfix: dict):
        print(PROGRESS + json.dumps({"done": done, "postfix": postfix}), flush=True)

    while True:
        try:
            target, payload, result_file = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        module, name = target.split(":")
        try:
            result = getattr(importlib.import_module(module), name)(payload, report)
        except Exception as error:  # noqa: BLE001 (sent to the parent, which raises it)
            traceback.print_exc()
            try:
                _emit_error(error)
            except Exception:  # noqa: BLE001 (an exception that does not pickle: its text)
                _emit_error(HrjaxError(f"{type(error).__name__}: {error}"))
            continue
        with open(result_file, "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        print(RESULT, flush=True)  # the parent reads the file once it sees this line


if __name__ == "__main__":
    main()
