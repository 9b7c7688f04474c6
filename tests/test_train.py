"""The training loop end to end on a pool of tiny random HF checkpoints (real loaders, sampler,
encoder, tasks and cache): exact resume after SIGKILL, metrics files, bad input."""

import copy
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from hrjax.config import ConfigError, base_config, run_config
from hrjax.errors import CheckpointError, TrainingDivergedError
from hrjax.train import load_data, train, tree_meta
from runs import config_file, config_of, finish, launch

TIMING = ("learner_seconds", "rollout_seconds", "episodes_per_s", "learner_fraction")
CACHE_COUNTERS = ("cache_hits", "cache_misses", "generated_tokens")  # online: the first run fills the cache


def saved_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def final_state(workdir: Path) -> dict:
    """The latest checkpoint's state, as flat {path: array}, read back by Orbax without a target."""
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    flat = {}

    def visit(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                visit(f"{prefix}/{k}", v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(f"{prefix}/{i}", v)
        else:
            flat[prefix] = np.asarray(node)

    visit("", restored.state)
    return flat


def metric_rows(workdir: Path, leave_out=()) -> list[dict]:
    """The run's metrics rows without the timing figures and the keys in `leave_out`."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in (*TIMING, *leave_out)} for r in rows]


@pytest.mark.parametrize("mode", ["tree", "online"])
def test_sigkill_then_resume_equals_an_unbroken_run_bit_for_bit(mode, tiny_pool, tmp_path):
    config = config_file(tmp_path / "config.py", tiny_pool, mode)
    finish(launch(config, tmp_path / "unbroken"))  # tree mode: builds the tree (or reuses it)

    kill_after = random.Random(f"{mode}-{os.getpid()}").randint(2, 8)  # a random point among 12 iterations
    broken = tmp_path / "broken"
    process = launch(config, broken)
    deadline = time.time() + 300
    while not (saved_steps(broken) and saved_steps(broken)[-1] >= kill_after):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and saved_steps(broken)[-1] < 12
    out = finish(launch(config, broken))
    assert "trained to iteration 12" in out

    unbroken, resumed = final_state(tmp_path / "unbroken"), final_state(broken)
    assert unbroken.keys() == resumed.keys() and len(unbroken) > 5
    for path in unbroken:
        assert unbroken[path].dtype == resumed[path].dtype
        assert unbroken[path].tobytes() == resumed[path].tobytes(), path  # bitwise, not approximately
    # rows past the kill were logged once; online: the unbroken run may have filled the response cache the others read
    assert metric_rows(tmp_path / "unbroken", CACHE_COUNTERS) == metric_rows(broken, CACHE_COUNTERS)


def test_metrics_checkpoints_and_tensorboard(tiny_pool, tmp_path):
    from tensorboardX.proto import event_pb2

    config = config_of(tiny_pool, iterations=6, **{"env.stop_action": True})
    result = train(config, tmp_path, progress=False)
    assert result.iteration == 6 and len(result.history) == 7
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # step 0: the untrained router's evaluation
    for key in ("return", "quality", "cost", "entropy", "approx_kl", "clip_fraction", "value_loss", "learning_rate",
                "explained_variance", "episodes_per_s", "learner_seconds", "hops"):
        assert all(np.isfinite(r[key]) for r in rows[1:]), key
    histogram = np.array(rows[-1]["action_histogram"])
    assert histogram.shape == (2, 3)  # 2 hops x (2 models + STOP)
    np.testing.assert_allclose(histogram[0].sum(), 1.0, rtol=1e-5)
    assert histogram[0, 2] == 0.0  # no STOP before the first answer
    assert [r["step"] for r in rows if "eval/value" in r] == [0, 3, 6]
    assert saved_steps(tmp_path) == [4, 5, 6]  # max_to_keep = 3
    assert len([p for p in (tmp_path / "best").iterdir() if p.name.isdigit()]) == 1
    assert json.loads((tmp_path / "config.json").read_text()) == config.to_dict()

    tags = set()
    for events in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        data = events.read_bytes()
        at = 0
        while at < len(data):  # TFRecord framing: length, crc, payload, crc
            length = int.from_bytes(data[at:at + 8], "little")
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            at += 16 + length
    assert {"return", "eval/quality", "actions/hop0/tiny-0", "actions/hop1/STOP"} <= tags

    # the same workdir with a longer run resumes (num_iterations may grow) and goes on from step 6
    longer = train(config_of(tiny_pool, iterations=8, **{"env.stop_action": True}), tmp_path, progress=False)
    assert [r["step"] for r in longer.history] == [7, 8]


def test_every_iteration_is_logged_when_a_step_runs_several(tiny_pool, tmp_path):
    train(config_of(tiny_pool, iterations=6, **{"train.iterations_per_step": 3}), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["return"]) for r in rows[1:])
    assert [r["step"] for r in rows if "episodes_per_s" in r] == [3, 6]  # a step's timing: on its last iteration
    assert [r["step"] for r in rows if "eval/value" in r] == [0, 6]


def test_workdir_of_another_config_is_refused(tiny_pool, tmp_path):
    train(config_of(tiny_pool, iterations=2), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"config.ppo.learning_rate: 0.001 vs 0.01.*new --workdir"):
        train(config_of(tiny_pool, iterations=2, **{"ppo.learning_rate": 0.01}), tmp_path, progress=False)


def test_a_config_saved_before_a_field_existed_resumes_while_the_field_keeps_its_default(tiny_pool):
    """An older hrjax wrote config.json without fields added since: they count as their defaults there."""
    from hrjax.config import config_difference

    current = config_of(tiny_pool).to_dict()
    saved = json.loads(json.dumps(current))
    del saved["task"]["mixture"], saved["env"]["context_view"]
    assert current["task"]["mixture"] == [] and current["env"]["context_view"] != "auto"
    assert config_difference(saved, current) == f"config.env.context_view: 'auto' vs {current['env']['context_view']!r}"
    saved["env"]["context_view"] = current["env"]["context_view"]
    assert config_difference(saved, current) is None
    del saved["ppo"]["entropy_coef"]
    current["ppo"]["entropy_coef"] = 0.5
    assert config_difference(saved, current) == "config.ppo.entropy_coef: 0.01 vs 0.5"


def test_a_kill_between_the_best_and_the_latest_save_resumes(tiny_pool, tmp_path):
    train(config_of(tiny_pool, iterations=3), tmp_path, progress=False)  # step 3: best/3, then checkpoints/3
    shutil.rmtree(tmp_path / "checkpoints" / "3")  # as if killed between the two saves
    assert train(config_of(tiny_pool, iterations=3), tmp_path, progress=False).iteration == 3
    assert saved_steps(tmp_path)[-1] == 3


def test_damaged_checkpoint_is_an_error_not_a_fresh_start(tiny_pool, tmp_path):
    train(config_of(tiny_pool, iterations=2), tmp_path, progress=False)
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f.parent):
            f.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"checkpoints/2: the checkpoint cannot be read.*delete"):
        train(config_of(tiny_pool, iterations=3), tmp_path, progress=False)


def test_nan_stops_naming_the_iteration_and_metric_and_keeps_the_last_good_checkpoint(tiny_pool, tmp_path):
    from hrjax.env.tree import load_tree, save_tree

    config = config_of(tiny_pool, iterations=4)
    train(config, tmp_path, progress=False)
    # the tree gets rebuilt with a scorer that returns NaN for one prompt
    data = load_data(config)
    meta = tree_meta(config, data.examples)
    (tree_file,) = [p for p in (Path(tiny_pool["cache_dir"]) / "trees").glob("*.npz")
                    if _meta_of(p) == json.loads(json.dumps(meta, sort_keys=True))]
    backup = tmp_path / "tree.npz"
    shutil.copy(tree_file, backup)
    tree = load_tree(tree_file, meta)
    tree.quality[:] = np.nan
    save_tree(tree, tree_file, meta)
    try:
        with pytest.raises(TrainingDivergedError, match=r"Iterations 5-5: metric '\w+' is nan.*iteration 4"):
            train(config_of(tiny_pool, iterations=8), tmp_path, progress=False)
    finally:
        shutil.copy(backup, tree_file)
    assert saved_steps(tmp_path)[-1] == 4
    assert train(config_of(tiny_pool, iterations=5), tmp_path, progress=False).iteration == 5  # 4 still restores


def _meta_of(path: Path) -> dict:
    with np.load(path) as data:
        return json.loads(str(data["meta"]))


def test_unknown_keys_and_bad_values_name_the_path():
    config = base_config()
    config.pool = [dict(name="a", checkpoint="x", base_rate=1.0)]
    fresh = lambda: copy.deepcopy(config.to_dict())  # noqa: E731
    mapping = fresh()
    mapping["ppo"]["lrr"] = 1.0
    with pytest.raises(ConfigError, match=r"config.ppo.lrr: unknown key.*learning_rate"):
        run_config(mapping)
    mapping = fresh()
    mapping["ppo"]["num_envs"] = "8"
    with pytest.raises(ConfigError, match=r"config.ppo.num_envs: expected int, got '8'"):
        run_config(mapping)
    mapping = fresh()
    mapping["pool"][0]["base_rate"] = -1.0
    with pytest.raises(ConfigError, match=r"config.pool\[0\].*base_rate must be >= 0"):
        run_config(mapping)
    mapping = fresh()
    mapping["mode"] = "offline"
    with pytest.raises(ConfigError, match=r"config.mode must be 'tree' or 'online'"):
        run_config(mapping)


@pytest.mark.parametrize("override, message, entry", [
    ("--config.ppo.lrr=0.1", "config.ppo.lrr: unknown key", ("experiments.train",)),
    ("--config.ppo.learning_rate=abc", "could not convert string to float: 'abc'", ("hrjax.cli", "train")),
])
def test_bad_command_line_overrides_exit_with_a_clear_message(override, message, entry, tiny_pool, tmp_path):
    process = launch(config_file(tmp_path / "config.py", tiny_pool), tmp_path / "run", override, entry=entry)
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and message in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_seeds_of_one_config_share_its_tree_run_and_train_as_if_alone(tiny_pool, tmp_path, monkeypatch):
    """Within `sharing_tree_runs`, a second seed of the same config reuses the first's tree and compiled programs
    (no new `_TreeRun`) and ends with the parameters a fresh one gives it, bit for bit; another config gets its
    own, and outside it every run makes its own."""
    import dataclasses

    import jax

    from hrjax import train as train_module

    made = []
    original = train_module._TreeRun
    monkeypatch.setattr(train_module, "_TreeRun", lambda *args: made.append(args[0].seed) or original(*args))
    config = config_of(tiny_pool, iterations=4)
    with train_module.sharing_tree_runs():
        train(config, tmp_path / "seed0", progress=False)
        shared = train(dataclasses.replace(config, seed=1), tmp_path / "seed1", progress=False).params
        assert made == [config.seed]
        train(config_of(tiny_pool, iterations=4, **{"ppo.learning_rate": 3e-3}), tmp_path / "other", progress=False)
        assert made == [config.seed, config.seed]
    alone = train(dataclasses.replace(config, seed=1), tmp_path / "seed1-alone", progress=False).params
    train(dataclasses.replace(config, seed=1), tmp_path / "seed1-again", progress=False)
    assert made == [config.seed, config.seed, 1, 1]
    for a, b in zip(jax.tree_util.tree_leaves(shared), jax.tree_util.tree_leaves(alone)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_a_seed_run_computed_with_the_sweep_logs_and_checkpoints_as_its_own_run(tiny_pool, tmp_path, monkeypatch):
    """`hrjax evaluate`'s seed runs are computed in one program with the sweep, then written by `train` from the
    computed steps: the same metrics, evaluations, checkpoints and params as the run computed step by step (up
    to float32 rounding between the batched and unbatched programs), with none of its steps recomputed. A run
    resumed from a checkpoint of the computed steps goes on reading them (bit for bit); one resumed from a
    checkpoint they do not hold computes its steps itself, bit for bit as the run it came from."""
    import dataclasses

    import jax

    from hrjax import train as train_module
    from hrjax.pipeline import fixed_lambda_runs
    from hrjax.train import ComputedRun, load_or_build_tree

    config = config_of(tiny_pool, iterations=6, **{"train.iterations_per_step": 2, "train.eval_every": 1,
                                                   "train.local_processes": 1})
    own = train(config, tmp_path / "own", progress=False)
    computed_steps = []
    original = train_module._TreeRun.steps
    monkeypatch.setattr(train_module._TreeRun, "steps",
                        lambda self, carry, n: computed_steps.append(n) or original(self, carry, n))
    data = load_data(config)
    tree = load_or_build_tree(config, data.examples, progress=False)
    lam = config.env.cost_lambda
    runs = [(config.seed, lam), (config.seed + 1, lam), (config.seed, 2.0)]  # (seed, cost lambda)
    steps = fixed_lambda_runs(config, tree, data.rows("train"), runs, 2)
    assert steps.carries.iteration.tolist() == [[0, 2, 4, 6]] * 3 and steps.metrics["return"].shape == (3, 6)
    run = lambda r: ComputedRun(jax.tree_util.tree_map(lambda x: x[r], steps), 1.5, 3)  # noqa: E731
    ahead = train(config, tmp_path / "ahead", progress=False, computed=run(0))
    assert computed_steps == []
    assert saved_steps(tmp_path / "ahead") == saved_steps(tmp_path / "own") == [2, 4, 6]
    got, want = metric_rows(tmp_path / "ahead"), metric_rows(tmp_path / "own")
    assert [sorted(r) for r in got] == [sorted(r) for r in want] and any("eval/quality" in r for r in got)
    for g, w in zip(got, want):
        for k in g:
            np.testing.assert_allclose(g[k], w[k], atol=1e-4, err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(ahead.params), jax.tree_util.tree_leaves(own.params)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    learner = [json.loads(line)["learner_seconds"] for line in (tmp_path / "ahead" / "metrics.jsonl").read_text()
               .splitlines() if "learner_seconds" in line]
    assert learner == pytest.approx([1.5 * 2 / (3 * 6)] * 3)  # each step's share of the program's 1.5 s

    def cut_back_to_step_2(source, name):
        shutil.copytree(tmp_path / source, tmp_path / name)
        for step in (4, 6):
            shutil.rmtree(tmp_path / name / "checkpoints" / str(step))
        return tmp_path / name

    resumed = train(config, cut_back_to_step_2("ahead", "resumed"), progress=False, computed=run(0))
    assert computed_steps == []
    foreign = train(config, cut_back_to_step_2("own", "foreign"), progress=False, computed=run(1))  # another seed's
    assert computed_steps == [2, 2]
    for got, want in ((resumed, ahead), (foreign, own)):
        for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want.params)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert final_state(tmp_path / "resumed").keys() == final_state(tmp_path / "ahead").keys()
    with pytest.raises(ValueError, match="Only a tree-mode run on one device"):
        train(dataclasses.replace(config, mode="online"), tmp_path / "online", progress=False, computed=run(0))
