"""Stored data carries the version of the code that made it: a TFDS builder's VERSION (its build
directory) and a scorer's `SCORER_VERSIONS` entry (path-tree keys). The tables below pin each version
to a digest of the code it names, that code's hrjax helpers included; a code change without a version
bump fails here, so old builds and trees are never served for new code."""

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

import pytest
import tensorflow_datasets as tfds

import hrjax
from hrjax.tasks import builders, scorers
from hrjax.tasks.builders import BUILDERS
from hrjax.tasks.datasets import load_task
from test_task_datasets import nq_rows, write_jsonl

# task -> (builder VERSION, code digest). A code change fails here: bump the version if the change can alter
# what is stored (a refactor or a new error message cannot), then record the pair the failure message prints.
BUILDER_VERSIONS = {
    "gsm8k": ("1.0.0", "9cd3e7d1e4d322b0"),
    "hotpotqa": ("1.0.0", "d7f728fa66d309ee"),
    "humaneval": ("1.0.0", "6f5a3e6e7df8b837"),
    "math": ("1.1.0", "47df971388f9129c"),
    "mbpp": ("1.0.0", "37092dc463b8644b"),
    "nq_open": ("1.0.0", "76c86ad065986bc1"),
    "reasoning_gym": ("1.0.0", "f8bc7c1219c55acb"),
    "specialist_world": ("1.0.0", "4bcee25563b381da"),
    "triviaqa": ("1.0.0", "c94738d6418b43a3"),
}
# scorer -> (SCORER_VERSIONS entry, code digest).
SCORER_CODE = {
    "code_pass": ("2", "6275a171b468a801"),
    "exact": ("1", "724a35bb2695c6b5"),
    "exact_match": ("1", "384b04a6871c6923"),
    "f1": ("1", "e0d409af2d2efaa6"),
    "math": ("1", "92b61df69c3e1b5b"),
    "numeric": ("1", "949f6361f9c64662"),
    "reasoning_gym": ("1", "dc2b8b7755d8863b"),
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


def reached_code(root) -> dict[str, str]:
    """`root` and every hrjax function and class it reaches (names its code reads: globals,
    `module.attr`, `from hrjax... import` in a body; closures, wrapped functions, base classes and
    methods), and the whole of each hrjax module its code names -> {name (and line): source}."""
    texts: dict[object, str] = {}

    def visit_code(code: types.CodeType, namespace: dict) -> None:
        names = set(code.co_names)
        modules = [namespace[n] for n in names if isinstance(namespace.get(n), types.ModuleType)]
        modules += [importlib.import_module(n) for n in names if n.startswith("hrjax.")]  # `from hrjax.x import`
        modules = [m for m in modules if m.__name__.startswith("hrjax")]
        for module in modules:  # the whole module: code may run it as a file, or read any of it
            texts.setdefault(module, _normalised(inspect.getsource(module)))
        for name in names:
            if name in namespace:
                visit(namespace[name])
            for module in modules:
                if hasattr(module, name):
                    visit(getattr(module, name))
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
            if value.__code__ in texts or not value.__code__.co_filename.startswith(HRJAX):
                return  # seen, or not ours (a dataclass's generated methods: its class source covers them)
            texts[value.__code__] = _normalised(inspect.getsource(value))
            visit_code(value.__code__, value.__globals__)
            for cell in value.__closure__ or ():
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
    where = lambda k: f"{k.co_name}:{k.co_firstlineno}" if isinstance(k, types.CodeType) else k.__name__  # noqa: E731
    return {where(k): text for k, text in texts.items()}


def code_digest(root) -> str:
    return hashlib.sha256(json.dumps(sorted(reached_code(root).values())).encode()).hexdigest()[:16]


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
    check_version(BUILDER_VERSIONS, task, str(cls.VERSION), code_digest(cls),
                  f"{cls.__name__}.VERSION (and add its RELEASE_NOTES line)", "what it writes")


@pytest.mark.parametrize("scorer", sorted(scorers.SCORERS))
def test_scorer_code_changes_come_with_a_version_bump(scorer):
    check_version(SCORER_CODE, scorer, str(scorers.SCORER_VERSIONS[scorer]), code_digest(scorers.SCORERS[scorer]),
                  f"SCORER_VERSIONS[{scorer!r}] in hrjax/tasks/scorers.py", "a score")


def test_the_digest_follows_helpers_and_imports_not_docstrings():
    reached = {name.split(":")[0] for name in reached_code(builders.HrjaxMath)}
    assert {"HrjaxMath", "ManualTaskBuilder", "TaskBuilder", "parse", "make_example", "last_boxed"} <= reached
    assert {"specialist_examples", "hrjax.tasks.specialist_world"} <= {
        n.split(":")[0] for n in reached_code(builders.HrjaxSpecialistWorld)}
    assert "run_python" in {n.split(":")[0] for n in reached_code(scorers.SCORERS["code_pass"])}
    documented = 'def f(x):\n    """Says what it does."""\n    return x + 1  # and a comment\n'
    assert _normalised(documented) == _normalised("def f(x):\n    return x+1\n") != _normalised("def f(x): return x")


def test_a_bumped_builder_version_is_built_anew_not_read_from_the_old_build(tmp_path, monkeypatch):
    manual, data = tmp_path / "manual", tmp_path / "data"
    write_jsonl(manual / "NQ-open.train.jsonl", nq_rows("train", 4))
    first = load_task("nq_open", "train", data, manual, validation_fraction=0.0)
    parse = builders.HrjaxNqOpen.parse

    def shouting(self, rec, split, index, path):  # a parsing change
        row = parse(self, rec, split, index, path)
        return {**row, "question": row["question"].upper()}

    monkeypatch.setattr(builders.HrjaxNqOpen, "parse", shouting)
    stale = load_task("nq_open", "train", data, manual, validation_fraction=0.0)
    assert stale == first  # without a bump the old build is served: why the tables above exist
    monkeypatch.setattr(builders.HrjaxNqOpen, "VERSION", tfds.core.Version("1.0.1"))
    monkeypatch.setattr(builders.HrjaxNqOpen, "RELEASE_NOTES", {"1.0.1": "Questions in capitals."})
    bumped = load_task("nq_open", "train", data, manual, validation_fraction=0.0)
    assert [e.question for e in bumped] == [e.question.upper() for e in first]
    versions = sorted(p.name for p in (data / "hrjax_nq_open").glob("*/*") if re.fullmatch(r"\d+\.\d+\.\d+", p.name))
    assert versions == ["1.0.0", "1.0.1"]
