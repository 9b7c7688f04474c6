"""The PPO learner both training modes share: one jit-compiled update over a fixed-shape trajectory.

`Learner.update` runs GAE, advantage normalisation and `epochs` x shuffled `minibatches` of the
clipped PPO loss (with gradient clipping, Adam and an optional approx-KL early stop) as nested
`lax.scan`s, so the whole update is one XLA program. The sampled actions' old log-probabilities and
values come from the rollout (`Learner.sample`, tree mode) or, when a rollout records only
observations, actions and rewards (online mode), are recomputed from the trajectory with the
parameters that sampled it. The learning rate is read from the schedule at each
minibatch's place in the run (iteration x epochs x minibatches), not from the optimiser's step
count: minibatches skipped by the KL stop still advance it, so a linear schedule ends at 0.

Shapes: T = num_hops steps, B episodes, E embedding width, A actions (M models, + STOP if enabled).
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
from hrjax.parallel import Mesh, check_divisible, constrain_batch


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    num_envs: int = 256  # episodes per iteration (B); small batches converge early to one fixed path
    epochs: int = 2
    minibatches: int = 4
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # 'constant' or 'linear' (decays to 0 over the run's minibatch steps)
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    target_kl: Optional[float] = None  # skip an update's remaining minibatches once approx-KL > 1.5x this
    normalize_advantages: bool = True
    # Beyond the paper: sample lambda per episode from this (low, high) range and feed it to the
    # network, so one policy serves every cost-quality trade-off. None: the env's fixed cost_lambda.
    lambda_range: Optional[tuple[float, float]] = None
    # The episodes form this many contiguous groups; each epoch shuffles the steps within every group and
    # each minibatch takes an equal slice of every group, so on a mesh whose data axis divides it every
    # device draws its share of a minibatch from its own episodes (data-parallel: only gradients cross
    # devices). 0: the data axis size (1 on one device: one global shuffle). Set it explicitly (e.g. 8)
    # for the same minibatches, so the same run, on every mesh whose data axis divides it.
    shuffle_groups: int = 0

    def __post_init__(self):
        if self.shuffle_groups < 0:
            raise ValueError(f"ppo.shuffle_groups must be >= 0 (0: the mesh's data axis), got {self.shuffle_groups}.")
        for name in ("num_envs", "epochs", "minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"ppo.learning_rate must be > 0, got {self.learning_rate}.")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"ppo.lr_schedule must be 'constant' or 'linear', got '{self.lr_schedule}'.")
        if self.lambda_range is not None and not (len(self.lambda_range) == 2
                                                  and 0 <= self.lambda_range[0] <= self.lambda_range[1]):
            raise ValueError(f"ppo.lambda_range must be (low, high) with 0 <= low <= high, got {self.lambda_range}.")

    @property
    def conditioned(self) -> bool:
        return self.lambda_range is not None


class Trajectory(NamedTuple):
    """One iteration's episodes, [T, B, ...]; `valid` is False after an episode ended."""

    embedding: chex.Array  # [T, B, E] context embedding
    hop: chex.Array  # [T, B] int32
    cost_features: chex.Array  # [T, B, 2] cumulative and last-hop normalised cost
    cost_lambda: chex.Array  # [T, B] the episode's cost weight
    action_mask: chex.Array  # [T, B, A] bool
    action: chex.Array  # [T, B] int32
    reward: chex.Array  # [T, B]
    done: chex.Array  # [T, B] bool: the episode ended with this step
    valid: chex.Array  # [T, B] bool


def sample_cost_lambda(config: PPOConfig, cost_lambda: float, key: chex.PRNGKey, num_envs: int) -> chex.Array:
    """[B] each episode's lambda: drawn from `lambda_range`, or the env's fixed `cost_lambda`."""
    if config.conditioned:
        low, high = config.lambda_range
        return jax.random.uniform(key, (num_envs,), minval=low, maxval=high)
    return jnp.full((num_envs,), cost_lambda, jnp.float32)


def action_histogram(trajectory: Trajectory, num_actions: int) -> chex.Array:
    """[T, A] share of the episodes that took each action at each hop (valid steps only)."""
    counts = jnp.sum(jax.nn.one_hot(trajectory.action, num_actions) * trajectory.valid[..., None], axis=1)
    return counts / jnp.maximum(jnp.sum(trajectory.valid, axis=1), 1)[:, None]


def models_called(trajectory: Trajectory, num_models: int) -> chex.Array:
    """[B] pool models each episode called: its valid steps that were not STOP (action `num_models`)."""
    return jnp.sum(trajectory.valid & (trajectory.action < num_models), axis=0)


def explained_variance(values: chex.Array, returns: chex.Array, valid: chex.Array) -> chex.Array:
    """1 - Var[returns - values] / Var[returns] over valid steps (1: perfect; <= 0: no better than a constant)."""
    def variance(x):
        return losses.masked_mean(jnp.square(x - losses.masked_mean(x, valid)), valid)

    return 1.0 - variance(returns - values) / jnp.maximum(variance(returns), 1e-8)


