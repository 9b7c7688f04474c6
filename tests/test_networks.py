"""The router network's first layer and the learner's use of the sampling policy's statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrjax.agent.networks import ConcatDense, NetworkConfig
from hrjax.agent.ppo import Learner, PPOConfig, Trajectory


def test_concat_dense_is_dense_on_the_concatenation_with_the_same_parameters_and_gradients():
    rng = np.random.default_rng(0)
    parts = [jnp.asarray(rng.normal(size=(5, width)), jnp.float32) for width in (7, 3, 2)]
    dense, concat = nn.Dense(4, name="layer"), ConcatDense(4, name="layer")
    joined = jnp.concatenate(parts, axis=-1)
    params = dense.init(jax.random.PRNGKey(0), joined)
    # the same initial values as nn.Dense (old checkpoints and runs keep their parameters)
    jax.tree_util.tree_map(np.testing.assert_array_equal, concat.init(jax.random.PRNGKey(0), parts), params)
    params = jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    np.testing.assert_allclose(concat.apply(params, parts), dense.apply(params, joined), rtol=1e-5, atol=1e-6)
    # gradients of the parameters and of every input part (each part's own columns of the kernel)
    loss = lambda module, inputs: lambda p, x: jnp.sum(jnp.tanh(module.apply(p, inputs(x))) ** 2)  # noqa: E731
    got = jax.grad(loss(concat, lambda x: x), argnums=(0, 1))(params, parts)
    want = jax.grad(loss(dense, lambda x: jnp.concatenate(x, axis=-1)), argnums=(0, 1))(params, parts)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_network_config_refuses_empty_layers():
    with pytest.raises(ValueError, match="layers"):
        NetworkConfig(layers=0)


def test_update_on_the_sampled_statistics_equals_the_update_that_recomputes_them():
    b, e, hops = 64, 8, 2
    config = PPOConfig(num_envs=b, epochs=2, minibatches=4, learning_rate=0.01)
    learner = Learner(config, NetworkConfig(hidden=16), num_actions=3, num_hops=hops, num_iterations=10)
    params, opt_state = learner.init(jax.random.PRNGKey(0), e)
    rng = np.random.default_rng(1)
    embedding = jnp.asarray(rng.normal(size=(hops, b, e)), jnp.float32)
    hop = jnp.broadcast_to(jnp.arange(hops)[:, None], (hops, b))
    cost_features = jnp.asarray(rng.uniform(size=(hops, b, 2)), jnp.float32)
    cost_lambda, mask = jnp.zeros((hops, b)), jnp.ones((hops, b, 3), bool)
    action, log_prob, value = jax.vmap(learner.sample, (None, 0, 0, 0, 0, 0, 0))(
        params, jax.random.split(jax.random.PRNGKey(2), hops), embedding, hop, cost_features, cost_lambda, mask)
    reward = jnp.asarray(rng.normal(size=(hops, b)), jnp.float32)
    done = jnp.zeros((hops, b), bool).at[-1].set(True)
    trajectory = Trajectory(embedding, hop, cost_features, cost_lambda, mask, action, reward, done,
                            jnp.ones((hops, b), bool))
    update = jax.jit(learner.update)
    key = jax.random.PRNGKey(3)
    recomputed = update(params, opt_state, trajectory, key, 0)
    sampled = update(params, opt_state, trajectory, key, 0, (log_prob, value))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sampled, recomputed)
    # and they are the statistics of the sampled actions: swapping them changes the update
    swapped = update(params, opt_state, trajectory, key, 0, (value, log_prob))
    assert not np.allclose(swapped[0]["params"]["policy"]["kernel"], recomputed[0]["params"]["policy"]["kernel"])
