"""Routing headroom of a specialist pool: single models, the best fixed path and the oracle, per task.

`python -m hrjax.specialists.report [--n_test 64] [--num_hops 2] [--cache_dir DIR]` builds (or
reuses) the default pool, builds the path tree over `n_test` held-out (test split) prompts per task
type with the real env and MiniLM encoder, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Sequence

import numpy as np

from hrjax.env.tree import PathTree, level_offset
from hrjax.evaluate import best_fixed_leaf


def headroom(tree: PathTree, tasks: Sequence[str], names: Sequence[str]) -> dict:
    """Mean qualities per task type and overall (`tasks[i]` is prompt i's type):
    `single[name]`: one hop, and the model repeated over every hop; `best_fixed`: the full-length
    path with the best overall mean; `oracle`: the per-prompt best full-length path;
    `oracle_paths[task]`: how often each path is the oracle's pick on solved prompts;
    `needs_two_models[task]`: share of prompts that some path solves but no model alone
    (one hop or repeated) does."""
    tasks = np.asarray(tasks)
    hops = int(tree.depth.max()) + 1
    groups = {t: tasks == t for t in dict.fromkeys(tasks.tolist())} | {"all": np.ones(len(tasks), bool)}
    means = lambda q: {t: round(float(q[rows].mean()), 4) for t, rows in groups.items()}  # noqa: E731
    path_name = lambda path: ">".join(names[a] for a in path)  # noqa: E731
    alone = np.zeros(len(tasks), bool)
    single = {}
    for m, name in enumerate(names):
        one, repeated = tree.quality[:, tree.node_of_path([m])], tree.quality[:, tree.node_of_path([m] * hops)]
        single[name] = {"one_hop": means(one), "repeated": means(repeated)}
        alone |= (one > 0) | (repeated > 0)
    leaves = list(itertools.product(range(len(names)), repeat=hops))  # the BFS order of the last level
    first_leaf = level_offset(len(names), hops - 1)
    best = best_fixed_leaf(tree, np.arange(len(tasks)), cost_lambda=0.0)
    value, node = tree.oracle()
    leaf = node - first_leaf
    picks = {}
    for t, rows in groups.items():
        counts = np.bincount(leaf[rows & (value > 0)], minlength=len(leaves))
        picks[t] = {path_name(leaves[i]): int(counts[i]) for i in np.argsort(-counts, kind="stable") if counts[i]}
    best_single = max(max(s["one_hop"]["all"], s["repeated"]["all"]) for s in single.values())
    return {
        "single": single,
        "best_fixed": {"path": path_name(leaves[best - first_leaf]), "quality": means(tree.quality[:, best])},
        "oracle": means(value),
        "oracle_over_best_single": round(float(value.mean()) / max(best_single, 1e-9), 3),
        "oracle_paths": picks,
        "needs_two_models": means((value > 0) & ~alone),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    from hrjax.env.cache import ResponseCache
    from hrjax.env.mdp import EnvConfig, RoutingEnv
    from hrjax.env.tree import build_tree
    from hrjax.models.encoder import load_encoder
    from hrjax.pool import Pool
    from hrjax.specialists.build import DEFAULT_RECIPE, build_pool
    from hrjax.tasks.scorers import score_example
    from hrjax.tasks.specialist_world import HOP_TEMPLATE, MAX_NEW_TOKENS, specialist_examples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_test", type=int, default=64, help="held-out prompts per task type")
    parser.add_argument("--num_hops", type=int, default=2)
    parser.add_argument("--cache_dir", default=None, help="specialist cache (default ~/.cache/hrjax/specialists)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    specs = build_pool(DEFAULT_RECIPE, args.cache_dir)
    build_s = time.perf_counter() - start
    examples = specialist_examples("test", args.n_test, DEFAULT_RECIPE.seed)
    env = RoutingEnv(Pool.from_specs(specs), load_encoder(), score_example,
                     EnvConfig(num_hops=args.num_hops, template=HOP_TEMPLATE, max_new_tokens=MAX_NEW_TOKENS),
                     ResponseCache())
    tree = build_tree(env, examples, [e.question for e in examples])
    out = {"build_or_load_s": round(build_s, 1), "models": {s.name: s.base_rate for s in specs},
           "prompts": len(examples), **headroom(tree, [e.task for e in examples], [s.name for s in specs])}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
