"""Specialist members trained in child processes, one per share of the host's cores (`build_pool`'s
`processes`).

`train_in_processes` starts `python -m hrjax.specialists.worker` once per group of members and sends
it, pickled on stdin, the cores it may run on and then the recipe, the group's member names and the
cache root. The child pins itself to those cores before it imports JAX (so XLA sizes its thread
pool to them), trains its group with `train_members` (each member written atomically, as in one
process) and reports on stdout: `PROGRESS {"steps": n, "loss": x}` lines and, when a member's loss
diverged, one `DIVERGED {"message": ...}` line. The parent sums the groups' steps into one report,
raises the first divergence once every child is done (as the one-process build does), and turns
any other failure of a child into an `HrjaxError` that quotes the end of its stderr.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from hrjax.errors import HrjaxError, TrainingDivergedError

PROGRESS, DIVERGED = "PROGRESS ", "DIVERGED "


def train_in_processes(recipe, groups: list[list], root: Path, digest: str,
                       report: Callable[[int, float], None]) -> None:
    """Trains each group of `recipe`'s members in its own child process, pinned to its share of this
    process's cores; `report(steps done over all groups, latest loss)` as the children progress.
    Children still running are killed if this process is interrupted."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    children, lines = [], queue.Queue()
    try:
        for index, group in enumerate(groups):
            stderr = tempfile.TemporaryFile()
            child = subprocess.Popen([sys.executable, "-m", "hrjax.specialists.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, text=False)
            share = set(cpus[index::len(groups)]) or None
            pickle.dump(share, child.stdin)  # first, alone: the child pins itself before it imports JAX
            pickle.dump((recipe, [m.name for m in group], str(root), digest), child.stdin)
            child.stdin.close()
            threading.Thread(target=_forward_lines, args=(index, child.stdout, lines), daemon=True).start()
            children.append((group, child, stderr))
        steps, open_streams, diverged = [0] * len(groups), len(groups), None
        while open_streams:
            index, line = lines.get()
            if line is None:
                open_streams -= 1
            elif line.startswith(PROGRESS):
                update = json.loads(line[len(PROGRESS):])
                steps[index] = update["steps"]
                report(sum(steps), update["loss"])
            elif line.startswith(DIVERGED):
                diverged = diverged or TrainingDivergedError(json.loads(line[len(DIVERGED):])["message"])
        for group, child, stderr in children:
            if child.wait() != 0 and not (diverged and child.returncode == 3):
                stderr.seek(0)
                tail = stderr.read().decode(errors="replace").strip().splitlines()[-12:]
                raise HrjaxError(f"The process training specialist member(s) {[m.name for m in group]} failed "
                                 f"(exit status {child.returncode}); the end of its error output:\n" + "\n".join(tail))
        if diverged is not None:
            raise diverged
    finally:
        for _, child, stderr in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            stderr.close()


def _forward_lines(index: int, stream, lines: queue.Queue) -> None:
    """Puts (index, decoded line) for each line of `stream`, then (index, None) at its end."""
    for raw in stream:
        lines.put((index, raw.decode(errors="replace").rstrip("\n")))
    lines.put((index, None))


def main() -> int:
    """The child: pins itself, trains its members, reports on stdout; exit status 3 after a divergence."""
    cpus = pickle.load(sys.stdin.buffer)
    if cpus:
        os.sched_setaffinity(0, cpus)  # before JAX is imported and sizes its CPU threads
    recipe, names, root, digest = pickle.load(sys.stdin.buffer)  # imports hrjax.specialists.build
    from hrjax.specialists.build import train_members

    def report(steps_done: int, loss: float):
        print(PROGRESS + json.dumps({"steps": steps_done, "loss": loss}), flush=True)

    try:
        train_members(recipe, [m for m in recipe.members if m.name in names], Path(root), digest, report)
    except TrainingDivergedError as error:
        print(DIVERGED + json.dumps({"message": str(error)}), flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
