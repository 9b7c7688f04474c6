"""Held-out evaluation and reports: hand-worked trees where every metric is known, and a short PPO run."""

import dataclasses
import importlib.util
import io
import json
import math

import fsspec
import jax
import numpy as np
import pytest
from fsspec.registry import _registry as fsspec_implementations
from PIL import Image
from scipy import stats

from hrjax.agent.networks import NetworkConfig
from hrjax.agent.ppo import PPOConfig
from hrjax.agent.tree_mode import make_train
from hrjax.env.mdp import EnvConfig
from hrjax.env.tree import OfficialScores, PathTree, decision_nodes, tree_structure
from hrjax.evaluate import (EvaluationError, Split, action_table, evaluate, fmt, fmt_interval, hull_area,
                            knn_one_shot_models, markdown_table, method_eval, nodes_of_actions, pareto_hull,
                            ppo_policy, summarize, t_interval, uniform_random_nodes, write_summary)
from hrjax.report import (learning_curves_figure, paper_table, paper_table_markdown, paths_figure, pareto_figure,
                          write_report)
from hrjax.rundir import open_for_writing
from test_tree_learning import N, synthetic_tree


def explicit_tree(quality, hop_cost, num_models=2, num_hops=2, root=None):
    """A PathTree with the given node quality [N, K] and per-model hop cost [M] (same for every prompt)."""
    model, parent, depth = tree_structure(num_models, num_hops)
    quality = np.asarray(quality, np.float32)
    n, k = quality.shape
    root = np.ones((n, 2), np.float32) if root is None else np.asarray(root, np.float32)
    cost = np.tile(np.asarray(hop_cost, np.float32)[model], (n, 1))
    zeros = np.zeros((n, k), np.int32)
    return PathTree(root, np.repeat(root[:, None], decision_nodes(num_models, num_hops), axis=1), zeros, zeros, cost,
                    quality, model, parent, depth)


# nodes (M = 2, L = 2): 0 [m0], 1 [m1], 2 [m0 m0], 3 [m0 m1], 4 [m1 m0], 5 [m1 m1]; path costs .1 .3 .2 .4 .4 .6
HELD_OUT = explicit_tree([[1, 0, 1, 0, 0, 0],
                          [0, 1, 0, 0, 1, 1],
                          [0, 0, 0, 1, 0, 1],
                          [0, 0, 0, 1, 0, 0]], [0.1, 0.3])
# on the training prompts [m1 m0] is best; on the held-out ones [m0 m1] and [m1 m1] would be
TRAINING = explicit_tree([[0, 0, 0, 0, 1, 0],
                          [1, 1, 0, 1, 1, 0]], [0.1, 0.3])
ROUTER_NODES = np.array([[2, 4, 3, 5], [2, 5, 5, 3]])  # two seeds: held-out qualities 1 1 1 0 and 1 1 1 1


def fixed_router(tree, rows, cost_lambda):
    return ROUTER_NODES[:, rows]


@pytest.fixture(scope="module")
def hand_summary():
    ev = evaluate(Split(TRAINING, [0, 1], ["a", "a"]), Split(HELD_OUT, [0, 1, 2, 3], ["a", "a", "b", "b"]),
                  EnvConfig(num_hops=2), fixed_router, knn_k=1)
    return ev, summarize(ev)


def test_baselines_on_a_hand_worked_tree(hand_summary):
    ev, summary = hand_summary
    quality = {name: result[0].quality.mean() for name, result in ev.sweep.items()}
    np.testing.assert_allclose([quality[n] for n in ("single:m0", "single:m1", "repeat:m0", "repeat:m1")],
                               [0.25, 0.25, 0.25, 0.5])
    np.testing.assert_allclose(quality["random"], (0.25 + 0.5 + 0.5 + 0.25) / 4)  # the mean over the 4 leaves
    np.testing.assert_allclose(ev.at("random").cost, [[0.4] * 4], rtol=1e-6)  # (.2 + .4 + .4 + .6) / 4
    assert quality["oracle"] == 1.0
    # over every answer a method here gives: [m0] (one hop, as single:m0 does), [m1], [m0 m1], [m0 m1]
    np.testing.assert_allclose(ev.at("oracle").cost.mean(), (0.1 + 0.3 + 0.4 + 0.4) / 4, rtol=1e-6)
    # chosen on the training split ([m1 m0]), scored on the held-out one, where it is worse than [m0 m1]
    assert summary["methods"]["best_fixed"]["overall"]["path"] == "m1>m0"
    assert quality["best_fixed"] == 0.25
    assert summary["best_single"] == "repeat:m1" and summary["best_single_quality"] == 0.5
    assert summary["router"]["a"]["best_single"] == "single:m0"  # ties: the first listed; all score 0.5 on task a
    assert summary["oracle_quality"] == 1.0


