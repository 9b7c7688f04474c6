"""Tree-mode PPO (PureJaxRL style): with a path tree the environment is array look-ups, so rollout
and update run together in one jit-compiled `lax.scan` over iterations; `make_train(config, tree)`
returns a pure `train(rng)` that can be vmapped over seeds.

Episodes here are the paper's setting: L hops, no STOP, the cost charged at the end with the quality.
Shapes: N prompts, K tree nodes, E embedding width, B episodes per iteration, L hops, M models.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from hrjax.agent import losses
from hrjax.agent.networks import NetworkConfig, RouterNetwork
from hrjax.env.tree import PathTree, level_offset


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    num_iterations: int = 100
    num_envs: int = 256  # episodes per iteration (B); small batches converge early to one fixed path
    epochs: int = 2
    minibatches: int = 4
    learning_rate: float = 1e-3
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    cost_lambda: float = 0.0
    # Beyond the paper: sample lambda per episode from this (low, high) range and feed it to the
    # network, so one policy serves every cost-quality trade-off. None: fixed `cost_lambda`.
    lambda_range: Optional[tuple[float, float]] = None
    hidden: int = 128


class TreeArrays(NamedTuple):
    """The parts of a `PathTree` the jitted environment reads, as device arrays."""

    root_embedding: chex.Array  # [N, E]
    embedding: chex.Array  # [N, K, E]
    cost: chex.Array  # [N, K]
    quality: chex.Array  # [N, K]
    level_start: chex.Array  # [L + 1] first node index of each depth

    @classmethod
    def from_tree(cls, tree: PathTree) -> "TreeArrays":
        m, hops = tree.num_models, int(tree.depth.max()) + 1
        return cls(jnp.asarray(tree.root_embedding), jnp.asarray(tree.embedding), jnp.asarray(tree.cost),
                   jnp.asarray(tree.quality), jnp.array([level_offset(m, d) for d in range(hops + 1)]))


class EnvState(NamedTuple):
    prompt: chex.Array  # [B] int32
    node: chex.Array  # [B] int32, -1 at the root
    hop: chex.Array  # [B] int32
    cost: chex.Array  # [B] cumulative normalised cost
    last_cost: chex.Array  # [B]
    cost_lambda: chex.Array  # [B] the episode's cost weight


class Transition(NamedTuple):
    embedding: chex.Array  # [B, E]
    hop: chex.Array  # [B]
    cost_features: chex.Array  # [B, 2]
    cost_lambda: chex.Array  # [B]
    action: chex.Array  # [B]
    log_prob: chex.Array  # [B]
    value: chex.Array  # [B]
    reward: chex.Array  # [B]
    done: chex.Array  # [B]


def observe(tree: TreeArrays, state: EnvState):
    """-> (embedding [B, E], hop [B], cost features [B, 2])."""
    node_embedding = tree.embedding[state.prompt, jnp.maximum(state.node, 0)]
    embedding = jnp.where((state.node < 0)[:, None], tree.root_embedding[state.prompt], node_embedding)
    return embedding, state.hop, jnp.stack([state.cost, state.last_cost], axis=-1)


def env_step(tree: TreeArrays, state: EnvState, action: chex.Array, num_models: int, num_hops: int):
    """One hop for every episode: -> (next state, reward [B], done [B])."""
    parent_index = state.node - tree.level_start[jnp.maximum(state.hop - 1, 0)]
    child = jnp.where(state.node < 0, action, tree.level_start[state.hop] + parent_index * num_models + action)
    step_cost = tree.cost[state.prompt, child]
    cost = state.cost + step_cost
    done = state.hop + 1 >= num_hops
    reward = jnp.where(done, tree.quality[state.prompt, child] - state.cost_lambda * cost, 0.0)
    return EnvState(state.prompt, child, state.hop + 1, cost, step_cost, state.cost_lambda), reward, done


def initial_state(prompts: chex.Array, cost_lambda: chex.Array) -> EnvState:
    """Episodes at the roots of `prompts` [B], each with its cost weight [B]."""
    zeros = jnp.zeros(prompts.shape[0])
    return EnvState(prompts, jnp.full(prompts.shape, -1), jnp.zeros(prompts.shape, jnp.int32), zeros, zeros,
                    cost_lambda)


def make_train(config: PPOConfig, tree: PathTree, prompts: chex.Array):
    """-> (network, train): `train(rng) -> (params, metrics [num_iterations])`, pure and jittable.
    `prompts` [P] are the tree rows (prompt indices) episodes are drawn from."""
    num_models, num_hops = tree.num_models, int(tree.depth.max()) + 1
    arrays = TreeArrays.from_tree(tree)
    prompts = jnp.asarray(prompts)
    network = RouterNetwork(NetworkConfig(num_models, num_hops, hidden=config.hidden))
    batch = config.num_envs * num_hops
    if batch % config.minibatches:
        raise ValueError(f"num_envs * num_hops ({batch}) must divide into {config.minibatches} minibatches.")
    optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.learning_rate))

    conditioned = config.lambda_range is not None

    def apply(params, embedding, hop, cost_features, cost_lambda):
        return network.apply(params, embedding, hop, cost_features, cost_lambda if conditioned else None)

    def rollout(params, rng):
        rng, pick, draw = jax.random.split(rng, 3)
        chosen = jax.random.choice(pick, prompts, (config.num_envs,))
        if conditioned:
            cost_lambda = jax.random.uniform(draw, (config.num_envs,), minval=config.lambda_range[0],
                                             maxval=config.lambda_range[1])
        else:
            cost_lambda = jnp.full(config.num_envs, config.cost_lambda)
        state = initial_state(chosen, cost_lambda)

        def step(carry, key):
            state = carry
            embedding, hop, cost_features = observe(arrays, state)
            logits, value = apply(params, embedding, hop, cost_features, state.cost_lambda)
            action = jax.random.categorical(key, logits)
            log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=-1)[:, 0]
            next_state, reward, done = env_step(arrays, state, action, num_models, num_hops)
            return next_state, Transition(embedding, hop, cost_features, state.cost_lambda, action, log_prob,
                                          value, reward, done)

        final, transitions = jax.lax.scan(step, state, jax.random.split(rng, num_hops))
        return transitions, final

    def loss_fn(params, batch_data):
        transition, advantages, returns = batch_data
        logits, value = apply(params, transition.embedding, transition.hop, transition.cost_features,
                              transition.cost_lambda)
        mask = jnp.ones_like(logits, bool)
        log_prob = jnp.take_along_axis(losses.masked_log_softmax(logits, mask), transition.action[:, None], -1)[:, 0]
        valid = jnp.ones_like(log_prob, bool)
        policy_loss, clip_fraction = losses.clipped_surrogate_loss(
            log_prob, transition.log_prob, advantages, valid, config.clip_epsilon)
        value_loss = losses.clipped_value_loss(value, transition.value, returns, valid, config.clip_epsilon)
        entropy = losses.masked_mean(losses.entropy(logits, mask), valid)
        total = policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy
        approx_kl = losses.masked_mean(transition.log_prob - log_prob, valid)
        return total, dict(value_loss=value_loss, entropy=entropy, clip_fraction=clip_fraction, approx_kl=approx_kl)

    def iteration(carry, _):
        params, opt_state, rng = carry
        rng, rollout_key, shuffle_key = jax.random.split(rng, 3)
        transitions, final = rollout(params, rollout_key)
        valid = jnp.ones_like(transitions.reward, bool)
        advantages, returns = losses.gae(transitions.reward, transitions.value, transitions.done, valid,
                                         jnp.zeros(config.num_envs), config.gamma, config.gae_lambda)
        advantages = losses.normalize_advantages(advantages, valid)
        flat = jax.tree_util.tree_map(lambda x: x.reshape(batch, *x.shape[2:]),
                                      (transitions, advantages, returns))

        def epoch(carry, key):
            params, opt_state = carry
            order = jax.random.permutation(key, batch).reshape(config.minibatches, -1)

            def minibatch(carry, idx):
                params, opt_state = carry
                (_, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                    params, jax.tree_util.tree_map(lambda x: x[idx], flat))
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), info

            return jax.lax.scan(minibatch, (params, opt_state), order)

        (params, opt_state), info = jax.lax.scan(epoch, (params, opt_state), jax.random.split(shuffle_key, config.epochs))
        last = transitions.reward[-1]
        metrics = dict(jax.tree_util.tree_map(jnp.mean, info), reward=jnp.mean(last),
                       cost=jnp.mean(final.cost), quality=jnp.mean(last + final.cost_lambda * final.cost))
        return (params, opt_state, rng), metrics

    def train(rng):
        rng, init_key = jax.random.split(rng)
        e = arrays.root_embedding.shape[-1]
        params = network.init(init_key, jnp.zeros((1, e)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 2)),
                              jnp.zeros((1,)) if conditioned else None)
        (params, _, _), metrics = jax.lax.scan(
            iteration, (params, optimizer.init(params), rng), None, config.num_iterations)
        return params, metrics

    return network, train


def greedy_paths(network: RouterNetwork, params, tree: PathTree, prompts: chex.Array, cost_lambda: float = 0.0,
                 conditioned: bool = False):
    """Follows the argmax action from each prompt's root -> (quality [P], cost [P], actions [L, P]).
    `conditioned`: the network takes `cost_lambda` as an input (a lambda-conditioned router)."""
    num_models, num_hops = tree.num_models, int(tree.depth.max()) + 1
    arrays = TreeArrays.from_tree(tree)
    prompts = jnp.asarray(prompts)
    state = initial_state(prompts, jnp.full(prompts.shape, cost_lambda, jnp.float32))
    actions = []
    for _ in range(num_hops):
        logits, _ = network.apply(params, *observe(arrays, state), state.cost_lambda if conditioned else None)
        action = jnp.argmax(logits, axis=-1)
        state, _, _ = env_step(arrays, state, action, num_models, num_hops)
        actions.append(action)
    return arrays.quality[prompts, state.node], state.cost, jnp.stack(actions)
