"""Tree-mode PPO on one device and on 8 host devices split into meshes (8, 1), (4, 2) and (2, 4);
prints one JSON line: per mesh, the largest |difference| from the one-device run in the final
parameters and in every logged loss. Run by tests/test_parallel.py in a process of its own, with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before JAX starts)."""

import json
import sys

import jax
import numpy as np

from hrjax.agent.networks import NetworkConfig
from hrjax.agent.ppo import PPOConfig
from hrjax.agent.tree_mode import make_train
from hrjax.benchmarks.scale import collective_bytes, collective_executions
from hrjax.env.mdp import EnvConfig
from hrjax.parallel import MeshConfig, MeshError, make_mesh
from test_tree_learning import N, synthetic_tree

ITERATIONS = 20
# explicit shuffle groups: the same minibatches on one device and on every data axis that divides 8
PPO = PPOConfig(num_envs=256, shuffle_groups=8)
LOSSES = ("policy_loss", "value_loss", "entropy", "approx_kl", "return", "quality", "cost")


def main(seeds: int) -> None:
    tree = synthetic_tree(lambda c, p: 0.3 + 0.2 * p[-1] + 0.1 * c, [0.1, 0.3, 0.6], num_hops=2)
    env = EnvConfig(num_hops=2, stop_action=True, cost_lambda=0.1)

    def run(mesh):
        trainer = make_train(PPO, NetworkConfig(), env, tree, np.arange(N), ITERATIONS, mesh)
        keys = jax.random.split(jax.random.PRNGKey(0), seeds)
        compiled = jax.jit(jax.vmap(trainer.train)).lower(keys).compile()  # seeds stay vmappable on a mesh
        params, metrics = compiled(keys)
        moved = collective_bytes(compiled.as_text())
        param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))  # over the seeds
        # data-parallel: every minibatch all-reduces its gradients (>= the params' bytes per step); the
        # trajectory never gathers onto every device (an all-gather would move it whole)
        steps = ITERATIONS * PPO.epochs * PPO.minibatches
        split = {"devices": len(jax.tree_util.tree_leaves(params)[0].sharding.device_set),
                 "allreduce_per_gradient_step": moved["all-reduce"] / steps / param_bytes,
                 "allreduces_per_gradient_step": collective_executions(compiled.as_text())["all-reduce"] / steps,
                 "allgather_bytes": moved["all-gather"]}
        return jax.device_get(params), {k: np.asarray(metrics[k]) for k in LOSSES}, split

    # the reference: one device, one seed at a time, as a single-device user runs it
    trainer = make_train(PPO, NetworkConfig(), env, tree, np.arange(N), ITERATIONS)
    single = [jax.jit(trainer.train)(key) for key in jax.random.split(jax.random.PRNGKey(0), seeds)]
    base_params = jax.device_get(jax.tree_util.tree_map(lambda *x: np.stack(x), *[p for p, _ in single]))
    base_losses = {k: np.stack([np.asarray(m[k]) for _, m in single]) for k in LOSSES}
    out = {"devices": jax.device_count(), "iterations": ITERATIONS, "seeds": seeds}
    for shape in ((8, 1), (4, 2), (2, 4)):
        params, losses, split = run(make_mesh(MeshConfig(*shape)))
        out[f"{shape[0]}x{shape[1]}"] = {**split,
            "params": max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                                      jax.tree_util.tree_leaves(base_params))),
            "losses": max(float(np.abs(losses[k] - base_losses[k]).max()) for k in LOSSES)}
    try:
        make_train(PPOConfig(num_envs=252, minibatches=2), NetworkConfig(), env, tree, np.arange(N), 1,
                   make_mesh(MeshConfig(8, 1)))
    except MeshError as e:
        out["refused"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
