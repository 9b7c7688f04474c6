"""One process of test_pipeline_speed's compile-ahead test: the programs `train_runs` calls, compiled by
`compile_runs` from a stand-in tree of zeros (JAX's persistent compilation cache in argv[1]), then
`train_runs` on a random tree of the same shapes (argv[2] 'cold': train_runs alone). Prints one JSON line:
the cache's hits and misses after each part, and the runs' final params digest."""

import hashlib
import json
import sys

import jax
import numpy as np

from hrjax.runtime import use_compilation_cache

use_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the tiny programs compile fast
events = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}
jax.monitoring.register_event_listener(lambda event, **_: event in events and events.update({event: events[event] + 1}))

from runs import config_of  # noqa: E402

from hrjax.agent.tree_mode import compile_runs, make_train, train_runs  # noqa: E402
from hrjax.benchmarks.common import random_tree  # noqa: E402
from hrjax.env.tree import stand_in_tree  # noqa: E402

POOL = dict(pool=[dict(name=f"m{i}", checkpoint="/unused", base_rate=1.0) for i in range(2)], data_dir="/unused",
            cache_dir="/unused")
config = config_of(POOL, iterations=6, **{"train.iterations_per_step": 4})
rows, runs = np.arange(12), 5
tree = random_tree(16, 8, num_models=2, num_hops=2)


def trainer_of(tree):
    return make_train(config.ppo, config.network, config.env, tree, rows, config.train.num_iterations)


if sys.argv[2] != "cold":
    compile_runs(trainer_of(stand_in_tree(16, 2, 2, 8)), runs, 4, max_runs_per_call=2)
ahead = dict(events)
keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in range(runs)])
steps = train_runs(trainer_of(tree), keys, np.linspace(0, 1, runs, dtype=np.float32), 4, max_runs_per_call=2)
params = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(steps.carries.params)])
print(json.dumps({"ahead": ahead, "after": events, "params": hashlib.sha256(params.tobytes()).hexdigest()}))
