"""`hrjax export` / `route` / `calibrate` on the reduced specialist world (the shared `reduced_quickstart` run):
the exported policy and encoder reproduce the training process in a fresh process that never imports the
training code; routes equal the router's paths in the path tree; a tampered bundle is refused."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from hrjax.serving.bundle import FORMAT_VERSION, BudgetError, BundleError, UnknownModelError, load_bundle

FORBIDDEN = ("hrjax.agent", "hrjax.train", "hrjax.models.encoder", "orbax")

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from hrjax.serving.bundle import load_bundle
    from hrjax.serving.router import BundleRouter

    bundle, inputs, out = sys.argv[1:]
    x = json.load(open(inputs))
    router = BundleRouter(load_bundle(bundle))
    embedding = router.embed(x["texts"])
    log_probs = router.log_probs(embedding, np.array(x["hop"]), np.array(x["cost_features"]),
                                 np.array(x["mask"]), np.array(x["lams"]))
    np.save(out, np.exp(log_probs))
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "orbax" or m.startswith(%r))))
""" % (FORBIDDEN[:3],))


@pytest.fixture(scope="module")
def exported(reduced_quickstart, quickstart_bundle):
    """(bundle path, the exported `TrainedRouter`, the run's selection and held-out examples)."""
    from hrjax.export import load_trained
    from hrjax.train import load_data

    root, _ = reduced_quickstart
    trained = load_trained(root / "run")
    return quickstart_bundle, trained, load_data(trained.config)


@pytest.fixture(scope="module")
def router(exported):
    from hrjax.serving.router import BundleRouter

    return BundleRouter(load_bundle(exported[0]))


