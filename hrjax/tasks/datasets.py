"""Loading API for the routing tasks: `load_task(name, split, data_dir, ...) -> list[TaskExample]`.

The first call for a (task, options) pair builds the TFDS dataset into `data_dir` (ArrayRecord,
no TensorFlow; see `hrjax.tasks.base`); later calls only read it, through
`builder.as_data_source()`. TFDS builds into a temporary `incomplete.*` directory and renames it
into place at the end, so an interrupted build leaves nothing a later call would read; two
processes racing to build the same dataset both succeed (the loser reads the winner's copy).

```python
from hrjax.tasks.datasets import load_task, TASKS
test = load_task("humaneval", "test", "~/hrjax_data")                     # offline (package)
he = load_task("humaneval", "test", "~/hrjax_data", manual_dir="~/dl", source="manual")
train = load_task("gsm8k", "train", "~/hrjax_data", manual_dir="~/dl")     # ~/dl/gsm8k/train.jsonl
mix = load_task("reasoning_gym", "validation", "~/hrjax_data", tasks=["chain_sum"], n_validation=50)
```

Equivalently, with TFDS directly: `tfds.data_source("hrjax_gsm8k", split="train", data_dir=...,
builder_kwargs={"config": {"seed": 0}})` (the config is a dict of the task's options).

`TASKS` holds what the modules of `hrjax.tasks.families` register (`hrjax.tasks.registry`); importing
this module imports them all. `load_parts` gives a run's training, selection and held-out examples,
for one task or a mixture (`hrjax.config.TaskConfig.parts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import pkgutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import tensorflow_datasets as tfds

from hrjax.tasks import families, registry
from hrjax.tasks.base import (
    FIELDS,
    SCORERS,
    SPLITS,
    ManualTaskBuilder,
    TaskBuilder,
    TaskConfigError,
    TaskDataError,
    TaskExample,
)
from hrjax.tasks.registry import TaskSpec
from hrjax.tasks.scorers import SCORER_VERSIONS

__all__ = [
    "BUILDERS",
    "TASKS",
    "SCORERS",
    "SPLITS",
    "TaskExample",
    "TaskSpec",
    "TaskConfigError",
    "TaskDataError",
    "decode_example",
    "examples_fingerprint",
    "load_parts",
    "load_task",
    "prepare_task",
    "task_builder",
]


def _import_families() -> None:
    """Imports every module of `hrjax.tasks.families`: each registers its builder (and presets)."""
    for module in sorted(m.name for m in pkgutil.iter_modules(families.__path__)):
        importlib.import_module(f"{families.__name__}.{module}")


_import_families()
BUILDERS: Mapping[str, type[TaskBuilder]] = registry.BUILDERS  # family -> builder class
TASKS: Mapping[str, TaskSpec] = registry.TASKS  # every task name: the families and their presets


def _spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise TaskConfigError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def _options(spec: TaskSpec, config: Mapping[str, Any]) -> dict:
    clash = sorted(set(spec.preset) & set(config))
    if clash:
        raise TaskConfigError(
            f"{spec.name}: {clash} is fixed by this task name; use 'reasoning_gym' to choose it"
        )
    return {**spec.preset, **config}


def task_builder(
    name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None, **config
) -> TaskBuilder:
    """The (possibly not yet prepared) TFDS builder of task `name` with options `config`."""
    spec = _spec(name)
    cfg = spec.builder.make_config(**_options(spec, config))
    return spec.builder(data_dir=os.fspath(Path(data_dir).expanduser()), config=cfg)


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS's progress bars and its 'Downloading and preparing dataset' lines (a local build
    downloads nothing) off for the block (restored afterwards)."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(was)


def prepare_task(
    name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None, **config
) -> TaskBuilder:
    """Builds task `name` into `data_dir` unless already there; returns the prepared builder."""
    builder = task_builder(name, data_dir, manual_dir, **config)
    if builder.is_prepared():
        return builder
    if isinstance(builder, ManualTaskBuilder) and builder.options.get("source", "manual") == "manual":
        if manual_dir is None:
            raise TaskDataError(
                builder.missing_message(
                    f"not built yet in {builder.data_dir} and no manual_dir given", builder.options
                )
            )
        builder.find_files(Path(manual_dir).expanduser(), builder.options)  # clear error early
    download_config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(Path(manual_dir).expanduser()),
        try_download_gcs=False,
    )
    try:
        with _quiet_tfds():
            builder.download_and_prepare(download_config=download_config)
    except OSError:
        # Another process may have renamed its finished copy into place first.
        again = task_builder(name, data_dir, manual_dir, **config)
        if not again.is_prepared():
            raise
        return again
    return builder


def decode_example(raw: Mapping[str, Any]) -> TaskExample:
    """A record read from the data source (strings as bytes) -> TaskExample."""

    def text(v):
        if hasattr(v, "item") and not isinstance(v, (bytes, str)):
            v = v.item()
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    fields = {k: text(raw[k]) for k in FIELDS}
    return TaskExample(
        id=fields["id"],
        task=fields["task"],
        question=fields["question"],
        answers=tuple(json.loads(fields["answers"])),
        scorer=fields["scorer"],
        metadata=json.loads(fields["metadata"]),
    )


def examples_fingerprint(examples: Sequence[TaskExample]) -> dict:
    """What scores of `examples` depend on: {"examples": sha256 over each example's id, task, question,
    answers, scorer and metadata, in order; "scorers": the version of each scorer they name}."""
    digest = hashlib.sha256()
    for e in examples:
        row = [e.id, e.task, e.question, list(e.answers), e.scorer, e.metadata]
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    scorers = sorted({e.scorer for e in examples})
    return {"examples": digest.hexdigest(), "scorers": {s: SCORER_VERSIONS[s] for s in scorers}}


def load_task(
    name: str,
    split: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    **config,
) -> list[TaskExample]:
    """All examples of one split of task `name` (see `TASKS`), building it first if needed.

    `config` holds the task's options (its builder's `DEFAULTS`: e.g. `seed`,
    `validation_fraction`, reasoning-gym's `tasks` / `n_train` / ...); each distinct option set is
    built and cached separately under `data_dir`. `manual_dir` holds the upstream files of the
    manual-dir tasks; it is only needed for the first (building) call. The order is TFDS's
    deterministic one (examples sorted by a hash of their id), the same on every build.
    """
    if split not in SPLITS:
        raise TaskConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
    builder = prepare_task(name, data_dir, manual_dir, **config)
    built = sorted(builder.info.splits.keys())
    if split not in built:
        raise TaskConfigError(
            f"{name}: split {split!r} was not built (the source has none); built splits: {built}"
        )
    source = builder.as_data_source(split=split)
    n = len(source)
    records = source.__getitems__(list(range(n))) if n else []
    return [decode_example(r) for r in records]


def load_parts(
    parts: Sequence[Any], data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None
) -> tuple[list[TaskExample], list[TaskExample], list[TaskExample]]:
    """(training, selection, held-out) examples of the tasks `parts`, each task's in turn (a mixture's
    parts concatenated in order). A part has the fields of `hrjax.config.TaskPart`: `name`, `options`,
    `train_split` / `select_split` / `eval_split` and `num_train` / `num_select` / `num_eval` (0: all).
    A selection split equal to the training split takes the `num_select` examples after the first
    `num_train`. Every task must give at least one example of each part."""
    train, select, held_out = [], [], []
    for part in parts:
        kw = dict(data_dir=data_dir, manual_dir=manual_dir, **part.options)
        train_split = load_task(part.name, part.train_split, **kw)
        part_train = train_split[:part.num_train or None]
        if part.select_split == part.train_split:  # no spare split: the examples after the training ones
            part_select = train_split[part.num_train:][:part.num_select or None]
        else:
            part_select = load_task(part.name, part.select_split, **kw)[:part.num_select or None]
        part_eval = load_task(part.name, part.eval_split, **kw)[:part.num_eval or None]
        if not part_train or not part_select or not part_eval:
            raise TaskConfigError(
                f"Task '{part.name}' gave {len(part_train)} training, {len(part_select)} selection and "
                f"{len(part_eval)} evaluation examples: each part needs at least one (check config.task.options "
                "and num_train / num_select / num_eval).")
        train += part_train
        select += part_select
        held_out += part_eval
    return train, select, held_out
