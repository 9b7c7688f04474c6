"""The specialist world: short procedural tasks whose skills differ by design.

Every question is made of the `ALPHABET` characters, has one known answer, and is solved by a
fixed route of skills, one hop each:

- `add`:   `47+38` -> `85` (two numbers in [0, 99]);
- `mul`:   `312*7` -> `2184` (a number in [0, 999] times a digit in [2, 9]);
- `rev`:   `rev(abcde)` -> `edcba` (3 to 8 lower-case letters);
- `paren`: `(23+19)*7` -> `294` in two hops by two different skills: `paren` rewrites the bracket
  (`42*7`), then `mul` finishes (`294`). Numbers in the bracket lie in [1, 49], the factor in [2, 9].

The env writes hop prompts with `HOP_TEMPLATE`: hop 0 sees `47+38=`, each later hop sees only the
previous answer and `=` (`42*7=`). A final answer followed by `=` is answered by the `echo` skill,
which repeats it, so a solved prompt stays solved over extra hops. Questions are split by a hash of
(task type, question) (`rg_split_of`: 80% train, 10% validation, 10% test), so no question is in
two splits whatever the seed or counts. Answers are scored by the strict `exact` scorer.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from hrjax.env.mdp import HopTemplate
from hrjax.tasks.base import SPLITS, TaskConfigError, TaskDataError, TaskExample, rg_split_of, stable_unit

TASK_TYPES = ("add", "mul", "rev", "paren")
ECHO = "echo"
SKILLS = TASK_TYPES + (ECHO,)  # paren's second hop uses the mul skill
ALPHABET = "0123456789+*()=abcdefghijklmnopqrstuvwxyz"
HOP_TEMPLATE = HopTemplate(first="{question}=", later="{answers}=", answer_item="{response}", last_only=True)
MAX_NEW_TOKENS = 16  # every answer and rewrite is at most 8 characters plus EOS
SCORER = "exact"
TASK = "specialist_world"
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))

# A task type draws (question, route) from a numpy Generator; route: ((skill, response), ...).
Route = tuple[tuple[str, str], ...]


def _add(rng: np.random.Generator) -> tuple[str, Route]:
    a, b = rng.integers(0, 100, 2)
    return f"{a}+{b}", (("add", str(a + b)),)


def _mul(rng: np.random.Generator) -> tuple[str, Route]:
    a, b = rng.integers(0, 1000), rng.integers(2, 10)
    return f"{a}*{b}", (("mul", str(a * b)),)


def _rev(rng: np.random.Generator) -> tuple[str, Route]:
    word = "".join(rng.choice(_LETTERS, rng.integers(3, 9)))
    return f"rev({word})", (("rev", word[::-1]),)


def _paren(rng: np.random.Generator) -> tuple[str, Route]:
    a, b = rng.integers(1, 50, 2)
    c = rng.integers(2, 10)
    return f"({a}+{b})*{c}", (("paren", f"{a + b}*{c}"), ("mul", str((a + b) * c)))


_GENERATORS: dict[str, Callable[[np.random.Generator], tuple[str, Route]]] = {
    "add": _add, "mul": _mul, "rev": _rev, "paren": _paren}


def _stream_seed(task_type: str, seed: int) -> int:
    return int(stable_unit(TASK, task_type, str(seed)) * 2**48)


def specialist_examples(split: str, n: int, seed: int = 0, task_types: Sequence[str] = TASK_TYPES,
                        max_draws: int = 100_000) -> list[TaskExample]:
    """`n` distinct examples of each task type in `split`, types in the given order. Item i of a
    type depends only on (type, seed, i); items of other splits and repeats are skipped.
    metadata: {"task_type", "seed", "index", "route": [skill, ...], "steps": [response, ...]}."""
    if split not in SPLITS:
        raise TaskConfigError(f"{TASK}: unknown split {split!r}; expected one of {SPLITS}")
    unknown = sorted(set(task_types) - set(TASK_TYPES))
    if unknown or not task_types:
        raise TaskConfigError(f"{TASK}: task_types must be a non-empty subset of {TASK_TYPES}, got "
                              f"{list(task_types)}")
    out = []
    for task_type in task_types:
        rng = np.random.default_rng(_stream_seed(task_type, seed))
        seen: set[str] = set()
        index = 0
        while len(seen) < n and index < max_draws:
            question, route = _GENERATORS[task_type](rng)
            if question not in seen and rg_split_of(task_type, question) == split:
                seen.add(question)
                metadata = {"task_type": task_type, "seed": seed, "index": index,
                            "route": [skill for skill, _ in route], "steps": [r for _, r in route]}
                out.append(TaskExample(f"{task_type}/s{seed}/{index}", task_type, question,
                                       (route[-1][1],), SCORER, metadata))
            index += 1
        if len(seen) < n:
            raise TaskDataError(f"{TASK}/{task_type}: only {len(seen)} of {n} distinct {split} questions "
                                f"after {index} draws; ask for fewer or raise max_draws.")
    return out


def first_hop_pair(example: TaskExample) -> tuple[str, str, str]:
    """(skill, hop-0 prompt, response) of an example's first hop, as the env writes the prompt."""
    return (example.metadata["route"][0], HOP_TEMPLATE.message(example.question, []),
            example.metadata["steps"][0])


def echo_pair(example: TaskExample) -> tuple[str, str, str]:
    """(`echo`, prompt, response): what a later hop sees after the correct final answer, and the
    answer repeated."""
    answer = example.answers[0]
    return ECHO, HOP_TEMPLATE.message(example.question, [answer]), answer
