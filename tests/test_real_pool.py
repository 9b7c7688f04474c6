"""End to end on the real offline pool (SmolLM2-135M-Instruct + Gemma-3-270M, both from GGUF) over
reasoning-gym items: rollout, response cache and path tree agree and never generate twice."""

import numpy as np
import pytest

from hrjax import assets
from hrjax.env.cache import ResponseCache
from hrjax.env.mdp import EnvConfig, RoutingEnv, rollout
from hrjax.env.tree import build_tree
from hrjax.models.encoder import load_encoder
from hrjax.pool import ModelSpec, Pool


@pytest.fixture(scope="module")
def real_pool():
    return Pool.from_specs([ModelSpec("smollm2", str(assets.smollm2_gguf_path()), base_rate=1.0),
                            ModelSpec("gemma3", str(assets.gemma3_gguf_path()), base_rate=2.0)])


def test_real_pool_rollout_cache_and_tree(real_pool, tmp_path):
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=7)
    entries = list(dataset)
    questions = [e["question"] for e in entries]
    quality = lambda entry, text: float(dataset.score_answer(text.strip(), entry))  # noqa: E731
    config = EnvConfig(num_hops=2, max_new_tokens=16, cost_lambda=0.1)
    env = RoutingEnv(real_pool, load_encoder(), quality, config, ResponseCache(tmp_path / "cache"))

    actions = np.array([[0, 1, 1], [1, 0, 1]])
    episode = rollout(env, entries, questions, lambda obs: actions[int(obs.hop[0])])
    assert env.cache.stats.misses == 6 and episode.tokens_out.min() > 0
    texts = [r.text for r in env.cache.entries.values()]
    assert all(isinstance(t, str) for t in texts) and any(t.strip() for t in texts)

    tree = build_tree(env, entries, questions, progress=False)
    assert env.cache.stats.misses == 3 * (2 + 4)  # the rollout's 6 answers came from the cache
    for i in range(3):
        node = tree.node_of_path(actions[:, i].tolist())
        assert tree.quality[i, node] == episode.quality[i]
        assert tree.path_cost()[i, node] == pytest.approx(episode.total_cost[i], rel=1e-6)
    # costs are the base rates times the real token counts
    rates = np.array([1.0, 2.0])[tree.model]
    np.testing.assert_allclose(tree.cost * env.cost_unit, rates * (tree.tokens_in + tree.tokens_out), rtol=1e-6)

    # a new process over the persisted cache regenerates nothing
    again = RoutingEnv(real_pool, load_encoder(), quality, config, ResponseCache(tmp_path / "cache"))
    rebuilt = build_tree(again, entries, questions, progress=False)
    assert again.cache.stats.misses == 0 and again.cache.stats.hits == 18
    np.testing.assert_array_equal(rebuilt.tokens_out, tree.tokens_out)


def test_the_cpu_pool_mixture_asks_few_shot_and_answers_end_at_the_line(tmp_path):
    """`cpu_pool.py:mixture`: four reasoning-gym tasks at their configured counts; every hop is a few-shot
    completion (no chat template) whose answer generation ends at the line's end."""
    import collections
    import importlib.util
    from pathlib import Path

    from hrjax.config import run_config
    from hrjax.env.mdp import Context, hop_prompt
    from hrjax.train import load_data, quality_fn

    spec = importlib.util.spec_from_file_location(
        "cpu_pool", Path(__file__).resolve().parents[1] / "experiments/configs/cpu_pool.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw = module.get_config("mixture")
    raw.task.data_dir = str(tmp_path / "data")
    config = run_config(raw.to_dict())
    data = load_data(config)
    per_task = collections.Counter((e.task, part) for part in ("train", "select", "eval") for e in getattr(data, part))
    assert per_task == {(task, part): count for task in module.MIXTURE_TASKS
                        for part, count in (("train", 80), ("select", 16), ("eval", 50))}

    pool = Pool.from_specs(config.pool[:1])  # SmolLM2: what a hop looks like is the same for both members
    questions = [next(e for e in data.eval if e.task == task) for task in module.MIXTURE_TASKS]
    env = RoutingEnv(pool, load_encoder(), quality_fn(config), config.env, ResponseCache(tmp_path / "cache"))
    hop = env.respond(0, [Context(e.question) for e in questions])
    first = hop.responses
    prompt = pool.models[0].tokenizer.decode(hop_prompt(pool.models[0], config.env.template, Context(
        questions[0].question, (first[0],))))
    assert prompt.startswith(module.FEW_SHOT.split("{message}")[0]) and "<|im_start|>" not in prompt
    assert prompt.endswith(f"Question: {questions[0].question} (A first attempt answered: {first[0].text}. "
                           "Check it.)\nAnswer:")
    for answer, tokens_out in zip(first, hop.tokens_out):  # stopped at the newline, inside the 16-token budget
        assert "\n" not in answer.text and answer.text.strip() and 0 < tokens_out < 16
