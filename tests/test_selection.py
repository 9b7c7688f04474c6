"""The training loop's own split: its eval/* metrics and the best/ checkpoint come from selection
prompts held apart from the reported ones, and a fresh run logs them from iteration 0 (the untrained
router). Runs over the tiny random pool (tests/runs.py)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hrjax.agent.tree_mode import greedy_paths
from hrjax.config import ConfigError, TaskConfig
from hrjax.train import _TreeRun, load_data, train
from runs import config_of

EVAL_KEYS = {"eval/quality", "eval/cost", "eval/value"}


def logged(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_selection_split_equal_to_the_reported_one_is_refused():
    with pytest.raises(ConfigError, match=r"select_split and eval_split are both 'test'.*best checkpoint"):
        TaskConfig(select_split="test", eval_split="test")
    with pytest.raises(ConfigError, match=r"select_split is the training split.*num_train"):
        TaskConfig(select_split="train")


def test_selection_prompts_come_from_their_own_split_or_follow_the_training_ones(tiny_pool):
    data = load_data(config_of(tiny_pool, iterations=2))
    assert (len(data.train), len(data.select), len(data.eval)) == (8, 4, 4)  # train, validation, test
    ids = [{e.id for e in part} for part in (data.train, data.select, data.eval)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert data.examples == data.train + data.select + data.eval  # the path tree's rows, in this order
    np.testing.assert_array_equal(data.rows("select"), [8, 9, 10, 11])
    # a task without a spare split: the selection prompts are the num_select after the first num_train
    tail = load_data(config_of(tiny_pool, iterations=2, **{"task.select_split": "train", "task.num_train": 5,
                                                          "task.num_select": 2}))
    assert [e.id for e in tail.train + tail.select] == [e.id for e in data.train[:7]]
    assert [e.id for e in tail.eval] == [e.id for e in data.eval]


def test_a_fresh_run_logs_the_untrained_router_at_step_0_on_the_selection_prompts(tiny_pool, tmp_path):
    config = config_of(tiny_pool, iterations=2)
    result = train(config, tmp_path, progress=False)
    rows = logged(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"step"} | EVAL_KEYS and EVAL_KEYS <= set(rows[2]) and not EVAL_KEYS & set(rows[1])
    assert result.history[0] == rows[0]
    # step 0 scores the initial parameters' greedy paths on the selection prompts (tree rows 8-11)
    run = _TreeRun(config, load_data(config), None, progress=False)
    initial = run.init(jax.random.PRNGKey(config.seed)).params
    quality, cost, _ = greedy_paths(run.trainer.learner, initial, run.trainer.env, np.arange(8, 12),
                                    config.env.cost_lambda)
    assert (rows[0]["eval/quality"], rows[0]["eval/cost"]) == pytest.approx((float(quality.mean()),
                                                                              float(cost.mean())))
    # a resumed run goes on from its checkpoint and does not log step 0 again
    train(config_of(tiny_pool, iterations=4), tmp_path, progress=False)
    assert [r["step"] for r in logged(tmp_path)] == [0, 1, 2, 3, 4]
