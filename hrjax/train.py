"""The training loop: `train(config, workdir)` runs `iterations_per_step` jitted PPO iterations per
Python step, then logs each iteration's metrics (JSONL + TensorBoard + a progress bar with ETA),
evaluates the greedy router on the selection prompts (also at iteration 0, before any update) and
checkpoints. A run restarted
on the same workdir resumes from its latest checkpoint and ends with the same parameters, bit for
bit, as a run never interrupted.

Data flows one way: task examples -> pool + encoder -> env (or its path tree) -> PPO -> checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hrjax.checkpoint import RunCheckpoints
from hrjax.config import RunConfig
from hrjax.errors import TrainingDivergedError


class TrainResult(NamedTuple):
    params: Any
    iteration: int
    history: list[dict]  # the metrics rows logged by this process


@dataclasses.dataclass(frozen=True)
class RunData:
    """The task's examples in three disjoint parts (`config.task`): training prompts, selection
    prompts (the loop's eval/* metrics and best/ checkpoint) and the reported held-out ones."""

    train: list
    select: list
    eval: list

    @property
    def examples(self) -> list:
        """Every example, in the order of the path tree's rows: train, select, eval."""
        return self.train + self.select + self.eval

    def rows(self, part: str) -> np.ndarray:
        """[n] int: the rows of `examples` (and of the path tree) holding part 'train', 'select' or 'eval'."""
        start = {"train": 0, "select": len(self.train), "eval": len(self.train) + len(self.select)}[part]
        return np.arange(start, start + len(getattr(self, part)))


def load_data(config: RunConfig) -> RunData:
    from hrjax.tasks.datasets import load_parts

    task = config.task
    parts = load_parts(task.parts, task.data_dir, task.manual_dir)
    if task.answer_format:  # each family's models are asked for its answer format
        from hrjax.tasks.answers import asked_in_format

        parts = [[asked_in_format(e) for e in examples] for examples in parts]
    return RunData(*parts)


def quality_fn(config: RunConfig):
    """The env's scorer, `(example, response) -> [0, 1]`: of the answer in the family's format
    (`formatted_score`) when `config.task.answer_format`, else of the whole response (`score_example`)."""
    from hrjax.tasks.answers import formatted_score
    from hrjax.tasks.scorers import score_example

    return formatted_score if config.task.answer_format else score_example


def official_scoring(config: RunConfig, examples: list):
    """How the path tree scores `examples`' nodes for reports (`hrjax.env.tree.OfficialScoring`): the official
    metrics of each example's family (`hrjax.tasks.official`), its headline metric first (`HEADLINE_METRIC`), of
    the formatted answer (`formatted_official_score`: every metric 0.0 when the response holds none) when
    `config.task.answer_format`, else of the whole response; batched by `official_scores` (code in its bounded
    sandbox pool)."""
    from hrjax.env.tree import OfficialScoring
    from hrjax.tasks.answers import formatted_official_score, read_answer
    from hrjax.tasks.official import HEADLINE_METRIC, family_of, official_metrics, official_scores

    families = [family_of(e) for e in examples]
    columns = {f: [HEADLINE_METRIC[f], *(m for m in official_metrics(f) if m != HEADLINE_METRIC[f])]
               for f in dict.fromkeys(families)}
    width = max(map(len, columns.values()), default=0)
    names = np.array([columns[f] + [""] * (width - len(columns[f])) for f in families], str)

    def formatted(chunk: list, responses: list[str]) -> list[dict[str, float]]:
        answers = [read_answer(e, r) for e, r in zip(chunk, responses)]
        held = [i for i, answer in enumerate(answers) if answer is not None]
        scored = dict(zip(held, official_scores([chunk[i] for i in held], [answers[i] for i in held])))
        return [scored[i] if i in scored else formatted_official_score(e, r)  # no answer: each metric 0.0
                for i, (e, r) in enumerate(zip(chunk, responses))]

    return OfficialScoring(np.array(families, str), names, formatted if config.task.answer_format else official_scores)


def make_env(config: RunConfig, examples: Optional[list] = None):
    """The routing env over the configured pool, encoder and the shared response cache. With `examples`,
    first checks that each of their prompts fits every pool model's context at every hop (one
    `PromptTooLongError` naming those that do not)."""
    from hrjax.env.budget import check_prompt_budgets
    from hrjax.env.cache import ResponseCache
    from hrjax.env.mdp import RoutingEnv
    from hrjax.models.encoder import load_encoder
    from hrjax.pool import load_pool
    cache = ResponseCache(Path(config.train.cache_dir).expanduser() / "responses")
    pool = load_pool(config)
    env = RoutingEnv(pool, load_encoder(config.encoder or None), quality_fn(config), config.env, cache)
    if examples is not None:
        check_prompt_budgets(env, [e.id for e in examples], [e.question for e in examples])
    return env


def tree_meta(config: RunConfig, examples: list) -> dict:
    """What a path tree depends on: the tree format, the pool (its specs and their files' content), the
    encoder, the generation settings, and every example's content with the versions of their scorers, of
    their families' official metrics and, when answers are scored in their family's format, of its extractor."""
    from hrjax.env.tree import FORMAT_VERSION
    from hrjax.pool import FileDigests, digest_index, spec_fingerprint
    from hrjax.tasks.datasets import examples_fingerprint
    from hrjax.tasks.official import OFFICIAL_VERSIONS, family_of

    generation = {k: v for k, v in config.to_dict()["env"].items()
                  if k not in ("cost_lambda", "cost_timing", "stop_action")}
    digests = FileDigests(digest_index(config))
    files = [spec_fingerprint(spec, digests) for spec in config.pool]
    digests.save()
    if config.task.answer_format:  # formatted answers scored: by each family's extractor, at its version
        from hrjax.tasks.answers import answer_format

        read_by = {e.task: fmt.version for e in examples if (fmt := answer_format(e)) is not None}
        scoring = {"answer_format": dict(sorted(read_by.items()))}
    else:
        scoring = {}
    official = {family: OFFICIAL_VERSIONS[family] for family in sorted({family_of(e) for e in examples})}
    return {"format": FORMAT_VERSION, "pool": config.to_dict()["pool"], "pool_files": files, "encoder": config.encoder,
            "env": generation, "task": config.task.name, **scoring, **examples_fingerprint(examples),
            "official": official}


def tree_path(config: RunConfig, meta: dict) -> Path:
    """Where the path tree of `meta` (`tree_meta`) is cached: named by a digest of it."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    return Path(config.train.cache_dir).expanduser() / "trees" / f"{digest}.npz"


def load_or_build_tree(config: RunConfig, examples: list, progress: bool):
    """The path tree of `examples` (as `load_or_build_scored_tree` builds it; its official scores not read)."""
    return _load_or_build(config, examples, progress, official=False)[0]


def load_or_build_scored_tree(config: RunConfig, examples: list, progress: bool):
    """(the path tree of `examples`, its `OfficialScores` (`official_scoring`)), from the cache dir when they
    were built before, else built (and saved: the official scores as extra arrays beside the tree). One
    process builds a given tree at a time; another that needs it waits, then reads it. In a multi-process
    job each process builds only its share of the prompts (`build_tree_share`)."""
    return _load_or_build(config, examples, progress, official=True)


def _load_or_build(config: RunConfig, examples: list, progress: bool, official: bool):
    """`load_or_build_scored_tree`; the official scores read from a saved tree only when `official` (else None)."""
    from hrjax.env.tree import build_scored_tree, load_official, load_tree, save_tree
    from hrjax.locking import exclusive
    from hrjax.parallel import all_processes

    meta = tree_meta(config, examples)
    path = tree_path(config, meta)

    def read():
        return load_tree(path, meta), (load_official(path) if official else None)

    if jax.process_count() > 1:
        if all_processes(path.exists()):
            return read()
        built = build_tree_share(config, examples, meta, path, progress)
        save_tree(built[0], path, meta, **built[1].extras())  # by every process: its cache dir may be its own
        return built
    if not path.exists():
        with exclusive(path.with_suffix(".lock"), f"the path tree build {path}", wait=True):
            if not path.exists():  # else built by the process this one waited for
                built = build_scored_tree(make_env(config, examples), examples, [e.question for e in examples],
                                          official_scoring(config, examples), progress=progress)
                save_tree(built[0], path, meta, **built[1].extras())
                return built
    return read()


def build_tree_share(config: RunConfig, examples: list, meta: dict, path: Path, progress: bool):
    """The whole tree of `examples` and its `OfficialScores` in every process of a multi-process job, each
    process generating (and scoring) only its rows (`hrjax.parallel.process_rows`) into a shard file of its
    own beside `path` (kept: a killed job's rerun reads the shards already built), then gathering the others'
    rows. A shard holds `generated`: the answers its process generated (cache misses; 0 when the cache had
    them)."""
    from absl import logging

    from hrjax.env.tree import (ROW_FIELDS, OfficialScores, build_scored_tree, load_extra, load_official, load_tree,
                                save_tree, shard_path)
    from hrjax.locking import exclusive
    from hrjax.parallel import gather_rows, process_rows

    index, count = jax.process_index(), jax.process_count()
    rows, shard = process_rows(len(examples)), shard_path(path, index, count)
    shard_meta = {**meta, "rows": f"{index}::{count}"}
    scoring = official_scoring(config, examples)  # the layout of every row: the same J in every process
    with exclusive(shard.with_suffix(".lock"), f"the path tree shard {shard}", wait=True):
        if shard.exists():
            part, official = load_tree(shard, shard_meta), load_official(shard)
            logging.info("path tree rows %d::%d of %d: read from %s (%d answers generated when built)", index,
                         count, len(examples), shard, int(load_extra(shard, "generated")))
        else:
            env = make_env(config, examples)
            part, official = build_scored_tree(
                env, [examples[i] for i in rows], [examples[i].question for i in rows],
                scoring._replace(families=scoring.families[rows], names=scoring.names[rows]), progress=progress)
            generated = env.cache.stats.misses
            save_tree(part, shard, shard_meta, generated=np.asarray(generated), **official.extras())
            logging.info("path tree rows %d::%d of %d (%d prompts): %d answers generated, %d from the cache", index,
                         count, len(examples), len(rows), generated, env.cache.stats.hits)
    whole = gather_rows({"official": official.values, **{name: getattr(part, name) for name in ROW_FIELDS}},
                        len(examples))
    return (part._replace(**{name: whole[name] for name in ROW_FIELDS}),
            OfficialScores(whole["official"], scoring.families, scoring.names))


class _TreeRun:
    """Tree mode: the path tree of every prompt (train, select, eval: the one tree `hrjax evaluate`
    reads too); one jitted scan per Python step; evaluation on the selection prompts. Nothing here depends
    on the run's seed, so the runs of one config can share one (`sharing_tree_runs`)."""

    def __init__(self, config: RunConfig, data: RunData, mesh, progress: bool):
        from hrjax.agent.tree_mode import greedy_paths, make_train
        from hrjax.parallel import replicated
        from hrjax.runtime import RUN_ONCE_COMPILER_OPTIONS

        tree = load_or_build_tree(config, data.examples, progress)
        self.trainer = make_train(config.ppo, config.network, config.env, tree, data.rows("train"),
                                  config.train.num_iterations, mesh)
        self._init = jax.jit(self.trainer.init, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
        self._run = jax.jit(self.trainer.run, static_argnums=1)
        select_rows, lam = data.rows("select"), config.env.cost_lambda

        def greedy(params):  # -> (mean quality, mean cost), whole in every process
            quality, cost, _ = greedy_paths(self.trainer.learner, params, self.trainer.env, select_rows, lam)
            return jnp.mean(quality), jnp.mean(cost)

        self._greedy = jax.jit(greedy, out_shardings=None if mesh is None else replicated(mesh))

    def init(self, rng):
        return self._init(rng)

    def steps(self, carry, n: int):
        """n iterations -> (carry, one metrics dict per iteration, the step's learner and rollout seconds)."""
        start = time.perf_counter()
        carry, metrics = self._run(carry, n)
        jax.block_until_ready(carry)
        seconds = time.perf_counter() - start
        metrics = {k: np.asarray(v) for k, v in metrics.items()}  # [n, ...] each
        return carry, [{k: v[i] for k, v in metrics.items()} for i in range(n)], dict(learner_seconds=seconds,
                                                                                      rollout_seconds=0.0)

    def evaluate(self, params):
        quality, cost = self._greedy(params)
        return float(quality), float(cost)


class ComputedRun(NamedTuple):
    """A tree run computed ahead, in one program with other runs (`hrjax evaluate`'s seed runs and sweep:
    `hrjax.agent.tree_mode.train_runs`), for `train` to log, evaluate and checkpoint."""

    steps: Any  # the run's `hrjax.agent.tree_mode.RunSteps`, leaves [S + 1, ...] and [num_iterations, ...]
    program_seconds: float  # wall seconds of the program that computed it
    program_runs: int  # how many runs that program computed


def computable_ahead(config: RunConfig) -> bool:
    """Whether a run of `config` can be a `ComputedRun`: tree mode on one device of a one-process job."""
    from hrjax.parallel import training_mesh

    return config.mode == "tree" and jax.process_count() == 1 and training_mesh(config.mesh) is None


class _ComputedTreeRun:
    """A `ComputedRun`'s steps, which the loop logs, evaluates and checkpoints as it does steps it computes.
    A carry that is not the computed one at its iteration (a checkpoint written by another program) is
    continued by `run`, the run's own programs. Each step's learner seconds are its share of the program's."""

    def __init__(self, run: _TreeRun, computed: ComputedRun):
        self.run, self.computed = run, jax.tree_util.tree_map(np.asarray, computed.steps)
        self.ends = self.computed.carries.iteration  # [S + 1] the iteration each carry is at
        iterations = computed.program_runs * len(self.computed.metrics["return"])
        self.seconds_per_iteration = computed.program_seconds / iterations

    def init(self, rng):
        return self._carry(0)

    def _carry(self, iteration: int):
        """The computed carry at `iteration` (device arrays, as `_TreeRun`'s), or None when no step ends there."""
        index = np.flatnonzero(self.ends == iteration)
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x[index[0]]), self.computed.carries) if index.size else None

    def steps(self, carry, n: int):
        """As `_TreeRun.steps`, read from the computed steps when `carry` is the computed carry at its iteration."""
        start = int(carry.iteration)
        computed, ahead = self._carry(start), self._carry(start + n)
        same = computed is not None and all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(jax.device_get(computed)), jax.tree_util.tree_leaves(jax.device_get(carry))))
        if not same or ahead is None:
            return self.run.steps(carry, n)
        rows = [{k: v[i] for k, v in self.computed.metrics.items()} for i in range(start, start + n)]
        return ahead, rows, dict(learner_seconds=n * self.seconds_per_iteration, rollout_seconds=0.0)

    def evaluate(self, params):
        return self.run.evaluate(params)


