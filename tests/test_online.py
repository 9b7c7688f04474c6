"""Online mode over a tiny random pool (real loaders, sampler, encoder and env): its metrics count
what the rollout did, the same way tree mode counts them over the same paths."""

import jax
import numpy as np
import pytest

from hrjax import assets
from hrjax.agent.networks import NetworkConfig
from hrjax.agent.online import OnlineTrainer
from hrjax.agent.ppo import PPOConfig
from hrjax.agent.tree_mode import make_train
from hrjax.env.mdp import EnvConfig, RoutingEnv
from hrjax.env.tree import build_tree
from hrjax.models.encoder import load_encoder
from hrjax.pool import ModelSpec, Pool
from tiny_models import make_tiny_pool_model

QUESTIONS = ["What is two plus two?", "Name a colour.", "Spell cat backwards.", "Is water wet?"]
STOP = 2  # two pool models, then STOP


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    specs = [ModelSpec(f"m{i}", str(make_tiny_pool_model(tmp_path_factory.mktemp(f"pool{i}"), assets.minilm_path(), i)),
                       base_rate=float(i + 1)) for i in range(2)]
    return RoutingEnv(Pool.from_specs(specs), load_encoder(None), lambda example, text: float(len(text) % 2),
                      EnvConfig(num_hops=2, stop_action=True, max_new_tokens=4))


def stop_after_first_answer(params):
    """The router with STOP's logit at +100: any model at hop 0 (STOP is masked there), then STOP."""
    policy = params["params"]["policy"]
    return {**params, "params": {**params["params"], "policy": {**policy, "bias": policy["bias"].at[STOP].set(100.0)}}}


def test_hops_counts_models_called_not_the_stop_step_in_both_modes(env):
    ppo, network = PPOConfig(num_envs=len(QUESTIONS), minibatches=2), NetworkConfig(hidden=16)
    examples = list(range(len(QUESTIONS)))
    online = OnlineTrainer(ppo, network, env, examples, QUESTIONS, num_iterations=1, seed=0)
    carry = online.init(jax.random.PRNGKey(0))
    _, metrics = online.iteration(carry._replace(params=stop_after_first_answer(carry.params)))
    np.testing.assert_array_equal(metrics["action_histogram"][1], [0, 0, 1])  # every episode stopped at hop 1
    assert float(metrics["hops"]) == 1.0  # one model called per episode; STOP calls none

    tree = build_tree(env, examples, QUESTIONS, progress=False)
    trainer = make_train(ppo, network, env.config, tree, np.arange(len(QUESTIONS)), 1)
    carry = trainer.init(jax.random.PRNGKey(0))
    _, tree_metrics = trainer.run(carry._replace(params=stop_after_first_answer(carry.params)), 1)
    np.testing.assert_array_equal(tree_metrics["action_histogram"][0, 1], [0, 0, 1])
    assert float(tree_metrics["hops"][0]) == float(metrics["hops"])
