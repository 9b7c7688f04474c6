"""TriviaQA, closed-book: the `triviaqa` family."""

from __future__ import annotations

from hrjax.tasks.answer_format import SHORT_ANSWER
from hrjax.tasks.base import ManualTaskBuilder, make_example, standard_patterns
from hrjax.tasks.registry import register


@register
class HrjaxTriviaqa(ManualTaskBuilder):
    """TriviaQA (Joshi et al. 2017), closed-book: the question alone, no evidence documents.

    Upstream files, any of: the HF mirror's `<subset>.nocontext/{train,validation}-*.parquet` or
    `<subset>/{train,validation}-*.parquet` (records `{"question", "question_id", "answer":
    {"value", "aliases", "normalized_aliases", "normalized_value", ...}}`; only these columns are
    read, so the big context columns cost nothing); or the original JSON files from
    nlp.cs.washington.edu/triviaqa (`{"Data": [{"Question", "QuestionId", "Answer": {"Value",
    "Aliases", "NormalizedAliases", ...}}]}`): subset "rc" reads `qa/web-*.json` and
    `qa/wikipedia-*.json`, subset "unfiltered" reads `triviaqa-unfiltered/unfiltered-web-*.json`.
    Test answers are not public, so no test split is built. Questions repeated within a split
    (rc lists a question once per evidence source) are kept once, by question id.
    answers: [value, then the aliases]; scorer `exact_match`; metadata: {"question_id",
    "normalized_value", "normalized_aliases", "question_source"}.
    """

    name = "hrjax_triviaqa"
    TASK, SCORER, DIRNAME = "triviaqa", "exact_match", "triviaqa"
    ANSWER_FORMAT = SHORT_ANSWER
    DEFAULTS = {"subset": "rc", "validation_fraction": 0.1, "seed": 0}
    CHOICES = {"subset": ("rc", "unfiltered")}
    COLUMNS = ("question", "question_id", "question_source", "answer")
    MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD = (
        "https://nlp.cs.washington.edu/triviaqa/ (triviaqa-rc.tar.gz: qa/*.json; "
        "triviaqa-unfiltered.tar.gz: triviaqa-unfiltered/*.json) or "
        "https://huggingface.co/datasets/mandarjoshi/trivia_qa "
        "(rc.nocontext/ or unfiltered.nocontext/ {train,validation}-*.parquet)"
    )

    @classmethod
    def config_slug(cls, opts):
        return f"{opts['subset']}-s{opts['seed']}"

    @classmethod
    def file_patterns(cls, opts):
        sub = opts["subset"]
        if sub == "rc":
            # web-*, wikipedia-* (and verified-*-dev, a subset: deduplicated by question id)
            orig = {"train": ["qa/*-train.json"], "validation": ["qa/*-dev.json"]}
        else:
            orig = {
                "train": ["triviaqa-unfiltered/unfiltered-web-train.json", "unfiltered-web-train.json"],
                "validation": ["triviaqa-unfiltered/unfiltered-web-dev.json", "unfiltered-web-dev.json"],
            }
        return standard_patterns(
            subdirs=(f"{sub}.nocontext", sub), extra=orig, splits=("train", "validation")
        )

    def parse_split(self, split, files):
        rows, seen = [], set()
        for row in super().parse_split(split, files):
            if row["id"] not in seen:
                seen.add(row["id"])
                rows.append(row)
        return rows

    def parse(self, rec, split, index, path):
        if "Answer" in rec or "Question" in rec:  # original JSON
            ans = rec.get("Answer") or {}
            value, aliases = ans.get("Value", ""), list(ans.get("Aliases") or [])
            norm_value = ans.get("NormalizedValue", "")
            norm_aliases = list(ans.get("NormalizedAliases") or [])
            qid, question, source = rec["QuestionId"], rec["Question"], rec.get("QuestionSource", "")
        else:  # HF layout
            ans = rec.get("answer") or {}
            value, aliases = ans.get("value", ""), list(ans.get("aliases") or [])
            norm_value = ans.get("normalized_value", "")
            norm_aliases = list(ans.get("normalized_aliases") or [])
            qid, question, source = rec["question_id"], rec["question"], rec.get("question_source", "")
        answers = []
        for a in [value, *aliases]:
            a = (a or "").strip()
            if a and a != "<unk>" and a not in answers:
                answers.append(a)
        if not answers:
            return None
        return make_example(
            f"triviaqa/{qid}", self.TASK, question.strip(), answers, self.SCORER,
            {
                "question_id": qid,
                "normalized_value": norm_value,
                "normalized_aliases": norm_aliases,
                "question_source": source,
            },
        )
