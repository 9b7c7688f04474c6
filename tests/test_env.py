"""The routing MDP on a tiny random pool: costs, contexts, masks, STOP, caching and counting."""

import numpy as np
import pytest

from hrjax import assets
from hrjax.env.cache import ResponseCache
from hrjax.env.mdp import Answer, Context, EmbeddingMemo, EnvConfig, RoutingEnv, hop_prompt, rollout
from hrjax.env.tree import build_tree, load_tree, save_tree, tree_structure
from hrjax.evaluate import oracle_nodes
from hrjax.models.encoder import load_encoder
from hrjax.pool import ModelSpec, Pool
from tiny_models import make_tiny_pool_model

RATES = (1.0, 3.0, 0.5)
QUESTIONS = ["What is two plus two?", "Name a colour.", "Spell cat backwards.", "Is water wet?", "Count to three."]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    specs = []
    for i, rate in enumerate(RATES):
        path = make_tiny_pool_model(tmp_path_factory.mktemp(f"pool{i}"), assets.minilm_path(), seed=i)
        specs.append(ModelSpec(f"m{i}", str(path), base_rate=rate))
    return Pool.from_specs(specs)


class GenerationCounter:
    """Wraps each pool model's sampler to record how many prompts each one generated for."""

    def __init__(self, pool, monkeypatch):
        self.rows = [0] * len(pool)
        for i, model in enumerate(pool.models):
            original = model.sampler.generate_tokens

            def counted(prompts, sampling, _i=i, _original=original):
                self.rows[_i] += len(prompts)
                return _original(prompts, sampling)
            monkeypatch.setattr(model.sampler, "generate_tokens", counted)


def quality_by_length(example, response):
    return float(len(response) % 2)


def make_env(pool, encoder, cache=None, **config):
    return RoutingEnv(pool, encoder, quality_by_length, EnvConfig(max_new_tokens=8, **config), cache)


def fixed_policy(actions_per_hop):
    hop_actions = iter(actions_per_hop)
    return lambda obs: next(hop_actions)


def test_costs_contexts_and_shapes(pool, encoder):
    env = make_env(pool, encoder, num_hops=2)
    state, obs = env.reset(list(range(3)), QUESTIONS[:3])
    assert obs.embedding.shape == (3, env.observation_dim) and obs.action_mask.shape == (3, 3)
    assert env.observation_dim == 2 * encoder.dim  # the text default: question and latest answer
    assert obs.hop.tolist() == [0, 0, 0] and np.all(obs.cost == 0)
    actions = np.array([0, 1, 2])
    result = env.step(state, actions)
    for i, a in enumerate(actions):
        spec = pool.models[a].spec
        expected = spec.base_rate * (result.tokens_in[i] + result.tokens_out[i])
        assert result.state.cost[i] * env.cost_unit == pytest.approx(expected, rel=1e-6)
        context = result.state.contexts[i]
        assert context.question == QUESTIONS[i] and len(context.responses) == 1
        # the response is the chosen model's own greedy answer to the hop-0 prompt
        prompt = pool.models[a].encode_prompt(QUESTIONS[i])
        assert result.tokens_in[i] == len(prompt)
        own = pool.models[a].sampler.generate_tokens([prompt], env.sampling)[0]
        assert result.tokens_out[i] == len(own.tokens)
    assert not result.done.any() and env.observe(result.state).hop.tolist() == [1, 1, 1]
    assert np.all(result.reward == 0)  # cost charged at the end by default
    final = env.step(result.state, np.array([2, 2, 0]))
    assert final.done.all()
    assert all(len(c.responses) == 2 for c in final.state.contexts)
    lam = env.config.cost_lambda
    np.testing.assert_allclose(final.reward, final.state.quality - lam * final.state.cost)


def test_one_hop_is_one_shot_routing(pool, encoder):
    env = make_env(pool, encoder, num_hops=1, cost_lambda=0.5)
    episode = rollout(env, list(range(4)), QUESTIONS[:4], lambda obs: np.array([0, 1, 2, 1]))
    assert episode.action.shape == (1, 4) and episode.done.all() and episode.valid.all()
    expected = episode.quality - 0.5 * episode.total_cost
    np.testing.assert_allclose(episode.reward[0], expected, rtol=1e-6)


