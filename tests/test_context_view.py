"""The evolving context, visible to the router: observations embed the question and the latest answer
apart (`hrjax.env.mdp.CONTEXT_VIEWS`), in the env, in path trees (L = 3, tiny random models) and in serving."""

import numpy as np
import pytest

from hrjax.env.mdp import Answer, Context, EnvConfig, RoutingEnv, State, rollout
from hrjax.env.tree import build_tree
from hrjax.models.encoder import load_encoder
from hrjax.pool import ModelSpec, Pool

QUESTION = "Which of these long answers is right, and why?"
WORDS = ("river stone light cloud paper music garden window silver forest engine market winter bridge "
         "candle harbor valley planet coffee letter").split()


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


@pytest.fixture(scope="module")
def pool(tiny_pool):
    return Pool.from_specs([ModelSpec(**spec) for spec in tiny_pool["pool"]])


class CountingEncoder:
    """The real encoder, counting its calls and the texts of each."""

    def __init__(self, encoder):
        self.encoder, self.dim, self.calls = encoder, encoder.dim, []

    def encode(self, texts):
        self.calls.append(list(texts))
        return self.encoder.encode(texts)


def long_answer(seed: int, encoder, tokens: int = 400) -> Answer:
    """An answer of at least `tokens` encoder tokens (words drawn with `seed` from its half of WORDS)."""
    half = len(WORDS) // 2
    text = " ".join(np.random.default_rng(seed).choice(WORDS[half * (seed % 2):][:half], tokens))
    assert len(encoder.tokenizer.tokenize(text)) >= tokens
    return Answer(text, (), "none")


def observe(pool, encoder, view: str, contexts) -> np.ndarray:
    """The env's observation embeddings [B, E] of `contexts` (all at the same hop) under `view`."""
    env = RoutingEnv(pool, encoder, lambda example, text: 0.0, EnvConfig(num_hops=3, context_view=view))
    b, hop = len(contexts), len(contexts[0].responses)
    state = State(list(range(b)), list(contexts), np.full(b, hop, np.int32), np.zeros(b, np.float32),
                  np.zeros(b, np.float32), np.zeros(b, bool), np.zeros(b, np.float32))
    return env.observe(state).embedding


def test_hop2_observations_differ_by_the_latest_400_token_answer(pool, encoder):
    first = long_answer(0, encoder)
    contexts = [Context(QUESTION, (first, long_answer(seed, encoder))) for seed in (1, 2)]
    counting = CountingEncoder(encoder)
    default = observe(pool, counting, EnvConfig().view, contexts)
    assert default.shape == (2, 2 * encoder.dim)
    assert np.abs(default[0] - default[1]).max() > 0.05  # the second answers tell the two states apart
    np.testing.assert_array_equal(default[0, :encoder.dim], default[1, :encoder.dim])  # the same question
    # one encoder call per observation, on each distinct text once: the question and the two latest answers
    assert counting.calls == [[QUESTION, contexts[0].responses[1].text, contexts[1].responses[1].text]]
    # the joined view cuts question + first answer at the encoder's 256 tokens: the states look the same (two rows
    # of one batch, equal up to the host's row-dependent rounding: 7e-8 seen on one CI host)
    joined = observe(pool, encoder, "joined", contexts)
    np.testing.assert_allclose(joined[0], joined[1], rtol=0, atol=1e-6)

    pooled = observe(pool, encoder, "question_latest_pooled", contexts)
    q, a1, a2, b2 = encoder.encode([QUESTION, first.text, contexts[0].responses[1].text,
                                    contexts[1].responses[1].text])
    np.testing.assert_allclose(pooled, [np.concatenate([q, a2, (a1 + a2) / 2]), np.concatenate([q, b2, (a1 + b2) / 2])],
                               atol=1e-5)
    before = observe(pool, encoder, "question_latest_pooled", [Context(QUESTION)])  # hop 0: no answer yet
    np.testing.assert_allclose(before[0], np.concatenate([q, np.zeros(2 * encoder.dim)]), atol=1e-5)


def test_unknown_view_is_refused():
    with pytest.raises(ValueError, match="context_view must be 'auto' or one of"):
        EnvConfig(context_view="latest")


