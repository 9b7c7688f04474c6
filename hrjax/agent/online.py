"""Online mode: each iteration rolls out a batch of training prompts through the real pool and
response cache (Python orchestration, `hrjax.env.mdp.rollout`), then runs the jitted PPO update.

The carry (params, optimiser state, RNG key, data position, iteration) is everything a checkpoint
needs: the prompts come from a seeded, epoch-shuffled stream indexed by the position, so a resumed
run draws the same batches, samples the same actions and, over a warm cache, sees the same responses.
Each episode samples its actions from a key of its own (the hop's key folded with its index in the
batch), so in a multi-process job each process rolls out only its part of the batch (the part its
devices hold on the mesh's 'data' axis) and the job samples what one process would; the update runs
on the global batch (`hrjax.parallel.global_batch`).
Shapes: B episodes per iteration, L hops, A actions.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from hrjax.agent.networks import NetworkConfig
from hrjax.agent.ppo import (Learner, PPOConfig, Trajectory, action_histogram, models_called,
                             sample_cost_lambda)
from hrjax.env.mdp import Episode, RoutingEnv, rollout, routing_reward
from hrjax.parallel import (Mesh, constrain_batch, constrain_replicated, global_batch, global_replicated,
                            local_batch, replicated, sum_over_processes)


class PromptStream:
    """An endless stream of prompt indices: epoch e is a permutation of range(N) drawn from (seed, e)."""

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts < 1:
            raise ValueError("Online training needs at least one training prompt.")
        self.num_prompts, self.seed = num_prompts, seed

    def batch(self, position: int, size: int) -> np.ndarray:
        """The `size` prompt indices that follow the first `position` of the stream."""
        out = []
        while len(out) < size:
            epoch, offset = divmod(position, self.num_prompts)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)
            take = order[offset:offset + size - len(out)]
            out.extend(take.tolist())
            position += len(take)
        return np.array(out, np.int64)


class OnlineCarry(NamedTuple):
    params: chex.ArrayTree
    opt_state: chex.ArrayTree
    rng: chex.PRNGKey
    data_position: chex.Array  # [] int: training prompts consumed so far
    iteration: chex.Array  # [] int32: updates done so far (the learning-rate schedule reads it)


def episode_trajectory(episode: Episode, cost_lambda: np.ndarray, cost_timing: str) -> Trajectory:
    """The learner's view of an env episode; rewards recomputed with each episode's lambda [B]."""
    finished = episode.done & episode.valid
    total_cost = np.cumsum(episode.cost, axis=0)
    reward = routing_reward(finished, episode.quality[None], total_cost, episode.cost, episode.valid,
                            cost_lambda[None], cost_timing)
    return Trajectory(episode.embedding, episode.hop, episode.cost_features,
                      np.broadcast_to(cost_lambda, episode.hop.shape).astype(np.float32), episode.action_mask,
                      episode.action, np.asarray(reward, np.float32), finished, episode.valid)


class OnlineTrainer:
    """PPO against a `RoutingEnv` over training `examples` / `questions`."""

    def __init__(self, ppo: PPOConfig, network: NetworkConfig, env: RoutingEnv, examples: Sequence[Any],
                 questions: Sequence[str], num_iterations: int, seed: int, mesh: Optional[Mesh] = None):
        """With a `mesh` (`hrjax.parallel.make_mesh`) the update splits the B episodes over its 'data'
        axis, parameters and optimiser state whole on every device (B must divide by the axis size)."""
        if len(examples) != len(questions):
            raise ValueError(f"{len(examples)} examples but {len(questions)} questions.")
        self.ppo, self.env, self.examples, self.questions = ppo, env, list(examples), list(questions)
        self.learner = Learner(ppo, network, env.num_actions, env.config.num_hops, num_iterations, mesh)
        self.stream = PromptStream(len(examples), seed)
        self.mesh = mesh

        def sample(params, key, episodes, embedding, hop, cost_features, cost_lambda, mask):
            """Actions [b] of episodes `episodes` [b] (their indices in the batch), each from its own key."""
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(episodes)
            one = lambda k, *obs: self.learner.act(params, k, *(x[None] for x in obs))[0]  # noqa: E731
            return jax.vmap(one)(keys, embedding, hop, cost_features, cost_lambda, mask)

        self._sample = jax.jit(sample)
        self._greedy = jax.jit(lambda params, *obs: self.learner.act(params, None, *obs, greedy=True))

        def update(params, opt_state, trajectory: Trajectory, key, iteration):
            trajectory = constrain_batch(trajectory, mesh, axis=1)
            params, opt_state, metrics = self.learner.update(params, opt_state, trajectory, key, iteration)
            return (*constrain_replicated((params, opt_state), mesh), metrics)

        def summary(trajectory: Trajectory):  # -> (mean models called, action histogram [L, A])
            return (jnp.mean(models_called(trajectory, len(self.env.pool))),
                    action_histogram(trajectory, self.learner.num_actions))

        whole = None if mesh is None else replicated(mesh)  # readable in every process
        self._update = jax.jit(update, out_shardings=whole)
        self._summary = jax.jit(summary, out_shardings=whole)

    def init(self, rng: chex.PRNGKey) -> OnlineCarry:
        rng, init_key = jax.random.split(rng)
        params, opt_state = self.learner.init(init_key, self.env.observation_dim)
        return OnlineCarry(params, opt_state, rng, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def play(self, params, key, examples: Sequence[Any], questions: Sequence[str], cost_lambda: np.ndarray,
             greedy: bool = False, episodes: Optional[np.ndarray] = None) -> Episode:
        """One batched episode per example with the policy (sampled, or greedy). `episodes` [b]: their
        indices in the iteration's batch (default 0..b-1), which pick each episode's sampling key."""
        keys = iter(jax.random.split(key, self.env.config.num_hops))
        episodes = np.arange(len(examples)) if episodes is None else episodes

        def policy(obs):
            observation = (obs.embedding, obs.hop, obs.cost, cost_lambda, obs.action_mask)
            if greedy:
                return np.asarray(self._greedy(params, *observation))
            return np.asarray(self._sample(params, next(keys), episodes, *observation))

        return rollout(self.env, examples, questions, policy)

    def iteration(self, carry: OnlineCarry) -> tuple[OnlineCarry, dict]:
        """One rollout (this process's part of the batch) + one update on the whole batch -> (next carry,
        metrics incl. rollout/learner wall seconds, over the whole batch)."""
        b = self.ppo.num_envs
        rng, act_key, lambda_key, update_key = jax.random.split(carry.rng, 4)
        position = int(carry.data_position)
        part = local_batch(self.mesh, b)
        index = self.stream.batch(position, b)[part]
        cost_lambda = np.asarray(sample_cost_lambda(self.ppo, self.env.config.cost_lambda, lambda_key, b))[part]
        stats, start = dict(vars(self.env.cache.stats)), time.perf_counter()
        episode = self.play(carry.params, act_key, [self.examples[i] for i in index],
                            [self.questions[i] for i in index], cost_lambda, episodes=np.arange(b)[part])
        trajectory = global_batch(episode_trajectory(episode, cost_lambda, self.env.config.cost_timing), self.mesh,
                                  axis=1)
        rollout_seconds = time.perf_counter() - start
        params, opt_state, metrics = self._update(carry.params, carry.opt_state, trajectory, update_key,
                                                  carry.iteration)
        jax.block_until_ready(params)
        learner_seconds = time.perf_counter() - start - rollout_seconds
        after = vars(self.env.cache.stats)
        hops, histogram = self._summary(trajectory)
        sums = sum_over_processes(np.array([episode.quality.sum(), episode.total_cost.sum(),
                                            after["hits"] - stats["hits"], after["misses"] - stats["misses"],
                                            after["generated_tokens"] - stats["generated_tokens"]], np.float64))
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        metrics.update(quality=sums[0] / b, cost=sums[1] / b, hops=np.asarray(hops),
                       action_histogram=np.asarray(histogram), cache_hits=int(sums[2]), cache_misses=int(sums[3]),
                       generated_tokens=int(sums[4]), rollout_seconds=rollout_seconds,
                       learner_seconds=learner_seconds)
        position = global_replicated(jnp.asarray(position + b, jnp.int32), self.mesh)
        return OnlineCarry(params, opt_state, rng, position, carry.iteration + 1), metrics