def test_step_cost_timing_charges_each_hop(pool, encoder):
    env = make_env(pool, encoder, num_hops=2, cost_lambda=2.0, cost_timing="step")
    episode = rollout(env, list(range(2)), QUESTIONS[:2], fixed_policy([np.array([1, 0]), np.array([2, 1])]))
    step_costs = episode.cost_features[1, :, 1]  # the first hop's cost, as observed at hop 1
    np.testing.assert_allclose(episode.reward[0], -2.0 * step_costs, rtol=1e-6)
    np.testing.assert_allclose(episode.reward.sum(0), episode.quality - 2.0 * episode.total_cost, rtol=1e-5)


def test_stop_ends_episode_and_is_masked_at_hop_zero(pool, encoder):
    env = make_env(pool, encoder, num_hops=3, stop_action=True)
    assert env.num_actions == 4
    state, obs = env.reset([0, 1], QUESTIONS[:2])
    assert obs.action_mask[:, 3].tolist() == [False, False]
    with pytest.raises(ValueError, match="STOP is not allowed at hop 0"):
        env.step(state, np.array([3, 0]))
    episode = rollout(env, [0, 1], QUESTIONS[:2],
                      fixed_policy([np.array([0, 1]), np.array([3, 2]), np.array([0, 3])]))
    assert episode.valid.tolist() == [[True, True], [True, True], [False, True]]
    assert episode.done[1].tolist() == [True, False] and episode.done[2].tolist() == [True, True]
    assert episode.tokens_out[1, 0] == 0  # STOP generates nothing
    np.testing.assert_allclose(episode.reward[1, 0], episode.quality[0])


def test_each_prompt_hop_generated_once_by_its_model_and_then_cached(pool, encoder, monkeypatch, tmp_path):
    counter = GenerationCounter(pool, monkeypatch)
    env = make_env(pool, encoder, cache=ResponseCache(tmp_path / "cache"), num_hops=2)
    hop_actions = [np.array([0, 1, 1, 2, 0]), np.array([2, 2, 0, 1, 1])]
    first = rollout(env, list(range(5)), QUESTIONS, fixed_policy(hop_actions))
    expected = np.bincount(np.concatenate(hop_actions), minlength=3).tolist()
    assert counter.rows == expected
    assert env.cache.stats.misses == 10 and env.cache.stats.hits == 0
    # a second identical rollout, even from a fresh process reading the persisted cache, generates nothing
    fresh = make_env(pool, encoder, cache=ResponseCache(tmp_path / "cache"), num_hops=2)
    second = rollout(fresh, list(range(5)), QUESTIONS, fixed_policy(hop_actions))
    assert counter.rows == expected
    assert fresh.cache.stats.hits == 10 and fresh.cache.stats.misses == 0
    np.testing.assert_array_equal(first.quality, second.quality)
    np.testing.assert_array_equal(first.tokens_out, second.tokens_out)


def test_long_answer_budgets_generate_in_flight_with_the_same_answers(pool, encoder, monkeypatch):
    from hrjax.env.mdp import INFLIGHT_MIN_TOKENS

    streamed = []  # rows per in-flight call (the real engine runs: this only counts)
    for model in pool.models:
        def counted(prompts, sampling, slots, _original=model.sampler.generate_stream):
            streamed.append(len(prompts))
            return _original(prompts, sampling, slots)
        monkeypatch.setattr(model.sampler, "generate_stream", counted)
    contexts = [Context(q) for q in QUESTIONS]
    make_env(pool, encoder).respond(1, contexts)  # a short budget: static batches
    assert streamed == []
    env = RoutingEnv(pool, encoder, quality_by_length, EnvConfig(max_new_tokens=INFLIGHT_MIN_TOKENS))
    hop = env.respond(1, contexts)
    assert streamed == [len(QUESTIONS)]
    model = pool.models[1]
    static = model.sampler.generate_tokens([hop_prompt(model, env.config.template, c) for c in contexts], env.sampling)
    assert hop.tokens_out.tolist() == [len(g.tokens) for g in static]
    assert [a.text for a in hop.responses] == [model.sampler.with_text(g).text for g in static]


