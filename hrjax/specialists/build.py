"""The specialist pool of the specialist world, trained by hrjax itself and cached.

A `Recipe` lists the members: narrow experts, each trained only on its skill (and `echo`, so a
solved answer survives later hops), and a larger generalist trained briefly on a mix, mediocre at
everything and about 3.5x as costly per token. `build_pool` trains every member that is not cached
yet, saves each as an ordinary HF checkpoint (config.json + safetensors + the shared character
tokenizer) under `<cache_dir>/<recipe hash>/<name>`, atomically, and returns the pool's
`ModelSpec`s, ready for `hrjax.pool.Pool.from_specs`. On a CPU host the members are split over one
child process per core (`hrjax.local_processes`); in each process, members of one shape train
together, in one program (`hrjax.specialists.sft.train_together`). The hash covers the
recipe, the world's alphabet and hop template, `FORMAT_VERSION` (bump it when training or task code
changes) and the JAX / Flax / optax versions, so a cached member is always what the recipe would
train now.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from hrjax.errors import HrjaxError, TrainingDivergedError
from hrjax.fsutil import atomic_file
from hrjax.pool import ModelSpec
from hrjax.specialists.sft import ROW_PAIRS, SFTConfig, place_in_rows
from hrjax.tasks.specialist_world import (
    ALPHABET, ECHO, HOP_TEMPLATE, SKILLS, TASK_TYPES, echo_pair, first_hop_pair, specialist_examples)

FORMAT_VERSION = 6  # 2: members of one shape trained together; 3: init compiled unoptimised; 4: lax.map, not vmap;
# 5: packed rows; 6: each member packed into its stack's rows
METADATA_KEY = "hrjax_specialist"  # in each member's config.json: recipe hash, member, final loss


@dataclasses.dataclass(frozen=True)
class Member:
    """One pool model: the skills it is trained on, its cost per token and its SFT settings."""

    name: str
    skills: tuple[str, ...]
    base_rate: float
    sft: SFTConfig = SFTConfig()

    def __post_init__(self):
        unknown = sorted(set(self.skills) - set(SKILLS))
        if unknown or not self.skills:
            raise HrjaxError(f"Member '{self.name}': skills must be a non-empty subset of {SKILLS}, got "
                             f"{list(self.skills)}; fix the recipe.")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained pool."""

    members: tuple[Member, ...]
    seed: int = 0  # world seed of the training questions
    train_per_task: int = 5000  # distinct train questions per task type (a skill's pairs)
    echo_per_task: int = 2000  # echo pairs per task type for members with the echo skill

    def __post_init__(self):
        names = [m.name for m in self.members]
        if not names or len(set(names)) != len(names):
            raise HrjaxError(f"A recipe needs members with unique names, got {names}; rename the duplicates.")
        if self.echo_per_task > self.train_per_task:
            raise HrjaxError(f"echo_per_task ({self.echo_per_task}) must not exceed train_per_task "
                             f"({self.train_per_task}): echo pairs reuse the training questions.")


EXPERT = SFTConfig(hidden_size=64, intermediate_size=128, num_layers=2, steps=1500)
GENERALIST = SFTConfig(hidden_size=128, intermediate_size=256, num_layers=2, steps=1000)
DEFAULT_RECIPE = Recipe(members=(
    Member("add", ("add", ECHO), 1.0, dataclasses.replace(EXPERT, steps=2000)),
    Member("mul", ("mul", ECHO), 1.0, dataclasses.replace(EXPERT, steps=3000)),  # 3-digit products: slowest skill
    Member("rev", ("rev", ECHO), 1.0, EXPERT),
    Member("paren", ("paren", ECHO), 1.0, dataclasses.replace(EXPERT, steps=1000)),
    Member("generalist", ("add", "mul", "rev", ECHO), 3.5, GENERALIST),  # larger, trained briefly on the mix
))


