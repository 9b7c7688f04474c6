"""MATH competition problems: the `math` family."""

from __future__ import annotations

import re

import tensorflow_datasets as tfds

from hrjax.tasks.answer_format import AnswerFormat, boxed_answer
from hrjax.tasks.base import ManualTaskBuilder, TaskBuilder, make_example, standard_patterns
from hrjax.tasks.registry import register
from hrjax.tasks.scorers import last_boxed


@register
class HrjaxMath(ManualTaskBuilder):
    r"""MATH competition problems (Hendrycks et al. 2021).

    Upstream files, any of: the original tarball `MATH/{train,test}/<subject>/<n>.json` (one
    `{"problem", "level", "type", "solution"}` object per file); `{train,test}.jsonl` or
    `{train,test}-*.parquet` with the same fields (hendrycks/competition_math mirrors), also
    `<subject>/{train,test}-*.parquet` (EleutherAI/hendrycks_math) and MATH-500's `test.jsonl`
    (`subject` for `type`, an explicit `answer`, `unique_id`).
    answers: [`answer` if given, else the content of the last `\boxed{}` of the solution];
    scorer `math` (LaTeX-normalised equivalence); metadata: {"solution", "level",
    "type"}. No validation split upstream: carved out of train.
    """

    name = "hrjax_math"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        **TaskBuilder.RELEASE_NOTES,
        "1.1.0": "Scorer 'math' (was 'exact_match'); answers from the shared `last_boxed`, stripped.",
    }
    TASK, SCORER, DIRNAME = "math", "math", "math"
    DEFAULTS = {"validation_fraction": 0.1, "seed": 0}
    ANSWER_FORMAT = AnswerFormat(
        "Solve it step by step, then put the final answer, simplified, in \\boxed{} (e.g. \\boxed{\\frac{1}{2}}).",
        boxed_answer, stop=("\nProblem:",))
    MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD = (
        "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar (see github.com/hendrycks/math; "
        "extract so that MATH/train/... and MATH/test/... exist), or Parquet from "
        "https://huggingface.co/datasets/EleutherAI/hendrycks_math (<subject>/{train,test}-*.parquet), "
        "or MATH-500 test.jsonl from https://huggingface.co/datasets/HuggingFaceH4/MATH-500"
    )

    @classmethod
    def file_patterns(cls, opts):
        return standard_patterns(
            subdirs=("data",),
            extra={
                s: [f"MATH/{s}/*/*.json", f"{s}/*/*.json", f"*/{s}-*.parquet"] for s in ("train", "test")
            },
        )

    def parse(self, rec, split, index, path):
        answer = rec.get("answer") or (last_boxed(rec["solution"]) or "").strip() or None
        if not answer:
            return None
        if rec.get("unique_id"):
            rid = "math/" + re.sub(r"\.json$", "", str(rec["unique_id"]))
        elif path.suffix == ".json" and path.parent.parent.name == split:
            rid = f"math/{split}/{path.parent.name}/{path.stem}"
        else:
            rid = f"math/{split}/{index}"
        return make_example(
            rid, self.TASK, rec["problem"], [answer], self.SCORER,
            {
                "solution": rec["solution"],
                "level": rec.get("level"),
                "type": rec.get("type") or rec.get("subject"),
            },
        )