def test_bad_actions_are_named(pool, encoder):
    env = make_env(pool, encoder)
    state, _ = env.reset([0, 1], QUESTIONS[:2])
    with pytest.raises(ValueError, match=r"actions must lie in \[0, 3\)"):
        env.step(state, np.array([0, 7]))
    with pytest.raises(ValueError, match=r"actions must have shape \(2,\)"):
        env.step(state, np.array([0]))


def test_tree_structure_by_hand():
    model, parent, depth = tree_structure(2, 2)
    assert model.tolist() == [0, 1, 0, 1, 0, 1]
    assert parent.tolist() == [-1, -1, 0, 0, 1, 1]
    assert depth.tolist() == [0, 0, 1, 1, 1, 1]


def test_tree_generates_every_path_once_and_matches_rollouts(pool, encoder, monkeypatch, tmp_path):
    counter = GenerationCounter(pool, monkeypatch)
    n, m = 4, len(pool)
    env = make_env(pool, encoder, cache=ResponseCache(tmp_path / "cache"), num_hops=2, cost_lambda=0.3)
    hop_actions = [np.array([0, 1, 2, 2]), np.array([1, 1, 0, 2])]
    episode = rollout(env, list(range(n)), QUESTIONS[:n], fixed_policy(hop_actions))
    rollout_generations = sum(counter.rows)
    assert rollout_generations == 2 * n

    embedded = []  # every context the build embeds: none after the last hop, where no decision is taken
    monkeypatch.setattr(env, "embed", lambda contexts, memo=None: embedded.extend(contexts) or
                        RoutingEnv.embed(env, contexts, memo))
    tree = build_tree(env, list(range(n)), QUESTIONS[:n], progress=False)
    monkeypatch.undo()
    k = m + m * m
    assert tree.quality.shape == (n, k) and tree.embedding.shape == (n, m, env.observation_dim)
    assert sorted({len(c.responses) for c in embedded}) == [0, 1]
    # every (prompt, node) answered exactly once overall: the rollout's answers came from the cache
    assert sum(counter.rows) == n * k
    assert env.cache.stats.hits == rollout_generations  # the rollout's nodes were not generated again

    for i in range(n):
        path = [int(hop_actions[0][i]), int(hop_actions[1][i])]
        node = tree.node_of_path(path)
        assert tree.model[node] == path[1] and tree.model[tree.parent[node]] == path[0]
        assert tree.quality[i, node] == episode.quality[i]
        assert tree.path_cost()[i, node] == pytest.approx(episode.total_cost[i], rel=1e-6)
        assert tree.tokens_out[i, node] == episode.tokens_out[1, i]
    np.testing.assert_allclose(tree.root_embedding, episode.embedding[0], atol=1e-6)
    first_hop = [tree.node_of_path([int(a)]) for a in hop_actions[0]]
    np.testing.assert_allclose(tree.embedding[np.arange(n), first_hop], episode.embedding[1], atol=1e-5)

    best = oracle_nodes(tree, np.arange(n), [0.3], stop_action=False)[0]  # the oracle bounds the rollout
    fixed = episode.quality - 0.3 * episode.total_cost
    assert np.all(tree.value(0.3)[np.arange(n), best] >= fixed - 1e-6)

    # a second build over a warm cache generates nothing, in chunks too; the saved tree round-trips
    again = build_tree(env, list(range(n)), QUESTIONS[:n], progress=False)
    chunked = build_tree(env, list(range(n)), QUESTIONS[:n], progress=False, chunk_size=5)
    assert sum(counter.rows) == n * k
    for name in tree._fields:  # the encoder pads each chunk to its own longest text: embeddings to rounding
        np.testing.assert_allclose(getattr(chunked, name), getattr(tree, name), atol=1e-5 if "embedding" in name else 0)
    meta = {"pool": [s.spec.name for s in pool.models], "hops": 2}
    save_tree(again, tmp_path / "tree.npz", meta)
    loaded = load_tree(tmp_path / "tree.npz", meta)
    for name in tree._fields:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(tree, name))
    with pytest.raises(ValueError, match="build a new tree"):
        load_tree(tmp_path / "tree.npz", {**meta, "hops": 3})


