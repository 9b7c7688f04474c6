r"""Answer formats: how a benchmark family asks its models for the answer, and the extraction that reads only that.

A family declares its `AnswerFormat` in its own module (`hrjax.tasks.families.<family>`) as its builder's
`ANSWER_FORMAT`: an instruction put after the question (`AnswerFormat.ask`), stop strings that may end a
generation (a new turn a base model starts after its answer; never text that can come before a complete
answer) and an extractor: response -> the formatted answer, or None when the response holds none. The formats:

- GSM8K: a last line `#### <number>`, read as lm-evaluation-harness's strict-match reads it (its first match of
  `#### (\-?[0-9\.\,]+)`);
- MATH: the final answer in `\boxed{}`, read as the reference's `last_boxed_only_string` (the last `\boxed`);
- TriviaQA, HotpotQA, NQ-open (`SHORT_ANSWER`): a last line `Answer: <a few words>` (markdown emphasis or code
  marks around `Answer:` and the answer allowed), the last such line read;
- HumanEval, MBPP: the code in one fenced block (```python, ```py or ```), the first block read.

`hrjax.tasks.answers` reads and scores a response in its example's family's format. (This module imports no
family, so every family module can import it.)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from hrjax.tasks.official import math_last_boxed
from hrjax.tasks.scorers import _FENCE

_GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-evaluation-harness gsm8k.yaml, filter "strict-match"
_ANSWER_LINE = re.compile(r"^[ \t*_`]*answer[ \t*_`]*:[ \t*_`]*(.*?[^\s*_`])[ \t*_`]*$", re.IGNORECASE | re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class AnswerFormat:
    """What a family asks for (`instruction`, after the question), where a generation may stop (`stop`) and
    how its answer is read (`extract(response) -> answer text or None`). `version` is part of the key of a path
    tree scored on formatted answers (`hrjax.train.tree_meta`): bump it when `extract` changes what it reads."""

    instruction: str
    extract: Callable[[str], str | None]
    stop: tuple[str, ...] = ()
    version: int = 1

    def ask(self, question: str) -> str:
        """The question with the format's instruction after it."""
        return f"{question}\n\n{self.instruction}"


def hashes_answer(response: str) -> str | None:
    """GSM8K: the first `#### <number>` of the response (lm-eval strict-match's pattern), as written; None if none."""
    match = _GSM8K_ANSWER.search(response)
    return match.group(0) if match else None


def boxed_answer(response: str) -> str | None:
    r"""MATH: the last `\boxed{...}` of the response, wrapper included (the reference's rule); None if none."""
    return math_last_boxed(response)


def answer_line(response: str) -> str | None:
    """Short-answer QA: the text of the last `Answer: ...` line (`*`, `_` and backquotes around it dropped); None
    if there is none."""
    found = _ANSWER_LINE.findall(response)
    return found[-1] if found else None


def code_block(response: str) -> str | None:
    """Code: the content of the first fenced block (an unclosed one runs to the end); None if there is none."""
    match = _FENCE.search(response)
    return match.group(1) if match else None


SHORT_ANSWER = AnswerFormat(
    "Think it through if you need to, then end with one last line of the form `Answer: <answer>`, giving only "
    "the answer (a name, a number, a date, yes or no: a few words).", answer_line, stop=("\nQuestion:",))
