"""Stored data carries the version of the code that made it: a TFDS builder's VERSION (its build
directory), a scorer's `SCORER_VERSIONS` entry, an official-metric family's `OFFICIAL_VERSIONS` entry and
an answer format's `version` (path-tree keys). The tables below pin each version
to a digest of the code it names, that code's hrjax helpers included; a code change without a version
bump fails here, so old builds and trees are never served for new code.

A builder's code is its family's whole module (`hrjax/tasks/families/<family>.py`: helpers, constants and the
registration included) plus every hrjax function, class and plain-data constant that code reaches elsewhere
(`hrjax/tasks/base.py`, the scorers, `hrjax/tasks/specialist_world.py`, ...); a scorer's code is what its
function reaches. Sources count as re-written from their AST, so formatting, comments and docstrings do not."""

import ast
import functools
import hashlib
import importlib
import inspect
import json
import re
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

import hrjax
from hrjax.tasks import base as tasks_base
from hrjax.tasks import official, scorers
from hrjax.tasks.datasets import BUILDERS, load_task
from hrjax.tasks.families.math import HrjaxMath
from hrjax.tasks.families.nq_open import HrjaxNqOpen
from hrjax.tasks.families.specialist_world import HrjaxSpecialistWorld
from test_task_datasets import nq_rows, write_jsonl

# task -> (builder VERSION, code digest). A code change fails here: bump the version if the change can alter
# what is stored (a refactor or a new error message cannot), then record the pair the failure message prints.
BUILDER_VERSIONS = {
    "gsm8k": ("1.0.0", "df7a0b0343db9be0"),
    "hotpotqa": ("1.0.0", "3a39d87734747b92"),
    "humaneval": ("1.0.0", "9de0085fb011919c"),
    "math": ("1.1.0", "1b0c6941bce8e6f9"),
    "mbpp": ("1.0.0", "5f5a5899dd439c6c"),
    "nq_open": ("1.0.0", "2305dbf12b057490"),
    "reasoning_gym": ("1.0.0", "e3b34c2e7a5704a8"),
    "specialist_world": ("1.0.0", "934dde301fe1bf79"),
    "triviaqa": ("1.0.0", "05c34a7101644b0f"),
}
# scorer -> (SCORER_VERSIONS entry, code digest).
SCORER_CODE = {
    "code_pass": ("2", "bd25d6404e2bf736"),
    "exact": ("1", "724a35bb2695c6b5"),
    "exact_match": ("1", "c116204f1028c961"),
    "f1": ("1", "67004a5dfe5843d3"),
    "math": ("1", "6980e812d5ffaf55"),
    "numeric": ("1", "22ed766f3a1704bd"),
    "reasoning_gym": ("1", "64b9848388c291dd"),
}

# official-metric family -> (OFFICIAL_VERSIONS entry, code digest of its metrics).
OFFICIAL_CODE = {
    "gsm8k": ("1", "35f404894217fd97"),
    "hotpotqa": ("1", "cabfc6ccc6f5b089"),
    "humaneval": ("1", "45a98d5028f35415"),
    "math": ("1", "92aabae5c8dab5aa"),
    "mbpp": ("1", "45a98d5028f35415"),
    "nq_open": ("1", "d1db0690d403eeef"),
    "reasoning_gym": ("1", "64b9848388c291dd"),
    "specialist_world": ("1", "724a35bb2695c6b5"),
    "triviaqa": ("1", "50f0a168628eba51"),
}

# task -> (its ANSWER_FORMAT's version, code digest of its extractor).
ANSWER_FORMAT_CODE = {
    "gsm8k": ("1", "7cdace8f7577ce31"),
    "hotpotqa": ("1", "d0f026e8b25f4207"),
    "humaneval": ("1", "cab095efc6fe865f"),
    "math": ("1", "9a7de9c959c12084"),
    "mbpp": ("1", "cab095efc6fe865f"),
    "nq_open": ("1", "d0f026e8b25f4207"),
    "triviaqa": ("1", "d0f026e8b25f4207"),
}


def _normalised(source: str) -> str:
    """Source as re-written from its AST (`ast.unparse`): formatting, comments and docstrings do not count."""
    text = textwrap.dedent(source)
    try:
        tree = ast.parse(text)
    except SyntaxError:  # a lambda inside a larger expression
        return text
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


HRJAX = str(Path(hrjax.__file__).parent)


