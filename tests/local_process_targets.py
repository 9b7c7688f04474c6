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


REMEMBERED = []


def remember(payload, report) -> tuple:
    """Adds `payload` to this process's list -> (this process's id, every payload it has been sent so far)."""
    REMEMBERED.append(payload)
    return os.getpid(), list(REMEMBERED)


PROGRAMS_GOT = None  # [programs compiled or loaded from the persistent cache] since `compiled_runs` first ran


def compiled_runs(payload, report) -> tuple:
    """The (runs, iterations per step) of the programs `hrjax.pipeline.compile_fixed_lambda_runs` left in this
    process for its `train_fixed_lambda_runs`, and how many programs this process has compiled or loaded from
    JAX's persistent cache since its first call."""
    global PROGRAMS_GOT
    import jax

    from hrjax import pipeline

    if PROGRAMS_GOT is None:
        PROGRAMS_GOT = [0]

        def count(*_, **__):
            PROGRAMS_GOT[0] += 1

        jax.monitoring.register_event_listener(
            lambda event, **_: event == "/jax/compilation_cache/cache_hits" and count())
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, duration, **_: event == "/jax/core/compile/backend_compile_duration" and count())
    return sorted(pipeline._COMPILED), PROGRAMS_GOT[0]
