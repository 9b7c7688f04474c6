"""One policy for every trade-off: lambda-conditioned routers against fixed-lambda routers, lambda by lambda.

`compare_trade_offs(config, workdir)` trains, on the run's path tree, `config.evaluate.seeds` lambda-conditioned
routers (`config.ppo.lambda_range`: lambda drawn per episode and fed to the network) and, with the same PPO settings
but lambda fixed, one router per seed at each lambda of `config.evaluate.cost_lambdas` (each kind one jitted program
vmapped over seeds, and over lambdas for the fixed ones, as `hrjax evaluate`'s sweep; final parameters of every run,
no checkpoint selection on either side). Both are scored on the held-out prompts at every lambda: the value
quality - lambda * cost of their greedy paths, the conditioned router fed that lambda. The chief writes
trade_offs.json and trade_offs.md to the workdir (local or gs://), and the job ends by printing its phase timings.

Figures per lambda: each kind's value, quality and cost (mean and 95% t-interval over seeds, and the seeds'
values), `difference` = conditioned - fixed mean value, `worst_seed_difference` = the lowest conditioned seed's value
minus the fixed mean. Overall: `worst_difference` (the lowest `difference` over the sweep).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from hrjax.config import ConfigError, RunConfig
from hrjax.pipeline import PhaseClock, sweep_routers, timing_line
from hrjax.pool import resolve_pool
from hrjax.train import load_data, load_or_build_tree

RESULT_JSON, RESULT_MARKDOWN = "trade_offs.json", "trade_offs.md"


class TradeOffs(NamedTuple):
    result: dict  # `comparison`, plus 'lambda_range' and 'seconds' (wall seconds per phase, then 'total')
    conditioned: Any  # the conditioned routers' parameters, [S, ...] leaves
    fixed: dict  # {cost_lambda: the fixed-lambda routers' parameters, [S, ...] leaves}


def check_conditioned(config: RunConfig) -> tuple[float, float]:
    """The conditioned range, which must cover every lambda of the sweep; a ConfigError naming the fix."""
    if not config.ppo.conditioned:
        raise ConfigError("Comparing trade-offs needs a lambda-conditioned router: set config.ppo.lambda_range "
                          "(e.g. --config.ppo.lambda_range='(0.0, 2.0)'), or use "
                          "experiments/configs/specialist_world.py:conditioned.")
    low, high = config.ppo.lambda_range
    outside = [lam for lam in config.evaluate.cost_lambdas if not low <= lam <= high]
    if outside:
        raise ConfigError(f"config.evaluate.cost_lambdas {outside} lie outside config.ppo.lambda_range "
                          f"({low}, {high}), where the conditioned router was never trained: widen the range or drop "
                          "them from the sweep.")
    return low, high


def held_out_values(learner, params, env_config, tree, rows: np.ndarray, cost_lambda: float) -> dict[str, np.ndarray]:
    """Greedy paths of `params` ([S, ...] leaves, or {cost_lambda: [S, ...]}) on tree `rows` [P] at `cost_lambda`
    -> {"value", "quality", "cost"}: [S] means over the prompts."""
    from hrjax.evaluate import method_eval, one_hot_nodes, ppo_policy

    nodes = ppo_policy(learner, params, env_config)(tree, rows, cost_lambda)  # [S, P]
    result = method_eval(tree, rows, one_hot_nodes(nodes, len(tree.model)))
    quality, cost = result.quality.mean(axis=1), result.cost.mean(axis=1)
    return {"value": quality - cost_lambda * cost, "quality": quality, "cost": cost}


def comparison(lambdas: Sequence[float], fixed: Sequence[dict], conditioned: Sequence[dict]) -> dict:
    """The JSON-able comparison of `held_out_values` per lambda (fixed-lambda routers vs conditioned ones)."""
    from hrjax.evaluate import t_interval

    rows = []
    for lam, f, c in zip(lambdas, fixed, conditioned):
        kinds = {name: {key: list(t_interval(values[key])) for key in ("value", "quality", "cost")}
                 | {"seed_values": [float(v) for v in values["value"]]}
                 for name, values in (("fixed", f), ("conditioned", c))}
        fixed_mean = float(np.mean(f["value"]))
        rows.append({"cost_lambda": float(lam), **kinds, "difference": float(np.mean(c["value"])) - fixed_mean,
                     "worst_seed_difference": float(np.min(c["value"])) - fixed_mean})
    return {"num_seeds": len(fixed[0]["value"]), "rows": rows,
            "worst_difference": min(row["difference"] for row in rows)}


def markdown(result: dict) -> str:
    """The comparison as a Markdown table (value = quality - lambda x cost on the held-out prompts)."""
    def cell(interval):
        mean, low, high = interval
        return f"{mean:.3f} [{low:.3f}, {high:.3f}]"

    lines = [f"Held-out value (quality - lambda x cost), mean and 95% interval over {result['num_seeds']} seeds; "
             "difference = conditioned - fixed (mean), worst seed = the lowest conditioned seed - the fixed mean.", "",
             "| lambda | fixed-lambda routers | conditioned router | difference | worst seed | "
             "fixed quality / cost | conditioned quality / cost |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        f, c = row["fixed"], row["conditioned"]
        lines.append(f"| {row['cost_lambda']:g} | {cell(f['value'])} | {cell(c['value'])} | {row['difference']:+.3f} | "
                     f"{row['worst_seed_difference']:+.3f} | {f['quality'][0]:.3f} / {f['cost'][0]:.3f} | "
                     f"{c['quality'][0]:.3f} / {c['cost'][0]:.3f} |")
    lines += ["", f"worst difference over the sweep: {result['worst_difference']:+.3f}"]
    return "\n".join(lines) + "\n"


def compare_trade_offs(config: RunConfig, workdir: str | os.PathLike, progress: bool = True) -> TradeOffs:
    """Trains and compares both kinds of router (module docstring)."""
    from hrjax.agent.ppo import Learner
    from hrjax.agent.tree_mode import make_train
    from hrjax.parallel import is_chief
    from hrjax.rundir import locked_run_dir, write_text

    check_conditioned(config)
    clock = PhaseClock()
    with locked_run_dir(workdir) as workdir:
        with clock.phase("pool"):
            config = resolve_pool(config, progress)
        with clock.phase("tree"):
            data = load_data(config)
            tree = load_or_build_tree(config, data.examples, progress)
        train_rows, test_rows = data.rows("train"), data.rows("eval")
        seeds = [config.seed + s for s in range(config.evaluate.seeds)]
        lambdas = list(config.evaluate.cost_lambdas)
        with clock.phase("conditioned routers"):
            trainer = make_train(config.ppo, config.network, config.env, tree, train_rows,
                                 config.train.num_iterations)
            keys = jax.numpy.stack([jax.random.PRNGKey(s) for s in seeds])
            conditioned = jax.device_get(jax.jit(jax.vmap(lambda key: trainer.train(key)[0]))(keys))
        fixed_config = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, lambda_range=None))
        with clock.phase("fixed-lambda routers"):
            fixed = sweep_routers(fixed_config, tree, train_rows, seeds, lambdas)
        with clock.phase("evaluation"):
            learner = trainer.learner  # the fixed routers' network differs only by its missing lambda input
            fixed_learner = Learner(fixed_config.ppo, config.network, learner.num_actions, learner.num_hops,
                                    config.train.num_iterations)
            result = comparison(
                lambdas,
                [held_out_values(fixed_learner, fixed, config.env, tree, test_rows, lam) for lam in lambdas],
                [held_out_values(trainer.learner, conditioned, config.env, tree, test_rows, lam) for lam in lambdas])
        result["lambda_range"] = list(config.ppo.lambda_range)
        result["seconds"] = clock.with_total()
        if is_chief():
            write_text(workdir / RESULT_JSON, json.dumps(result, indent=1, sort_keys=True))
            write_text(workdir / RESULT_MARKDOWN, markdown(result))
            print(timing_line(result["seconds"]), flush=True)
    return TradeOffs(result, conditioned, fixed)
