"""The specialist world's procedural tasks, offline: the `specialist_world` family. The world itself
(task types, skills, hop template) is `hrjax.tasks.specialist_world`."""

from __future__ import annotations

from hrjax.tasks.base import SPLITS, TaskBuilder, make_example
from hrjax.tasks.registry import register
from hrjax.tasks.specialist_world import specialist_examples


@register
class HrjaxSpecialistWorld(TaskBuilder):
    """The specialist world's procedural tasks (`hrjax.tasks.specialist_world`), offline.

    Options: `task_types` (subset of add, mul, rev, paren), `n_train` / `n_validation` / `n_test`
    (items per task type per split), `seed`. Each split holds exactly
    `specialist_examples(split, n_<split>, seed, task_types)`; splits never share a question.
    answers: [the answer]; scorer `exact`; metadata: {"task_type", "seed", "index", "route",
    "steps"} (the skills of each hop and their responses).
    """

    name = "hrjax_specialist_world"
    TASK, SCORER = "specialist_world", "exact"
    DEFAULTS = {"task_types": ["add", "mul", "rev", "paren"], "n_train": 2000, "n_validation": 64,
                "n_test": 64, "seed": 0}
    COUNTS = ("n_train", "n_validation", "n_test")

    @classmethod
    def config_slug(cls, opts):
        types = "+".join(opts["task_types"])
        return f"{types}-{opts['n_train']}-{opts['n_validation']}-{opts['n_test']}-s{opts['seed']}"

    def build_splits(self, dl_manager):
        opts = self.options
        out = {}
        for split in SPLITS:
            examples = specialist_examples(split, opts[f"n_{split}"], opts["seed"], opts["task_types"])
            out[split] = [make_example(e.id, e.task, e.question, e.answers, e.scorer, e.metadata)
                          for e in examples]
        return out
