"""Held-out evaluation of a router against baselines, all read from path trees.

Two splits: a tree over the training prompts (where the best fixed path is chosen and the one-shot
router is fitted) and a tree over held-out prompts (where everything is scored), each prompt with a
task label. Every method gives, per held-out prompt, a distribution over terminal tree nodes (one-hot
for a deterministic path; the exact expectation for uniform-random routing), hence a quality and a
cumulative normalised cost. Methods (keys of `Evaluation.sweep`, in display order):

- `single:<model>` one hop of the model, `repeat:<model>` the model for every hop (when L > 1);
- `random`: a uniformly random valid action at every hop (STOP, when enabled, is one of M + 1
  actions from hop 1 on), as an exact expectation;
- `best_fixed`: the full-length path with the best mean value quality - lambda * cost on the
  training split, applied to every held-out prompt;
- `knn_one_shot`: one model, one hop, chosen per prompt as the best mean value over the k nearest
  training prompts (cosine on the question's embedding);
- `router`: the trained router's greedy paths, one set per seed;
- `oracle`: the per-prompt best value over full-length paths (over every node when STOP is on).

`summarize` turns an `Evaluation` into the JSON-able summary (per task and overall: quality, cost,
AIQ, the router's gains and APGR, 95% t-intervals over seeds) that `write_summary`,
`markdown_table` and `hrjax.report` all read, so every number shown comes from one place.
Shapes: S seeds (1 for deterministic methods), P held-out prompts, K tree nodes, L hops, M models,
A actions (M, + STOP when enabled).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from hrjax.env.mdp import EnvConfig
from hrjax.env.tree import PathTree, level_offset
from hrjax.errors import HrjaxError
from hrjax.fsutil import atomic_file

OVERALL = "overall"
ROUTER, ORACLE = "router", "oracle"

# (tree, tree rows [P], cost_lambda) -> terminal node [S, P] per seed
Policy = Callable[[PathTree, np.ndarray, float], np.ndarray]


class EvaluationError(HrjaxError, ValueError):
    """Splits, trees or a policy that cannot be evaluated together."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Prompts of one split: rows of a path tree and each row's task label."""

    tree: PathTree
    rows: np.ndarray  # [P] int tree rows
    tasks: tuple[str, ...]  # [P]

    def __post_init__(self):
        object.__setattr__(self, "rows", np.asarray(self.rows, np.int64))
        object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))
        if self.rows.ndim != 1 or not self.rows.size or len(self.tasks) != self.rows.size:
            raise EvaluationError(f"A split needs a non-empty 1-d list of tree rows and one task label per row; got "
                                  f"rows of shape {self.rows.shape} and {len(self.tasks)} labels: pass matching lists.")
        n = self.tree.quality.shape[0]
        if self.rows.min() < 0 or self.rows.max() >= n:
            raise EvaluationError(f"Split rows must index the tree's {n} prompts; got rows in "
                                  f"[{self.rows.min()}, {self.rows.max()}]: pass rows of this split's tree.")


@dataclasses.dataclass(frozen=True, eq=False)
class MethodEval:
    """One method at one cost lambda on the held-out split."""

    node_prob: np.ndarray  # [S, P, K] probability that the episode ends at each node
    quality: np.ndarray  # [S, P] expected quality of the final answer
    cost: np.ndarray  # [S, P] expected cumulative normalised cost
    note: str = ""  # e.g. the best fixed path's models


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluation:
    """Every method at every lambda of the sweep (which includes the reported `cost_lambda`)."""

    cost_lambda: float
    cost_lambdas: tuple[float, ...]  # sorted
    sweep: dict[str, tuple[MethodEval, ...]]  # method -> one MethodEval per entry of cost_lambdas
    groups: dict[str, np.ndarray]  # 'overall' and each task -> bool mask [P]
    model_names: tuple[str, ...]
    num_hops: int
    stop_action: bool
    action_table: np.ndarray  # [K, L, A] the actions leading to (and stopping at) each node

    def at(self, method: str, cost_lambda: float | None = None) -> MethodEval:
        lam = self.cost_lambda if cost_lambda is None else float(cost_lambda)
        if lam not in self.cost_lambdas:
            raise EvaluationError(f"cost_lambda={lam} is not in the evaluated sweep {list(self.cost_lambdas)}: "
                                  "pick one of those or evaluate with it in cost_lambdas.")
        return self.sweep[method][self.cost_lambdas.index(lam)]

    @property
    def single_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.sweep if m.startswith(("single:", "repeat:")))


