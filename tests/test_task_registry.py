"""The tasks package: one module per family in hrjax/tasks/families/, registered with hrjax.tasks.registry, and
no import circle between the modules of hrjax.tasks."""

import ast
import sys
from pathlib import Path

import pytest

from hrjax.tasks import datasets, families, registry
from hrjax.tasks.base import TaskConfigError
from hrjax.tasks.datasets import BUILDERS, TASKS, load_task

TASKS_DIR = Path(datasets.__file__).parent


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(TASKS_DIR.parent.parent).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` a file imports, at its top or inside a function (a lazy import closes a circle too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                    for a in node.names}
    return out & known


def test_no_import_circle_in_the_tasks_package():
    paths = {module_name(p): p for p in sorted(TASKS_DIR.rglob("*.py"))}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items()}
    family_modules = {name for name in graph if name.startswith(f"{families.__name__}.")}
    for imports in graph.values():  # who imports the families package imports every family (datasets does)
        if families.__name__ in imports:
            imports |= family_modules
    assert "hrjax.tasks.base" in graph["hrjax.tasks.families.gsm8k"]

    def cycle_from(node, stack):
        if node in stack:
            return stack[stack.index(node):] + [node]
        for nxt in sorted(graph[node]):
            found = cycle_from(nxt, stack + [node])
            if found:
                return found
        return None

    for node in graph:
        assert cycle_from(node, []) is None, f"import circle: {' -> '.join(cycle_from(node, []))}"


def test_every_family_module_registers_its_builder():
    modules = {f"{families.__name__}.{p.stem}" for p in Path(families.__file__).parent.glob("*.py")
               if p.stem != "__init__"}
    assert {cls.__module__ for cls in BUILDERS.values()} == modules
    for task, cls in BUILDERS.items():
        assert TASKS[task].builder is cls and cls.TASK == task
    assert TASKS["chain_sum"].preset == {"tasks": ["chain_sum"]}  # a preset a family registers
    assert [t for t, s in TASKS.items() if s.needs_manual_dir] == sorted(
        ["gsm8k", "math", "mbpp", "triviaqa", "hotpotqa", "nq_open"], key=list(TASKS).index)


TOY_FAMILY = '''
from hrjax.tasks.base import SPLITS, TaskBuilder, make_example
from hrjax.tasks.registry import register


@register
class HrjaxToyCount(TaskBuilder, skip_registration=True):  # not in TFDS's global registry
    """A toy family: count to n."""

    name = "hrjax_toy_count"
    TASK, SCORER = "toy_count", "exact"
    DEFAULTS = {"n": 3}
    COUNTS = ("n",)

    def build_splits(self, dl_manager):
        return {s: [make_example(f"{s}/{i}", self.TASK, f"{s} {i}+1", [str(i + 1)], self.SCORER, {})
                    for i in range(self.options["n"])] for s in SPLITS}
'''


def test_a_new_family_is_one_new_file(tmp_path, monkeypatch):
    (tmp_path / "toy_count.py").write_text(TOY_FAMILY)
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    try:
        datasets._import_families()  # what importing hrjax.tasks.datasets does
        assert TASKS["toy_count"].builder.__name__ == "HrjaxToyCount" and not TASKS["toy_count"].needs_manual_dir
        got = load_task("toy_count", "validation", tmp_path / "data", n=2)
        assert [(e.question, e.answers) for e in sorted(got, key=lambda e: e.id)] == [
            ("validation 0+1", ("1",)), ("validation 1+1", ("2",))]
        with pytest.raises(TaskConfigError, match="registered twice"):
            registry.register(BUILDERS["toy_count"])
    finally:
        for table in (registry.TASKS, registry.BUILDERS):
            table.pop("toy_count", None)
        sys.modules.pop(f"{families.__name__}.toy_count", None)