# The reduced world CI trains in under 2 minutes: add and paren questions (paren needs paren then mul),
# the default recipe's three experts for them and no generalist.
REDUCED_RECIPE = Recipe(members=tuple(m for m in DEFAULT_RECIPE.members if m.name in ("add", "mul", "paren")))
RECIPES = {"default": DEFAULT_RECIPE, "reduced": REDUCED_RECIPE}


def default_cache_dir() -> Path:
    """`$HRJAX_SPECIALISTS` or `~/.cache/hrjax/specialists`."""
    return Path(os.environ.get("HRJAX_SPECIALISTS") or Path.home() / ".cache" / "hrjax" / "specialists")


def recipe_hash(recipe: Recipe) -> str:
    """16 hex digits over everything that changes the trained weights."""
    import flax
    import jax
    import optax

    key = {"recipe": dataclasses.asdict(recipe), "format": FORMAT_VERSION, "alphabet": ALPHABET,
           "template": dataclasses.asdict(HOP_TEMPLATE),
           "versions": [jax.__version__, flax.__version__, optax.__version__]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _train_examples(per_task: int, seed: int) -> tuple:
    """A recipe's train questions, drawn once per process for all of its members."""
    return tuple(specialist_examples("train", per_task, seed, TASK_TYPES))


def training_pairs(recipe: Recipe, member: Member) -> list[tuple[str, str]]:
    """The member's (prompt, response) pairs: the first hop of every train question whose route starts
    with one of its skills, and, with `echo`, the echo pair of `echo_per_task` questions per type."""
    examples = _train_examples(recipe.train_per_task, recipe.seed)
    pairs = [first_hop_pair(e) for e in examples]
    pairs = [(prompt, response) for skill, prompt, response in pairs if skill in member.skills]
    if ECHO in member.skills:
        for task_type in TASK_TYPES:
            of_type = [e for e in examples if e.task == task_type][:recipe.echo_per_task]
            pairs += [echo_pair(e)[1:] for e in of_type]
    return pairs


def is_built(path: Path, digest: str) -> bool:
    """Whether `path` holds a member saved by a build of the recipe with this hash."""
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get(METADATA_KEY, {}).get("recipe") == digest


# Seconds of a training step per token of its packed rows [R, L] on one core of a 2-core AVX2 host (Zen 3), the
# other core training too: a fixed part plus a part per matmul FLOP of the token's forward pass, fit to a 64-wide
# expert (24.6 ms a step of 22 x 38 tokens) and the 128-wide generalist (72.5 ms, 20 x 48).
STEP_SECONDS_PER_TOKEN = (1.40e-5, 9.4e-11)
STACK_COMPILE_SECONDS = 11.0  # the init and update programs of one stack of members (`train_together`)


def pair_lengths(recipe: Recipe, member: Member) -> np.ndarray:
    """Tokens of each of the member's training pairs [N]: <s> prompt response </s>, a token a character."""
    return np.array([len(prompt) + len(response) + 2 for prompt, response in training_pairs(recipe, member)])


@functools.lru_cache(maxsize=256)
def _rows_needed(lengths: tuple, steps: int, batch_size: int, seed: int, row_length: int) -> int:
    """The most rows of `row_length` tokens a step needs for pairs of these lengths, drawn like the real ones."""
    draws = np.random.default_rng(seed).integers(0, len(lengths), (steps, batch_size))
    return place_in_rows(np.array(lengths), draws, row_length)[1]


def stack_seconds(stack: Sequence[Member], lengths: Mapping[str, np.ndarray]) -> float:
    """Estimated seconds to train `stack` (members of one shape) in one program, as `train_together` does:
    its compile, then every member's steps on the stack's rows [R, L] (L = `ROW_PAIRS` x the longest pair of
    any member, R the most rows a step of any member needs)."""
    length = ROW_PAIRS * max(int(lengths[m.name].max()) for m in stack)
    rows = max(_rows_needed(tuple(lengths[m.name].tolist()), m.sft.steps, m.sft.batch_size, m.sft.seed, length)
               for m in stack)
    config = stack[0].sft
    fixed, per_flop = STEP_SECONDS_PER_TOKEN
    flops = 2 * config.num_layers * (4 * config.hidden_size ** 2 + 3 * config.hidden_size * config.intermediate_size)
    return STACK_COMPILE_SECONDS + sum(m.sft.steps for m in stack) * rows * length * (fixed + per_flop * flops)


def partition_members(members: Sequence[Member], groups: int, lengths: Mapping[str, np.ndarray]) -> list[list]:
    """`members` split into at most `groups` shares, one per process, each trained as stacks of one shape
    (`train_members`), so that the largest estimated share time (the sum of its `stack_seconds`) is small:
    each member, costliest first, onto the share it adds the least time to; then single moves and swaps
    between shares while one lowers (largest, total). No empty shares, each in recipe order; deterministic.
    One group needs no `lengths`."""
    if groups <= 1:
        return [list(members)]
    memo = {}

    def seconds(share) -> float:
        stacks = {}
        for member in share:
            stacks.setdefault(member.sft.shape, []).append(member)
        for stack in stacks.values():
            key = tuple(sorted(m.name for m in stack))
            if key not in memo:
                memo[key] = stack_seconds(stack, lengths)
        return sum(memo[tuple(sorted(m.name for m in stack))] for stack in stacks.values())

    def score(shares) -> tuple[float, float]:
        times = [seconds(share) for share in shares]
        return max(times), sum(times)

    shares = [[] for _ in range(groups)]
    for member in sorted(members, key=lambda m: seconds([m]), reverse=True):
        shares[min(range(len(shares)), key=lambda g: seconds(shares[g] + [member]) - seconds(shares[g]))].append(member)
    while True:
        neighbours = [_moved(shares, a, i, b) for a in range(len(shares)) for i in range(len(shares[a]))
                      for b in range(len(shares)) if b != a]
        neighbours += [_swapped(shares, a, i, b, j) for a in range(len(shares)) for b in range(a + 1, len(shares))
                       for i in range(len(shares[a])) for j in range(len(shares[b]))]
        best = min(neighbours, key=score, default=None)
        if best is None or score(best) >= score(shares):
            break
        shares = best
    order = {m.name: i for i, m in enumerate(members)}
    shares = [sorted(share, key=lambda m: order[m.name]) for share in shares if share]
    return sorted(shares, key=lambda share: order[share[0].name])


def _moved(shares: list[list], a: int, i: int, b: int) -> list[list]:
    """`shares` with member i of share a moved to share b."""
    moved = [list(share) for share in shares]
    moved[b].append(moved[a].pop(i))
    return moved


def _swapped(shares: list[list], a: int, i: int, b: int, j: int) -> list[list]:
    """`shares` with member i of share a and member j of share b swapped."""
    swapped = [list(share) for share in shares]
    swapped[a][i], swapped[b][j] = shares[b][j], shares[a][i]
    return swapped


def build_pool(recipe: Recipe = DEFAULT_RECIPE, cache_dir: Optional[str | os.PathLike] = None,
               progress: bool = True, processes: int = 0) -> list[ModelSpec]:
    """Trains the members not cached yet (one tqdm bar over all their steps) and returns the pool's
    specs in recipe order. Each member is written atomically when its training ends, so an
    interrupted build leaves only complete members, which a later build reuses. With `processes`
    above 1 (0: `hrjax.local_processes.default_processes`, one per core on a CPU host), the members
    are split by `partition_members` and each share trains in a child process pinned to its own
    cores (`hrjax.local_processes.run_pinned`); a member's weights then depend on which members share
    its program only by float32 rounding, and the split is fixed for a given recipe and core count."""
    from hrjax.local_processes import default_processes
    from hrjax.locking import exclusive

    digest = recipe_hash(recipe)
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / digest
    paths = {m.name: root / m.name for m in recipe.members}
    if any(not is_built(paths[m.name], digest) for m in recipe.members):
        # one builder at a time: a process that waited for another finds its members built
        with exclusive(root.parent / f".{digest}.lock", f"the specialist pool build {root}", wait=True):
            todo = [m for m in recipe.members if not is_built(paths[m.name], digest)]
            if todo:
                with atomic_file(root / "recipe.json", "w") as f:
                    json.dump({"hash": digest, "recipe": dataclasses.asdict(recipe)}, f, indent=2)
                processes = default_processes(processes)
                lengths = {m.name: pair_lengths(recipe, m) for m in todo} if processes > 1 else {}
                groups = partition_members(todo, processes, lengths)
                _build_groups(recipe, groups, root, digest, progress)
    return [ModelSpec(m.name, str(paths[m.name]), m.base_rate, use_chat_template=False) for m in recipe.members]


def _build_groups(recipe: Recipe, groups: list[list], root: Path, digest: str, progress: bool) -> None:
    """Trains each group of members (one group in this process, several in child processes), with
    one tqdm bar over all their steps."""
    from tqdm.auto import tqdm

    from hrjax.local_processes import run_pinned

    names = " | ".join("+".join(m.name for m in group) for group in groups)
    with tqdm(total=sum(m.sft.steps for group in groups for m in group), desc=f"specialists {names}",
              unit="step", disable=not progress) as bar:
        def report(steps_done: int, loss: float):
            bar.update(steps_done - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}")

        if len(groups) == 1:
            train_members(recipe, groups[0], root, digest, report)
        else:
            run_pinned("hrjax.specialists.build:train_group",
                       [(recipe, [m.name for m in group], str(root), digest) for group in groups],
                       lambda steps_done, postfix: report(steps_done, postfix["loss"]))


def train_group(payload: tuple, report: Callable[[int, dict], None]) -> None:
    """A child process's share of a build (`run_pinned`): payload = (recipe, member names, root, digest)."""
    recipe, names, root, digest = payload
    train_members(recipe, [m for m in recipe.members if m.name in names], Path(root), digest,
                  lambda steps_done, loss: report(steps_done, {"loss": loss}))


def train_members(recipe: Recipe, todo: list, root: Path, digest: str,
                  report: Callable[[int, float], None]) -> None:
    """Trains the `todo` members of `recipe` in this process, those of one shape (`SFTConfig.shape`)
    together in one program (`train_together`), each saved atomically under `root` when its
    training ends; `report(steps done over todo, latest mean loss)` after every jitted call. A
    member whose loss diverges is dropped and the others finish; then the first such error is raised."""
    from hrjax.models.hf import save_hf
    from hrjax.specialists.sft import encode_pairs, loaded_lm, train_together
    from hrjax.specialists.tokenizer import char_tokenizer

    tokenizer = char_tokenizer(ALPHABET)
    stacks = {}
    for member in todo:
        stacks.setdefault(member.sft.shape, []).append(member)
    finished, diverged = 0, None
    for stack in stacks.values():
        data = [encode_pairs(tokenizer, training_pairs(recipe, m), m.sft.max_position_embeddings) for m in stack]
        start = finished
        try:
            for index, params, losses in train_together(
                    [m.sft for m in stack], data, len(tokenizer),
                    lambda steps_done, loss: report(start + steps_done, loss), [f"member '{m.name}'" for m in stack]):
                member = stack[index]
                metadata = {"recipe": digest, "member": dataclasses.asdict(member), "pairs": len(data[index][0]),
                            "final_loss": float(losses[-20:].mean())}
                config = member.sft.decoder_config(len(tokenizer))
                save_hf(loaded_lm(config, params, tokenizer, str(root / member.name), **{METADATA_KEY: metadata}),
                        root / member.name)
        except TrainingDivergedError as error:
            diverged = diverged or error
        finished = start + sum(m.sft.steps for m in stack)
    if diverged is not None:
        raise diverged