def test_run_configs_resolve_auto_by_task(tiny_pool):
    from runs import config_of

    assert config_of(tiny_pool).env.context_view == "question_and_latest"
    assert config_of(tiny_pool, **{"env.context_view": "joined"}).env.context_view == "joined"
    assert config_of(tiny_pool, **{"task.name": "specialist_world"}).env.context_view == "joined"


@pytest.mark.parametrize("view", ["question_and_latest", "question_latest_pooled"])
def test_an_L3_tree_of_tiny_models_carries_the_observations(pool, encoder, view):
    """Every node a policy observes (depth 0 and 1 of L = 3) holds the env's observation of its context."""
    questions = ["What is two plus two?", "Name a colour."]
    env = RoutingEnv(pool, encoder, lambda example, text: float(len(text) % 2),
                     EnvConfig(num_hops=3, max_new_tokens=8, context_view=view))
    tree = build_tree(env, [0, 1], questions, progress=False)
    width = 2 if view == "question_and_latest" else 3
    assert tree.root_embedding.shape == (2, width * encoder.dim)
    assert tree.embedding.shape == (2, 6, width * encoder.dim)  # D = 2 + 4 of the K = 2 + 4 + 8 nodes
    m = len(pool)
    for first in range(m):
        for second in range(m):
            actions = [np.array([first, first]), np.array([second, 1 - second]), np.array([0, 1])]
            hops = iter(actions)
            episode = rollout(env, [0, 1], questions, lambda obs: next(hops))
            for i in range(2):
                np.testing.assert_allclose(episode.embedding[0, i], tree.root_embedding[i], atol=1e-5)
                for t in (1, 2):
                    node = tree.node_of_path([int(a[i]) for a in actions[:t]])
                    np.testing.assert_allclose(episode.embedding[t, i], tree.embedding[i, node], atol=1e-5)
    # hop-2 states after the same first answer but different second ones are told apart
    siblings = [tree.node_of_path([0, a]) for a in range(m)]
    assert np.abs(tree.embedding[:, siblings[0]] - tree.embedding[:, siblings[1]]).max() > 1e-3


def test_a_bundle_serves_the_observations_and_decisions_training_saw(tiny_pool, tmp_path):
    """A text run (context view 'question_and_latest') exported: serving observes and decides as the env."""
    import jax

    from hrjax.agent.ppo import Learner
    from hrjax.export import export_bundle, load_trained
    from hrjax.serving.bundle import load_bundle
    from hrjax.serving.router import BundleRouter
    from hrjax.train import load_data, make_env, train
    from runs import config_of

    config = config_of(tiny_pool, iterations=2)
    train(config, tmp_path / "run", progress=False)
    bundle = load_bundle(export_bundle(tmp_path / "run", tmp_path / "bundle", progress=False))
    assert bundle.manifest["env"]["context_view"] == "question_and_latest"
    router = BundleRouter(bundle)
    trained = load_trained(tmp_path / "run")
    env = make_env(trained.config)
    questions = [e.question for e in load_data(config).select]
    states = [router.start(q) for q in questions]
    for hop in range(config.env.num_hops):  # hop 0, then after each question's first answer (model i % 2)
        if hop:
            for action in range(len(router.pool)):
                rows = range(action, len(states), len(router.pool))
                prompts = [router.prompt(states[i], action) for i in rows]
                generations = router.pool.models[action].sampler.generate_tokens(prompts, router.sampling())
                for i, generation in zip(rows, generations):
                    states[i] = router.advance(states[i], action, generation)
        embedding, hops, cost, mask = router.observe(states)
        assert embedding.shape == (len(states), 2 * bundle.manifest["encoder"]["dim"])
        np.testing.assert_allclose(embedding, env.embed([s.context for s in states]), atol=1e-5)
        learner = Learner(config.ppo, config.network, mask.shape[1], config.env.num_hops, config.train.num_iterations)
        (lam, params), = trained.param_sets.items()
        log_probs, _ = jax.jit(learner.apply)(params, embedding, hops, cost, np.full(len(states), lam, np.float32),
                                              mask)
        np.testing.assert_allclose(router.probabilities(states, [lam] * len(states)), np.exp(log_probs), atol=1e-5)