# the official metrics of HELD_OUT's nodes: prompts 0, 1 (task a) are gsm8k's (strict_match, flexible_extract),
# prompts 2, 3 (task b) math's (accuracy only: column 1 NaN)
OFFICIAL = OfficialScores(
    np.array([[[1, 1], [0, 1], [1, 0], [0, 0], [0, 0], [0, 1]],
              [[0, 0], [1, 1], [0, 1], [0, 0], [0, 1], [1, 0]],
              [[0, np.nan], [0, np.nan], [0, np.nan], [1, np.nan], [0, np.nan], [1, np.nan]],
              [[1, np.nan], [0, np.nan], [0, np.nan], [1, np.nan], [0, np.nan], [0, np.nan]]], np.float32),
    np.array(["gsm8k", "gsm8k", "math", "math"]),
    np.array([["strict_match", "flexible_extract"]] * 2 + [["accuracy", ""]] * 2))


def test_official_metrics_per_family_and_the_headline_overall(hand_summary):
    ev = evaluate(Split(TRAINING, [0, 1], ["a", "a"]),
                  Split(HELD_OUT, [0, 1, 2, 3], ["a", "a", "b", "b"], OFFICIAL), EnvConfig(num_hops=2), fixed_router,
                  knn_k=1)
    summary = summarize(ev)
    assert summary["official_metrics"] == {"overall": {"gsm8k": ["strict_match", "flexible_extract"],
                                                       "math": ["accuracy"]},
                                           "a": {"gsm8k": ["strict_match", "flexible_extract"]},
                                           "b": {"math": ["accuracy"]}}
    single = summary["methods"]["single:m1"]  # node 1 of each prompt
    assert single["a"]["official"] == {"strict_match": {"mean": 0.5, "low": 0.5, "high": 0.5},
                                       "flexible_extract": {"mean": 1.0, "low": 1.0, "high": 1.0}}
    assert single["b"]["official"] == {"accuracy": {"mean": 0.0, "low": 0.0, "high": 0.0}}
    assert single["overall"]["official_headline"]["mean"] == 0.25 and "official" not in single["overall"]
    for name in ("single:m0", "repeat:m1", "random", "oracle"):  # the mean over the prompts of the node figures
        headline = np.einsum("spk,pk->sp", ev.at(name).node_prob, OFFICIAL.values[..., 0])
        assert summary["methods"][name]["overall"]["official_headline"]["mean"] == pytest.approx(headline.mean())
    # the router's two seeds end at nodes [2, 4, 3, 5] and [2, 5, 5, 3]: headline figures 1 0 1 0 and 1 1 1 1
    # (their reward qualities 1 1 1 0 and 1 1 1 1)
    def interval(seeds):
        return dict(zip(("mean", "low", "high"), t_interval(seeds)))

    router = summary["router"]["b"]
    assert router["official"] == {"accuracy": interval([0.5, 1.0])} and router["official_headline"]["mean"] == 0.75
    assert summary["router"]["overall"]["official_headline"] == summary["methods"]["router"]["overall"][
        "official_headline"] == interval([0.5, 1.0])
    assert "official" not in summarize(evaluate(Split(TRAINING, [0, 1], ["a", "a"]), Split(HELD_OUT, [0, 1, 2, 3],
                                                                                          ["a"] * 4, OFFICIAL),
                                                EnvConfig(num_hops=2), fixed_router, knn_k=1))["router"]["a"]

    table = markdown_table(summary).split("\n\n")[0].splitlines()
    head = table[0][2:-2].split(" | ")
    assert head[1:4] == ["quality (overall)", "official headline metrics (overall)", "cost (overall)"]
    assert head[4:6] == ["quality (a)", "official gsm8k strict_match (a)"] and "official math accuracy (b)" in head
    single_row = next(line for line in table if line.startswith("| single:m1 |"))[2:-2].split(" | ")
    assert single_row[head.index("official gsm8k strict_match (a)")] == "0.500"
    with pytest.raises(EvaluationError, match="official scores hold"):
        Split(TRAINING, [0, 1], ["a", "a"], OFFICIAL)

    # the paper table: the official figure beside quality, the x-gain on it (on quality without official metrics)
    overall = paper_table(summary)[-1]
    assert (overall["metric"], overall["x_gain_on"], overall["router"]["official"]) == (
        "headline metrics", "official", summary["router"]["overall"]["official_headline"])
    assert overall["single"]["m1"] == {"quality": 0.25, "official": 0.25, "cost": pytest.approx(0.3)}
    assert overall["x_gain"]["m1"] == pytest.approx({key: value / 0.25 for key, value in interval([0.5, 1]).items()})
    assert overall["x_gain"]["m1"] != paper_table(hand_summary[1])[-1]["x_gain"]["m1"]  # the reward's: .875 / .25
    assert paper_table(summary)[0]["metric"] == "gsm8k strict_match"
    plain = paper_table(hand_summary[1])
    assert {r["x_gain_on"] for r in plain} == {"quality"} and {r["metric"] for r in plain} == {None}
    assert "official" not in paper_table_markdown(hand_summary[1], plain)
    assert "official" not in plain[0]["single"]["m0"] and "official_metrics" not in hand_summary[1]