def test_exported_policy_and_encoder_match_training_in_a_fresh_process(exported, router, tmp_path):
    from hrjax.agent.ppo import Learner
    from hrjax.env.cache import ResponseCache
    from hrjax.env.mdp import Context, RoutingEnv, action_mask
    from hrjax.models.encoder import load_encoder

    bundle, trained, data = exported
    config = trained.config
    encoder = load_encoder(config.encoder or None)
    env = RoutingEnv(router.pool, encoder, lambda e, r: 0.0, config.env,
                     ResponseCache(os.path.expanduser(config.train.cache_dir) + "/responses"))
    # 100 decision states: each selection (then held-out) question at hop 0, and after each model's answer
    texts, hop, cost = [], [], []
    for example in data.select + data.eval:
        root = Context(example.question)
        texts.append(root.text()), hop.append(0), cost.append([0.0, 0.0])
        for model in range(len(env.pool)):
            answered = env.respond(model, [root])
            texts.append(root.then(answered.responses[0]).text()), hop.append(1)
            cost.append([float(answered.cost[0])] * 2)
        if len(texts) >= 100:
            break
    texts, hop, cost = texts[:100], np.array(hop[:100], np.int32), np.array(cost[:100], np.float32)
    mask = action_mask(hop, len(env.pool), config.env.stop_action)
    lambdas = list(trained.param_sets)
    lams = np.array([lambdas[i % len(lambdas)] for i in range(100)], np.float32)
    assert len(set(texts)) > 50 and (hop == 1).sum() > 50  # real, varied states

    learner = Learner(config.ppo, config.network, mask.shape[1], config.env.num_hops, config.train.num_iterations)
    embedding = encoder.encode(texts)
    expected = np.zeros(mask.shape, np.float32)
    for lam in lambdas:
        rows = lams == np.float32(lam)
        log_probs, _ = jax.jit(learner.apply)(trained.param_sets[lam], embedding[rows], hop[rows], cost[rows],
                                              lams[rows], mask[rows])
        expected[rows] = np.exp(np.asarray(log_probs))

    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"texts": texts, "hop": hop.tolist(), "cost_features": cost.tolist(),
                                  "mask": mask.tolist(), "lams": lams.tolist()}))
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    done = subprocess.run([sys.executable, str(script), str(bundle), str(inputs), str(tmp_path / "probs.npy")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []  # no training code in the serving process
    probabilities = np.load(tmp_path / "probs.npy")
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5)
    assert (expected.argmax(-1) != expected[:, 0].argmax()).any()  # the decisions are not all one action


def test_routes_equal_the_trained_routers_paths_in_the_tree(exported, router):
    from hrjax.agent.ppo import Learner
    from hrjax.agent.tree_mode import TreeEnv, greedy_paths
    from hrjax.metrics import read_metrics
    from hrjax.tasks.scorers import score_example
    from hrjax.train import load_or_build_tree

    _, trained, data = exported
    config = trained.config
    tree = load_or_build_tree(config, data.examples, progress=False)
    env = TreeEnv.create(tree, config.env)
    learner = Learner(config.ppo, config.network, env.num_actions, env.num_hops, config.train.num_iterations)
    rows, questions = data.rows("select"), [e.question for e in data.select]
    stop = env.num_models
    for lam, params in trained.param_sets.items():
        quality, cost, actions = map(np.asarray, greedy_paths(learner, params, env, rows, lam))
        states = router.route(questions, lam)
        for i, state in enumerate(states):
            assert state.finished
            path = [int(a) for a in actions[:, i] if a >= 0]
            assert list(state.actions) == path[:len(state.actions)], (lam, state.question)
            assert path[len(state.actions):] in ([], [stop]) and state.stopped == (path[-1] == stop)
            assert score_example(data.select[i], state.answer) == quality[i], (lam, state.to_dict())
            assert state.total_cost == pytest.approx(float(cost[i]), abs=1e-6)
        if lam == config.env.cost_lambda:
            assert any(len(s.hops) == 2 for s in states) and any(s.stopped for s in states)
            # the training loop's own last evaluation of this router on the same prompts
            final = [r for r in read_metrics(trained.workdir / "metrics.jsonl") if "eval/quality" in r][-1]
            assert np.mean([score_example(e, s.answer) for e, s in zip(data.select, states)]) == pytest.approx(
                final["eval/quality"], abs=1e-6)
            assert np.mean([s.total_cost for s in states]) == pytest.approx(final["eval/cost"], abs=1e-5)


def test_after_warm_up_no_text_or_batch_compiles_the_encoder_or_policy_again(router):
    from hrjax.models.sentence_batches import packed_shapes

    rng = np.random.default_rng(0)
    words = [str(w) for w in rng.integers(0, 10 ** 6, size=400)]
    for model in router.pool.models:  # read again by the warm-up, not at the first request
        vars(model.sampler).pop("token_table", None)
    shapes = router.warm_up(max_decisions=64)
    compiled = (router._encoder._cache_size(), router._policy._cache_size())
    settings = router.encoder_settings
    assert compiled[0] == len(packed_shapes(settings["batch_size"], settings["max_seq_length"]))
    assert shapes == compiled[0] + 7  # and the policy at batches 1, 2, 4, ..., 64
    assert all("token_table" in vars(model.sampler) for model in router.pool.models)
    for count in (1, 3, 17, 33, 64):  # texts from 1 word to past the encoder's token limit
        questions = [" ".join(words[:n]) for n in rng.integers(1, 400, size=count)]
        router.decide([router.start(q) for q in questions], [router.default_lambda] * count)
    assert (router._encoder._cache_size(), router._policy._cache_size()) == compiled


def test_calibration_offers_and_the_command_lines(exported, router, capsys):
    from hrjax.cli import main

    bundle, trained, data = exported
    table = router.calibration
    assert [e["cost_lambda"] for e in table["entries"]] == sorted(trained.param_sets) == sorted(router.trained_lambdas)
    assert table["num_prompts"] == len(data.select)
    offers = router.offers()
    assert offers[router.served_name] == trained.config.env.cost_lambda and len(offers) > 2
    for name, lam in offers.items():
        if "@cost=" in name:
            budget = float(name.split("=")[1])
            chosen = next(e for e in table["entries"] if e["cost_lambda"] == lam)
            within = [e for e in table["entries"] if e["cost"] <= budget]
            assert chosen["cost"] <= budget and chosen["quality"] == max(e["quality"] for e in within)
    cheapest = min(table["entries"], key=lambda e: e["cost"])
    assert router.lambda_for("hrjax-router", budget=cheapest["cost"]) == cheapest["cost_lambda"]
    best = max(table["entries"], key=lambda e: (e["quality"], -e["cost"]))
    assert router.lambda_for("hrjax-router@share=1") == best["cost_lambda"]
    with pytest.raises(BudgetError, match="Raise the budget"):
        router.lambda_for("hrjax-router", budget=cheapest["cost"] / 2)
    for bad in ("gpt-4", "hrjax-router@cost=abc", "hrjax-router@lambda=0.123"):
        with pytest.raises(BundleError):
            router.lambda_for(bad)
    with pytest.raises(UnknownModelError):
        router.lambda_for("hrjax-router@speed=1")

    questions = [e.question for e in data.select[:2] + data.select[-2:]]
    capsys.readouterr()
    assert main(["route", f"--bundle={bundle}", *questions, "--json", "--model=hrjax-router@lambda=2.0"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [dict(s.to_dict(), model="hrjax-router@lambda=2.0", cost_lambda=2.0)
                       for s in router.route(questions, 2.0)]
    budget = sorted(e["cost"] for e in table["entries"])[1]
    assert main(["calibrate", f"--bundle={bundle}", f"--budget_cost={budget}", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["chosen"]["cost"] <= budget and answer["calibration"] == table


def _tamper(path, case):
    manifest = path / "manifest.json"
    if case == "changed_byte":
        target = path / "policy" / "params_0.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 1
        target.unlink()  # a hard link to the original: write a new file
        target.write_bytes(bytes(data))
    elif case == "missing_file":
        (path / "encoder" / "tokenizer" / "tokenizer.json").unlink()
    elif case == "unlisted_file":
        (path / "encoder" / "tokenizer" / "special_tokens_map.json").write_text("{}")
    else:
        from hrjax.serving.bundle import manifest_digest

        content = json.loads(manifest.read_text())
        if case == "other_version":
            content["format_version"] += 1
            content["manifest_sha256"] = manifest_digest(content)
        elif case == "changed_reference":  # a pool member referenced outside the bundle, whose files changed
            content["pool"][0]["checkpoint"] = {"path": str(path / "pool" / content["pool"][0]["name"]),
                                                "fingerprint": "sha256:" + "0" * 64}
            content["manifest_sha256"] = manifest_digest(content)
        else:  # edited_manifest
            content["policy"]["default_lambda"] = 0.5
        manifest.unlink()
        manifest.write_text(json.dumps(content))


@pytest.mark.parametrize("case, message", [
    ("changed_byte", "'policy/params_0.safetensors' changed after export"),
    ("missing_file", "'encoder/tokenizer/tokenizer.json' listed in the manifest is missing"),
    ("unlisted_file", "'encoder/tokenizer/special_tokens_map.json' is not in the manifest"),
    ("other_version", f"bundle format version {FORMAT_VERSION + 1}, but this hrjax reads version {FORMAT_VERSION}"),
    ("edited_manifest", "does not match its recorded digest"),
    ("changed_reference", "the checkpoint at .* is not the one exported"),
])
def test_a_tampered_bundle_is_refused(exported, tmp_path, case, message):
    copy = tmp_path / "bundle"
    shutil.copytree(exported[0], copy, copy_function=os.link)
    load_bundle(copy)  # the untouched copy verifies
    _tamper(copy, case)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)
    load_bundle(exported[0])  # the original is intact
