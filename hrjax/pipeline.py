"""`hrjax evaluate`: train the router over several seeds (or resume / reuse finished runs), then
score it on held-out prompts against every baseline and write the report.

Layout of the run directory (local or gs://, as `hrjax train`'s: `hrjax.rundir`): `seed_<s>/` (one
`hrjax.train` workdir per seed), `summary.json`, `report.md` and its PNGs, and `sweep_routers.npz`
(the lambda sweep's routers, which `hrjax export` turns into a bundle's calibration table). The chief
alone writes them, each whole (`hrjax.rundir.open_for_writing`). Everything is read from the one path
tree of the training, selection and held-out prompts (generated once, cached; the seed runs train on
it), so baselines and the oracle are exact. The held-out prompts are scored here only: the seed runs
select on the others. The job ends by printing the wall seconds of its phases (`EvaluationRun.seconds`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from typing import NamedTuple, Optional, Sequence

import jax
import numpy as np

from hrjax.config import RunConfig
from hrjax.pool import resolve_pool
from hrjax.rundir import RunPath, as_path, open_for_writing
from hrjax.train import (ComputedRun, computable_ahead, load_data, load_or_build_scored_tree, sharing_tree_runs,
                         train, tree_meta, tree_path)

SWEEP_FILE = "sweep_routers.npz"


class EvaluationRun(NamedTuple):
    summary: dict
    table: str  # Markdown
    report: RunPath  # report.md
    seconds: dict  # wall seconds per phase that ran (pool, tree, routers, seed runs, evaluation, report), then 'total'


class PhaseClock:
    """Wall seconds per named phase of a job: `with clock.phase("tree"): ...`; `clock.seconds`."""

    def __init__(self):
        self.seconds, self._start = {}, time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def with_total(self) -> dict:
        """The phases' seconds in the order they first ran, then 'total' (since the clock was made)."""
        return {**self.seconds, "total": time.perf_counter() - self._start}


def timing_line(seconds: dict) -> str:
    """'phase seconds: pool 12.3 s, tree 4.5 s, ..., total 80.1 s' of `EvaluationRun.seconds`."""
    return "phase seconds: " + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())


def sweep_routers(config: RunConfig, tree, train_rows: np.ndarray, seeds: list[int],
                  lambdas: Optional[Sequence[float]] = None) -> dict:
    """{cost_lambda: params stacked over seeds} for each of `lambdas` (default: every lambda of the evaluation
    sweep but the run's own): fixed-lambda routers trained like the seed runs (same keys), in memory, as one
    program (`fixed_lambda_runs`)."""
    if lambdas is None:
        lambdas = sweep_lambdas(config)
    if not lambdas:
        return {}
    return routers_by_lambda(fixed_lambda_runs(config, tree, train_rows, [(s, lam) for lam in lambdas for s in seeds]),
                             lambdas, len(seeds))


def sweep_lambdas(config: RunConfig) -> list[float]:
    """The lambdas at which a router that is not lambda-conditioned is trained again per seed for the AIQ sweep:
    every lambda of `config.evaluate.cost_lambdas` but the run's own (none for a conditioned router)."""
    if config.ppo.conditioned:
        return []
    return [x for x in config.evaluate.cost_lambdas if x != config.env.cost_lambda]


def routers_by_lambda(steps, lambdas: Sequence[float], num_seeds: int) -> dict:
    """{cost_lambda: final params [seeds, ...]} of lambda-major runs' `RunSteps` (leaves [R, S + 1, ...])."""
    final = jax.tree_util.tree_map(lambda x: x[:, -1], steps.carries.params)
    return {lam: jax.tree_util.tree_map(lambda x, i=i: x[i * num_seeds:(i + 1) * num_seeds], final)
            for i, lam in enumerate(lambdas)}