def constant_text(value) -> str | None:
    """Canonical text of plain data (what a module-level constant holds: numbers, strings, compiled regexes,
    numpy arrays, and containers of them), independent of PYTHONHASHSEED; None for anything else."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, re.Pattern):
        return f"re.compile({value.pattern!r}, {int(value.flags)})"
    if isinstance(value, (np.ndarray, np.generic)):
        return f"np.array({value.tolist()!r}, {value.dtype})"
    if isinstance(value, dict):
        items = [(constant_text(k), constant_text(v)) for k, v in value.items()]
        return None if any(None in kv for kv in items) else "{" + ", ".join(sorted(f"{k}: {v}" for k, v in items)) + "}"
    if isinstance(value, (tuple, list, set, frozenset)):
        items = [constant_text(v) for v in value]
        if None in items:
            return None
        return f"{type(value).__name__}({', '.join(sorted(items) if isinstance(value, (set, frozenset)) else items)})"
    return None


def reached_code(root) -> dict[str, str]:
    """`root` and every hrjax function and class it reaches (names its code reads: globals,
    `module.attr`, `from hrjax... import` in a body; closures, wrapped functions, base classes and
    methods), the value of each plain-data global it reads (`constant_text`), and the whole of each hrjax
    module its code names -> {name (and line): source}."""
    texts: dict[object, str] = {}
    functions: set = set()  # visited function objects

    def visit_global(module: str, name: str, value) -> None:
        if name.startswith("__"):  # __doc__, __file__, __name__: not code
            return
        text = constant_text(value)
        if text is None:
            visit(value)
        elif module.startswith("hrjax"):
            texts[(module, name)] = f"{module}.{name} = {text}"

    def visit_code(code: types.CodeType, namespace: dict) -> None:
        names = set(code.co_names)
        modules = [namespace[n] for n in names if isinstance(namespace.get(n), types.ModuleType)]
        modules += [importlib.import_module(n) for n in names if n.startswith("hrjax.")]  # `from hrjax.x import`
        modules = [m for m in modules if m.__name__.startswith("hrjax")]
        for module in modules:  # the whole module: code may run it as a file, or read any of it
            texts.setdefault(module, _normalised(inspect.getsource(module)))
        for name in names:
            if name in namespace:
                visit_global(namespace.get("__name__", ""), name, namespace[name])
            for module in modules:
                if hasattr(module, name):
                    visit_global(module.__name__, name, getattr(module, name))
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                visit_code(const, namespace)

    def visit(value) -> None:
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if isinstance(value, property):
            for f in (value.fget, value.fset):
                visit(f)
        elif isinstance(value, functools.partial):
            for v in (value.func, *value.args, *value.keywords.values()):
                visit(v)
        elif inspect.isfunction(value):
            if value in functions or not value.__code__.co_filename.startswith(HRJAX):
                return  # seen, or not ours (a dataclass's generated methods: its class source covers them)
            functions.add(value)
            if value.__code__ not in texts:
                texts[value.__code__] = _normalised(inspect.getsource(value))
                visit_code(value.__code__, value.__globals__)
            for cell in value.__closure__ or ():  # per function: closures of one code differ in what they hold
                visit(cell.cell_contents)
            visit(getattr(value, "__wrapped__", None))
        elif inspect.isclass(value):
            if value in texts or not value.__module__.startswith("hrjax"):
                return
            texts[value] = _normalised(inspect.getsource(value))
            for base in value.__mro__[1:]:
                visit(base)
            for attr in vars(value).values():
                visit(attr)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(root)

    def where(key) -> str:
        if isinstance(key, types.CodeType):
            return f"{key.co_name}:{key.co_firstlineno}"
        return ".".join(key) if isinstance(key, tuple) else key.__name__

    return {where(k): text for k, text in texts.items()}


def builder_code(cls) -> dict[str, str]:
    """What a builder writes depends on: its family's whole module, and the code `reached_code` finds."""
    module = inspect.getmodule(cls)
    return {**reached_code(cls), module.__name__: _normalised(inspect.getsource(module))}


def digest(texts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(texts.values())).encode()).hexdigest()[:16]


def check_version(table: dict, name: str, version: str, digest: str, bump: str, what: str) -> None:
    recorded = table.get(name)
    if recorded == (version, digest):
        return
    changed = recorded is not None and version == recorded[0] and digest != recorded[1]
    why = (f"its code changed but its version is still {version}. If the change can alter {what}, bump {bump} "
           "first (or data stored by the old code is served for the new); then " if changed else "")
    pytest.fail(f"{name}: {why}record {name!r}: ({version!r}, {digest!r}) in tests/test_versions.py.")


@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_builder_code_changes_come_with_a_version_bump(task):
    cls = BUILDERS[task]
    assert str(cls.VERSION) in cls.RELEASE_NOTES, f"{cls.__name__}: RELEASE_NOTES has no entry for {cls.VERSION}"
    check_version(BUILDER_VERSIONS, task, str(cls.VERSION), digest(builder_code(cls)),
                  f"{cls.__name__}.VERSION (and add its RELEASE_NOTES line)", "what it writes")


