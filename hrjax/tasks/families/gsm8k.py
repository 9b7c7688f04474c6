"""GSM8K grade-school maths: the `gsm8k` family."""

from __future__ import annotations

from hrjax.tasks.answer_format import AnswerFormat, hashes_answer
from hrjax.tasks.base import ManualTaskBuilder, make_example, standard_patterns
from hrjax.tasks.registry import register


def gsm8k_final_answer(solution: str) -> str | None:
    """The number after GSM8K's `#### ` marker, thousands separators removed."""
    if "####" not in solution:
        return None
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


@register
class HrjaxGsm8k(ManualTaskBuilder):
    """GSM8K grade-school maths (Cobbe et al. 2021).

    Upstream files: `train.jsonl` / `test.jsonl` from github.com/openai/grade-school-math
    (grade_school_math/data/), or the HF mirror's `main/{train,test}-*.parquet`; records
    `{"question", "answer"}` where `answer` is the worked solution ending in `#### <number>`.
    answers: [the number after `####`, commas removed]; scorer `numeric`;
    metadata: {"solution"}. Upstream has no validation split: it is carved out of train.
    """

    name = "hrjax_gsm8k"
    TASK, SCORER, DIRNAME = "gsm8k", "numeric", "gsm8k"
    DEFAULTS = {"validation_fraction": 0.1, "seed": 0}
    ANSWER_FORMAT = AnswerFormat(
        "Solve it step by step, then give the final answer on a last line of the form `#### <number>` (the number "
        "alone: no units, no words).", hashes_answer, stop=("\nQuestion:",))
    MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD = (
        "https://github.com/openai/grade-school-math/tree/master/grade_school_math/data "
        "(train.jsonl, test.jsonl) or https://huggingface.co/datasets/openai/gsm8k "
        "(main/train-00000-of-00001.parquet, main/test-00000-of-00001.parquet)"
    )

    @classmethod
    def file_patterns(cls, opts):
        return standard_patterns(
            subdirs=("main",),
            extra={s: [f"grade_school_math/data/{s}.jsonl"] for s in ("train", "test")},
        )

    def parse(self, rec, split, index, path):
        final = gsm8k_final_answer(rec["answer"])
        if not final:
            return None
        return make_example(
            f"gsm8k/{split}/{index}", self.TASK, rec["question"], [final], self.SCORER,
            {"solution": rec["answer"]},
        )