def test_router_gains_and_gap_recovered_per_seed(hand_summary):
    _, summary = hand_summary
    r = summary["router"]["overall"]
    assert r["quality"]["mean"] == pytest.approx(0.875)
    assert r["gain_over_best_single"]["mean"] == pytest.approx((0.75 / 0.5 + 1.0 / 0.5) / 2)
    assert r["gain_over_average_single"]["mean"] == pytest.approx((0.75 + 1.0) / 2 / 0.3125)  # singles average .3125
    # seeds: (.75 - .5) / (1 - .5) = .5 and (1 - .5) / .5 = 1
    assert r["gap_recovered"]["mean"] == pytest.approx(0.75)
    half = stats.t.ppf(0.975, 1) * np.std([0.5, 1.0], ddof=1) / math.sqrt(2)
    assert (r["gap_recovered"]["low"], r["gap_recovered"]["high"]) == pytest.approx((0.75 - half, 0.75 + half))
    assert summary["gap_recovered"] == pytest.approx(0.75) and summary["router_quality"] == pytest.approx(0.875)
    # task b: best single [m1 m1] 0.5, oracle 1, router 0.5 then 1
    assert summary["router"]["b"]["gap_recovered"]["mean"] == pytest.approx(0.5)


def test_apgr_is_routellms_area_between_the_cheapest_and_the_best_single_model(hand_summary):
    _, summary = hand_summary
    r = summary["router"]["overall"]
    # weak = the cheapest single model (single:m0: cost .1, quality .25), strong = the best (repeat:m1: .6, .5).
    # Each router seed is one point (one lambda): seed 0 (.4, .75), seed 1 (.45, 1.0); its quality over
    # [.1, .6] is 0 left of the point, flat right of it: mean .75 * .2 / .5 = .3 and 1 * .15 / .5 = .3,
    # so PGR averages to (.3 - .25) / (.5 - .25) = .2 for both seeds.
    anchors = r["apgr_anchors"]
    assert (anchors["weak"], anchors["strong"], anchors["reason"]) == ("single:m0", "repeat:m1", None)
    assert (anchors["weak_cost"], anchors["weak_quality"]) == pytest.approx((0.1, 0.25))
    assert (anchors["strong_cost"], anchors["strong_quality"]) == pytest.approx((0.6, 0.5))
    assert r["apgr"]["mean"] == pytest.approx(0.2) and r["apgr"]["low"] == pytest.approx(0.2)
    assert summary["apgr"] == pytest.approx(0.2) and summary["apgr_anchors"] == anchors
    # the weak model itself recovers nothing; the oracle's exact curve (AIQ .8625 on the same range) the most
    methods = summary["methods"]
    assert methods["single:m0"]["overall"]["apgr"]["mean"] == pytest.approx(0.0)
    assert methods["oracle"]["overall"]["apgr"]["mean"] == pytest.approx((0.8625 - 0.25) / 0.25)
    # task b: weak single:m0 (.1, 0), strong repeat:m1 (.6, .5); router seeds (.5, .5) and (.5, 1) average
    # .5 * .1 / .5 and 1 * .1 / .5 over [.1, .6]: PGR .1 / .5 and .2 / .5
    assert summary["router"]["b"]["apgr"]["mean"] == pytest.approx((0.2 + 0.4) / 2)
    # task a: every single model scores .5, so the best one is also the cheapest: no range to average over
    a = summary["router"]["a"]
    assert a["apgr"]["mean"] is None and a["apgr_anchors"]["weak"] == a["apgr_anchors"]["strong"] == "single:m0"
    assert "also the cheapest" in a["apgr_anchors"]["reason"]
    assert "also the cheapest" in markdown_table(summary)
    # a deterministic method has a zero-width interval
    q = summary["methods"]["repeat:m1"]["overall"]["quality"]
    assert q["low"] == q["mean"] == q["high"] == 0.5


def test_aiq_on_the_hand_worked_tree(hand_summary):
    _, summary = hand_summary
    aiq = summary["aiq_by_method"]
    # shared cost range [0.1 (single m0), 0.6 (repeat m1)]; a single point (c, q) scores q * (0.6 - c) / 0.5
    assert aiq["single:m0"] == pytest.approx(0.25)
    assert aiq["single:m1"] == pytest.approx(0.25 * 0.3 / 0.5)
    # the oracle's exact curve: every prompt's cheapest answer [m0] (.1, .25); below lambda 5 prompt 1 takes [m1]
    # (.15, .5); below 1 / .3 prompts 2 and 3 take [m0 m1] (.3, 1): .05 * .375 + .15 * .75 + .3 * 1 over [.1, .6]
    assert aiq["oracle"] == pytest.approx((0.05 * 0.375 + 0.15 * 0.75 + 0.3) / 0.5)
    np.testing.assert_allclose(summary["methods"]["oracle"]["overall"]["frontier"],
                               [[0.1, 0.25], [0.15, 0.5], [0.3, 1.0]], rtol=1e-6)
    assert summary["aiq_cost_range"]["overall"] == pytest.approx([0.1, 0.6])
    # zero router: the hull of (.1, .25) and (.6, .5) (the other single points lie below it)
    assert aiq["zero_router"] == pytest.approx((0.25 + 0.5) / 2)
    assert aiq["router"] == pytest.approx(0.3)  # seeds (.4, .75) and (.45, 1.0): .75 * .2 / .5 and 1 * .15 / .5
    assert summary["aiq"] == aiq["router"]
    assert summary["router"]["overall"]["aiq"]["low"] == pytest.approx(0.3)  # both seeds agree


