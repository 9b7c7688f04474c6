"""Targets that `tests/test_local_processes.py` runs in child processes (`hrjax.local_processes.run_pinned`)."""

import os

from hrjax.errors import TrainingDivergedError


def cores_of(payload: int, report) -> list[int]:
    """Reports `payload` units of work done, then returns the cores this child may run on."""
    report(payload, {"child": payload})
    return sorted(os.sched_getaffinity(0))


def diverge(payload: str, report) -> None:
    raise TrainingDivergedError(payload)


def die(payload: int, report) -> None:
    os._exit(payload)


def started_at(payload, report) -> float:
    """The time.time() at which this child got to run its payload."""
    import time

    return time.time()
