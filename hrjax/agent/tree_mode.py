"""Tree mode (PureJaxRL style): with a path tree the environment is array look-ups, so rollout and
update run together in one jit-compiled `lax.scan` over iterations.

`make_train(...)` returns pure functions: `init(rng) -> TrainCarry`, `run(carry, n, cost_lambda=None)
-> (carry, metrics [n])` (n static) and `train(rng, cost_lambda=None)`, all jittable and vmappable over
seeds and, for a fixed-lambda router, over the cost lambda (a traced scalar; None: the env config's).
`train_runs` trains many runs at once, step by step, as one program.
The environment follows `EnvConfig`: L hops, STOP when enabled (action M, not at hop 0: stopping at a
node scores that node's answer), the cost charged at the end or per hop.
Shapes: N prompts, K tree nodes (D of them decided at: `hrjax.env.tree.decision_nodes`), E embedding width,
B episodes per iteration, L hops, M models.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hrjax.agent.networks import NetworkConfig
from hrjax.agent.ppo import (Learner, PPOConfig, Trajectory, action_histogram, models_called,
                             sample_cost_lambda)
from hrjax.env.mdp import EnvConfig, routing_reward
from hrjax.env.tree import PathTree, decision_nodes, level_offset
from hrjax.parallel import Mesh, constrain_batch, constrain_replicated
from hrjax.runtime import RUN_ONCE_COMPILER_OPTIONS


class TreeArrays(NamedTuple):
    """The parts of a `PathTree` the jitted environment reads, as device arrays."""

    observation: chex.Array  # [N, 1 + D, E] embedding at the root (column 0) and after node k < D (column k + 1)
    cost: chex.Array  # [N, K]
    quality: chex.Array  # [N, K]
    level_start: chex.Array  # [L + 1] first node index of each depth

    @classmethod
    def from_tree(cls, tree: PathTree) -> "TreeArrays":
        m, hops = tree.num_models, tree_hops(tree)
        n, decided = tree.quality.shape[0], decision_nodes(m, hops)
        if tree.embedding.shape[:2] != (n, decided) or tree.root_embedding.shape[0] != n:
            raise ValueError(f"A path tree of {n} prompts, {m} models and {hops} hops embeds the root and the "
                             f"{decided} nodes decided at (`decision_nodes`): embedding [{n}, {decided}, E], got "
                             f"{tree.embedding.shape} (and root_embedding {tree.root_embedding.shape}): build the tree "
                             "with `hrjax.env.tree.build_tree`, or rebuild one saved by an older version.")
        observation = np.concatenate([tree.root_embedding[:, None], tree.embedding], axis=1)
        return cls(jnp.asarray(observation), jnp.asarray(tree.cost), jnp.asarray(tree.quality),
                   jnp.array([level_offset(m, d) for d in range(hops + 1)]))


def tree_hops(tree: PathTree) -> int:
    return int(tree.depth.max()) + 1


class EnvState(NamedTuple):
    prompt: chex.Array  # [B] int32 tree row
    node: chex.Array  # [B] int32, -1 at the root
    hop: chex.Array  # [B] int32
    cost: chex.Array  # [B] cumulative normalised cost
    last_cost: chex.Array  # [B]
    cost_lambda: chex.Array  # [B] the episode's cost weight
    done: chex.Array  # [B] bool


class TreeEnv(NamedTuple):
    """The jitted environment: the tree's arrays plus the MDP's static settings."""

    arrays: TreeArrays
    num_models: int
    num_hops: int
    stop_action: bool
    cost_timing: str

    @classmethod
    def create(cls, tree: PathTree, env: EnvConfig) -> "TreeEnv":
        if tree_hops(tree) != env.num_hops:
            raise ValueError(f"The path tree has {tree_hops(tree)} hops but env.num_hops is {env.num_hops}: "
                             "build the tree with the same env config.")
        return cls(TreeArrays.from_tree(tree), tree.num_models, env.num_hops, env.stop_action, env.cost_timing)

    @property
    def num_actions(self) -> int:
        return self.num_models + int(self.stop_action)

    def reset(self, prompts: chex.Array, cost_lambda: chex.Array) -> EnvState:
        """Episodes at the roots of tree rows `prompts` [B], each with its cost weight [B]."""
        zeros = jnp.zeros(prompts.shape, jnp.float32)
        return EnvState(prompts, jnp.full(prompts.shape, -1), jnp.zeros(prompts.shape, jnp.int32), zeros, zeros,
                        jnp.broadcast_to(cost_lambda, prompts.shape).astype(jnp.float32),
                        jnp.zeros(prompts.shape, bool))

    def observe(self, state: EnvState):
        """-> (embedding [B, E], hop [B], cost features [B, 2], action mask [B, A])."""
        embedding = self.arrays.observation[state.prompt, state.node + 1]  # a node decided at: node < D
        mask = jnp.ones((state.hop.shape[0], self.num_actions), bool)
        if self.stop_action:
            mask = mask.at[:, self.num_models].set(state.hop > 0)
        return embedding, state.hop, jnp.stack([state.cost, state.last_cost], axis=-1), mask

    def step(self, state: EnvState, action: chex.Array):
        """One hop for every episode -> (next state, reward [B], finished [B], valid [B])."""
        a, m = self.arrays, self.num_models
        valid = ~state.done
        stop = (action == m) if self.stop_action else jnp.zeros_like(valid)
        move = valid & ~stop
        parent_index = state.node - a.level_start[jnp.maximum(state.hop - 1, 0)]
        model = jnp.minimum(action, m - 1)
        child = jnp.where(state.node < 0, model, a.level_start[state.hop] + parent_index * m + model)
        node = jnp.where(move, child, state.node)
        step_cost = jnp.where(move, a.cost[state.prompt, child], 0.0)
        cost = state.cost + step_cost
        hop = state.hop + move
        finished = valid & (stop | (hop >= self.num_hops))
        quality = a.quality[state.prompt, jnp.maximum(node, 0)]
        reward = routing_reward(finished, quality, cost, step_cost, valid, state.cost_lambda, self.cost_timing)
        next_state = EnvState(state.prompt, node, hop, cost, step_cost, state.cost_lambda, state.done | finished)
        return next_state, reward, finished, valid


class TrainCarry(NamedTuple):
    """Everything a tree-mode run carries from one iteration to the next (and checkpoints)."""

    params: chex.ArrayTree
    opt_state: chex.ArrayTree
    rng: chex.PRNGKey
    iteration: chex.Array  # [] int32: updates done so far (the learning-rate schedule reads it)


class RunSteps(NamedTuple):
    """A whole run, step by step: what `hrjax.train`'s loop would have computed, for it to log, evaluate and
    checkpoint. Leaves [S + 1, ...] for one run, [R, S + 1, ...] for R runs (`train_runs`)."""

    carries: TrainCarry  # the fresh carry, then the carry after each of the S steps
    metrics: dict  # each iteration's metrics, [num_iterations, ...] per run


class TreeTrainer(NamedTuple):
    learner: Learner
    env: TreeEnv
    init: callable  # (rng) -> TrainCarry
    run: callable  # (carry, n, cost_lambda=None) -> (carry, metrics with leading axis n); n static
    train: callable  # (rng, cost_lambda=None) -> (params, metrics [num_iterations])
    num_iterations: int  # of a whole run
    on: callable  # (TreeArrays) -> this trainer reading those arrays (traced ones: the tree as a program argument)


def make_train(ppo: PPOConfig, network: NetworkConfig, env_config: EnvConfig, tree: PathTree,
               prompts: chex.Array, num_iterations: int, mesh: Optional[Mesh] = None) -> TreeTrainer:
    """Tree-mode PPO over tree rows `prompts` [P] (episodes draw their prompt uniformly from them).
    With a `mesh` (`hrjax.parallel.make_mesh`), each iteration's B episodes are split over its 'data'
    axis and the parameters and optimiser state kept whole on every device: the same program, with
    XLA reducing the gradients across the data axis (B must divide by the data axis size). The metrics
    come out whole on every device, so each process of a multi-process job can read them. `run` and
    `train` take the episodes' fixed cost lambda as an argument (a float or traced scalar [], so one
    program serves a vmapped sweep; None: `env_config.cost_lambda`); a lambda-conditioned router
    (`ppo.lambda_range`) draws its own and ignores it."""
    env = TreeEnv.create(tree, env_config)
    learner = Learner(ppo, network, env.num_actions, env.num_hops, num_iterations, mesh)
    return _trainer_on(env, learner, jnp.asarray(prompts), tree.root_embedding.shape[-1], num_iterations, mesh,
                       env_config.cost_lambda)


def _trainer_on(env: TreeEnv, learner: Learner, prompts: chex.Array, embedding_width: int, num_iterations: int,
                mesh: Optional[Mesh], default_lambda: float) -> TreeTrainer:
    """`make_train`'s trainer over `env`, whose arrays may be traced; `default_lambda` when a run gets none."""
    ppo = learner.config
    b = ppo.num_envs

    def rollout(params, key, fixed_lambda):
        """-> (trajectory [L, B], the sampled actions' (log-probability, value) [L, B], final state)."""
        pick, draw, act = jax.random.split(key, 3)
        cost_lambda = sample_cost_lambda(ppo, fixed_lambda, draw, b)
        state = constrain_batch(env.reset(jax.random.choice(pick, prompts, (b,)), cost_lambda), mesh)

        def step(state, step_key):
            embedding, hop, cost_features, mask = env.observe(state)
            action, log_prob, value = learner.sample(params, step_key, embedding, hop, cost_features,
                                                     state.cost_lambda, mask)
            next_state, reward, finished, valid = env.step(state, action)
            return next_state, (Trajectory(embedding, hop, cost_features, state.cost_lambda, mask, action, reward,
                                           finished, valid), (log_prob, value))

        final, (trajectory, behaviour) = jax.lax.scan(step, state, jax.random.split(act, env.num_hops))
        return constrain_batch(trajectory, mesh, axis=1), constrain_batch(behaviour, mesh, axis=1), final

    def iteration(carry: TrainCarry, fixed_lambda):
        rng, rollout_key, update_key = jax.random.split(carry.rng, 3)
        trajectory, behaviour, final = rollout(carry.params, rollout_key, fixed_lambda)
        params, opt_state, metrics = learner.update(carry.params, carry.opt_state, trajectory, update_key,
                                                    carry.iteration, behaviour)
        params, opt_state = constrain_replicated((params, opt_state), mesh)
        quality = env.arrays.quality[final.prompt, final.node]
        metrics.update(quality=jnp.mean(quality), cost=jnp.mean(final.cost),
                       hops=jnp.mean(models_called(trajectory, env.num_models)),
                       action_histogram=action_histogram(trajectory, env.num_actions))
        return TrainCarry(params, opt_state, rng, carry.iteration + 1), constrain_replicated(metrics, mesh)

    def init(rng) -> TrainCarry:
        rng, init_key = jax.random.split(rng)
        params, opt_state = learner.init(init_key, embedding_width)
        return TrainCarry(params, opt_state, rng, jnp.zeros((), jnp.int32))

    def run(carry: TrainCarry, n: int, cost_lambda=None):
        fixed_lambda = default_lambda if cost_lambda is None else cost_lambda
        return jax.lax.scan(lambda c, _: iteration(c, fixed_lambda), carry, None, n)

    def train(rng, cost_lambda=None):
        carry, metrics = run(init(rng), num_iterations, cost_lambda)
        return carry.params, metrics

    def on(arrays: TreeArrays) -> TreeTrainer:
        return _trainer_on(env._replace(arrays=arrays), learner, prompts, embedding_width, num_iterations, mesh,
                           default_lambda)

    return TreeTrainer(learner, env, init, run, train, num_iterations, on)