def fixed_lambda_runs(config: RunConfig, tree, train_rows: np.ndarray, runs: Sequence[tuple[int, float]],
                      iterations_per_step: Optional[int] = None, children=None):
    """The tree-mode runs `runs` ((seed, cost_lambda) each: the key of `hrjax train`'s run of that seed) as
    one jitted program vmapped over the runs (in chunks on a CPU), compiled once and split over this process's
    devices (`hrjax.agent.tree_mode.train_runs`) -> their `RunSteps` as numpy arrays, leaves [R, S + 1, ...], in steps
    of `iterations_per_step` (None: one step). Each run equals its own program's up to float32 rounding. On a
    CPU host the runs are further split over child processes pinned to a share of the cores each
    (`config.train.local_processes`, `hrjax.local_processes.run_pinned`), each compiling the program for its
    runs: one run's small matmuls gain little from a second core. `children`: `RunnersAhead.children()`, one
    per share of the runs, their programs ready."""
    from hrjax.local_processes import run_pinned

    keys = np.stack([np.asarray(jax.random.PRNGKey(seed)) for seed, _ in runs])
    run_lambdas = np.array([lam for _, lam in runs], np.float32)
    payloads = [(config, tree, train_rows, keys[share], run_lambdas[share], iterations_per_step)
                for share in run_shares(config, len(keys))]
    if children is not None:
        parts = children.run("hrjax.pipeline:train_fixed_lambda_runs", payloads)
    elif len(payloads) == 1:
        return train_fixed_lambda_runs(payloads[0])
    else:
        parts = run_pinned("hrjax.pipeline:train_fixed_lambda_runs", payloads)
    return jax.tree_util.tree_map(lambda *x: np.concatenate(x), *parts)


def run_shares(config: RunConfig, runs: int) -> list[np.ndarray]:
    """The indices of `fixed_lambda_runs`' runs each of its processes trains (one process per core on a CPU)."""
    from hrjax.local_processes import default_processes

    processes = min(default_processes(config.train.local_processes), runs)
    return np.array_split(np.arange(runs), max(processes, 1))


def _runs_per_call() -> Optional[int]:
    from hrjax.agent.tree_mode import CPU_RUNS_PER_CALL

    return CPU_RUNS_PER_CALL if jax.default_backend() == "cpu" else None


