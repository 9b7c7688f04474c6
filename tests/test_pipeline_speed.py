"""The main job's fast paths give what the slow ones gave: the lambda sweep as one program vmapped over
lambda x seed equals one program per lambda; a rerun reuses the saved sweep and the finished seed runs
(no program); the job prints its phase timings."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from runs import config_of, reduced_specialist_config

from hrjax.agent.tree_mode import make_train
from hrjax.benchmarks.common import random_tree
from hrjax.pipeline import SWEEP_FILE, evaluate_run, sweep_routers, timing_line

POOL = dict(pool=[dict(name=f"m{i}", checkpoint="/unused", base_rate=1.0 + i) for i in range(2)],
            data_dir="/unused", cache_dir="/unused")
# float32 rounding differs between the batched and unbatched programs; over a few PPO iterations it
# stays below this (another lambda moves the parameters by over 10x this: checked below)
TOLERANCE = 1e-4


@pytest.mark.parametrize("processes", [1, 2])  # in this process; split over 2 pinned child processes
def test_sweep_is_one_program_equal_to_one_per_lambda(processes):
    config = config_of(POOL, iterations=6, **{"evaluate.cost_lambdas": (0.0, 0.5, 2.0), "env.stop_action": True,
                                              "train.local_processes": processes})
    assert config.env.cost_lambda == 0.5
    tree = random_tree(16, 8, num_models=2, num_hops=2)
    rows, seeds = np.arange(12), [3, 4]
    sweep = sweep_routers(config, tree, rows, seeds)
    assert sorted(sweep) == [0.0, 2.0]  # every lambda of the sweep but the run's own (0.5)
    keys = jax.numpy.stack([jax.random.PRNGKey(s) for s in seeds])
    # the last lambda's routers as the old sweep trained them: a program of their own, lambda a constant
    env = dataclasses.replace(config.env, cost_lambda=2.0)
    trainer = make_train(config.ppo, config.network, env, tree, rows, config.train.num_iterations)
    alone = jax.jit(jax.vmap(trainer.train))(keys)[0]
    for got, want in zip(jax.tree_util.tree_leaves(sweep[2.0]), jax.tree_util.tree_leaves(alone)):
        assert got.shape == want.shape and got.shape[0] == len(seeds)
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
    first, last = (jax.tree_util.tree_leaves(sweep[lam]) for lam in (0.0, 2.0))
    assert max(float(np.abs(a - b).max()) for a, b in zip(first, last)) > 10 * TOLERANCE  # lambda reaches the run


SPLIT_RUNS = """
import json, jax, numpy as np
from hrjax.agent.networks import NetworkConfig
from hrjax.agent.ppo import PPOConfig
from hrjax.agent.tree_mode import make_train, train_runs
from hrjax.benchmarks.common import random_tree
from hrjax.env.mdp import EnvConfig
trainer = make_train(PPOConfig(num_envs=32), NetworkConfig(hidden=16), EnvConfig(num_hops=2, stop_action=True),
                     random_tree(16, 8, num_models=2, num_hops=2), np.arange(12), 6)
runs = [(seed, lam) for lam in (0.0, 2.0) for seed in (3, 4, 5)]
alone = [jax.tree_util.tree_leaves(jax.jit(trainer.train)(jax.random.PRNGKey(s), lam)[0]) for s, lam in runs]
results = []
for per_step, per_call in ((None, None), (4, 1)):  # one call of one step; 2 calls (4 runs each) of 4 + 2 iterations
    steps = train_runs(trainer, jax.numpy.stack([jax.random.PRNGKey(s) for s, _ in runs]), [lam for _, lam in runs],
                       per_step, max_runs_per_call=per_call)
    params = jax.tree_util.tree_map(lambda x: x[:, -1], steps.carries.params)
    got = [[np.asarray(x[r]) for x in jax.tree_util.tree_leaves(params)] for r in range(len(runs))]
    results.append(dict(
        devices=jax.device_count(), runs=jax.tree_util.tree_leaves(params)[0].shape[0],
        ends=np.asarray(steps.carries.iteration[0]).tolist(),
        difference=max(float(np.abs(a - b).max()) for g, w in zip(got, alone) for a, b in zip(g, w)),
        seeds_apart=max(float(np.abs(a - b).max()) for a, b in zip(got[0], got[1]))))