class Learner:
    """The router network, its optimiser and PPO's pure functions (jit them at the call site)."""

    def __init__(self, config: PPOConfig, network: NetworkConfig, num_actions: int, num_hops: int,
                 num_iterations: int, mesh: Optional[Mesh] = None):
        """`mesh`: the update splits the episodes over its 'data' axis (see `PPOConfig.shuffle_groups`)."""
        self.config, self.num_actions, self.num_hops, self.mesh = config, num_actions, num_hops, mesh
        self.network = RouterNetwork(network, num_actions, num_hops)
        data = 1
        if mesh is not None:
            check_divisible(mesh, "config.ppo.num_envs", config.num_envs)
            data = mesh.shape["data"]
        self.shuffle_groups = config.shuffle_groups or data
        if self.shuffle_groups % data:
            raise ValueError(f"ppo.shuffle_groups ({config.shuffle_groups}) must be a multiple of the mesh's data axis "
                             f"({data}) so that each device shuffles its own episodes: set it to a multiple of "
                             f"{data}, or 0 (the data axis).")
        if config.num_envs % self.shuffle_groups:
            raise ValueError(f"ppo.num_envs ({config.num_envs}) must split into {self.shuffle_groups} shuffle groups: "
                             "change ppo.num_envs or ppo.shuffle_groups.")
        per_group = config.num_envs // self.shuffle_groups * num_hops
        if per_group % config.minibatches:
            raise ValueError(f"Each shuffle group's {per_group} steps ({config.num_envs // self.shuffle_groups} "
                             f"episodes x {num_hops} hops) must split into ppo.minibatches ({config.minibatches}): "
                             "change ppo.num_envs, ppo.minibatches or ppo.shuffle_groups.")
        self.minibatch_size = config.num_envs * num_hops // config.minibatches
        self.steps_per_update = config.epochs * config.minibatches
        if config.lr_schedule == "linear":
            self.learning_rate = optax.linear_schedule(config.learning_rate, 0.0,
                                                       num_iterations * self.steps_per_update)
        else:
            self.learning_rate = optax.constant_schedule(config.learning_rate)
        # Adam's moments only: the rate is applied in `update`, from the schedule (see the module docstring)
        self.optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.scale_by_adam())

    def init(self, key: chex.PRNGKey, embedding_dim: int):
        """-> (params, opt_state)."""
        params = self.network.init(key, jnp.zeros((1, embedding_dim)), jnp.zeros((1,), jnp.int32),
                                   jnp.zeros((1, 2)), jnp.zeros((1,)) if self.config.conditioned else None)
        return params, self.optimizer.init(params)

    def apply(self, params, embedding, hop, cost_features, cost_lambda, action_mask):
        """-> (log-probabilities [..., A] with invalid actions excluded, value [...])."""
        logits, value = self.network.apply(params, embedding, hop, cost_features,
                                           cost_lambda if self.config.conditioned else None)
        return losses.masked_log_softmax(logits, action_mask), value

    def act(self, params, key, embedding, hop, cost_features, cost_lambda, action_mask, greedy: bool = False):
        """Samples (or, `greedy`, takes the argmax) action [B] for observations [B, ...]."""
        if greedy:
            log_probs, _ = self.apply(params, embedding, hop, cost_features, cost_lambda, action_mask)
            return jnp.argmax(log_probs, axis=-1)
        return self.sample(params, key, embedding, hop, cost_features, cost_lambda, action_mask)[0]

    def sample(self, params, key, embedding, hop, cost_features, cost_lambda, action_mask):
        """Samples actions for observations [B, ...] -> (action [B], its log-probability [B], value [B]):
        what `update` needs of the sampling policy (`behaviour`)."""
        log_probs, value = self.apply(params, embedding, hop, cost_features, cost_lambda, action_mask)
        action = jax.random.categorical(key, log_probs)
        return action, jnp.take_along_axis(log_probs, action[..., None], axis=-1)[..., 0], value

    def _loss(self, params, minibatch, count):
        """count []: the minibatch's valid steps, summed beforehand (`losses.masked_mean`)."""
        step, old_log_prob, old_value, advantages, returns = minibatch
        log_probs, value = self.apply(params, step.embedding, step.hop, step.cost_features, step.cost_lambda,
                                      step.action_mask)
        log_prob = jnp.take_along_axis(log_probs, step.action[:, None], axis=-1)[:, 0]
        cfg = self.config
        policy_loss, clip_fraction = losses.clipped_surrogate_loss(log_prob, old_log_prob, advantages, step.valid,
                                                                   cfg.clip_epsilon, count)
        value_loss = losses.clipped_value_loss(value, old_value, returns, step.valid, cfg.clip_epsilon, count)
        entropy = losses.masked_mean(losses.entropy(log_probs, step.action_mask), step.valid, count)
        total = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
        approx_kl = losses.approx_kl(log_prob, old_log_prob, step.valid, count)
        return total, dict(policy_loss=policy_loss, value_loss=value_loss, entropy=entropy,
                           clip_fraction=clip_fraction, approx_kl=approx_kl)

    def update(self, params, opt_state, trajectory: Trajectory, key: chex.PRNGKey, iteration: chex.Array,
               behaviour: Optional[tuple[chex.Array, chex.Array]] = None):
        """One PPO update on a trajectory [T, B, ...] sampled with `params`; `iteration` [] int is
        this update's 0-based index in the run (the learning-rate schedule reads it); `behaviour`: the
        sampled actions' log-probabilities and the values [T, B] as `sample` returned them (None:
        recomputed here from the trajectory). -> (params, opt_state, metrics: dict of scalars)."""
        cfg = self.config
        t, b = trajectory.reward.shape
        chex.assert_shape(trajectory.valid, (t, b))
        chex.assert_shape(trajectory.action_mask, (t, b, self.num_actions))
        if behaviour is None:
            log_probs, values = self.apply(params, trajectory.embedding, trajectory.hop, trajectory.cost_features,
                                           trajectory.cost_lambda, trajectory.action_mask)
            old_log_prob = jnp.take_along_axis(log_probs, trajectory.action[..., None], axis=-1)[..., 0]
        else:
            old_log_prob, values = behaviour
            chex.assert_shape((old_log_prob, values), (t, b))
        advantages, returns = losses.gae(trajectory.reward, values, trajectory.done, trajectory.valid,
                                         jnp.zeros(b), cfg.gamma, cfg.gae_lambda)
        if cfg.normalize_advantages:
            advantages = losses.normalize_advantages(advantages, trajectory.valid)
        g = self.shuffle_groups
        # [T, B, ...] -> [G, T * B / G, ...]: group j holds episodes j*B/G .. (j+1)*B/G - 1, every hop
        grouped = constrain_batch(jax.tree_util.tree_map(
            lambda x: x.reshape(t, g, b // g, *x.shape[2:]).swapaxes(0, 1).reshape(g, t * b // g, *x.shape[2:]),
            (trajectory, old_log_prob, values, advantages, returns)), self.mesh)
        threshold = jnp.inf if cfg.target_kl is None else 1.5 * cfg.target_kl

        def gather(x, index):
            """x [G, T * B / G, ...], index [G, m / G]: each group's slice -> [m, ...], split over 'data' by group."""
            return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1).reshape(
                -1, *x.shape[2:])

        def minibatch(carry, index_step_count):
            params, opt_state, stopped = carry
            index, step, count = index_step_count
            batch = constrain_batch(jax.tree_util.tree_map(lambda x: gather(x, index), grouped), self.mesh)
            # the forward's sums and the gradients then meet in one all-reduce per step
            (_, info), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch, count)
            stopped = stopped | (info["approx_kl"] > threshold)
            learning_rate = self.learning_rate(step)
            updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, jax.tree_util.tree_map(lambda u: -learning_rate * u, updates))
            if cfg.target_kl is None:  # nothing stops an update: no per-step select over every parameter
                params, opt_state = new_params, new_opt_state
            else:
                keep = lambda new, old: jnp.where(stopped, old, new)  # noqa: E731
                params = jax.tree_util.tree_map(keep, new_params, params)
                opt_state = jax.tree_util.tree_map(keep, new_opt_state, opt_state)
            return (params, opt_state, stopped), dict(info, kl_stop=stopped.astype(jnp.float32),
                                                      learning_rate=learning_rate)

        def epoch_order(epoch_key):
            keys = epoch_key[None] if g == 1 else jax.random.split(epoch_key, g)  # g = 1: one global shuffle
            order = jax.vmap(lambda key: jax.random.permutation(key, t * b // g))(keys)  # [G, T * B / G]
            return order.reshape(g, cfg.minibatches, -1).swapaxes(0, 1)  # [minibatches, G, m / G]

        orders = jax.vmap(epoch_order)(jax.random.split(key, cfg.epochs))  # [epochs, minibatches, G, m / G]
        # every minibatch's valid steps, in one cross-device sum for the whole update
        counts = jax.vmap(jax.vmap(lambda index: jnp.sum(gather(grouped[0].valid, index))))(orders)
        steps = iteration * self.steps_per_update + jnp.arange(self.steps_per_update).reshape(cfg.epochs,
                                                                                             cfg.minibatches)
        (params, opt_state, _), info = jax.lax.scan(
            lambda carry, epoch: jax.lax.scan(minibatch, carry, epoch), (params, opt_state, jnp.array(False)),
            (orders, steps, counts.astype(jnp.float32)))
        metrics = jax.tree_util.tree_map(jnp.mean, info)
        metrics["explained_variance"] = explained_variance(values, returns, trajectory.valid)
        metrics["return"] = jnp.mean(jnp.sum(trajectory.reward * trajectory.valid, axis=0))
        return params, opt_state, metrics
