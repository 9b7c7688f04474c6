"""A response read and scored in its task family's answer format (`hrjax.tasks.answer_format`).

`asked_in_format(example)` puts the family's instruction after the question; `read_answer(example, response)`
applies the extractor of the example's family (its builder's `ANSWER_FORMAT`;
the whole response for families without a format: reasoning-gym, whose questions carry their own `<answer>`
instructions, and the specialist world); `formatted_score` is the training scorer
(`hrjax.tasks.scorers.score_example`) and `formatted_official_score` the official metrics
(`hrjax.tasks.official.official_score`) of that answer, 0.0 when the response does not hold one, so a model is
scored on what its answer says, never on numbers or words in its working.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hrjax.tasks.answer_format import AnswerFormat
from hrjax.tasks.datasets import BUILDERS
from hrjax.tasks.official import family_of, official_metrics, official_score
from hrjax.tasks.scorers import score_example


def answer_format(example: Any) -> AnswerFormat | None:
    """The answer format of a task example's family (its builder's `ANSWER_FORMAT`); None for families without
    one, and for reasoning-gym items (whose `task` is their dataset)."""
    builder = BUILDERS.get(example.task)
    return builder.ANSWER_FORMAT if builder is not None else None


def asked_in_format(example: Any) -> Any:
    """The example with its family's answer-format instruction after the question (`AnswerFormat.ask`);
    unchanged for a family without a format."""
    declared = answer_format(example)
    return example if declared is None else dataclasses.replace(example, question=declared.ask(example.question))


def read_answer(example: Any, response: str) -> str | None:
    """The answer of `response` in the example's family's format (None if it holds none); the whole response
    for a family without a format."""
    declared = answer_format(example)
    return response if declared is None else declared.extract(response)


def formatted_score(example: Any, response: str) -> float:
    """The training scorer's quality of the formatted answer of `response`; 0.0 when it holds none."""
    answer = read_answer(example, response)
    return 0.0 if answer is None else score_example(example, answer)


def formatted_official_score(example: Any, response: str) -> dict[str, float]:
    """Every official metric of the formatted answer of `response`; each 0.0 when it holds none."""
    answer = read_answer(example, response)
    if answer is None:
        return {name: 0.0 for name in official_metrics(family_of(example))}
    return official_score(example, answer)