class RunnersAhead:
    """The child processes that train `fixed_lambda_runs`' runs (one per share, `run_shares`), started while
    this process builds the tree: each imports JAX and compiles the programs for its share from the tree's
    shapes alone (`compile_fixed_lambda_runs`; with a persistent compilation cache (`use_compilation_cache`)
    the first child compiles into it, then the others load from it), then waits for the tree. The tree build
    keeps about 1.35 of 2 cores busy (AVX2 host); the programs take 14 s to compile, and a child 4 s to start
    and get them ready. `start` in the tree phase, `children()` for the runs; a use as a context manager ends
    them. A failed start is only warned about (the runs then start their own). Nothing starts off a CPU
    backend (a second process would claim the accelerator's memory)."""

    def __init__(self):
        self._children, self._future = None, None

    def __enter__(self) -> "RunnersAhead":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._future is not None:
            self._future.cancel()
        if self._children is not None:
            self._children.close()
            self._children = None

    def start(self, config: RunConfig, examples: list, train_rows: np.ndarray, runs: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from hrjax.local_processes import PinnedChildren, compilation_cache_dir

        if not (runs and jax.default_backend() == "cpu"):
            return
        payloads = [(config, len(examples), train_rows, len(share)) for share in run_shares(config, runs)]
        self._children = PinnedChildren(len(payloads))

        def prepare():
            if compilation_cache_dir():  # the first child compiles into the cache, the others then load from it
                self._children.run("hrjax.pipeline:compile_fixed_lambda_runs", payloads[:1])
                self._children.run("hrjax.pipeline:compile_fixed_lambda_runs", payloads[1:],
                                   children=range(1, len(payloads)))
            else:
                self._children.run("hrjax.pipeline:compile_fixed_lambda_runs", payloads)

        pool = ThreadPoolExecutor(1)
        self._future = pool.submit(prepare)
        pool.shutdown(wait=False)  # its thread ends with `prepare`

    def children(self):
        """The children, their programs ready (`PinnedChildren`), or None (none started, or they failed)."""
        if self._future is None:
            return None
        try:
            self._future.result()
        except Exception as error:  # noqa: BLE001 (a speed-up only: the runs start their own children)
            import warnings

            warnings.warn(f"Starting the routers' runs ahead failed; they start with the runs: {error}")
            self.__exit__(None, None, None)
        finally:
            self._future = None
        return self._children


# `compile_fixed_lambda_runs`' programs in a child of `RunnersAhead`, by (runs, iterations per step), for the
# child's `train_fixed_lambda_runs`
_COMPILED: dict = {}


def compile_fixed_lambda_runs(payload: tuple, report=None) -> None:
    """payload = (config, number of tree rows, train rows, runs): compiles the programs `train_fixed_lambda_runs`
    calls for that many runs, over a stand-in tree of zeros of the real tree's shapes
    (`hrjax.agent.tree_mode.compile_runs`), into the persistent compilation cache, and keeps them for this
    process's `train_fixed_lambda_runs` of the same config."""
    from hrjax.agent.tree_mode import compile_runs, make_train
    from hrjax.env.mdp import observation_width
    from hrjax.env.tree import stand_in_tree
    from hrjax.models.encoder import load_encoder

    config, rows, train_rows, runs = payload
    width = observation_width(load_encoder(config.encoder or None).dim, config.env.view)
    tree = stand_in_tree(rows, len(config.pool), config.env.num_hops, width)
    trainer = make_train(config.ppo, config.network, config.env, tree, train_rows, config.train.num_iterations)
    _COMPILED[runs, config.train.iterations_per_step] = compile_runs(
        trainer, runs, config.train.iterations_per_step, max_runs_per_call=_runs_per_call())


def train_fixed_lambda_runs(payload: tuple, report=None):
    """payload = (config, tree, train rows, keys [R, 2], cost lambdas [R], iterations per step) -> the R runs'
    `RunSteps` as numpy arrays (`hrjax.agent.tree_mode.train_runs`, with the programs this process compiled
    for them, if any): `fixed_lambda_runs`' runs, or a child process's share of them (`report` unused)."""
    from hrjax.agent.tree_mode import make_train, train_runs

    config, tree, train_rows, keys, run_lambdas, iterations_per_step = payload
    trainer = make_train(config.ppo, config.network, config.env, tree, train_rows, config.train.num_iterations)
    return jax.device_get(train_runs(trainer, keys, run_lambdas, iterations_per_step,
                                     max_runs_per_call=_runs_per_call(),
                                     compiled=_COMPILED.pop((len(keys), iterations_per_step), None)))


def sweep_key(config: RunConfig, seeds: list[int]) -> str:
    """16 hex digits over everything the sweep's routers depend on: the resolved config (pool, task,
    env, PPO, network, iterations, lambdas) and the seeds."""
    return hashlib.sha256(json.dumps([config.to_dict(), list(seeds)], sort_keys=True).encode()).hexdigest()[:16]


def saved_sweep_key(path: str | os.PathLike) -> str:
    """The `sweep_key` a saved sweep was trained under ('' if none is saved there, or it has none)."""
    path = as_path(path)
    if not path.exists():
        return ""
    with path.open("rb") as f, np.load(f) as data:
        return json.loads(str(data["meta"])).get("key", "")


def save_sweep(path: str | os.PathLike, sweep: dict, seeds: list[int], key: str = "") -> RunPath:
    """Writes `sweep_routers`' result ({cost_lambda: params stacked over seeds}) to one .npz, local or gs://
    (`open_for_writing`): arrays '<i>/<param path>' for the i-th lambda, and 'meta' (JSON: the lambdas and
    seeds in order, and the `sweep_key`)."""
    from flax.traverse_util import flatten_dict

    lambdas = sorted(sweep)
    arrays = {f"{i}/{name}": np.asarray(value) for i, lam in enumerate(lambdas)
              for name, value in flatten_dict(sweep[lam], sep="/").items()}
    path = as_path(path)
    with open_for_writing(path) as f:
        np.savez(f, meta=np.array(json.dumps({"cost_lambdas": lambdas, "seeds": list(seeds), "key": key})),
                 **arrays)
    return path


def load_sweep(path: str | os.PathLike) -> tuple[list[int], dict]:
    """-> (seeds, {cost_lambda: params stacked over seeds}) as `save_sweep` wrote them (local or gs://)."""
    from flax.traverse_util import unflatten_dict

    with as_path(path).open("rb") as f, np.load(f) as data:
        meta = json.loads(str(data["meta"]))
        sweep = {}
        for i, lam in enumerate(meta["cost_lambdas"]):
            prefix = f"{i}/"
            sweep[float(lam)] = unflatten_dict({k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)},
                                               sep="/")
    return meta["seeds"], sweep


