"""reasoning-gym's procedural tasks, offline: the `reasoning_gym` family, and one task name per
default dataset (`chain_sum`, ...) that fixes `tasks` to it."""

from __future__ import annotations

import json
from typing import Mapping

from hrjax.tasks.base import (
    SPLITS, TaskBuilder, TaskConfigError, TaskDataError, jsonable, make_example, rg_split_of, stable_unit,
)
from hrjax.tasks.registry import register, register_preset


DEFAULT_RG_TASKS = (
    "basic_arithmetic",
    "chain_sum",
    "products",
    "gsm_symbolic",
    "letter_counting",
    "spell_backward",
)


def rg_stream_seed(task: str, seed: int) -> int:
    """The seed handed to reasoning-gym: a 48-bit hash of (task, seed). reasoning-gym makes item i
    from `Random(seed + i)`, so seeds s and s + 1 would give the same stream shifted by one item;
    hashed seeds give unrelated streams."""
    return int(stable_unit("hrjax-reasoning-gym", task, str(seed)) * 2**48)


@register
class HrjaxReasoningGym(TaskBuilder):
    """Procedural tasks from reasoning-gym, generated offline.

    Options: `tasks` (reasoning-gym dataset names; default basic_arithmetic, chain_sum, products,
    gsm_symbolic, letter_counting, spell_backward), `n_train` / `n_validation` / `n_test` (items
    per task per split), `seed`, `task_configs` ({task: {config kwargs}} passed to
    `reasoning_gym.create_dataset`), `max_draws` (per task).
    For each task, items are drawn in order from `create_dataset(task, seed=rg_stream_seed(task,
    seed), size=max_draws, **task_configs[task])` (item i depends only on the seed and i; the seed
    is hashed because reasoning-gym's streams for seeds s and s + 1 overlap); each goes to the
    split `rg_split_of(task, question)` picks (hash buckets: 10% test, 10% validation, 80% train),
    repeated questions are skipped, and drawing stops once every split has its count. So the same
    options give the same items, and no question is in two splits.
    answers: [entry answer]; scorer `reasoning_gym`; metadata: {"source_dataset", "seed",
    "rg_seed", "index", "config", "entry"} where `entry` is the item dict `score_answer(answer, entry)`
    takes: `reasoning_gym.get_score_answer_fn(source_dataset)(answer, entry)`. Values JSON cannot
    hold become strings (gsm_symbolic keeps `Fraction`s in its metadata); each stored entry is
    checked at build time to score its gold answer exactly as the original item does.
    """

    name = "hrjax_reasoning_gym"
    TASK, SCORER = "reasoning_gym", "reasoning_gym"
    DEFAULTS = {
        "tasks": list(DEFAULT_RG_TASKS),
        "n_train": 500,
        "n_validation": 100,
        "n_test": 100,
        "seed": 0,
        "task_configs": {},
        "max_draws": 100_000,
    }
    COUNTS = ("n_train", "n_validation", "n_test", "max_draws")

    @classmethod
    def validate_options(cls, opts):
        super().validate_options(opts)
        tasks = opts["tasks"]
        if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise TaskConfigError(f"reasoning_gym: tasks must be a non-empty list of names, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise TaskConfigError(f"reasoning_gym: tasks has duplicates: {tasks}")
        extra = sorted(set(opts["task_configs"]) - set(tasks))
        if extra:
            raise TaskConfigError(f"reasoning_gym: task_configs names tasks not in `tasks`: {extra}")

    @classmethod
    def config_slug(cls, opts):
        tasks = "+".join(opts["tasks"]) if len(opts["tasks"]) <= 2 else f"{len(opts['tasks'])}tasks"
        return f"{tasks}-{opts['n_train']}-{opts['n_validation']}-{opts['n_test']}-s{opts['seed']}"

    def build_splits(self, dl_manager):
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        opts = self.options
        want = {"train": opts["n_train"], "validation": opts["n_validation"], "test": opts["n_test"]}
        out: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for task in opts["tasks"]:
            if task not in DATASETS:
                import difflib

                close = difflib.get_close_matches(task, list(DATASETS), n=5)
                raise TaskConfigError(f"reasoning_gym: unknown dataset {task!r}; close names: {close}")
            kwargs = opts["task_configs"].get(task, {})
            rg_seed = rg_stream_seed(task, opts["seed"])
            ds = reasoning_gym.create_dataset(task, seed=rg_seed, size=max(opts["max_draws"], 1), **kwargs)
            score = reasoning_gym.get_score_answer_fn(task)
            got = {s: 0 for s in SPLITS}
            seen: set[str] = set()
            index = 0
            while any(got[s] < want[s] for s in SPLITS) and index < opts["max_draws"]:
                entry = ds[index]
                question = entry["question"]
                split = rg_split_of(task, question)
                if question not in seen and got[split] < want[split]:
                    seen.add(question)
                    got[split] += 1
                    stored = self._storable_entry(task, index, entry, score)
                    meta = {
                        "source_dataset": task,
                        "seed": opts["seed"],
                        "rg_seed": rg_seed,
                        "index": index,
                        "config": kwargs,
                        "entry": stored,
                    }
                    out[split].append(
                        make_example(
                            f"{task}/s{opts['seed']}/{index}", task, question, [str(entry["answer"])],
                            self.SCORER, meta,
                        )
                    )
                index += 1
            short = {s: (got[s], want[s]) for s in SPLITS if got[s] < want[s]}
            if short:
                raise TaskDataError(
                    f"reasoning_gym/{task}: only {short} (got, wanted) distinct questions per split after "
                    f"{index} draws; lower the counts, raise max_draws, or widen the task's config"
                )
        return out

    @staticmethod
    def _storable_entry(task: str, index: int, entry: Mapping, score) -> dict:
        """The item as JSON types (values JSON cannot hold, e.g. a sympy object, become strings),
        checked to score its gold answer exactly as the original item does."""
        stored = json.loads(json.dumps(jsonable(
            {"question": entry["question"], "answer": entry["answer"], "metadata": entry.get("metadata", {})},
            lossy=True,
        )))
        gold = str(entry["answer"])
        if score(gold, stored) != score(gold, entry):
            raise TaskDataError(
                f"reasoning_gym/{task}: item {index} cannot be stored as JSON without changing how "
                "score_answer scores it; this task is not supported"
            )
        return stored


for _task in DEFAULT_RG_TASKS:  # `chain_sum` etc.: this family with `tasks` fixed to that one dataset
    register_preset(_task, HrjaxReasoningGym, {"tasks": [_task]}, f"reasoning-gym {_task} (offline)")
