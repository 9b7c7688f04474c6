"""Tree-mode PPO learns on synthetic path trees where the right answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hrjax.agent.networks import NetworkConfig
from hrjax.agent.ppo import Learner, PPOConfig, Trajectory
from hrjax.agent.tree_mode import TreeEnv, greedy_paths, make_train
from hrjax.env.mdp import EnvConfig
from hrjax.env.tree import PathTree, decision_nodes, tree_structure

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
    d = decision_nodes(num_models, num_hops)
    embedding = np.repeat(root[:, None], d, axis=1) + rng.normal(scale=0.05, size=(N, d, E)).astype(np.float32)
    zeros = np.zeros((N, k), np.int32)
    return PathTree(root, embedding, zeros, zeros, cost, quality, model, parent, depth)


def train(tree, num_iterations=300, cost_lambda=0.0, stop_action=False, **overrides):
    env = EnvConfig(num_hops=int(tree.depth.max()) + 1, cost_lambda=cost_lambda, stop_action=stop_action)
    trainer = make_train(PPOConfig(**{"num_envs": 256, **overrides}), NetworkConfig(), env, tree, np.arange(N),
                         num_iterations)
    params, metrics = jax.jit(trainer.train)(jax.random.PRNGKey(0))
    return trainer, params, metrics


def greedy(trainer, params, tree, cost_lambda=0.0):
    return greedy_paths(trainer.learner, params, trainer.env, np.arange(N), cost_lambda)


def test_one_model_always_best_reaches_95_percent():
    tree = synthetic_tree(lambda c, p: [0.2, 0.4, 0.9][p[-1]], [1.0, 1.0, 1.0])
    trainer, params, metrics = train(tree)
    env = trainer.env
    embedding, hop, cost_features, mask = env.observe(env.reset(jnp.arange(N), jnp.float32(0.0)))
    log_probs, _ = trainer.learner.apply(params, embedding, hop, cost_features, jnp.zeros(N), mask)
    assert float(jnp.exp(log_probs)[:, 2].mean()) >= 0.95
    assert metrics["return"][-10:].mean() > metrics["return"][:5].mean()
    assert metrics["action_histogram"].shape == (300, 1, 3)
    assert float(metrics["action_histogram"][-1, 0, 2]) >= 0.9


def test_router_beats_every_single_model_when_best_depends_on_cluster():
    # two hops; cluster 0 needs model 0 then 1, cluster 1 needs model 1 then 2; the rest scores 0.3
    best = {0: [0, 1], 1: [1, 2]}
    tree = synthetic_tree(lambda c, p: 1.0 if p == best[c] else 0.3, [1.0, 1.0, 1.0], num_hops=2)
    trainer = make_train(PPOConfig(num_envs=256), NetworkConfig(), EnvConfig(num_hops=2), tree, np.arange(N), 400)
    seeds = jax.random.split(jax.random.PRNGKey(0), 4)
    params_per_seed, _ = jax.jit(jax.vmap(trainer.train))(seeds)  # the pure train(rng) vmaps over seeds
    leaves = tree.depth == 1
    single = [tree.quality[:, tree.node_of_path([m, m])].mean() for m in range(3)]
    fixed_paths = tree.quality[:, leaves].mean(axis=0)
    for s in range(4):
        params = jax.tree_util.tree_map(lambda x: x[s], params_per_seed)
        quality, _, _ = greedy(trainer, params, tree)
        assert float(quality.mean()) > max(single) + 0.3
        assert float(quality.mean()) > fixed_paths.max() + 0.2


def test_large_lambda_moves_to_the_cheapest_model():
    tree = synthetic_tree(lambda c, p: [0.6, 0.8, 0.7][p[-1]], [0.1, 1.0, 0.5])
    trainer, params, _ = train(tree, cost_lambda=5.0)
    _, cost, actions = greedy(trainer, params, tree, cost_lambda=5.0)
    assert np.all(np.asarray(actions) == 0)
    trainer, params, _ = train(tree, cost_lambda=0.0)
    _, _, actions = greedy(trainer, params, tree)
    assert np.all(np.asarray(actions) == 1)  # with cost free, the best quality wins


def test_lambda_conditioned_policy_trades_quality_for_cost_monotonically():
    # quality 0.5 / 0.7 / 0.9 at cost 0.05 / 0.3 / 0.8: the best model moves 2 -> 1 -> 0 as lambda grows
    tree = synthetic_tree(lambda c, p: [0.5, 0.7, 0.9][p[-1]], [0.05, 0.3, 0.8])
    trainer, params, _ = train(tree, num_iterations=400, lambda_range=(0.0, 2.0))
    sweep = [greedy(trainer, params, tree, cost_lambda=lam) for lam in (0.0, 0.25, 0.5, 1.0, 2.0)]
    quality = [float(q.mean()) for q, _, _ in sweep]
    cost = [float(c.mean()) for _, c, _ in sweep]
    assert all(a >= b for a, b in zip(cost, cost[1:])) and all(a >= b for a, b in zip(quality, quality[1:]))
    assert np.all(np.asarray(sweep[0][2]) == 2) and np.all(np.asarray(sweep[-1][2]) == 0)
    assert np.all(np.asarray(sweep[2][2]) == 1)  # 0.7 - 0.5 * 0.3 beats 0.5 - 0.025 and 0.9 - 0.4


@pytest.mark.parametrize("cost_timing", ["end", "step"])
def test_tree_env_rewards_match_the_tree_with_stop(cost_timing):
    tree = synthetic_tree(lambda c, p: 0.1 * len(p) + 0.2 * p[-1], [0.1, 0.2, 0.4], num_hops=2, seed=1)
    env = TreeEnv.create(tree, EnvConfig(num_hops=2, stop_action=True, cost_timing=cost_timing))
    state = env.reset(jnp.arange(4), jnp.float32(0.5))
    assert not np.asarray(env.observe(state)[3])[:, 3].any()  # no STOP before the first answer
    state, r0, f0, _ = env.step(state, jnp.array([0, 1, 2, 2]))
    assert np.asarray(env.observe(state)[3]).all()
    state, r1, f1, v1 = env.step(state, jnp.array([3, 0, 3, 1]))  # rows 0 and 2 stop
    np.testing.assert_array_equal(np.asarray(f1), [True, True, True, True])
    np.testing.assert_array_equal(np.asarray(v1), [True, True, True, True])
    nodes = [tree.node_of_path(p) for p in ([0], [1, 0], [2], [2, 1])]
    total = tree.path_cost()[np.arange(4), nodes]
    expected = tree.quality[np.arange(4), nodes] - 0.5 * total
    np.testing.assert_allclose(np.asarray(r0 + r1), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.hop), [1, 2, 1, 2])
    after, r2, f2, v2 = env.step(state, jnp.array([0, 0, 0, 0]))  # finished episodes do not move
    assert not np.asarray(v2).any() and not np.asarray(r2).any()
    np.testing.assert_array_equal(np.asarray(after.node), np.asarray(state.node))


def test_stop_ends_episodes_once_more_hops_only_cost():
    # the first answer decides quality (model 0 best); a second hop adds cost and nothing else
    tree = synthetic_tree(lambda c, p: 0.8 if p[0] == 0 else 0.3, [0.2, 0.2, 0.2], num_hops=2)
    trainer, params, metrics = train(tree, cost_lambda=1.0, stop_action=True)
    quality, cost, actions = greedy(trainer, params, tree, cost_lambda=1.0)
    np.testing.assert_array_equal(np.asarray(actions), [[0] * N, [3] * N])
    np.testing.assert_allclose(np.asarray(cost), 0.2, rtol=1e-6)
    assert float(metrics["hops"][-10:].mean()) < 1.1


def rewarded_action_zero(**overrides):
    """A Learner and a trajectory of one-hop episodes that all took action 0 and earned reward 10.
    Without advantage normalisation every update raises log p(0) (the value head is off), so the
    signed KL estimate mean(old_logp - logp) is negative however far the policy moves."""
    config = PPOConfig(**{"num_envs": 64, "epochs": 2, "minibatches": 4, "learning_rate": 0.01,
                          "normalize_advantages": False, "value_coef": 0.0, "entropy_coef": 0.0, **overrides})
    learner = Learner(config, NetworkConfig(hidden=16), num_actions=3, num_hops=1, num_iterations=10)
    b = config.num_envs
    ones, zeros = jnp.ones((1, b), bool), jnp.zeros((1, b))
    embedding = jnp.asarray(np.random.default_rng(0).normal(size=(1, b, E)), jnp.float32)
    trajectory = Trajectory(embedding, jnp.zeros((1, b), jnp.int32), jnp.zeros((1, b, 2)), zeros,
                            jnp.ones((1, b, 3), bool), jnp.zeros((1, b), jnp.int32), zeros + 10.0, ones, ones)
    return learner, trajectory, *learner.init(jax.random.PRNGKey(0), E)


def taken_log_prob(learner, params, trajectory):
    log_probs, _ = learner.apply(params, trajectory.embedding, trajectory.hop, trajectory.cost_features,
                                 trajectory.cost_lambda, trajectory.action_mask)
    return jnp.take_along_axis(log_probs, trajectory.action[..., None], axis=-1)[..., 0]


def largest_change(params, before) -> float:
    """max |params - before| over every parameter."""
    return max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                           jax.tree_util.tree_leaves(before)))


def test_kl_early_stop_fires_on_a_negative_signed_estimate_and_applies_only_the_minibatches_before_it():
    learner, trajectory, params, opt_state = rewarded_action_zero(target_kl=1e-6)
    new_params, new_opt_state, metrics = jax.jit(learner.update)(params, opt_state, trajectory,
                                                                 jax.random.PRNGKey(1), 0)
    moved = taken_log_prob(learner, new_params, trajectory) - taken_log_prob(learner, params, trajectory)
    assert float(jnp.mean(-moved)) < 0  # the old signed estimator could never have stopped this update
    assert float(metrics["approx_kl"]) >= 0
    # KL is 0 on the first minibatch (nothing moved yet) and above 1.5e-6 after it: 7 of 8 skipped
    np.testing.assert_allclose(metrics["kl_stop"], 7 / 8)
    # exactly one Adam step: its moments are those of one gradient g (mu = 0.1 g, nu = 0.001 g^2),
    # and each parameter moved by lr * g / (|g| + eps), at most the learning rate
    assert int(optax.tree_utils.tree_get(new_opt_state, "count")) == 1
    mu, nu = optax.tree_utils.tree_get(new_opt_state, "mu"), optax.tree_utils.tree_get(new_opt_state, "nu")
    for m, v in zip(jax.tree_util.tree_leaves(mu), jax.tree_util.tree_leaves(nu)):
        np.testing.assert_allclose(v, 0.1 * np.square(m), rtol=1e-4, atol=1e-20)
    step = largest_change(new_params, params)
    assert 0.99 * 0.01 <= step <= 0.01 * (1 + 1e-5)


def test_linear_schedule_reaches_zero_when_kl_stops_skip_minibatches():
    # every model equally good: the policy keeps moving, so the KL stop skips 3 of 4 minibatches to the end
    tree = synthetic_tree(lambda c, p: 0.5, [1.0, 1.0, 1.0])
    ppo = PPOConfig(num_envs=64, epochs=1, minibatches=4, learning_rate=0.01, lr_schedule="linear", target_kl=1e-9)
    trainer = make_train(ppo, NetworkConfig(hidden=16), EnvConfig(num_hops=1), tree, np.arange(N), 80)
    run = jax.jit(trainer.run, static_argnums=1)
    carry, metrics = run(trainer.init(jax.random.PRNGKey(0)), 79)
    last, last_metrics = run(carry, 1)
    step = largest_change(last.params, carry.params)
    assert step < 0.05 * 0.01  # the last of 80 updates runs at <= 4/320 of the initial rate
    assert float(metrics["kl_stop"].mean()) > 0.5  # ... although most minibatches were skipped
    # the schedule's rate over the last update's 4 steps: 0.01 * (4, 3, 2, 1) / 320
    np.testing.assert_allclose(last_metrics["learning_rate"], [0.01 * 2.5 / 320], rtol=1e-5)
