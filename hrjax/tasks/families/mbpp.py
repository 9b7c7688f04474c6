"""MBPP, Mostly Basic Python Problems: the `mbpp` family."""

from __future__ import annotations

import re
from typing import Sequence

from hrjax.tasks.answer_format import AnswerFormat, code_block
from hrjax.tasks.base import SPLITS, ManualTaskBuilder, TaskDataError, make_example, standard_patterns
from hrjax.tasks.registry import register


def _entry_point_from_tests(tests: Sequence[str]) -> str | None:
    for t in tests:
        m = re.match(
            r"\s*assert\s+(?:not\s+)?\(*\s*(?:set\(|math\.isclose\(|abs\()?\s*([A-Za-z_]\w*)\s*\(", t
        )
        if m:
            return m.group(1)
    return None


def _newlines(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n")


# MBPP's README: task ids 1-10 are few-shot prompts (not built), 11-510 test, 511-600
# validation, 601-974 train.
def mbpp_split(task_id: int) -> str | None:
    if 11 <= task_id <= 510:
        return "test"
    if 511 <= task_id <= 600:
        return "validation"
    if task_id >= 601:
        return "train"
    return None


@register
class HrjaxMbpp(ManualTaskBuilder):
    """MBPP, Mostly Basic Python Problems (Austin et al. 2021).

    Upstream files: `mbpp.jsonl` (all 974 problems; `{"task_id", "text", "code", "test_list",
    "test_setup_code", "challenge_test_list"}`) from github.com/google-research/google-research/
    tree/master/mbpp, split by task id as its README specifies (11-510 test, 511-600 validation,
    601-974 train; 1-10, the few-shot prompts, are not built); or the HF mirror's
    `full/{train,validation,test}-*.parquet` (its `prompt` split is not built). Option
    `variant="sanitized"` reads `sanitized-mbpp.json` / `sanitized/*.parquet` instead
    (`prompt` for `text`, `test_imports` for `test_setup_code`).
    question: the description, then "Your code should pass these tests:" and the asserts (the
    paper's prompt; the tests name the function). answers: [reference code]; scorer `code_pass`;
    metadata: {"task_id", "entry_point", "test_list", "test_setup_code", "challenge_test_list",
    "test_program"} where `test_program` (setup code + asserts) is run after the candidate code.
    """

    name = "hrjax_mbpp"
    TASK, SCORER, DIRNAME = "mbpp", "code_pass", "mbpp"
    DEFAULTS = {"variant": "full", "validation_fraction": 0.1, "seed": 0}
    CHOICES = {"variant": ("full", "sanitized")}
    ANSWER_FORMAT = AnswerFormat(
        "Write the Python function in one ```python code block (the code the tests run, with its imports).",
        code_block)
    MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD = (
        "https://github.com/google-research/google-research/tree/master/mbpp (mbpp.jsonl, "
        "sanitized-mbpp.json) or https://huggingface.co/datasets/google-research-datasets/mbpp "
        "(full/{train,validation,test}-00000-of-00001.parquet)"
    )

    @classmethod
    def config_slug(cls, opts):
        return f"{opts['variant']}-s{opts['seed']}"

    @classmethod
    def file_patterns(cls, opts):
        if opts["variant"] == "sanitized":
            return standard_patterns(
                subdirs=("sanitized",), splits=(),
                extra={**{s: [f"sanitized/{s}-*.parquet"] for s in SPLITS},
                       "all": ["sanitized-mbpp.json", "sanitized-mbpp.jsonl"]},
            )
        return standard_patterns(subdirs=("full",), extra={"all": ["mbpp.jsonl", "mbpp.jsonl.gz"]})

    def build_splits(self, dl_manager):
        found = self.source_files(dl_manager)
        if "all" in found:
            by_split: dict[str, list[dict]] = {}
            for index, (rec, path) in enumerate(self.records(found["all"])):
                try:
                    split = mbpp_split(int(rec["task_id"]))
                    if split is not None:
                        by_split.setdefault(split, []).append(self.parse(rec, split, index, path))
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    raise TaskDataError(
                        f"mbpp: {path}: record {index} is not in the expected upstream format "
                        f"({type(e).__name__}: {e})"
                    ) from e
            return self.finish_splits(by_split)
        return super().build_splits(dl_manager)

    def parse(self, rec, split, index, path):
        tests = [_newlines(t) for t in rec["test_list"]]
        text = rec["text"] if "text" in rec else rec["prompt"]
        if "test_setup_code" in rec:
            setup = _newlines(rec.get("test_setup_code") or "")
        else:
            setup = "\n".join(rec.get("test_imports") or [])
        challenge = [_newlines(t) for t in (rec.get("challenge_test_list") or [])]
        question = (
            f"{text.strip()}\nYour code should pass these tests:\n\n" + "\n".join(tests)
        )
        program = (setup + "\n" if setup.strip() else "") + "\n".join(tests) + "\n"
        return make_example(
            f"mbpp/{int(rec['task_id'])}", self.TASK, question, [_newlines(rec["code"])], self.SCORER,
            {
                "task_id": int(rec["task_id"]),
                "entry_point": _entry_point_from_tests(tests),
                "test_list": tests,
                "test_setup_code": setup,
                "challenge_test_list": challenge,
                "test_program": program,
            },
        )
