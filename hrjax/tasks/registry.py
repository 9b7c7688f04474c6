"""The task registry: each module of `hrjax.tasks.families` registers its builder here (`@register`),
and may add task names that fix some of its options (`register_preset`). Adding a benchmark is one new
module in `hrjax/tasks/families/`; `hrjax.tasks.datasets` imports every module there, so read the
tables through it (`hrjax.tasks.datasets.TASKS`), not before."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from hrjax.tasks.base import ManualTaskBuilder, TaskBuilder, TaskConfigError


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A registered task: its builder, the options it fixes, and whether it needs a manual dir."""

    name: str
    builder: type[TaskBuilder]
    preset: Mapping[str, Any]
    needs_manual_dir: bool
    description: str


BUILDERS: dict[str, type[TaskBuilder]] = {}  # family (builder TASK) -> builder class
TASKS: dict[str, TaskSpec] = {}  # every task name: the families and their presets


def _add(spec: TaskSpec) -> None:
    if spec.name in TASKS:
        raise TaskConfigError(f"task {spec.name!r} is registered twice ({TASKS[spec.name].builder.__name__} "
                              f"and {spec.builder.__name__}); give one of them another name")
    TASKS[spec.name] = spec


def register(cls: type[TaskBuilder]) -> type[TaskBuilder]:
    """Class decorator: registers builder `cls` under its `TASK`. A manual-dir builder needs a manual dir
    unless its default `source` is not "manual" (HumanEval ships with a package)."""
    needs_manual_dir = issubclass(cls, ManualTaskBuilder) and cls.DEFAULTS.get("source", "manual") == "manual"
    _add(TaskSpec(cls.TASK, cls, {}, needs_manual_dir, (cls.__doc__ or "").strip().splitlines()[0]))
    BUILDERS[cls.TASK] = cls
    return cls


def register_preset(name: str, builder: type[TaskBuilder], preset: Mapping[str, Any], description: str) -> None:
    """Registers task `name`: `builder` with the options `preset` fixed (the rest stay choosable)."""
    _add(TaskSpec(name, builder, dict(preset), False, description))