print(json.dumps(results))
"""


def test_runs_split_over_host_devices_train_as_they_would_alone():
    # 6 runs over 4 host devices (padded to 8), in one call or in two: each device trains its runs alone
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", SPLIT_RUNS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one_call, chunked = json.loads(done.stdout.strip().splitlines()[-1])
    assert one_call["ends"] == [0, 6] and chunked["ends"] == [0, 4, 6], (one_call, chunked)
    for result in (one_call, chunked):
        assert result["devices"] == 4 and result["runs"] == 6, result
        assert result["difference"] <= TOLERANCE and result["seeds_apart"] > 10 * TOLERANCE, result


def test_programs_compiled_ahead_from_a_stand_in_tree_are_the_ones_the_runs_load(tmp_path):
    """`compile_runs` over a tree of zeros fills the persistent compilation cache with the very programs
    `train_runs` then calls on a real tree of those shapes (init and the 4- and 2-iteration steps: 3 hits, in
    a fresh process), and the runs come out as when they compile their own (tests/compile_ahead_run.py)."""
    def run(cache, mode):
        done = subprocess.run([sys.executable, "compile_ahead_run.py", str(tmp_path / cache), mode],
                              cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    hits = "/jax/compilation_cache/cache_hits"
    ahead, cold = run("ahead", "ahead"), run("cold", "cold")
    assert ahead["ahead"][hits] == 0 and ahead["after"][hits] == 3
    assert cold["after"][hits] == 0
    assert ahead["params"] == cold["params"]


def test_runners_started_ahead_hold_their_programs_for_the_runs_and_train_them_as_fresh_children(tmp_path):
    """`RunnersAhead`: children started before the tree exists, readied from its shapes alone, keep the
    programs for their share of the runs (3 runs each, in steps of 4 iterations) and run them, compiling or
    loading none, on the runs, which come out as those of children started for them (tests/runners_ahead_run.py)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "runners_ahead_run.py", str(tmp_path / "xla")], env=env,
                          cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # each child held its programs, used them up, and got no other program for the runs
    assert result["before"] == [[[[3, 4]], 0]] * 2 and result["after"] == [[[], 0]] * 2, result
    assert result["readied"] == result["fresh"]


def test_main_job_prints_its_phase_seconds_and_a_rerun_reuses_the_sweep(reduced_quickstart, capsys):
    root, run = reduced_quickstart
    phases = ["pool", "tree", "routers", "seed runs", "evaluation", "report"]  # routers: seed runs + sweep
    assert list(run.seconds) == [*phases, "total"]
    assert all(run.seconds[p] >= 0 for p in phases) and run.seconds["total"] >= sum(run.seconds[p] for p in phases)
    saved = (root / "run" / SWEEP_FILE).stat()
    again = evaluate_run(reduced_specialist_config(root), root / "run", progress=False)
    assert timing_line(again.seconds) in capsys.readouterr().out.splitlines()
    assert list(again.seconds) == [p for p in phases if p != "routers"] + ["total"]  # nothing left to train
    assert again.summary["aiq_by_method"] == run.summary["aiq_by_method"]
    after = (root / "run" / SWEEP_FILE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)  # read back, not trained again


def test_an_online_evaluation_trains_its_seeds_one_by_one_then_the_sweep(tiny_pool, tmp_path):
    """Online seed runs go through the pool (not a program over the tree), so they are not computed with the
    sweep: each is its own `hrjax train` run, then the sweep is one program."""
    from hrjax.checkpoint import latest_saved_step
    from hrjax.pipeline import load_sweep

    config = config_of(tiny_pool, mode="online", iterations=2,
                       **{"evaluate.seeds": 2, "evaluate.cost_lambdas": (0.0, 0.5), "train.local_processes": 1})
    run = evaluate_run(config, tmp_path / "run", progress=False)
    assert list(run.seconds) == ["pool", "tree", "seed runs", "sweep", "evaluation", "report", "total"]
    assert [latest_saved_step(tmp_path / "run" / f"seed_{config.seed + s}") for s in range(2)] == [2, 2]
    seeds, sweep = load_sweep(tmp_path / "run" / SWEEP_FILE)
    assert seeds == [config.seed, config.seed + 1] and sorted(sweep) == [0.0]
