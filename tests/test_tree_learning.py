"""Tree-mode PPO learns on synthetic path trees where the right answer is known."""

import jax
import jax.numpy as jnp
import numpy as np

from hrjax.agent.tree_mode import PPOConfig, TreeArrays, greedy_paths, initial_state, make_train, observe
from hrjax.env.tree import PathTree, tree_structure

N, E = 64, 8


def synthetic_tree(quality_of, cost_of_model, num_models=3, num_hops=1, seed=0):
    """A PathTree whose node quality is `quality_of(prompt_cluster, path_models)` and whose hop cost
    is `cost_of_model[m]`; prompts fall in two embedding clusters."""
    rng = np.random.default_rng(seed)
    model, parent, depth = tree_structure(num_models, num_hops)
    k = len(model)
    cluster = np.arange(N) % 2
    root = rng.normal(scale=0.1, size=(N, E)).astype(np.float32)
    root[:, 0] += np.where(cluster == 0, 1.0, -1.0)
    paths = []
    for node in range(k):
        path, at = [], node
        while at >= 0:
            path.insert(0, int(model[at]))
            at = parent[at]
        paths.append(path)
    quality = np.array([[quality_of(c, p) for p in paths] for c in cluster], np.float32)
    cost = np.tile(np.array([cost_of_model[p[-1]] for p in paths], np.float32), (N, 1))
    embedding = np.repeat(root[:, None], k, axis=1) + rng.normal(scale=0.05, size=(N, k, E)).astype(np.float32)
    zeros = np.zeros((N, k), np.int32)
    return PathTree(root, embedding, zeros, zeros, cost, quality, model, parent, depth)


def train(tree, **overrides):
    config = PPOConfig(**{"num_iterations": 300, "num_envs": 256, **overrides})
    network, train_fn = make_train(config, tree, np.arange(N))
    params, metrics = jax.jit(train_fn)(jax.random.PRNGKey(0))
    return network, params, metrics


def test_one_model_always_best_reaches_95_percent():
    tree = synthetic_tree(lambda c, p: [0.2, 0.4, 0.9][p[-1]], [1.0, 1.0, 1.0])
    network, params, metrics = train(tree)
    state = initial_state(jnp.arange(N), jnp.zeros(N))
    logits, _ = network.apply(params, *observe(TreeArrays.from_tree(tree), state))
    assert float(jax.nn.softmax(logits)[:, 2].mean()) >= 0.95
    assert metrics["reward"][-10:].mean() > metrics["reward"][:5].mean()


def test_router_beats_every_single_model_when_best_depends_on_cluster():
    # two hops; cluster 0 needs model 0 then 1, cluster 1 needs model 1 then 2; the rest scores 0.3
    best = {0: [0, 1], 1: [1, 2]}
    tree = synthetic_tree(lambda c, p: 1.0 if p == best[c] else 0.3, [1.0, 1.0, 1.0], num_hops=2)
    network, train_fn = make_train(PPOConfig(num_iterations=400, num_envs=256), tree, np.arange(N))
    seeds = jax.random.split(jax.random.PRNGKey(0), 4)
    params_per_seed, _ = jax.jit(jax.vmap(train_fn))(seeds)  # the pure train(rng) vmaps over seeds
    leaves = tree.depth == 1
    single = [tree.quality[:, tree.node_of_path([m, m])].mean() for m in range(3)]
    fixed_paths = tree.quality[:, leaves].mean(axis=0)
    for s in range(4):
        params = jax.tree_util.tree_map(lambda x: x[s], params_per_seed)
        quality, _, _ = greedy_paths(network, params, tree, np.arange(N))
        assert float(quality.mean()) > max(single) + 0.3
        assert float(quality.mean()) > fixed_paths.max() + 0.2


def test_large_lambda_moves_to_the_cheapest_model():
    tree = synthetic_tree(lambda c, p: [0.6, 0.8, 0.7][p[-1]], [0.1, 1.0, 0.5])
    network, params, _ = train(tree, cost_lambda=5.0)
    _, cost, actions = greedy_paths(network, params, tree, np.arange(N), cost_lambda=5.0)
    assert np.all(np.asarray(actions) == 0)
    network, params, _ = train(tree, cost_lambda=0.0)
    _, _, actions = greedy_paths(network, params, tree, np.arange(N))
    assert np.all(np.asarray(actions) == 1)  # with cost free, the best quality wins


def test_lambda_conditioned_policy_trades_quality_for_cost_monotonically():
    # quality 0.5 / 0.7 / 0.9 at cost 0.05 / 0.3 / 0.8: the best model moves 2 -> 1 -> 0 as lambda grows
    tree = synthetic_tree(lambda c, p: [0.5, 0.7, 0.9][p[-1]], [0.05, 0.3, 0.8])
    network, params, _ = train(tree, lambda_range=(0.0, 2.0), num_iterations=400)
    sweep = [greedy_paths(network, params, tree, np.arange(N), cost_lambda=lam, conditioned=True)
             for lam in (0.0, 0.25, 0.5, 1.0, 2.0)]
    quality = [float(q.mean()) for q, _, _ in sweep]
    cost = [float(c.mean()) for _, c, _ in sweep]
    assert all(a >= b for a, b in zip(cost, cost[1:])) and all(a >= b for a, b in zip(quality, quality[1:]))
    assert np.all(np.asarray(sweep[0][2]) == 2) and np.all(np.asarray(sweep[-1][2]) == 0)
    assert np.all(np.asarray(sweep[2][2]) == 1)  # 0.7 - 0.5 * 0.3 beats 0.5 - 0.025 and 0.9 - 0.4