def test_hull_and_area_of_known_points():
    # D lies under A-B, C is beaten by B (cheaper and better)
    points = {"A": (0.2, 0.4), "B": (0.4, 0.8), "C": (0.6, 0.7), "D": (0.3, 0.5), "E": (0.8, 0.9)}
    hull = pareto_hull(*np.array(list(points.values())).T)
    np.testing.assert_allclose(hull, [points["A"], points["B"], points["E"]])
    # 0 on [0, .2), then .2 * (.4 + .8) / 2 + .4 * (.8 + .9) / 2, then flat .9 over [.8, 1]
    assert hull_area(hull, 0.0, 1.0) == pytest.approx(0.12 + 0.34 + 0.18)
    assert hull_area(hull, 0.3, 0.5) == pytest.approx((0.1 * (0.6 + 0.8) / 2 + 0.1 * (0.8 + 0.825) / 2) / 0.2)
    assert hull_area(hull, 0.1, 0.1) == 0.0 and hull_area(hull, 0.9, 0.9) == pytest.approx(0.9)


def test_t_interval_matches_scipy():
    x = [0.61, 0.72, 0.68, 0.75]
    mean, low, high = t_interval(x)
    expected = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x)) and (low, high) == pytest.approx(expected)
    assert t_interval([0.4]) == (0.4, 0.4, 0.4)
    # by hand, 3 seeds: t_{0.975, 2} = 4.302653
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2.0 - 4.302653 / math.sqrt(3), 2.0 + 4.302653 / math.sqrt(3)), rel=1e-6)


def test_uniform_random_with_stop_is_the_policy_expectation():
    # M = 2, L = 2, STOP from hop 1: each depth-0 node ends by STOP with 1/2 * 1/3, each leaf is 1/2 * 1/3
    p = uniform_random_nodes(HELD_OUT, stop_action=True)
    np.testing.assert_allclose(p, [1 / 6] * 6)
    ev = evaluate(Split(TRAINING, [0, 1], ["a", "a"]), Split(HELD_OUT, [0, 1, 2, 3], ["a"] * 4),
                  EnvConfig(num_hops=2, stop_action=True), fixed_router, knn_k=1)
    np.testing.assert_allclose(ev.at("random").quality[0], HELD_OUT.quality.sum(axis=1) / 6)
    # with STOP the oracle picks among every node: prompt 0 stops after [m0] (quality 1, cost .1)
    np.testing.assert_allclose(ev.at("oracle").cost[0, 0], 0.1, rtol=1e-6)


def test_best_fixed_path_may_stop_early_with_stop():
    # on both splits [m0] then STOP (quality 1, cost .1) beats every full-length path
    tree = explicit_tree([[1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 1]], [0.1, 0.3])
    split = Split(tree, [0, 1], ["a", "a"])
    for stop, path, quality, cost in ((True, "m0>STOP", 1.0, 0.1), (False, "m0>m1", 0.5, 0.4)):
        ev = evaluate(split, split, EnvConfig(num_hops=2, stop_action=stop), lambda t, r, lam: np.full((1, 2), 3),
                      knn_k=1)
        assert summarize(ev)["methods"]["best_fixed"]["overall"]["path"] == path
        assert (ev.at("best_fixed").quality.mean(), ev.at("best_fixed").cost.mean()) == pytest.approx((quality, cost))


def test_oracle_breaks_ties_by_cost_then_quality():
    # one hop: m0 costs .3, m1 .1 and both answer right, so at lambda 0 the oracle takes the cheaper m1
    tree = explicit_tree([[1, 1], [1, 1], [0, 0]], [0.3, 0.1], num_hops=1)
    split = Split(tree, [0, 1, 2], ["a"] * 3)
    ev = evaluate(split, split, EnvConfig(num_hops=1), lambda t, r, lam: np.zeros((1, 3), int), knn_k=1)
    np.testing.assert_allclose(ev.at("oracle").cost, [[0.1] * 3], rtol=1e-6)
    # the curve's cheap end (lambda = +inf) is each prompt's cheapest node, between cost ties the better one:
    # prompt 0 takes [m1] (quality 1, not [m0]), prompt 1 either; at lambda 0 they take [m1] and [m0 m1]
    tree = explicit_tree([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]], [0.1, 0.1])
    split = Split(tree, [0, 1], ["a", "a"])
    ev = evaluate(split, split, EnvConfig(num_hops=2, stop_action=True), lambda t, r, lam: np.zeros((1, 2), int),
                  knn_k=1)
    np.testing.assert_allclose(summarize(ev)["methods"]["oracle"]["overall"]["frontier"], [[0.1, 0.5], [0.15, 1.0]],
                               rtol=1e-6)