# ---------------------------------------------------------------------------------------------- methods

def method_eval(tree: PathTree, rows: np.ndarray, node_prob: np.ndarray, note: str = "") -> MethodEval:
    """Expected quality and cost [S, P] of terminal-node distributions `node_prob` [S, P, K] on `rows`."""
    node_prob = np.asarray(node_prob, np.float64)
    quality = np.einsum("spk,pk->sp", node_prob, tree.quality[rows].astype(np.float64))
    cost = np.einsum("spk,pk->sp", node_prob, tree.path_cost()[rows].astype(np.float64))
    return MethodEval(node_prob, quality, cost, note)


def one_hot_nodes(nodes: np.ndarray, num_nodes: int) -> np.ndarray:
    """Terminal nodes [S, P] int -> distribution [S, P, K]."""
    return np.eye(num_nodes)[np.asarray(nodes)]


def fixed_node(tree: PathTree, rows: np.ndarray, node: int) -> np.ndarray:
    """[1, P, K]: every prompt ends at `node`."""
    return one_hot_nodes(np.full((1, len(rows)), node), tree.quality.shape[1])


def uniform_random_nodes(tree: PathTree, stop_action: bool) -> np.ndarray:
    """[K] probability that a uniformly random policy ends at each node: M choices at hop 0, then
    M + 1 (STOP included) when STOP is enabled, so reaching a depth-d node has probability
    1/M * (1/(M+1))^d and ending there (by STOP) 1/(M+1) of that, except at full length."""
    m, last = tree.num_models, int(tree.depth.max())
    if not stop_action:
        return np.where(tree.depth == last, float(m) ** -(last + 1), 0.0)
    reach = (1.0 / m) * (1.0 / (m + 1)) ** tree.depth.astype(np.float64)
    return np.where(tree.depth == last, reach, reach / (m + 1))


def best_fixed_leaf(tree: PathTree, rows: np.ndarray, cost_lambda: float) -> int:
    """The full-length node with the best mean value over `rows`."""
    leaves = np.flatnonzero(tree.depth == tree.depth.max())
    return int(leaves[np.argmax(tree.value(cost_lambda)[rows][:, leaves].mean(axis=0))])


def knn_one_shot_models(train: Split, test: Split, cost_lambda: float, k: int) -> np.ndarray:
    """[P] the model (one hop) with the best mean value quality - lambda * cost over each held-out
    prompt's k nearest training prompts, by cosine similarity of the question embeddings (ties: the
    lower model index)."""
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    similarity = unit(test.tree.root_embedding[test.rows]) @ unit(train.tree.root_embedding[train.rows]).T  # [P, R]
    neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # [P, k]
    m = train.tree.num_models
    first_hop = train.tree.value(cost_lambda)[train.rows][:, :m]  # depth-0 nodes are models 0..M-1
    return np.argmax(first_hop[neighbours].mean(axis=1), axis=1)


def nodes_of_actions(actions: np.ndarray, num_models: int) -> np.ndarray:
    """Terminal node [..., P] of action sequences [..., L, P] (STOP = M or -1 ends the path)."""
    actions = np.asarray(actions)
    node = np.full(actions.shape[:-2] + actions.shape[-1:], -1, np.int64)
    alive = np.ones(node.shape, bool)
    for d in range(actions.shape[-2]):
        a = actions[..., d, :]
        move = alive & (a >= 0) & (a < num_models)
        child = a if d == 0 else level_offset(num_models, d) + (node - level_offset(num_models, d - 1)) * num_models + a
        node, alive = np.where(move, child, node), move
    if (node < 0).any():
        raise EvaluationError("A path stops before its first hop: the policy must pick a model at hop 0.")
    return node