def evaluate_run(config: RunConfig, workdir: str | os.PathLike, progress: bool = True) -> EvaluationRun:
    """Trains `config.evaluate.seeds` routers (tree mode; online runs are scored on the same tree),
    and for a router that is not lambda-conditioned, one per seed at every other lambda of the sweep
    (reused from the workdir's sweep_routers.npz when saved there under the same config and seeds);
    then scores everything on the held-out prompts and writes summary.json, report.md and PNGs.
    `workdir`: a local path or gs:// (checked first: `hrjax.rundir.run_dir`). The workdir is held
    exclusively while the evaluation runs (each seed's run dir too; a bucket is not locked)."""
    from hrjax.rundir import local_dir, locked_run_dir

    local_dir(config.train.cache_dir, "config.train.cache_dir")
    with locked_run_dir(workdir) as workdir:
        return _evaluate_in(config, workdir, progress)


def _runs_to_train(config: RunConfig, workdir: RunPath, seeds: list[int], lambdas: list[float]) -> list[tuple]:
    """(seed, cost lambda) of the runs `_seed_runs_and_sweep` computes: the seed runs not yet finished in
    `workdir` (at `config.env.cost_lambda`), then the sweep's runs at each of `lambdas` (every seed)."""
    from hrjax.checkpoint import latest_saved_step

    pending = [s for s in seeds if latest_saved_step(workdir / f"seed_{s}") != config.train.num_iterations]
    return [(s, config.env.cost_lambda) for s in pending] + [(s, lam) for lam in lambdas for s in seeds]


def _seed_runs_and_sweep(config: RunConfig, workdir: RunPath, tree, train_rows: np.ndarray, seeds: list[int],
                         lambdas: list[float], clock: PhaseClock, progress: bool, sweep: Optional[dict],
                         ahead: RunnersAhead):
    """Tree mode on one device (`hrjax.train.computable_ahead`): the `_runs_to_train` as one program
    (`fixed_lambda_runs`, in the seed runs' steps, by the children started `ahead`: phase 'routers'); then each
    seed run's metrics, evaluations and checkpoints written by `train` from the computed steps, as it would
    have computed them (phase 'seed runs'). -> (each seed's final params, {lambda: params [seeds, ...]} of
    `lambdas`, or `sweep` when there are none)."""
    runs = _runs_to_train(config, workdir, seeds, lambdas)
    pending = [s for s, _ in runs[:len(runs) - len(lambdas) * len(seeds)]]
    computed = {}
    if runs:
        with clock.phase("routers"):
            steps = fixed_lambda_runs(config, tree, train_rows, runs, config.train.iterations_per_step,
                                      ahead.children())
        seconds = clock.seconds["routers"]
        computed = {s: ComputedRun(jax.tree_util.tree_map(lambda x, i=i: x[i], steps), seconds, len(runs))
                    for i, s in enumerate(pending)}
        if lambdas:
            sweep = routers_by_lambda(jax.tree_util.tree_map(lambda x: x[len(pending):], steps), lambdas, len(seeds))
    with clock.phase("seed runs"), sharing_tree_runs():  # the seeds' evaluations compiled once
        params = [train(dataclasses.replace(config, seed=s), workdir / f"seed_{s}", progress, computed.get(s)).params
                  for s in seeds]
    return params, sweep


