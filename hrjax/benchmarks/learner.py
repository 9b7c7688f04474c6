"""Learner throughput: is PPO ever the bottleneck?

Tree mode: environment steps per second of the fused rollout + update scan (default network and
PPO settings, MiniLM-width embeddings over a path tree of random arrays: throughput does not depend
on the values), the FLOPs one environment step costs, counted from the network's dense layers
(the rollout's forward pass, whose log-probs and values the update reuses, and `epochs` x forward +
backward at 2x forward, less the input gradient of the context embedding, which nothing needs), and
the achieved share of a float32 matmul peak measured in the same run.

Online mode: online PPO on the real offline pool (SmolLM2-135M + Gemma-3-270M) over reasoning-gym
prompts; the share of an iteration's wall time spent in the jitted update, with a cold response
cache (every answer generated) and again over a warm one (the same prompts; rollouts only embed
and score). The first iteration (jit compilation) is excluded.
"""

from __future__ import annotations

import tempfile
import time

import jax
import numpy as np

from hrjax.agent.ppo import PPOConfig
from hrjax.benchmarks.common import best_seconds, host_info, matmul_peak_gflops, random_tree

PPO_DEFAULTS = PPOConfig()


def dense_flops_per_sample(params) -> int:
    """2 * fan_in * fan_out summed over every dense kernel: one forward pass of one sample."""
    kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(params) if "kernel" in jax.tree_util.keystr(path)]
    return int(sum(2 * k.shape[0] * k.shape[1] for k in kernels))


def update_flops_per_step(params, embedding_dim: int, epochs: int) -> int:
    """FLOPs per environment step of tree-mode PPO: the rollout's forward pass, then `epochs` x (forward,
    kernel gradients and input gradients, each one forward's worth) less the input gradient of the
    context embedding's rows of each first (`*torso_0`) layer."""
    first_layers = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
                    if jax.tree_util.keystr(path).endswith("torso_0']['kernel']")]
    embedding_gradient = sum(2 * embedding_dim * k.shape[1] for k in first_layers)
    return dense_flops_per_sample(params) * (1 + 3 * epochs) - epochs * embedding_gradient


def tree_mode(num_envs: int = PPO_DEFAULTS.num_envs, num_prompts: int = 512, embedding_dim: int = 384,
              num_models: int = 3, num_hops: int = 2, iterations: int = 20) -> dict:
    from hrjax.agent.networks import NetworkConfig
    from hrjax.agent.tree_mode import make_train
    from hrjax.env.mdp import EnvConfig

    tree = random_tree(num_prompts, embedding_dim, num_models, num_hops)
    ppo = PPOConfig(num_envs=num_envs)
    trainer = make_train(ppo, NetworkConfig(), EnvConfig(num_hops=num_hops), tree, np.arange(num_prompts), iterations)
    run = jax.jit(trainer.run, static_argnums=1)
    carry = trainer.init(jax.random.PRNGKey(0))
    jax.block_until_ready(run(carry, iterations))
    seconds = best_seconds(lambda: run(carry, iterations))
    steps_per_s = iterations * ppo.num_envs * num_hops / seconds
    flops_per_step = update_flops_per_step(carry.params, embedding_dim, ppo.epochs)
    peak = matmul_peak_gflops()
    achieved = steps_per_s * flops_per_step / 1e9
    return {"tree_env_steps_per_s": round(steps_per_s), "tree_flops_per_env_step": flops_per_step,
            "tree_achieved_gflops": round(achieved, 1), "matmul_peak_gflops": round(peak, 1),
            "tree_peak_fraction": round(achieved / peak, 3), "tree_num_envs": ppo.num_envs}


def online_mode(num_envs: int = 32, iterations: int = 3, max_new_tokens: int = 16) -> dict:
    import reasoning_gym

    from hrjax import assets
    from hrjax.agent.networks import NetworkConfig
    from hrjax.agent.online import OnlineTrainer
    from hrjax.env.cache import ResponseCache
    from hrjax.env.mdp import EnvConfig, RoutingEnv
    from hrjax.models.encoder import load_encoder
    from hrjax.pool import ModelSpec, Pool

    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=num_envs * (iterations + 1), seed=0)
    entries = list(dataset)
    pool = Pool.from_specs([ModelSpec("smollm2-135m", str(assets.smollm2_gguf_path()), base_rate=1.0),
                            ModelSpec("gemma3-270m", str(assets.gemma3_gguf_path()), base_rate=2.0)])
    quality = lambda entry, text: float(dataset.score_answer(text.strip(), entry))  # noqa: E731
    out = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = RoutingEnv(pool, load_encoder(), quality, EnvConfig(num_hops=2, max_new_tokens=max_new_tokens),
                         ResponseCache(cache_dir))
        for cache in ("cold", "warm"):  # the warm pass replays the same prompts over the filled cache
            trainer = OnlineTrainer(PPOConfig(num_envs=num_envs), NetworkConfig(), env, entries,
                                    [e["question"] for e in entries], iterations + 1, seed=0)
            carry = trainer.init(jax.random.PRNGKey(0))
            learner = wall = 0.0
            for i in range(iterations + 1):
                start = time.perf_counter()
                carry, metrics = trainer.iteration(carry)
                if i:  # the first iteration compiles the update
                    learner += metrics["learner_seconds"]
                    wall += time.perf_counter() - start
            suffix = "" if cache == "cold" else "_warm_cache"
            out[f"online_learner_fraction{suffix}"] = round(learner / wall, 4)
            out[f"online_iteration_seconds{suffix}"] = round(wall / iterations, 3)
    out["online_num_envs"] = num_envs
    return out


def run(tree_num_envs: int = PPO_DEFAULTS.num_envs, online: bool = True) -> dict:
    return {**host_info(), **tree_mode(tree_num_envs), **(online_mode() if online else {})}
