r"""Answer scorers: a model's response and a task item's gold answers -> a reward in [0, 1].

`SCORERS[name](response, answers, metadata)` is how the environment scores a rollout; the
arguments are the fields of a `hrjax.tasks.datasets.TaskExample` (the builders name the scorer):

- 'numeric': the response's number (`extract_number`: `\boxed{}`, then GSM8K's `#### x`, then
  the last number) against each gold within a relative tolerance.
- 'exact': the stripped response equals a gold character for character (procedural tasks whose
  answers contain punctuation or article-like words, which SQuAD normalisation would erase).
- 'exact_match', 'f1': SQuAD-normalised exact match / token F1 of the response's final answer
  (`final_answer`: `<answer>` tags, `\boxed{}`, `#### x`, else the whole response), max over golds.
- 'code_pass': pass@1 of `metadata["prompt"]` (if any) + the response's code against
  `metadata["test_program"]`, in the sandbox (`hrjax.tasks.sandbox`), judged by
  `hrjax.tasks.code_harness`: only the tests running to their end scores, not an exit status.
- 'reasoning_gym': the task's own `score_answer(answer, entry)`, with `metadata["entry"]`,
  `metadata["source_dataset"]` and `metadata["config"]`.

Options (numeric tolerance, code limits) are keyword arguments of the functions below; bind other
values with `functools.partial`. Everything here is pure Python; `reasoning_gym` is imported on
first use only.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import re
import secrets
import string
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hrjax.tasks import code_harness
from hrjax.tasks.sandbox import run_python

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed +([^\s${}]+)")  # `\boxed 7`
_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"  # 1,234,567 | 1234 | 12.5 | 12. | .5
_NUMBER = re.compile(rf"(?<![\w.])(-?)({_DIGITS})(?:[eE]([-+]?\d+))?(?:\s*/\s*({_DIGITS}))?")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}")
_TIMES_TEN = re.compile(r"\s*(?:\\times|\\cdot|×|\*)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def last_boxed(text: str) -> str | None:
    r"""Content of the last closed `\boxed{...}` (or `\fbox{...}`), nested braces kept; else of
    the last brace-less `\boxed 7`; else None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[match.end():i]
    bare = _BOXED_BARE.findall(text)
    return bare[-1] if bare else None


def _after_hashes(text: str) -> str | None:
    """What follows the last GSM8K-style `####`; None if there is none."""
    at = text.rfind("####")
    return None if at < 0 else text[at + 4:]


def final_answer(response: str) -> str:
    r"""The answer part of a response: the last `<answer>...</answer>` (reasoning-gym's format),
    else the last `\boxed{}`, else what follows `####`, else the whole response; stripped."""
    tags = _ANSWER_TAG.findall(response)
    if tags:
        return tags[-1].strip()
    for part in (last_boxed(response), _after_hashes(response)):
        if part is not None:
            return part.strip()
    return response.strip()


def _numbers(text: str) -> list[float]:
    """Every number in `text`, in order: thousands commas, `$`, `%`, signs, `a/b`, `\\frac{a}{b}`,
    `1.5e3` and `1.5 \\times 10^{3}` understood; non-finite values and zero denominators dropped."""
    text = text.replace("−", "-").replace("{,}", ",").replace("\\,", "").replace("\\!", "")
    text = _TIMES_TEN.sub(r"e\1", _LATEX_FRACTION.sub(r"\1/\2", text.replace("\\$", "").replace("$", "")))
    values = []
    for sign, digits, exponent, denominator in _NUMBER.findall(text):
        value = float(f"{sign}{digits.replace(',', '')}e{exponent or 0}")
        if denominator:
            below = float(denominator.replace(",", ""))
            value = value / below if below else math.nan
        if math.isfinite(value):
            values.append(value)
    return values


def extract_number(text: str) -> float | None:
    r"""The numeric answer of a text: the first number in its last `\boxed{}` if it has one, else
    the first number after its last `####` if it has one, else its last number; None if none."""
    for part in (last_boxed(text), _after_hashes(text)):
        if part is not None:
            values = _numbers(part)
            return values[0] if values else None
    values = _numbers(text)
    return values[-1] if values else None