def action_table(tree: PathTree, stop_action: bool) -> np.ndarray:
    """[K, L, A] one-hot: the action taken at each hop on the way to (and, with STOP, stopping at) each
    node; without STOP only full-length nodes end a path."""
    m, hops, k = tree.num_models, int(tree.depth.max()) + 1, tree.quality.shape[1]
    table = np.zeros((k, hops, m + int(stop_action)))
    for node in range(k):
        at = node
        while at >= 0:
            table[node, tree.depth[at], tree.model[at]] = 1.0
            at = tree.parent[at]
        if stop_action and tree.depth[node] < hops - 1:  # ending early is a STOP at the next hop
            table[node, tree.depth[node] + 1, m] = 1.0
    return table


def ppo_policy(learner, params, env_config: EnvConfig) -> Policy:
    """A `Policy` from tree-mode PPO: greedy paths of `params` stacked over seeds ([S, ...] leaves,
    as `jax.vmap(trainer.train)` returns them), or of `{cost_lambda: stacked params}` for routers
    trained at each lambda of the sweep. A lambda-conditioned learner is fed the sweep's lambda."""
    import jax

    from hrjax.agent.tree_mode import TreeEnv, greedy_paths

    def policy(tree: PathTree, rows: np.ndarray, cost_lambda: float) -> np.ndarray:
        seeds = params
        if isinstance(params, Mapping) and all(isinstance(k, (int, float)) for k in params):
            if cost_lambda not in params:
                raise EvaluationError(f"No router was trained at cost_lambda={cost_lambda} (trained at "
                                      f"{sorted(params)}): train one there or drop it from the sweep.")
            seeds = params[cost_lambda]
        env = TreeEnv.create(tree, env_config)
        actions = jax.vmap(lambda p: greedy_paths(learner, p, env, rows, cost_lambda)[2])(seeds)  # [S, L, P]
        return nodes_of_actions(np.asarray(actions), tree.num_models)

    return policy