def contains(sequence, part):
    return any(sequence[i:i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def test_shared_tokenizer_passes_answers_as_tokens(pool, encoder):
    env = make_env(pool, encoder, num_hops=2)
    assert len({m.tokenizer_id for m in pool.models}) == 1  # the tiny pool shares one vocabulary
    state, _ = env.reset([0], QUESTIONS[:1])
    first = env.step(state, np.array([1])).state
    answer = first.contexts[0].responses[0]
    assert answer.tokens and not set(answer.tokens) & pool.models[1].special_ids
    prompt = hop_prompt(pool.models[2], env.config.template, first.contexts[0])
    assert contains(prompt, list(answer.tokens))
    assert prompt[:1] == pool.models[2].special_affixes[0] and prompt[-1:] == pool.models[2].special_affixes[1]


def test_foreign_tokenizer_answers_are_retokenised_from_text(pool, encoder):
    env = make_env(pool, encoder, num_hops=2)
    foreign = Answer("the answer is 4", (7, 8, 9), tokenizer_id="another-vocabulary")
    context = Context(QUESTIONS[0], (foreign,))
    message = env.config.template.message(QUESTIONS[0], [foreign.text])
    assert hop_prompt(pool.models[0], env.config.template, context) == pool.models[0].encode_prompt(message)


def test_prompt_template_wraps_the_hop_message(pool):
    import dataclasses

    model = pool.models[0]
    templated = dataclasses.replace(model, spec=dataclasses.replace(model.spec, prompt_template="Q: {message}\nA:"))
    assert templated.encode_prompt("hi") == model.encode_prompt("Q: hi\nA:")
    with pytest.raises(ValueError, match="must contain '\\{message\\}'"):
        ModelSpec("bad", "x", 1.0, prompt_template="no placeholder")


def test_stop_string_cut_answers_pass_as_text(pool, encoder):
    """A response cut at a stop string no longer matches its tokens: it is handed on as text."""
    plain = make_env(pool, encoder, num_hops=1)
    state, _ = plain.reset([0], QUESTIONS[:1])
    full = plain.step(state, np.array([0])).state.contexts[0].responses[0].text
    word = next(w for w in full.split()[1:] if len(w) >= 4)
    stop = word[1:3]  # inside a word: its tokens differ from the text's, so only the text cut sees it
    env = make_env(pool, encoder, num_hops=2, stop=(stop,))
    state, _ = env.reset([0], QUESTIONS[:1])
    answer = env.step(state, np.array([0])).state.contexts[0].responses[0]
    assert answer.text == full[:full.index(stop)] and answer.tokens == ()


def test_embedding_memo_encodes_each_text_once_and_forgets_the_least_recent(encoder):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return encoder.encode(texts)

    memo = EmbeddingMemo(encode, capacity=3)
    texts = ["2+3", "(1+2)*4", "2+3", "rev(abc)"]
    np.testing.assert_allclose(memo(texts), encoder.encode(texts), atol=1e-6)
    assert calls == [["2+3", "(1+2)*4", "rev(abc)"]] and (memo.hits, memo.misses) == (1, 3)
    again = memo(["rev(abc)", "2+3", "7*8"])  # 7*8 new: the least recently used, (1+2)*4, leaves
    np.testing.assert_allclose(again, encoder.encode(["rev(abc)", "2+3", "7*8"]), atol=1e-6)
    assert calls[1:] == [["7*8"]]
    memo(["(1+2)*4", "7*8"])
    assert calls[2:] == [["(1+2)*4"]]
    assert memo([]).shape == (0, encoder.dim)
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingMemo(encode, capacity=0)