_SHARED_TREE_RUNS: list[dict] = []  # while `sharing_tree_runs` is active: {config less the seed: its `_TreeRun`}


@contextlib.contextmanager
def sharing_tree_runs():
    """Within it, the tree-mode runs of one config that differ only in their seed share one `_TreeRun`
    (the tree loaded and its programs compiled once, for the first); on exit it is dropped, with the tree's
    device arrays. `hrjax evaluate` trains its seeds so."""
    _SHARED_TREE_RUNS.append({})
    try:
        yield
    finally:
        _SHARED_TREE_RUNS.pop()


def _tree_run(config: RunConfig, data: RunData, mesh, progress: bool) -> _TreeRun:
    """A new `_TreeRun` for `config`, or within `sharing_tree_runs` the one of the last run whose config
    differed at most in its seed."""
    if not _SHARED_TREE_RUNS:
        return _TreeRun(config, data, mesh, progress)
    shared = _SHARED_TREE_RUNS[-1]
    key = (json.dumps({**config.to_dict(), "seed": None}, sort_keys=True), mesh)
    if key not in shared:
        shared.clear()
        shared[key] = _TreeRun(config, data, mesh, progress)
    return shared[key]


class _OnlineRun:
    """Online mode: rollouts through the pool and response cache, then the jitted update."""

    def __init__(self, config: RunConfig, data: RunData, mesh, progress: bool):
        from hrjax.agent.online import OnlineTrainer

        self.config, self.data = config, data
        self.trainer = OnlineTrainer(config.ppo, config.network, make_env(config, data.examples), data.train,
                                     [e.question for e in data.train], config.train.num_iterations, config.seed,
                                     mesh)

    def init(self, rng):
        return self.trainer.init(rng)

    def steps(self, carry, n: int):
        """n iterations -> (carry, one metrics dict per iteration, the step's learner and rollout seconds)."""
        rows, seconds = [], {"learner_seconds": 0.0, "rollout_seconds": 0.0}
        for _ in range(n):
            carry, metrics = self.trainer.iteration(carry)
            for part in seconds:
                seconds[part] += metrics.pop(part)
            rows.append(metrics)
        return carry, rows, seconds

    def evaluate(self, params):
        """Greedy episodes of the selection prompts (each process plays its share) -> mean quality, cost."""
        from hrjax.parallel import process_rows, sum_over_processes

        select = [self.data.select[i] for i in process_rows(len(self.data.select))]
        lam = np.full(len(select), self.config.env.cost_lambda, np.float32)
        episode = self.trainer.play(params, jax.random.PRNGKey(0), select, [e.question for e in select], lam,
                                    greedy=True)
        self.trainer.env.cache.flush()
        quality, cost = sum_over_processes(np.array([episode.quality.sum(), episode.total_cost.sum()], np.float64))
        return quality / len(self.data.select), cost / len(self.data.select)