def evaluate(train: Split, test: Split, env: EnvConfig, router: Policy, cost_lambdas: Sequence[float] = (),
             knn_k: int = 5, model_names: Sequence[str] | None = None) -> Evaluation:
    """Every method on `test` at `env.cost_lambda` and at each of `cost_lambdas` (the AIQ sweep).
    `router(tree, rows, cost_lambda)` -> terminal nodes [S, P], e.g. `ppo_policy(...)`."""
    tree, m = test.tree, test.tree.num_models
    hops = int(tree.depth.max()) + 1
    for name, split in (("training", train), ("held-out", test)):
        if int(split.tree.depth.max()) + 1 != env.num_hops or split.tree.num_models != m:
            raise EvaluationError(f"The {name} tree has {int(split.tree.depth.max()) + 1} hops and "
                                  f"{split.tree.num_models} models, but env.num_hops is {env.num_hops} and the "
                                  f"held-out tree has {m} models: build both trees with the same pool and env.")
    if train.tree.root_embedding.shape[-1] != tree.root_embedding.shape[-1]:
        raise EvaluationError("The training and held-out trees embed with different widths: build both with the "
                              "same encoder.")
    if not 1 <= knn_k <= train.rows.size:
        raise EvaluationError(f"knn_k={knn_k} must be in [1, {train.rows.size}] (the training prompts): lower it.")
    names = tuple(model_names) if model_names is not None else tuple(f"m{i}" for i in range(m))
    if len(names) != m:
        raise EvaluationError(f"{len(names)} model names for a pool of {m} models: pass one name per model.")
    lambdas = tuple(sorted({float(x) for x in cost_lambdas} | {float(env.cost_lambda)}))
    rows, k = test.rows, tree.quality.shape[1]

    fixed = {f"single:{n}": method_eval(tree, rows, fixed_node(tree, rows, i)) for i, n in enumerate(names)}
    if hops > 1:
        fixed |= {f"repeat:{n}": method_eval(tree, rows, fixed_node(tree, rows, tree.node_of_path([i] * hops)))
                  for i, n in enumerate(names)}
    fixed["random"] = method_eval(tree, rows, np.broadcast_to(uniform_random_nodes(tree, env.stop_action),
                                                              (1, rows.size, k)))
    sweep = {name: (result,) * len(lambdas) for name, result in fixed.items()}

    def path_name(node: int) -> str:
        return ">".join(names[int(tree.model[a])] for a in _ancestry(tree, node))

    best, knn, routed, oracle = [], [], [], []
    for lam in lambdas:
        leaf = best_fixed_leaf(train.tree, train.rows, lam)
        best.append(method_eval(tree, rows, fixed_node(tree, rows, leaf), note=path_name(leaf)))
        knn.append(method_eval(tree, rows, one_hot_nodes(knn_one_shot_models(train, test, lam, knn_k)[None], k)))
        nodes = np.asarray(router(tree, rows, lam))
        if nodes.ndim != 2 or nodes.shape[1] != rows.size or nodes.min() < 0 or nodes.max() >= k:
            raise EvaluationError(f"The router policy returned nodes of shape {nodes.shape} in [{nodes.min()}, "
                                  f"{nodes.max()}]; it must return [seeds, {rows.size}] terminal nodes in [0, {k}) "
                                  "(one per held-out prompt and seed).")
        routed.append(method_eval(tree, rows, one_hot_nodes(nodes, k)))
        _, best_nodes = tree.oracle(lam, leaves_only=not env.stop_action)
        oracle.append(method_eval(tree, rows, one_hot_nodes(best_nodes[rows][None], k)))
    sweep |= {"best_fixed": tuple(best), "knn_one_shot": tuple(knn), ROUTER: tuple(routed), ORACLE: tuple(oracle)}
    groups = {OVERALL: np.ones(rows.size, bool)} | {t: np.asarray(test.tasks) == t for t in dict.fromkeys(test.tasks)}
    return Evaluation(float(env.cost_lambda), lambdas, sweep, groups, names, hops, env.stop_action,
                      action_table(tree, env.stop_action))