def _evaluate_in(config: RunConfig, workdir: RunPath, progress: bool) -> EvaluationRun:
    from hrjax.agent.tree_mode import make_train
    from hrjax.evaluate import Split, evaluate, markdown_table, ppo_policy, summarize
    from hrjax.metrics import read_metrics
    from hrjax.parallel import is_chief
    from hrjax.report import write_report

    clock = PhaseClock()
    with clock.phase("pool"):
        config = resolve_pool(config, progress)
    seeds = [config.seed + s for s in range(config.evaluate.seeds)]
    lambdas = sweep_lambdas(config)
    key = sweep_key(config, seeds)  # a rerun reuses the saved sweep of the same config, as it does the seed runs
    sweep = load_sweep(workdir / SWEEP_FILE)[1] if lambdas and saved_sweep_key(workdir / SWEEP_FILE) == key else None
    trained_sweep = bool(lambdas) and sweep is None
    with RunnersAhead() as ahead:
        with clock.phase("tree"):  # the seed runs' tree (train, select, eval), built here and cached for them
            data = load_data(config)
            train_rows = data.rows("train")
            runs = 0  # the routers' runs get ready while a tree is built
            if computable_ahead(config) and not tree_path(config, tree_meta(config, data.examples)).exists():
                runs = len(_runs_to_train(config, workdir, seeds, lambdas if trained_sweep else []))
            ahead.start(config, data.examples, train_rows, runs)
            tree, official = load_or_build_scored_tree(config, data.examples, progress)  # official: for the report
        if computable_ahead(config):
            params, sweep = _seed_runs_and_sweep(config, workdir, tree, train_rows, seeds,
                                                 lambdas if trained_sweep else [], clock, progress, sweep, ahead)
        else:  # online mode, a training mesh or several processes: the seed runs one by one, then the sweep
            with clock.phase("seed runs"), sharing_tree_runs():  # one tree run's programs, compiled once for all
                params = [train(dataclasses.replace(config, seed=s), workdir / f"seed_{s}", progress).params
                          for s in seeds]
            if trained_sweep:
                with clock.phase("sweep"):
                    sweep = sweep_routers(config, tree, train_rows, seeds, lambdas)
    if trained_sweep and is_chief():
        save_sweep(workdir / SWEEP_FILE, sweep, seeds, key)
    stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), *params)
    if lambdas:
        stacked = {config.env.cost_lambda: stacked, **sweep}
    learner = make_train(config.ppo, config.network, config.env, tree, train_rows,
                         config.train.num_iterations).learner
    with clock.phase("evaluation"):
        result = evaluate(Split(tree, train_rows, [e.task for e in data.train]),
                          Split(tree, data.rows("eval"), [e.task for e in data.eval], official),
                          config.env, ppo_policy(learner, stacked, config.env), config.evaluate.cost_lambdas,
                          min(config.evaluate.knn_k, len(data.train)), [m.name for m in config.pool])
        summary = summarize(result)
    report = workdir / "report.md"
    with clock.phase("report"):
        if is_chief():  # in a multi-process job every process evaluated; the chief alone writes
            write_report(workdir, summary, [read_metrics(workdir / f"seed_{s}" / "metrics.jsonl") for s in seeds])
    seconds = clock.with_total()
    if is_chief():
        print(timing_line(seconds), flush=True)
    return EvaluationRun(summary, markdown_table(summary), report, seconds)