@pytest.mark.parametrize("scorer", sorted(scorers.SCORERS))
def test_scorer_code_changes_come_with_a_version_bump(scorer):
    check_version(SCORER_CODE, scorer, str(scorers.SCORER_VERSIONS[scorer]),
                  digest(reached_code(scorers.SCORERS[scorer])),
                  f"SCORER_VERSIONS[{scorer!r}] in hrjax/tasks/scorers.py", "a score")


@pytest.mark.parametrize("family", sorted(official.OFFICIAL_METRICS))
def test_official_metric_code_changes_come_with_a_version_bump(family):
    check_version(OFFICIAL_CODE, family, str(official.OFFICIAL_VERSIONS[family]),
                  digest(reached_code(official.OFFICIAL_METRICS[family])),
                  f"OFFICIAL_VERSIONS[{family!r}] in hrjax/tasks/official.py", "an official score")


@pytest.mark.parametrize("task", sorted(task for task, builder in BUILDERS.items() if builder.ANSWER_FORMAT))
def test_answer_format_code_changes_come_with_a_version_bump(task):
    declared = BUILDERS[task].ANSWER_FORMAT
    check_version(ANSWER_FORMAT_CODE, task, str(declared.version), digest(reached_code(declared.extract)),
                  f"the version of {BUILDERS[task].__name__}.ANSWER_FORMAT", "the answer read from a response")


def test_the_digest_follows_helpers_imports_and_constants_not_docstrings(monkeypatch):
    reached = {name.split(":")[0] for name in builder_code(HrjaxMath)}
    assert {"HrjaxMath", "ManualTaskBuilder", "TaskBuilder", "parse", "make_example", "last_boxed",
            "hrjax.tasks.families.math"} <= reached  # the family's whole file, and what it reaches elsewhere
    assert {"specialist_examples", "_rev", "hrjax.tasks.specialist_world._LETTERS"} <= {
        n.split(":")[0] for n in builder_code(HrjaxSpecialistWorld)}
    assert "run_python" in {n.split(":")[0] for n in reached_code(scorers.SCORERS["code_pass"])}
    # closures of one code are each followed: hotpotqa's F1 and exact match are both `_qa_metric`'s `metric`
    assert {"_hotpot_f1", "_equal"} <= {n.split(":")[0] for n in reached_code(official.OFFICIAL_METRICS["hotpotqa"])}
    documented = 'def f(x):\n    """Says what it does."""\n    return x + 1  # and a comment\n'
    assert _normalised(documented) == _normalised("def f(x):\n    return x+1\n") != _normalised("def f(x): return x")
    # A constant outside the family's file that its code reads counts: which files are read, a scorer's regex.
    before = digest(builder_code(HrjaxNqOpen)), digest(reached_code(scorers.SCORERS["exact_match"]))
    monkeypatch.setattr(tasks_base, "_SPLIT_ALIASES", {**tasks_base._SPLIT_ALIASES, "validation": ("validation",)})
    monkeypatch.setattr(scorers, "_ARTICLES", re.compile(r"\b(a|an)\b"))
    after = digest(builder_code(HrjaxNqOpen)), digest(reached_code(scorers.SCORERS["exact_match"]))
    assert before[0] != after[0] and before[1] != after[1]


def test_a_bumped_builder_version_is_built_anew_not_read_from_the_old_build(tmp_path, monkeypatch):
    manual, data = tmp_path / "manual", tmp_path / "data"
    write_jsonl(manual / "NQ-open.train.jsonl", nq_rows("train", 4))
    first = load_task("nq_open", "train", data, manual, validation_fraction=0.0)
    parse = HrjaxNqOpen.parse

    def shouting(self, rec, split, index, path):  # a parsing change
        row = parse(self, rec, split, index, path)
        return {**row, "question": row["question"].upper()}

    monkeypatch.setattr(HrjaxNqOpen, "parse", shouting)
    stale = load_task("nq_open", "train", data, manual, validation_fraction=0.0)
    assert stale == first  # without a bump the old build is served: why the tables above exist
    monkeypatch.setattr(HrjaxNqOpen, "VERSION", tfds.core.Version("1.0.1"))
    monkeypatch.setattr(HrjaxNqOpen, "RELEASE_NOTES", {"1.0.1": "Questions in capitals."})
    bumped = load_task("nq_open", "train", data, manual, validation_fraction=0.0)
    assert [e.question for e in bumped] == [e.question.upper() for e in first]
    versions = sorted(p.name for p in (data / "hrjax_nq_open").glob("*/*") if re.fullmatch(r"\d+\.\d+\.\d+", p.name))
    assert versions == ["1.0.0", "1.0.1"]
