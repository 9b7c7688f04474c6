"""The main job end to end: `hrjax evaluate --config=experiments/configs/specialist_world.py` in a fresh
cache directory (nothing cached: pool build, path tree, the routers of the 3 seed runs and the lambda sweep,
the seed runs' logs and checkpoints, evaluation, report), as the command runs it (JAX's compilation cache in
the cache directory). Figures: total and per-phase wall seconds, and `speedup_vs_sequential_sweep`: the seed
runs and the sweep as one program vmapped over lambda x seed (the job's 'routers' phase) against one program
per lambda vmapped over the seeds (as the job's sweep ran before), timed afterwards in the same process on the
same path tree, compilation included in both. `paren_quality`: the router's and each single model's quality
on the held-out paren prompts (the task no single model solves; recipe 'default' only).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import jax

from hrjax.benchmarks.common import experiment_config, host_info



def main_job_config(root: Path, recipe: str = "default"):
    """The main job's `RunConfig` (recipe 'default', or 'reduced': the CI world), caches and data under `root`."""
    return experiment_config("specialist_world", recipe, root=root)


def sequential_sweep_seconds(config, seeds: list[int]) -> float:
    """Wall seconds of the seed runs and the sweep as one jitted program per lambda of the sweep (each vmapped
    over the seeds, the lambda a constant of its program), over the run's cached pool and tree, in this process."""
    from hrjax.agent.tree_mode import make_train
    from hrjax.pool import resolve_pool
    from hrjax.train import load_data, load_or_build_tree

    config = resolve_pool(config, progress=False)
    data = load_data(config)
    tree, rows = load_or_build_tree(config, data.examples, progress=False), data.rows("train")
    keys = jax.numpy.stack([jax.random.PRNGKey(s) for s in seeds])
    start = time.perf_counter()
    for lam in dict.fromkeys([config.env.cost_lambda, *config.evaluate.cost_lambdas]):  # the seed runs' first
        env = dataclasses.replace(config.env, cost_lambda=lam)
        trainer = make_train(config.ppo, config.network, env, tree, rows, config.train.num_iterations)
        jax.block_until_ready(jax.jit(jax.vmap(trainer.train))(keys)[0])
    return time.perf_counter() - start


def run(recipe: str = "default") -> dict:
    from hrjax.pipeline import evaluate_run
    from hrjax.runtime import use_compilation_cache, use_quick_compiles

    with tempfile.TemporaryDirectory(prefix="hrjax-bench-quickstart-") as root:
        config = main_job_config(Path(root), recipe)
        use_quick_compiles()  # as `hrjax evaluate` does
        use_compilation_cache(Path(root) / "cache" / "xla")
        job = evaluate_run(config, Path(root) / "run", progress=False)
        sequential = sequential_sweep_seconds(config, [config.seed + s for s in range(config.evaluate.seeds)])
    seconds = {name: round(value, 1) for name, value in job.seconds.items()}
    methods = job.summary["methods"]
    paren = {name: round(groups["paren"]["quality"]["mean"], 3) for name, groups in methods.items()
             if name == "router" or name.startswith("single:")} if "paren" in job.summary["num_prompts"] else {}
    return {**host_info(), "recipe": recipe, "total_seconds": seconds.pop("total"),
            "phase_seconds": seconds, "sequential_sweep_seconds": round(sequential, 1),
            "speedup_vs_sequential_sweep": round(sequential / job.seconds["routers"], 2),
            "router_quality": round(job.summary["router_quality"], 3),
            "best_single_quality": round(job.summary["best_single_quality"], 3), "paren_quality": paren}
