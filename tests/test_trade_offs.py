"""`hrjax trade_offs` (hrjax.trade_offs): lambda-conditioned routers against fixed-lambda ones, on the reduced
main job's path tree (cached by the session's `reduced_quickstart`), each figure recomputed here from the returned
parameters' greedy paths."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from runs import reduced_specialist_config

from hrjax.agent.tree_mode import TreeEnv, greedy_paths, make_train
from hrjax.config import ConfigError
from hrjax.pool import resolve_pool
from hrjax.trade_offs import RESULT_JSON, RESULT_MARKDOWN, check_conditioned, compare_trade_offs
from hrjax.train import load_data, load_or_build_tree


def _conditioned(config, **ppo):
    return dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, **ppo))


def test_trade_offs_needs_a_conditioned_range_that_covers_the_sweep(tmp_path):
    config = reduced_specialist_config(tmp_path)
    with pytest.raises(ConfigError, match="lambda_range"):
        check_conditioned(config)
    with pytest.raises(ConfigError, match=r"\[2\.0\] lie outside"):
        check_conditioned(_conditioned(config, lambda_range=(0.0, 1.0)))
    assert check_conditioned(_conditioned(config, lambda_range=(0.0, 2.0))) == (0.0, 2.0)


def test_trade_offs_scores_both_kinds_at_every_lambda(reduced_quickstart, tmp_path):
    root, _ = reduced_quickstart
    config = _conditioned(reduced_specialist_config(root), lambda_range=(0.0, 2.0))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, num_iterations=20),
                                 evaluate=dataclasses.replace(config.evaluate, seeds=2))
    run = compare_trade_offs(config, tmp_path / "run", progress=False)

    config = resolve_pool(config, progress=False)  # the pool the run resolved (cached by the fixture)
    data = load_data(config)
    tree = load_or_build_tree(config, data.examples, progress=False)
    env = TreeEnv.create(tree, config.env)
    rows = data.rows("eval")
    learners = {kind: make_train(ppo, config.network, config.env, tree, data.rows("train"), 20).learner
                for kind, ppo in (("conditioned", config.ppo),
                                  ("fixed", dataclasses.replace(config.ppo, lambda_range=None)))}

    def values(kind, params, lam):
        quality, cost, _ = jax.vmap(lambda p: greedy_paths(learners[kind], p, env, rows, lam))(params)
        return np.asarray(quality).mean(axis=1) - lam * np.asarray(cost).mean(axis=1)

    assert [row["cost_lambda"] for row in run.result["rows"]] == list(config.evaluate.cost_lambdas)
    assert sorted(run.fixed) == sorted(config.evaluate.cost_lambdas)
    for row in run.result["rows"]:
        lam = row["cost_lambda"]
        fixed, conditioned = values("fixed", run.fixed[lam], lam), values("conditioned", run.conditioned, lam)
        np.testing.assert_allclose(row["fixed"]["seed_values"], fixed, atol=1e-6)
        np.testing.assert_allclose(row["conditioned"]["seed_values"], conditioned, atol=1e-6)
        assert row["difference"] == pytest.approx(conditioned.mean() - fixed.mean(), abs=1e-6)
        assert row["worst_seed_difference"] == pytest.approx(conditioned.min() - fixed.mean(), abs=1e-6)
    assert run.result["worst_difference"] == min(row["difference"] for row in run.result["rows"])
    saved = json.loads((tmp_path / "run" / RESULT_JSON).read_text())
    assert saved["rows"] == json.loads(json.dumps(run.result["rows"]))
    table = (tmp_path / "run" / RESULT_MARKDOWN).read_text()
    assert table.count("\n| ") == 1 + len(config.evaluate.cost_lambdas)  # the header and one row per lambda