def random_tree(rng, num_models, num_hops, n):
    """A PathTree with random qualities in {0, .5, 1} and random cumulative costs for `n` prompts."""
    model, parent, depth = tree_structure(num_models, num_hops)
    k = len(model)
    quality = rng.choice([0.0, 0.5, 1.0], size=(n, k)).astype(np.float32)
    cost = rng.uniform(0.05, 1.0, size=(n, k)).astype(np.float32)
    root = rng.normal(size=(n, 3)).astype(np.float32)
    zeros = np.zeros((n, k), np.int32)
    return PathTree(root, np.repeat(root[:, None], decision_nodes(num_models, num_hops), axis=1), zeros, zeros, cost,
                    quality, model, parent, depth)


def test_the_oracle_bounds_every_method_on_random_trees():
    """Property: on random trees, with random routers (deterministic per seed) and a randomised method
    (a random distribution over ends), the oracle's AIQ and its exact curve bound every method."""
    cases = []
    for trial in range(12):
        rng = np.random.default_rng(trial)
        m, hops, stop = int(rng.integers(2, 4)), int(rng.integers(1, 3)), bool(rng.integers(2))
        tree, n = random_tree(rng, m, hops, 10), 10
        ends = np.flatnonzero(tree.depth == hops - 1) if not stop else np.arange(tree.quality.shape[1])
        tasks = ["a" if i % 3 else "b" for i in range(n)]
        ev = evaluate(Split(tree, np.arange(n), tasks), Split(tree, np.arange(n), tasks),
                      EnvConfig(num_hops=hops, stop_action=stop, cost_lambda=0.3),
                      lambda t, rows, lam: rng.choice(ends, size=(3, len(rows))), (0.0, 1.0), knn_k=2)
        mixed = np.zeros((1, n, tree.quality.shape[1]))
        mixed[..., ends] = rng.dirichlet(np.ones(len(ends)), size=(1, n))
        ev = dataclasses.replace(ev, sweep=ev.sweep | {"mixed": (method_eval(tree, np.arange(n), mixed),) * 3})
        cases.append((trial, ev, summarize(ev)))
    for trial, ev, summary in cases:
        for group in ev.groups:
            aiq = {name: entry[group]["aiq"]["mean"] for name, entry in summary["methods"].items()}
            assert aiq["oracle"] >= max(aiq.values()) - 1e-9, (trial, group, aiq)
    for trial, ev, summary in cases:
        for group, mask in ev.groups.items():
            frontier = np.array(summary["methods"]["oracle"][group]["frontier"])
            for name, results in ev.sweep.items():
                for r in results:
                    cost, quality = r.cost[:, mask].mean(axis=1), r.quality[:, mask].mean(axis=1)  # [S]
                    bound = np.where(cost < frontier[0, 0], 0.0, np.interp(cost, *frontier.T))
                    assert np.all(quality <= bound + 1e-9), (trial, group, name, cost, quality, frontier)
            # one cost range for every method: the cheapest and dearest point of any method (the oracle's included)
            c_min, c_max = summary["aiq_cost_range"][group]
            every = np.concatenate([frontier[:, 0]] + [r.cost[:, mask].mean(axis=1) for rs in ev.sweep.values()
                                                       for r in rs])
            assert (c_min, c_max) == pytest.approx((every.min(), every.max()))
            for name in ev.single_methods:
                point = np.array(summary["methods"][name][group]["points"])[:1, 1:]
                assert summary["methods"][name][group]["aiq"]["mean"] == pytest.approx(hull_area(point, c_min, c_max))


