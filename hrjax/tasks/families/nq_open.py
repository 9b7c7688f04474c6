"""Natural Questions open, closed-book: the `nq_open` family."""

from __future__ import annotations

from hrjax.tasks.answer_format import SHORT_ANSWER
from hrjax.tasks.base import ManualTaskBuilder, make_example, standard_patterns
from hrjax.tasks.registry import register


@register
class HrjaxNqOpen(ManualTaskBuilder):
    """Natural Questions open (Lee et al. 2019; Kwiatkowski et al. 2019), closed-book.

    Upstream files: `NQ-open.train.jsonl` and `NQ-open.dev.jsonl` from
    github.com/google-research-datasets/natural-questions/tree/master/nq_open, or the HF
    mirror's `nq_open/{train,validation}-*.parquet`; records `{"question", "answer": [str, ...]}`.
    Upstream's dev file is our validation split; there is no public test split (a user-supplied
    `test.jsonl` in the same format is read if present). answers: the list; scorer
    `exact_match`; metadata: {}.
    """

    name = "hrjax_nq_open"
    TASK, SCORER, DIRNAME = "nq_open", "exact_match", "nq_open"
    ANSWER_FORMAT = SHORT_ANSWER
    DEFAULTS = {"validation_fraction": 0.1, "seed": 0}
    MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD = (
        "https://github.com/google-research-datasets/natural-questions/tree/master/nq_open "
        "(NQ-open.train.jsonl, NQ-open.dev.jsonl) or "
        "https://huggingface.co/datasets/google-research-datasets/nq_open "
        "(nq_open/{train,validation}-00000-of-00001.parquet)"
    )

    @classmethod
    def file_patterns(cls, opts):
        return standard_patterns(
            subdirs=("nq_open",),
            extra={"train": ["NQ-open.train.jsonl"], "validation": ["NQ-open.dev.jsonl"]},
        )

    def parse(self, rec, split, index, path):
        raw = rec["answer"]
        raw = [raw] if isinstance(raw, str) else list(raw or [])
        answers = []
        for a in raw:
            a = str(a).strip()
            if a and a not in answers:
                answers.append(a)
        if not answers:
            return None
        return make_example(
            f"nq_open/{split}/{index}", self.TASK, rec["question"].strip(), answers, self.SCORER, {}
        )