def _first_non_finite(rows: list[dict], first_iteration: int, params) -> Optional[str]:
    for iteration, metrics in enumerate(rows, first_iteration):
        for name, value in metrics.items():
            if not np.all(np.isfinite(np.asarray(value))):
                return f"metric '{name}' is {np.asarray(value).tolist()} at iteration {iteration}"
    if not bool(_all_finite(params)):
        return "the parameters hold NaN or inf"
    return None


@jax.jit
def _all_finite(tree) -> jax.Array:
    """[] bool: no NaN or inf in any leaf of `tree` (one program, not one per leaf)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def train(config: RunConfig, workdir: str | Path, progress: bool = True, computed: Optional[ComputedRun] = None
          ) -> TrainResult:
    """Trains (or resumes) the router of `config` in `workdir` (a local path or gs://); -> final params
    and the logged rows. The workdir is held exclusively while the run lasts (by the chief of a
    multi-process job: every process of the job runs this). With `computed` (a run computed ahead with
    others) its steps are logged, evaluated and checkpointed, not recomputed."""
    from hrjax.rundir import local_dir, locked_run_dir

    if computed is not None and not computable_ahead(config):
        raise ValueError(f"Only a tree-mode run on one device of a one-process job can be computed ahead; this one "
                         f"is a {config.mode}-mode run over {jax.device_count()} device(s) in {jax.process_count()} "
                         "process(es): train it without `computed`.")
    local_dir(config.train.cache_dir, "config.train.cache_dir")
    with locked_run_dir(workdir) as workdir:
        return _train_in(config, workdir, progress, computed)


def _train_in(config: RunConfig, workdir: Path, progress: bool, computed: Optional[ComputedRun]) -> TrainResult:
    """Every process of a multi-process job runs this: Orbax checkpoints from all of them, config.json,
    metrics and TensorBoard from the chief only."""
    from hrjax.metrics import MetricsWriter
    from hrjax.parallel import global_replicated, is_chief, training_mesh
    from hrjax.pool import resolve_pool
    from hrjax.rundir import write_text

    config = resolve_pool(config, progress)
    progress = progress and is_chief()
    checkpoints = RunCheckpoints(workdir, config.to_dict(), config.train.max_to_keep, config.train.best_metric)
    try:
        if is_chief():
            write_text(workdir / "config.json", json.dumps(config.to_dict(), indent=2))
        data = load_data(config)
        mesh = training_mesh(config.mesh)
        run = (_tree_run if config.mode == "tree" else _OnlineRun)(config, data, mesh, progress)
        if computed is not None:
            run = _ComputedTreeRun(run, computed)
        # the carry counts its iterations; over a mesh of several processes, one array spanning them all
        fresh = {"carry": global_replicated(run.init(jax.random.PRNGKey(config.seed)), mesh)}
        resumed_from, state = checkpoints.restore(fresh)
        action_names = [m.name for m in config.pool] + (["STOP"] if config.env.stop_action else [])
        writer = MetricsWriter(workdir, action_names, resumed_from, enabled=is_chief())
        try:
            return _loop(config, run, state, checkpoints, writer, progress)
        finally:
            writer.close()
    finally:
        checkpoints.close()


def _evaluation(config: RunConfig, run, params) -> dict:
    """The eval/* metrics: the greedy router's mean quality, cost and value on the selection prompts."""
    quality, cost = run.evaluate(params)
    return {"eval/quality": quality, "eval/cost": cost, "eval/value": quality - config.env.cost_lambda * cost}


def _loop(config: RunConfig, run, state: dict, checkpoints: RunCheckpoints, writer, progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    loop, carry = config.train, state["carry"]
    iteration = int(carry.iteration)
    history, python_step = [], iteration // loop.iterations_per_step
    if iteration == 0:  # a fresh run: the learning curves start at the untrained router (never offered to best/)
        evaluation = _evaluation(config, run, carry.params)
        writer.write(0, evaluation)
        history.append({"step": 0, **evaluation})
    with tqdm(total=loop.num_iterations, initial=iteration, desc=f"train ({config.mode})", unit="it",
              disable=not progress) as bar:
        while iteration < loop.num_iterations:
            n = min(loop.iterations_per_step, loop.num_iterations - iteration)
            start = time.perf_counter()
            carry, rows, seconds_by_part = run.steps(carry, n)
            # at least its parts: a step computed ahead (`ComputedRun`) is read here in no time
            seconds = max(time.perf_counter() - start, sum(seconds_by_part.values()))
            bad = _first_non_finite(rows, iteration + 1, carry.params)
            if bad:
                raise TrainingDivergedError(
                    f"Iterations {iteration + 1}-{iteration + n}: {bad}; stopped without saving them. The last good "
                    f"checkpoint (iteration {checkpoints.latest_step}) is kept in {checkpoints.workdir}/checkpoints: "
                    "lower ppo.learning_rate or ppo.max_grad_norm, or fix what made the rewards non-finite, then "
                    "restart.")
            python_step += 1
            metrics = rows[-1]  # the step's own figures go with its last iteration
            metrics.update(seconds_by_part, episodes_per_s=n * config.ppo.num_envs / seconds,
                           learner_fraction=seconds_by_part["learner_seconds"] / seconds)
            state = {"carry": carry}
            last = iteration + n >= loop.num_iterations
            if python_step % loop.eval_every == 0 or last:
                evaluation = _evaluation(config, run, carry.params)
                metrics.update(evaluation)
                checkpoints.save_best(iteration + n, state, evaluation)
            logged = list(zip(range(iteration + 1, iteration + n + 1), rows))  # the curves start at iteration 1
            writer.write_rows(logged)
            history += [{"step": step, **{k: np.asarray(v).tolist() for k, v in row.items()}} for step, row in logged]
            iteration += n
            if python_step % loop.checkpoint_every == 0 or last:
                checkpoints.save(iteration, state)
            bar.update(n)
            bar.set_postfix(reward=f"{float(metrics['return']):.3f}", quality=f"{float(metrics['quality']):.3f}",
                            cost=f"{float(metrics['cost']):.3f}")
    return TrainResult(carry.params, iteration, history)