# On XLA:CPU a program over many runs is slower per run once their working set outgrows the caches: on a
# 2-core AVX2 host (32 MiB L3), one core each, 2.1-2.4 s a run over 1-6 runs against 3.0 s over 12.
CPU_RUNS_PER_CALL = 4


class _RunPlan(NamedTuple):
    """How `train_runs` lays R runs out: `calls` calls of `chunk` runs (over all the devices, `split` along the
    runs), each in steps of `sizes` iterations; the tree's arrays `whole` on every device."""

    chunk: int
    calls: int
    sizes: tuple
    split: NamedSharding
    whole: NamedSharding

    @classmethod
    def of(cls, trainer: TreeTrainer, runs: int, iterations_per_step: Optional[int],
           devices: Optional[Sequence[jax.Device]], max_runs_per_call: Optional[int]) -> "_RunPlan":
        devices = list(jax.local_devices() if devices is None else devices)
        per_device = -(-runs // len(devices))
        calls = 1 if max_runs_per_call is None else -(-per_device // max_runs_per_call)
        mesh = Mesh(np.asarray(devices), ("runs",))
        total = trainer.num_iterations
        per_step = total if iterations_per_step is None else min(iterations_per_step, total)
        sizes = (per_step,) * (total // per_step) + (total % per_step,) * bool(total % per_step)
        return cls(-(-per_device // calls) * len(devices), calls, sizes, NamedSharding(mesh, PartitionSpec("runs")),
                   NamedSharding(mesh, PartitionSpec()))

    def programs(self, trainer: TreeTrainer) -> tuple:
        """(init: keys [chunk, 2] -> carries, {n: (carries, lambdas [chunk], tree arrays) -> (carries, metrics
        [chunk, n, ...])}): jitted, vmapped over the runs; the tree an argument, so a program depends only on
        the tree's shapes."""
        init = jax.jit(jax.vmap(trainer.init), out_shardings=self.split, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
        programs = {n: jax.jit(jax.vmap(lambda carry, lam, arrays, n=n: trainer.on(arrays).run(carry, n, lam),
                                        in_axes=(0, 0, None)), out_shardings=self.split) for n in set(self.sizes)}
        return init, programs


class CompiledRuns(NamedTuple):
    """`train_runs`' programs compiled for one `_RunPlan` (`compile_runs`): they run on any tree of the shapes
    they were compiled for."""

    plan: _RunPlan
    init: Any  # jax.stages.Compiled: keys [chunk, 2] -> carries
    programs: dict  # {n: jax.stages.Compiled}: (carries, lambdas [chunk], tree arrays) -> (carries, metrics)


def compile_runs(trainer: TreeTrainer, runs: int, iterations_per_step: Optional[int] = None,
                 devices: Optional[Sequence[jax.Device]] = None,
                 max_runs_per_call: Optional[int] = None) -> CompiledRuns:
    """Compiles the programs `train_runs` calls for `runs` runs (same arguments), from the shapes of
    `trainer`'s tree only (its values may be a stand-in of zeros), running nothing -> them, for `train_runs`
    in this process; with JAX's persistent compilation cache on, `train_runs` in any process of this host
    also loads them instead of compiling."""
    plan = _RunPlan.of(trainer, runs, iterations_per_step, devices, max_runs_per_call)
    init, programs = plan.programs(trainer)
    keys = jax.ShapeDtypeStruct((plan.chunk, 2), jnp.uint32, sharding=plan.split)
    carries = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=plan.split),
                                     jax.eval_shape(init, keys))
    lambdas = jax.ShapeDtypeStruct((plan.chunk,), jnp.float32, sharding=plan.split)
    arrays = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=plan.whole),
                                    trainer.env.arrays)
    return CompiledRuns(plan, init.lower(keys).compile(),
                        {n: program.lower(carries, lambdas, arrays).compile() for n, program in programs.items()})


def train_runs(trainer: TreeTrainer, keys: chex.Array, cost_lambdas: chex.Array,
               iterations_per_step: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None,
               max_runs_per_call: Optional[int] = None, compiled: Optional[CompiledRuns] = None) -> RunSteps:
    """R independent fixed-lambda runs (run r from `keys[r]` at `cost_lambdas[r]`, [R] each) as one jitted
    program vmapped over the runs (`run`), called once per step of `iterations_per_step` iterations (None: one
    step; a shorter last step compiles a second program) and split over `devices` (default: this process's
    own). With `max_runs_per_call`, the runs go through the same program in equal chunks of at most that many
    per device (`CPU_RUNS_PER_CALL` on a CPU), one chunk after another. The runs are padded to fill the chunks
    with copies of the last. A run's arithmetic never crosses devices, so each device trains its share alone:
    on a CPU split into host devices (`--xla_force_host_platform_device_count`) the cores train runs side by
    side, which the small matmuls of one run cannot do. (The steps as a scan inside the program instead took
    1.14-1.40x the time per run on XLA:CPU.) `compiled`: `compile_runs`' programs for the same arguments (else
    they are traced and compiled, or loaded from the persistent cache, here). -> `RunSteps` as numpy arrays,
    leaves [R, S + 1, ...] and [R, num_iterations, ...]; the final params are `carries.params[:, -1]`."""
    runs = keys.shape[0]
    plan = _RunPlan.of(trainer, runs, iterations_per_step, devices, max_runs_per_call)
    if compiled is not None and compiled.plan != plan:
        raise ValueError(f"The compiled runs were planned as {compiled.plan}, these runs as {plan}: compile them "
                         "with the same runs, iterations per step, devices and runs per call.")
    chunk, calls = plan.chunk, plan.calls
    keys, cost_lambdas = (np.concatenate([x, np.repeat(x[-1:], chunk * calls - runs, axis=0)]) for x in
                          (np.asarray(keys), np.asarray(cost_lambdas, np.float32)))
    split, sizes = plan.split, plan.sizes
    init, programs = plan.programs(trainer) if compiled is None else (compiled.init, compiled.programs)
    arrays = jax.device_put(trainer.env.arrays, plan.whole)
    carries, metrics = [], []  # per call: [S + 1] carries, [S] steps' metrics
    for start in range(0, chunk * calls, chunk):
        lambdas = jax.device_put(cost_lambdas[start:start + chunk], split)
        carries.append([init(jax.device_put(keys[start:start + chunk], split))])
        metrics.append([])
        for n in sizes:
            carry, step_metrics = programs[n](carries[-1][-1], lambdas, arrays)
            carries[-1].append(carry)
            metrics[-1].append(step_metrics)
    # joined on the host: as a program, its hundreds of inputs took 7.3 s to compile (AVX2 host)
    carries, metrics = jax.device_get((carries, metrics))

    def joined(per_call: list, over_steps) -> chex.ArrayTree:
        """Each call's steps joined by `over_steps` (np.stack or np.concatenate) along axis 1, then the calls."""
        calls = [jax.tree_util.tree_map(lambda *x: over_steps(x, axis=1), *steps) for steps in per_call]
        return jax.tree_util.tree_map(lambda *x: np.concatenate(x)[:runs], *calls)

    return RunSteps(joined(carries, np.stack), joined(metrics, np.concatenate))


def greedy_paths(learner: Learner, params, env: TreeEnv, prompts: chex.Array, cost_lambda: float = 0.0):
    """Follows the argmax action from each prompt's root -> (quality [P], cost [P], actions [L, P]);
    an action after STOP is -1."""
    prompts = jnp.asarray(prompts)
    state = env.reset(prompts, jnp.float32(cost_lambda))
    actions = []
    for _ in range(env.num_hops):
        embedding, hop, cost_features, mask = env.observe(state)
        action = learner.act(params, None, embedding, hop, cost_features, state.cost_lambda, mask, greedy=True)
        actions.append(jnp.where(state.done, -1, action))
        state, _, _, _ = env.step(state, action)
    return env.arrays.quality[prompts, jnp.maximum(state.node, 0)], state.cost, jnp.stack(actions)

