"""test_pipeline_speed's runners-ahead test (JAX's persistent compilation cache in argv[1]): `fixed_lambda_runs`
on a random tree by the children `RunnersAhead` started and readied from the tree's shapes, then by children
started for the runs. Prints one JSON line: per readied child, the programs it held before and after the runs
(`hrjax.pipeline._COMPILED`'s keys) and how many programs it compiled or loaded since the first look; the
final params digest of each way."""

import hashlib
import json
import sys

import jax
import numpy as np

from hrjax.runtime import use_compilation_cache

use_compilation_cache(sys.argv[1])

from runs import config_of  # noqa: E402

from hrjax.benchmarks.common import random_tree  # noqa: E402
from hrjax.env.mdp import observation_width  # noqa: E402
from hrjax.models.encoder import load_encoder  # noqa: E402
from hrjax.pipeline import RunnersAhead, fixed_lambda_runs  # noqa: E402

POOL = dict(pool=[dict(name=f"m{i}", checkpoint="/unused", base_rate=1.0) for i in range(2)], data_dir="/unused",
            cache_dir="/unused")
config = config_of(POOL, iterations=6, **{"train.iterations_per_step": 4, "train.local_processes": 2})
rows, prompts = np.arange(12), 16
tree = random_tree(prompts, observation_width(load_encoder(config.encoder or None).dim, config.env.view), 2, 2)
runs = [(seed, lam) for lam in (0.0, 0.5) for seed in range(3)]


def digest(steps) -> str:
    params = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(steps.carries.params)])
    return hashlib.sha256(params.tobytes()).hexdigest()


with RunnersAhead() as ahead:
    ahead.start(config, list(range(prompts)), rows, len(runs))
    children = ahead.children()
    before = children.run("local_process_targets:compiled_runs", [None] * len(children))
    readied = fixed_lambda_runs(config, tree, rows, runs, 4, children)
    after = children.run("local_process_targets:compiled_runs", [None] * len(children))
fresh = fixed_lambda_runs(config, tree, rows, runs, 4)  # children started for the runs
print(json.dumps({"before": before, "after": after, "readied": digest(readied), "fresh": digest(fresh)}))