def _ancestry(tree: PathTree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.insert(0, node)
        node = int(tree.parent[node])
    return path


# ---------------------------------------------------------------------------------------------- metrics

def t_interval(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-distribution interval of the mean over seeds; zero width for one sample
    or equal samples."""
    from scipy import stats

    x = np.asarray(samples, np.float64)
    mean = float(x.mean())
    if x.size < 2 or np.ptp(x) == 0:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def pareto_hull(cost: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """[H, 2] (cost, quality) vertices, cost ascending, of the non-decreasing upper convex hull:
    points another point beats on both (cheaper or equal and at least as good) are dropped, then the
    upper convex hull of the rest is taken (points on a hull edge are dropped too)."""
    points = sorted(zip(map(float, cost), map(float, quality)), key=lambda p: (p[0], -p[1]))
    frontier = []
    for c, q in points:
        if not frontier or q > frontier[-1][1]:
            frontier.append((c, q))
    hull = []
    for p in frontier:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    return np.array(hull, np.float64).reshape(-1, 2)


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def hull_area(hull: np.ndarray, c_min: float, c_max: float) -> float:
    """AIQ of one hull [H, 2] on [c_min, c_max]: the mean over cost of f(c), where f is 0 left of the
    hull's first (cheapest) vertex, linear between vertices and flat at the last vertex's quality to
    its right; the width-0 range gives f(c_min)."""
    xs, ys = hull[:, 0], hull[:, 1]

    def f(c):
        return 0.0 if c < xs[0] else float(np.interp(c, xs, ys))

    if c_max <= c_min:
        return f(c_min)
    area = 0.0
    cuts = np.unique(np.clip(np.concatenate([[c_min, c_max], xs]), c_min, c_max))
    for a, b in zip(cuts[:-1], cuts[1:]):  # f is linear inside each piece; the jump at xs[0] is a cut
        mid = 0.5 * (a + b)
        if mid >= xs[0]:
            area += (b - a) * 0.5 * (np.interp(a, xs, ys) + np.interp(b, xs, ys))
    return area / (c_max - c_min)


def _group_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[S, P] -> [S] mean over the group's prompts."""
    return x[:, mask].mean(axis=1)


def _ratio(a: np.ndarray, b: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / b, np.nan)


def summarize(ev: Evaluation) -> dict:
    """The JSON-able summary every report reads. Per group ('overall' and each task):

    - `methods[name][group]`: quality, cost, aiq as {"mean", "low", "high"} (95% t over seeds;
      zero width for deterministic methods), the points [[lambda, cost, quality], ...] of the sweep
      (seed means), the action shares [L][A] at `cost_lambda` and, for best_fixed, the path;
      `methods["zero_router"][group]["aiq"]`: the hull of every single-model point.
    - `router[group]`: quality, cost, gain_over_best_single = router / best single quality,
      gain_over_average_single = router / mean quality of the single-model methods, apgr =
      (router - best single) / (oracle - best single) (null when the oracle is no better), aiq;
      `best_single` (the single-model method of highest mean quality in that group), its quality,
      and the oracle's quality.

    AIQ (RouterBench's average improvement in quality): each method's (cost, quality) points over the
    lambda sweep (per seed for the router) give a non-decreasing upper convex hull (`pareto_hull`);
    AIQ = (1 / (c_max - c_min)) * integral over [c_min, c_max] of f(c) (`hull_area`), with f = 0 left
    of the hull's cheapest point, linear between hull points and flat to the right of its last; the
    range is shared by every method in a group: the min and max cost of all points of all methods
    (every seed, every lambda). Single models and random routing are one point each.
    Top level: cost_lambda(s), num_seeds, router_quality / apgr / aiq (overall means),
    best_single_quality, oracle_quality and aiq_by_method (overall means)."""
    methods = {name: {} for name in ev.sweep} | {"zero_router": {}}
    router = {}
    shares = {name: np.einsum("spk,kla->spla", ev.at(name).node_prob, ev.action_table) for name in ev.sweep}
    for group, mask in ev.groups.items():
        # points[name]: [S, lambdas, 2] (cost, quality), seeds of a deterministic method are 1
        points = {name: np.stack([np.stack([_group_mean(r.cost, mask), _group_mean(r.quality, mask)], -1)
                                  for r in results], axis=1) for name, results in ev.sweep.items()}
        every = np.concatenate([p.reshape(-1, 2) for p in points.values()])
        c_min, c_max = float(every[:, 0].min()), float(every[:, 0].max())
        aiq = {name: np.array([hull_area(pareto_hull(*seed.T), c_min, c_max) for seed in p])
               for name, p in points.items()}
        singles = np.concatenate([points[name][0] for name in ev.single_methods])
        aiq["zero_router"] = np.array([hull_area(pareto_hull(*singles.T), c_min, c_max)])
        for name in ev.sweep:
            at = ev.at(name)
            entry = {"quality": t_interval(_group_mean(at.quality, mask)),
                     "cost": t_interval(_group_mean(at.cost, mask)), "aiq": t_interval(aiq[name]),
                     "points": [[lam, *map(float, p)] for lam, p in zip(ev.cost_lambdas, points[name].mean(axis=0))],
                     "action_share": shares[name][:, mask].mean(axis=(0, 1)).tolist()}
            if at.note:
                entry["path"] = at.note
            methods[name][group] = entry
        methods["zero_router"][group] = {"aiq": t_interval(aiq["zero_router"])}
        single_quality = {name: float(_group_mean(ev.at(name).quality, mask)[0]) for name in ev.single_methods}
        best_single = max(single_quality, key=single_quality.get)
        best, average = single_quality[best_single], float(np.mean(list(single_quality.values())))
        oracle = float(_group_mean(ev.at(ORACLE).quality, mask)[0])
        quality = _group_mean(ev.at(ROUTER).quality, mask)
        with np.errstate(divide="ignore", invalid="ignore"):
            apgr = np.where(oracle > best, (quality - best) / (oracle - best), np.nan)
        router[group] = {"quality": t_interval(quality), "cost": t_interval(_group_mean(ev.at(ROUTER).cost, mask)),
                         "gain_over_best_single": t_interval(_ratio(quality, best)),
                         "gain_over_average_single": t_interval(_ratio(quality, average)),
                         "apgr": t_interval(apgr), "aiq": t_interval(aiq[ROUTER]),
                         "best_single": best_single, "best_single_quality": best,
                         "average_single_quality": average, "oracle_quality": oracle}
    overall = router[OVERALL]
    summary = {
        "cost_lambda": ev.cost_lambda, "cost_lambdas": list(ev.cost_lambdas), "num_seeds": len(ev.at(ROUTER).quality),
        "num_prompts": {g: int(mask.sum()) for g, mask in ev.groups.items()}, "model_names": list(ev.model_names),
        "num_hops": ev.num_hops, "stop_action": ev.stop_action,
        "router_quality": overall["quality"][0], "best_single": overall["best_single"],
        "best_single_quality": overall["best_single_quality"], "oracle_quality": overall["oracle_quality"],
        "apgr": overall["apgr"][0], "aiq": overall["aiq"][0],
        "aiq_by_method": {name: groups[OVERALL]["aiq"][0] for name, groups in methods.items()},
        "methods": methods, "router": router,
    }
    return _jsonable(summary)


def _jsonable(x):
    """Tuples to {"mean", "low", "high"}, NumPy scalars to floats, NaN / inf to None."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, tuple) and len(x) == 3:
        return {key: _jsonable(v) for key, v in zip(("mean", "low", "high"), x)}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_summary(path: str | os.PathLike, summary: dict) -> Path:
    """Writes `summary` (from `summarize`) as JSON, atomically -> the path."""
    path = Path(path)
    with atomic_file(path, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=False)
        f.write("\n")
    return path


def fmt(x: float | None) -> str:
    """How every report prints a number (tables and plot annotations alike)."""
    return "n/a" if x is None else f"{x:.3f}"


def fmt_interval(interval: dict) -> str:
    """'mean' for a zero-width interval, else 'mean [low, high]'."""
    if interval["mean"] is None or interval["low"] == interval["high"]:
        return fmt(interval["mean"])
    return f"{fmt(interval['mean'])} [{fmt(interval['low'])}, {fmt(interval['high'])}]"


def method_label(summary: dict, name: str) -> str:
    path = summary["methods"][name].get(OVERALL, {}).get("path")
    return f"{name} ({path})" if path else name


def markdown_table(summary: dict) -> str:
    """Two Markdown tables: every method's quality and cost per group and its AIQ (95% intervals
    over seeds in brackets); then the router's gains, APGR and AIQ per group."""
    groups = list(summary["num_prompts"])
    head = ["method"] + [f"{col} ({g})" for g in groups for col in ("quality", "cost")] + ["AIQ"]
    lines = [_row(head), _row(["---"] * len(head))]
    for name, entry in summary["methods"].items():
        if name == "zero_router":
            cells = ["", ""] * len(groups)
        else:
            cells = [fmt_interval(entry[g][col]) for g in groups for col in ("quality", "cost")]
        lines.append(_row([method_label(summary, name)] + cells + [fmt_interval(entry[OVERALL]["aiq"])]))
    lines += ["", _row(["group", "router quality", "best single", "oracle", "gain vs best single",
                        "gain vs average single", "APGR", "AIQ"]), _row(["---"] * 8)]
    for g in groups:
        r = summary["router"][g]
        lines.append(_row([g, fmt_interval(r["quality"]), f"{fmt(r['best_single_quality'])} ({r['best_single']})",
                           fmt(r["oracle_quality"]), fmt_interval(r["gain_over_best_single"]),
                           fmt_interval(r["gain_over_average_single"]), fmt_interval(r["apgr"]),
                           fmt_interval(r["aiq"])]))
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