def _golds(answers: str | float | Sequence[str], scorer: str) -> list:
    golds = [answers] if isinstance(answers, (str, int, float)) else list(answers)
    if not golds:
        raise ValueError(f"{scorer}: the item has no gold answers; give at least one")
    return golds


def numeric_match(response: str, answers: str | float | Sequence[str], *, rel_tol: float = 1e-6) -> float:
    """1.0 if the response's number is within `rel_tol` (relative) of a gold's number, else 0.0.
    A gold may be a number or a text (`#### 72` and `\\boxed{}` golds work too)."""
    predicted = extract_number(response)
    for gold in _golds(answers, "numeric_match"):
        value = float(gold) if isinstance(gold, (int, float)) else extract_number(gold)
        if value is None:
            raise ValueError(f"numeric_match: gold answer {gold!r} has no number; use another scorer "
                             "for this task or fix its answers")
        if predicted is not None and math.isclose(predicted, value, rel_tol=rel_tol):
            return 1.0
    return 0.0


_LATEX_NOISE = re.compile(r"\\left|\\right|\\[,;:! ]|\$|\\%|%|\^\{?\\circ\}?|\s+")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?|-?\\frac\{-?\d+\}\{\d+\}")


def normalize_latex(answer: str) -> str:
    r"""A MATH-style final answer in canonical form: spacing, `$`, `\left`/`\right`, degree signs,
    `\%` and `\text{}` wrappers dropped, `\dfrac`/`\tfrac` read as `\frac`, a trailing `.` cut."""
    answer = _LATEX_TEXT.sub(r"\1", answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    return _LATEX_NOISE.sub("", answer).rstrip(".")


def math_match(response: str, answers: str | Sequence[str], *, rel_tol: float = 1e-6) -> float:
    r"""MATH-style equivalence of the response's final answer (`\boxed{}` first) and a gold: equal
    after `normalize_latex`, or, for a gold that is a plain number (`0.5`, `1/2`, `\frac{1}{2}`),
    the response's answer (a plain number, or the last number of an unboxed response) within `rel_tol`."""
    predicted = normalize_latex(final_answer(response))
    for gold in _golds(answers, "math_match"):
        gold = normalize_latex(str(gold))
        if predicted == gold:
            return 1.0
        if _PLAIN_NUMBER.fullmatch(gold):
            value = _numbers(predicted)[0] if _PLAIN_NUMBER.fullmatch(predicted) else (
                extract_number(response) if last_boxed(response) is None else None)
            if value is not None and math.isclose(value, _numbers(gold)[0], rel_tol=rel_tol):
                return 1.0
    return 0.0


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def strict_match(response: str, answers: str | Sequence[str]) -> float:
    """1.0 if the whitespace-stripped response equals a whitespace-stripped gold, else 0.0."""
    return max(float(response.strip() == gold.strip()) for gold in _golds(answers, "strict_match"))


def exact_match(response: str, answers: str | Sequence[str]) -> float:
    """SQuAD exact match of the response's `final_answer`, max over the golds."""
    predicted = normalize_answer(final_answer(response))
    return max(float(predicted == normalize_answer(gold)) for gold in _golds(answers, "exact_match"))


def token_f1(response: str, answers: str | Sequence[str]) -> float:
    """SQuAD token F1 of the response's `final_answer`, max over the golds (SQuAD 2.0's rule:
    1.0 if both sides have no tokens, 0.0 if only one has none)."""
    predicted = normalize_answer(final_answer(response)).split()
    best = 0.0
    for gold in _golds(answers, "token_f1"):
        expected = normalize_answer(gold).split()
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
            continue
        same = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
        if same:
            precision, recall = same / len(predicted), same / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def extract_code(response: str) -> str:
    """The first fenced code block (```python, ```py or bare ```; an unclosed one runs to the end)
    of a response, or the whole response if it has none."""
    match = _FENCE.search(response)
    return match.group(1) if match else response


@functools.cache
def _judge_program() -> str:
    return Path(code_harness.__file__).read_text()


def code_pass(completion_program: str, test_program: str, entry_point: str | None, *, prompt: str = "",
              timeout_s: float = 10.0, memory_mb: int = 1024, cpu_s: float | None = 10.0) -> float:
    """pass@1: 1.0 if `test_program`, then `check(entry_point)`, runs to its end against
    `completion_program` (HumanEval: prompt + completion) in the sandbox; 0.0 otherwise.
    `entry_point=None` when `test_program` makes its checks itself (MBPP's asserts, or a program that
    already ends with the `check` call). `prompt`: the task's own part of `completion_program`, whose
    complete definitions (HumanEval/32's `poly`) the tests use instead of the completion's.
    The tests run in a judge process apart from the completion's, which answers their calls with
    plain data; the pass is a line with a fresh nonce that only the judge knows, never an exit
    status (`hrjax.tasks.code_harness` says why, and what each forgery meets).
    Limits: wall seconds for the whole run; MiB of address space and CPU seconds per process."""
    nonce = secrets.token_hex(16)
    tests = f"{test_program}\n" + (f"check({entry_point})\n" if entry_point else "")
    payload = json.dumps({"nonce": nonce, "completion": completion_program, "tests": tests, "prompt": prompt})
    result = run_python(_judge_program(), stdin=payload.encode(), timeout_s=timeout_s, memory_mb=memory_mb,
                        cpu_s=cpu_s)
    return float(result.status == "passed" and f"\n{code_harness.PASSED} {nonce}\n" in result.stdout)


@functools.lru_cache(maxsize=None)
def _reasoning_gym_dataset(name: str, config_json: str):
    import reasoning_gym  # heavy, and only its tasks need it

    return reasoning_gym.create_dataset(name, **json.loads(config_json))


def reasoning_gym_score(answer: str, entry: Mapping[str, Any], dataset: str,
                        config: Mapping[str, Any] | None = None) -> float:
    """The reasoning-gym task's own `score_answer(answer, entry)`, from the dataset `dataset`
    built with `config` (the item's generation options; None: the defaults). Built once per
    (dataset, config)."""
    task = _reasoning_gym_dataset(dataset, json.dumps(dict(config or {}), sort_keys=True))
    return float(task.score_answer(answer, dict(entry)))


def _score_code(response: str, answers: Sequence[str], metadata: Mapping[str, Any]) -> float:
    prompt = metadata.get("prompt", "")
    return code_pass(prompt + extract_code(response), metadata["test_program"], None, prompt=prompt)


def _score_reasoning_gym(response: str, answers: Sequence[str], metadata: Mapping[str, Any]) -> float:
    return reasoning_gym_score(final_answer(response), metadata["entry"], metadata["source_dataset"],
                               metadata.get("config"))


def _without_metadata(scorer: Callable[[str, Sequence[str]], float]):
    return functools.wraps(scorer)(lambda response, answers, metadata: scorer(response, answers))


SCORERS: dict[str, Callable[[str, Sequence[str], Mapping[str, Any]], float]] = {
    "numeric": _without_metadata(numeric_match),
    "math": _without_metadata(math_match),
    "exact": _without_metadata(strict_match),
    "exact_match": _without_metadata(exact_match),
    "f1": _without_metadata(token_f1),
    "code_pass": _score_code,
    "reasoning_gym": _score_reasoning_gym,
}
# Bump a scorer's version whenever the scores it gives can change: path trees store scores, keyed by these
# (tests/test_versions.py fails when a scorer's code changes without a bump).
SCORER_VERSIONS: dict[str, int] = {"numeric": 1, "math": 1, "exact": 1, "exact_match": 1, "f1": 1, "code_pass": 2,
                                   "reasoning_gym": 1}


def score_example(example: Any, response: str) -> float:
    """Quality of `response` for a task example (anything with `scorer`, `answers`, `metadata`, e.g.
    `hrjax.tasks.datasets.TaskExample`): the routing env's `quality_fn`."""
    return SCORERS[example.scorer](response, example.answers, example.metadata)
