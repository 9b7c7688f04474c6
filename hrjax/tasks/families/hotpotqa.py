"""HotpotQA, multi-hop questions: the `hotpotqa` family."""

from __future__ import annotations

from typing import Mapping

from hrjax.tasks.answer_format import SHORT_ANSWER
from hrjax.tasks.base import ManualTaskBuilder, make_example, standard_patterns
from hrjax.tasks.registry import register


@register
class HrjaxHotpotqa(ManualTaskBuilder):
    """HotpotQA (Yang et al. 2018), multi-hop questions.

    Upstream files, any of: the original JSON lists from hotpotqa.github.io
    (`hotpot_train_v1.1.json`, `hotpot_dev_distractor_v1.json` or `hotpot_dev_fullwiki_v1.json`;
    records `{"_id", "question", "answer", "type", "level", "supporting_facts": [[title, i]],
    "context": [[title, [sentences]]]}`), or the HF mirror's `<setting>/{train,validation}-*.parquet`
    (`id`; `supporting_facts: {title, sent_id}`; `context: {title, sentences}`). Option `setting`
    ("distractor" or "fullwiki") picks the dev file / HF config. The test set's answers are not
    public, so no test split is built.
    question: the question; with `include_context=True` the context paragraphs ("Title: text",
    one per paragraph) come first, then "Question: ...". answers: [answer]; scorer `f1`;
    metadata: {"type", "level", "supporting_facts": [[title, sent_id], ...]}.
    """

    name = "hrjax_hotpotqa"
    TASK, SCORER, DIRNAME = "hotpotqa", "f1", "hotpotqa"
    ANSWER_FORMAT = SHORT_ANSWER
    DEFAULTS = {"setting": "distractor", "include_context": False, "validation_fraction": 0.1, "seed": 0}
    CHOICES = {"setting": ("distractor", "fullwiki")}
    MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD = (
        "http://curtis.ml.cmu.edu/datasets/hotpot/ (hotpot_train_v1.1.json, "
        "hotpot_dev_distractor_v1.json, hotpot_dev_fullwiki_v1.json; see hotpotqa.github.io) or "
        "https://huggingface.co/datasets/hotpotqa/hotpot_qa "
        "(distractor/{train,validation}-*.parquet or fullwiki/...)"
    )

    @classmethod
    def config_slug(cls, opts):
        return f"{opts['setting']}{'-ctx' if opts['include_context'] else ''}-s{opts['seed']}"

    @classmethod
    def file_patterns(cls, opts):
        st = opts["setting"]
        return standard_patterns(
            subdirs=(st,), splits=("train", "validation"),
            extra={"train": ["hotpot_train_v1.1.json"], "validation": [f"hotpot_dev_{st}_v1.json"]},
        )

    @property
    def COLUMNS(self):  # noqa: N802 - overrides the class attribute
        cols = ["id", "_id", "question", "answer", "type", "level", "supporting_facts"]
        return cols + ["context"] if self.options["include_context"] else cols

    @staticmethod
    def _pairs(value, a: str, b: str) -> list[list]:
        if isinstance(value, Mapping):  # HF: {a: [...], b: [...]}
            return [[x, y] for x, y in zip(value.get(a) or [], value.get(b) or [])]
        return [list(p) for p in (value or [])]

    def parse(self, rec, split, index, path):
        answer = (rec.get("answer") or "").strip()
        if not answer:
            return None
        rid = rec.get("_id") or rec.get("id")
        question = rec["question"].strip()
        if self.options["include_context"]:
            paras = self._pairs(rec.get("context"), "title", "sentences")
            ctx = "\n\n".join(f"{t}: {''.join(s).strip()}" for t, s in paras)
            question = f"{ctx}\n\nQuestion: {question}"
        return make_example(
            f"hotpotqa/{rid}", self.TASK, question, [answer], self.SCORER,
            {
                "type": rec.get("type"),
                "level": rec.get("level"),
                "supporting_facts": self._pairs(rec.get("supporting_facts"), "title", "sent_id"),
            },
        )