def test_nodes_of_actions_and_action_table_with_stop():
    # [m1 STOP], [m0 m1], [m1 m0] (STOP written as M = 2 or as the -1 greedy_paths writes after it)
    actions = np.array([[1, 0, 1], [2, 1, 0]])
    np.testing.assert_array_equal(nodes_of_actions(actions, 2), [1, 3, 4])
    np.testing.assert_array_equal(nodes_of_actions(np.array([[1], [-1]]), 2), [1])
    table = action_table(HELD_OUT, stop_action=True)  # [K, L, A]
    np.testing.assert_array_equal(table[1], [[0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(table[3], [[1, 0, 0], [0, 1, 0]])
    with pytest.raises(EvaluationError, match="first hop"):
        nodes_of_actions(np.array([[2], [0]]), 2)


def test_knn_one_shot_router_picks_each_clusters_model():
    # one hop, 3 models; cluster A (+x) is solved by model 0, cluster B (-x) by model 2; model 1 in between
    rng = np.random.default_rng(0)
    centre = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    train_cluster, test_cluster = np.arange(20) % 2, np.array([0, 1, 1, 0, 1])
    quality = {0: [1.0, 0.5, 0.0], 1: [0.0, 0.5, 1.0]}

    def tree(clusters):
        root = centre[clusters] + rng.normal(scale=0.2, size=(len(clusters), 3))
        return explicit_tree([quality[c] for c in clusters], [0.5, 0.1, 0.5], num_models=3, num_hops=1, root=root)

    train = Split(tree(train_cluster), np.arange(20), ["t"] * 20)
    test = Split(tree(test_cluster), np.arange(5), ["t"] * 5)
    np.testing.assert_array_equal(knn_one_shot_models(train, test, 0.0, k=5), [0, 2, 2, 0, 2])
    # at lambda 3, model 1's 0.5 - 0.3 beats 1.0 - 1.5 everywhere
    np.testing.assert_array_equal(knn_one_shot_models(train, test, 3.0, k=5), [1] * 5)
    with pytest.raises(EvaluationError, match="knn_k"):
        evaluate(train, test, EnvConfig(num_hops=1), lambda t, r, lam: np.zeros((1, len(r)), int), knn_k=21)


def test_mismatched_trees_are_refused():
    with pytest.raises(EvaluationError, match="num_hops"):
        evaluate(Split(TRAINING, [0], ["a"]), Split(HELD_OUT, [0], ["a"]), EnvConfig(num_hops=3), fixed_router)
    with pytest.raises(EvaluationError, match="one task label per row"):
        Split(HELD_OUT, [0, 1], ["a"])


# ------------------------------------------------------------------------------------ a trained router

LAMBDAS = (0.0, 2.0)
TRAIN_ROWS, TEST_ROWS = np.arange(48), np.arange(48, N)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 seeds of PPO at each lambda on one hop: cluster 0 needs model 0, cluster 1 model 1 (quality 1,
    cost .5 each; else .3); model 2 is cheap (.05) and scores .3, so at lambda 2 it wins everywhere."""
    tree = synthetic_tree(lambda c, p: 1.0 if p[-1] == c else 0.3, [0.5, 0.5, 0.05])
    ppo, network = PPOConfig(num_envs=128), NetworkConfig(hidden=64)
    params, metrics = {}, {}
    for lam in LAMBDAS:
        trainer = make_train(ppo, network, EnvConfig(num_hops=1, cost_lambda=lam), tree, TRAIN_ROWS, 100)
        params[lam], metrics[lam] = jax.jit(jax.vmap(trainer.train))(jax.random.split(jax.random.PRNGKey(1), 3))
    tasks = lambda rows: ["even" if r % 2 == 0 else "odd" for r in rows]  # noqa: E731 (the clusters)
    policy = ppo_policy(trainer.learner, params, EnvConfig(num_hops=1))
    ev = evaluate(Split(tree, TRAIN_ROWS, tasks(TRAIN_ROWS)), Split(tree, TEST_ROWS, tasks(TEST_ROWS)),
                  EnvConfig(num_hops=1, cost_lambda=0.0), policy, LAMBDAS, model_names=["math", "code", "tiny"])
    first = metrics[LAMBDAS[0]]
    runs = [[{"step": i, "return": float(first["return"][s, i]), "quality": float(first["quality"][s, i])}
             for i in range(100)] + [{"step": 99, "eval/quality": 0.9}] for s in range(3)]
    run_dir = tmp_path_factory.mktemp("run")
    return ev, summarize(ev), runs, run_dir


def test_trained_router_recovers_the_gap(trained):
    ev, summary, _, _ = trained
    assert summary["num_seeds"] == 3 and ev.at("router").quality.shape == (3, len(TEST_ROWS))
    assert summary["best_single_quality"] == pytest.approx(0.65)  # models 0 and 1 solve half the prompts
    assert summary["oracle_quality"] == pytest.approx(1.0)
    assert summary["gap_recovered"] > 0.9 and summary["router"]["overall"]["gap_recovered"]["low"] > 0.5
    # APGR between tiny (cost .05, quality .3) and math (.5, .65): the router's hull runs from tiny's point at
    # lambda 2 to (.5, 1) at lambda 0, so PGR averages (.65 - .3) / (.65 - .3) = 1
    assert summary["apgr_anchors"]["weak"] == "single:tiny" and summary["apgr_anchors"]["strong"] == "single:math"
    assert summary["apgr"] > 0.9
    assert summary["router"]["overall"]["gain_over_best_single"]["mean"] > 1.45
    # at lambda 2 every seed routes to the cheap model; its hull beats the single models'
    np.testing.assert_allclose(ev.at("router", 2.0).cost, 0.05, rtol=1e-5)
    assert summary["aiq"] > summary["aiq_by_method"]["zero_router"] + 0.1
    share = summary["methods"]["router"]["even"]["action_share"]
    assert share[0][0] > 0.95 and summary["methods"]["router"]["odd"]["action_share"][0][1] > 0.95


def test_summary_json_and_markdown(trained, tmp_path):
    _, summary, _, _ = trained
    loaded = json.loads(write_summary(tmp_path / "summary.json", summary).read_text())
    for key in ("router_quality", "best_single_quality", "oracle_quality", "gap_recovered", "apgr", "aiq"):
        assert isinstance(loaded[key], float)
    assert set(loaded["aiq_by_method"]) == {"single:math", "single:code", "single:tiny", "random", "best_fixed",
                                            "knn_one_shot", "router", "oracle", "zero_router"}
    assert set(loaded["methods"]["router"]) == {"overall", "even", "odd"}
    assert set(loaded["methods"]["oracle"]["odd"]["quality"]) == {"mean", "low", "high"}
    router_line = [line for line in markdown_table(loaded).splitlines() if line.startswith("| router |")]
    assert router_line[0].startswith(f"| router | {fmt_interval(loaded['methods']['router']['overall']['quality'])} |")


def test_report_files_and_plot_numbers_match_the_table(trained):
    _, summary, runs, run_dir = trained
    report = write_report(run_dir, summary, runs)
    text = report.read_text()
    for png in ("pareto.png", "paths.png", "learning_curves.png"):
        assert f"]({png})" in text
        with Image.open(run_dir / png) as image:
            image.verify()
    assert json.loads((run_dir / "summary.json").read_text())["apgr"] == summary["apgr"]
    # the overall panel annotates each method's quality exactly as the table prints it
    table_rows = [line.split(" | ") for line in markdown_table(summary).split("\n\n")[0].splitlines()[2:]]
    table_quality = [cells[1].split()[0] for cells in table_rows if not cells[0].startswith("| zero_router")]
    annotated = [t.get_text() for t in pareto_figure(summary).axes[0].texts]
    assert annotated == table_quality and len(annotated) == 8
    heat = [t.get_text() for t in paths_figure(summary).axes[1].texts]  # 'even': hop 1 x (math, code, tiny)
    assert heat == [fmt(x) for x in summary["methods"]["router"]["even"]["action_share"][0]]
    assert [ax.get_title() for ax in learning_curves_figure(runs).axes] == ["return", "quality", "eval/quality"]
    with pytest.raises(EvaluationError, match="metrics.jsonl"):
        learning_curves_figure([[{"step": 0, "loss": 1.0}]])


def test_learning_curves_draw_the_seed_mean_and_its_min_max_band():
    # three seeds; eval/* from step 0 (before any update), training metrics from step 10
    runs = [[{"step": 0, "eval/quality": 0.2 + 0.1 * s}, {"step": 10, "return": 1.0 + s, "eval/quality": 0.5 + 0.1 * s},
             {"step": 20, "return": 2.0 + s}] for s in range(3)]
    fig = learning_curves_figure(runs)
    assert [ax.get_title() for ax in fig.axes] == ["return", "eval/quality"]
    ax = fig.axes[1]
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata(), [0, 10])
    np.testing.assert_allclose(line.get_ydata(), [0.3, 0.6])  # the mean over seeds
    (band,) = ax.collections
    corners = {tuple(np.round(v, 6)) for v in band.get_paths()[0].vertices}
    assert {(0, 0.2), (0, 0.4), (10, 0.5), (10, 0.7)} <= corners  # min and max over seeds
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [2.0, 3.0])


class _Bucket(fsspec.AbstractFileSystem):
    """gs:// for the tests (this host has neither gcsfs nor network): a bucket as a dict of objects, where
    a folder is a prefix of an object's name and a file opened for writing becomes its object when it
    closes, with whatever was written (as gcsfs's uploads do, also on an error); `credentials=False`:
    every object write is refused as an unauthenticated caller's is. `uploads`: object names, one per
    completed upload."""

    protocol, root_marker = ("gs", "gcs"), ""
    objects: dict = {}
    uploads: list = []
    credentials = True

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path in self.objects:
            return {"name": path, "size": len(self.objects[path]), "type": "file"}
        if any(name.startswith(path + "/") for name in self.objects):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        children = sorted({path + "/" + name[len(path) + 1:].split("/")[0] for name in self.objects
                           if name.startswith(path + "/")})
        if not children:
            raise FileNotFoundError(path)
        return [self.info(c) for c in children] if detail else children

    def rm_file(self, path):
        del self.objects[self._strip_protocol(path)]

    def _open(self, path, mode="rb", **kwargs):
        if mode == "rb":
            if path not in self.objects:
                raise FileNotFoundError(path)
            return io.BytesIO(self.objects[path])
        if mode != "wb":
            raise ValueError(f"a bucket object cannot be opened with mode {mode!r}")
        if not self.credentials:
            raise PermissionError("Anonymous caller does not have storage.objects.create access (no credentials)")
        bucket = self

        class Upload(io.BytesIO):
            def close(self):
                if not self.closed:
                    bucket.objects[path] = self.getvalue()
                    bucket.uploads.append(path)
                super().close()

        return Upload()


@pytest.fixture
def bucket(monkeypatch):
    """gs:// served by a fresh `_Bucket` (gcsfs's place in fsspec's registry) for the test -> its class."""
    from etils.epath import backend

    fs = type("Bucket", (_Bucket,), {"objects": {}, "uploads": []})
    monkeypatch.setitem(fsspec_implementations, "gcs", fs)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield fs
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_the_report_sweep_and_seed_runs_go_to_gs_whole_and_read_back(trained, bucket, tmp_path, monkeypatch):
    """hrjax evaluate's writers and hrjax export's readers through etils.epath on a gs:// run directory."""
    from hrjax.export import best_seed, seed_runs
    from hrjax.pipeline import SWEEP_FILE, load_sweep, save_sweep
    from hrjax.rundir import as_path, write_text

    monkeypatch.chdir(tmp_path)  # a gs:// path taken for a local one would appear here, as gs:/bucket/...
    _, summary, runs, _ = trained
    run = as_path("gs://bucket/eval")
    report = write_report("gs://bucket/eval", summary, runs)
    assert report == run / "report.md"
    sweep = {0.5: {"dense": {"kernel": np.arange(12.0).reshape(3, 2, 2)}}, 2.0: {"dense": {"kernel": np.ones((3, 2))}}}
    save_sweep(run / SWEEP_FILE, sweep, [0, 1, 2])
    for seed, value in ((0, 0.2), (1, 0.7)):  # an evaluate workdir's seed runs, as hrjax train writes them
        write_text(run / f"seed_{seed}" / "config.json", "{}")
        write_text(run / f"seed_{seed}" / "metrics.jsonl", json.dumps({"step": 3, "eval/value": value}) + "\n")

    names = ["summary.json", "pareto.png", "paths.png", "learning_curves.png", "report.md", SWEEP_FILE] + [
        f"seed_{s}/{f}" for s in (0, 1) for f in ("config.json", "metrics.jsonl")]
    assert bucket.uploads == [f"bucket/eval/{name}" for name in names]  # each file one whole object upload
    assert sorted(bucket.objects) == sorted(bucket.uploads) and not list(tmp_path.iterdir())
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    text = report.read_text()
    assert markdown_table(summary) in text
    for png in ("pareto.png", "paths.png", "learning_curves.png"):
        assert f"]({png})" in text
        with Image.open(io.BytesIO((run / png).read_bytes())) as image:
            assert image.format == "PNG" and min(image.size) > 100
            image.verify()
    seeds, loaded = load_sweep(run / SWEEP_FILE)
    assert seeds == [0, 1, 2] and loaded.keys() == sweep.keys()
    for lam in sweep:
        np.testing.assert_array_equal(loaded[lam]["dense"]["kernel"], sweep[lam]["dense"]["kernel"])
    assert list(seed_runs(run)) == [0, 1] and best_seed(seed_runs(run)) == 1

    # a write that fails leaves the object as it was (a gs:// upload would publish what was written so far)
    with pytest.raises(RuntimeError), open_for_writing(run / "summary.json", "w") as f:
        f.write("{")
        raise RuntimeError("the writer failed")
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))


@pytest.mark.parametrize("case", ["no credentials", "no gcsfs"])
def test_a_gs_evaluate_workdir_that_cannot_be_written_is_one_clear_error(case, bucket, monkeypatch, tmp_path):
    from runs import reduced_specialist_config

    from hrjax.pipeline import evaluate_run
    from hrjax.rundir import RunDirError

    if case == "no credentials":
        monkeypatch.setattr(bucket, "credentials", False)
    else:
        monkeypatch.delitem(fsspec_implementations, "gcs")  # fsspec imports gcsfs for it
        if importlib.util.find_spec("gcsfs") is not None:
            pytest.skip("gcsfs is installed here")
    monkeypatch.chdir(tmp_path)  # where a gs:// path taken for a local one would appear, as gs:/bucket/...
    with pytest.raises(RunDirError) as error:
        evaluate_run(reduced_specialist_config(tmp_path), "gs://bucket/eval", progress=False)
    expected = "cannot read the bucket (PermissionError" if case == "no credentials" else "need gcsfs"
    assert str(error.value).startswith("--workdir=gs://bucket/eval: ") and expected in str(error.value)
    assert "gcloud auth application-default login" in str(error.value)
    assert not bucket.objects and not list(tmp_path.iterdir())  # refused first: no data, cache or tree made


def test_exporting_a_gs_run_without_gcsfs_is_one_clear_error(bucket, monkeypatch, tmp_path):
    from hrjax.export import export_bundle
    from hrjax.rundir import RunDirError

    monkeypatch.delitem(fsspec_implementations, "gcs")  # fsspec imports gcsfs for it
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(RunDirError, match=r"^--workdir=gs://bucket/eval: gs:// run directories need gcsfs"):
        export_bundle("gs://bucket/eval", tmp_path / "bundle")
    assert not list(tmp_path.iterdir())


def test_the_specialist_worlds_official_figures_are_its_reward(reduced_quickstart):
    """The reduced main job (the shared run): the specialist world's official metric is its own scorer, so its
    tree's official scores are its qualities node by node, and every method's official figures its quality."""
    from runs import reduced_specialist_config

    from hrjax.pool import resolve_pool
    from hrjax.train import load_data, load_or_build_scored_tree

    root, run = reduced_quickstart
    config = resolve_pool(reduced_specialist_config(root), progress=False)
    data = load_data(config)
    tree, official = load_or_build_scored_tree(config, data.examples, progress=False)  # the run's, from the cache
    assert official.families.tolist() == ["specialist_world"] * len(data.examples)
    assert official.names.tolist() == [["score"]] * len(data.examples)
    np.testing.assert_array_equal(official.values[..., 0], tree.quality)
    assert 0.1 < tree.quality.mean() < 0.9
    assert run.summary["official_metrics"] == {group: {"specialist_world": ["score"]} for group in run.summary[
        "num_prompts"]}
    for name, groups in run.summary["methods"].items():
        for entry in groups.values():
            if name != "zero_router":
                assert entry["official_headline"] == entry["quality"]
                assert entry["official"] == {"score": entry["quality"]}
    report = run.report.read_text()
    # no official column that would only repeat quality, but the summary's figures and their definition
    assert "official specialist_world" not in run.table and "- **official**: the benchmark's own" in report
