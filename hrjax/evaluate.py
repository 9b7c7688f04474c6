"""Held-out evaluation of a router against baselines, all read from path trees.

Two splits: a tree over the training prompts (where the best fixed path is chosen and the one-shot
router is fitted) and a tree over held-out prompts (where everything is scored), each prompt with a
task label. Every method gives, per held-out prompt, a distribution over terminal tree nodes (one-hot
for a deterministic path; the exact expectation for uniform-random routing), hence a quality and a
cumulative normalised cost. Methods (keys of `Evaluation.sweep`, in display order):

- `single:<model>` one hop of the model, `repeat:<model>` the model for every hop (when L > 1);
- `random`: a uniformly random valid action at every hop (STOP, when enabled, is one of M + 1
  actions from hop 1 on), as an exact expectation;
- `best_fixed`: the path with the best mean value quality - lambda * cost on the training split,
  applied to every held-out prompt: a full-length path, or with STOP any path (one that stops early
  is shown as `model>STOP`);
- `knn_one_shot`: one model, one hop, chosen per prompt as the best mean value over the k nearest
  training prompts (cosine on the question's embedding);
- `router`: the trained router's greedy paths, one set per seed;
- `oracle`: the per-prompt best value over every answer a method here can end with
  (`answer_nodes`: every node with STOP; without it, full-length paths and the one-hop answers of the
  single-model and one-shot baselines); ties go to the lower cost, then the higher quality
  (`oracle_nodes`). Besides its points at the sweep's lambdas, its exact cost-quality curve
  (`Evaluation.oracle_curve`) holds one point per distinct set of choices over all lambdas in
  [0, +inf], so it bounds every method.

`summarize` turns an `Evaluation` into the JSON-able summary (per task and overall: quality, cost,
AIQ, APGR, the router's gains and gap recovered, 95% t-intervals over seeds) that `write_summary`,
`markdown_table` and `hrjax.report` all read, so every number shown comes from one place.
Shapes: S seeds (1 for deterministic methods), P held-out prompts, K tree nodes, L hops, M models,
A actions (M, + STOP when enabled), B points of the oracle's curve.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from hrjax.env.mdp import EnvConfig
from hrjax.env.tree import OfficialScores, PathTree, level_offset
from hrjax.errors import HrjaxError
from hrjax.rundir import RunPath, as_path, open_for_writing

OVERALL = "overall"
ROUTER, ORACLE = "router", "oracle"

# (tree, tree rows [P], cost_lambda) -> terminal node [S, P] per seed
Policy = Callable[[PathTree, np.ndarray, float], np.ndarray]


class EvaluationError(HrjaxError, ValueError):
    """Splits, trees or a policy that cannot be evaluated together."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Prompts of one split: rows of a path tree and each row's task label; optionally the tree's official
    metrics (`hrjax.env.tree.OfficialScores`, all N rows), which the held-out split's reports then show."""

    tree: PathTree
    rows: np.ndarray  # [P] int tree rows
    tasks: tuple[str, ...]  # [P]
    official: OfficialScores | None = None

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
        if self.official is not None and self.official.values.shape[:2] != self.tree.quality.shape:
            raise EvaluationError(f"The official scores hold {self.official.values.shape[:2]} (prompts, nodes) but the "
                                  f"tree {self.tree.quality.shape}: pass the scores saved with this tree.")


@dataclasses.dataclass(frozen=True, eq=False)
class MethodEval:
    """One method at one cost lambda on the held-out split."""

    node_prob: np.ndarray  # [S, P, K] probability that the episode ends at each node
    quality: np.ndarray  # [S, P] expected quality of the final answer
    cost: np.ndarray  # [S, P] expected cumulative normalised cost
    note: str = ""  # e.g. the best fixed path's models
    official: np.ndarray | None = None  # [S, P, J] expected official metrics (`Evaluation.official_names`; NaN
    # past the prompt's family's metrics)


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
    oracle_curve: np.ndarray  # [B, P, 2] (cost, quality) per prompt at each lambda where the oracle's choices differ
    official_families: np.ndarray | None = None  # [P] str, each held-out prompt's benchmark family (with official)
    official_names: np.ndarray | None = None  # [P, J] str, the metric of each column of `MethodEval.official`

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

def method_eval(tree: PathTree, rows: np.ndarray, node_prob: np.ndarray, note: str = "",
                official: OfficialScores | None = None) -> MethodEval:
    """Expected quality and cost [S, P] of terminal-node distributions `node_prob` [S, P, K] on `rows`, and
    with the tree's `official` scores the expected official metrics [S, P, J] (NaN where a prompt's family has
    fewer than J)."""
    node_prob = np.asarray(node_prob, np.float64)
    quality = np.einsum("spk,pk->sp", node_prob, tree.quality[rows].astype(np.float64))
    cost = np.einsum("spk,pk->sp", node_prob, tree.path_cost()[rows].astype(np.float64))
    expected = None if official is None else np.einsum("spk,pkj->spj", node_prob,
                                                       official.values[rows].astype(np.float64))
    return MethodEval(node_prob, quality, cost, note, expected)


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


def terminal_nodes(tree: PathTree, stop_action: bool) -> np.ndarray:
    """[E] the nodes an episode can end at: every node with STOP, else the full-length ones."""
    return np.arange(tree.quality.shape[1]) if stop_action else np.flatnonzero(tree.depth == tree.depth.max())


def answer_nodes(tree: PathTree, stop_action: bool) -> np.ndarray:
    """[E] the nodes some evaluated method can end at, the oracle's choices: the episode ends
    (`terminal_nodes`) and the one-hop nodes (the single-model and one-shot baselines)."""
    return np.flatnonzero(stop_action | (tree.depth == 0) | (tree.depth == tree.depth.max()))


def _preferred(value: np.ndarray, cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """[...] index along the last axis of the preferred entry: the highest value, then the lowest cost,
    then the highest quality (then the first)."""
    best = value == value.max(axis=-1, keepdims=True)
    best &= cost == np.where(best, cost, np.inf).min(axis=-1, keepdims=True)
    return np.argmax(np.where(best, quality, -np.inf), axis=-1)


def _end_costs_and_qualities(tree: PathTree, rows: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative cost [P, E], quality [P, E]) of the nodes `ends` of the prompts `rows`, in float64."""
    return (tree.path_cost()[rows][:, ends].astype(np.float64), tree.quality[rows][:, ends].astype(np.float64))


def best_fixed_node(tree: PathTree, rows: np.ndarray, cost_lambda: float, stop_action: bool) -> int:
    """The terminal node (`terminal_nodes`: with STOP a fixed path may stop early) with the best mean
    value quality - lambda * cost over `rows`; ties as the oracle's (lower cost, then higher quality)."""
    ends = terminal_nodes(tree, stop_action)
    cost, quality = (x.mean(axis=0) for x in _end_costs_and_qualities(tree, rows, ends))
    return int(ends[_preferred(quality - cost_lambda * cost, cost, quality)])


def oracle_nodes(tree: PathTree, rows: np.ndarray, cost_lambdas: Sequence[float], stop_action: bool) -> np.ndarray:
    """[B, P] per lambda of `cost_lambdas` and prompt of `rows`: the node (of `answer_nodes`) of the best
    value quality - lambda * cost; ties: the lower cost, then the higher quality. lambda = +inf: the
    cheapest node (ties: the higher quality)."""
    ends = answer_nodes(tree, stop_action)
    cost, quality = _end_costs_and_qualities(tree, rows, ends)
    return np.stack([ends[_preferred(-cost if math.isinf(lam) else quality - lam * cost, cost, quality)]
                     for lam in cost_lambdas])


def oracle_curve_lambdas(tree: PathTree, rows: np.ndarray, stop_action: bool) -> np.ndarray:
    """[B] lambdas at which the oracle takes each of its distinct sets of choices over [0, +inf].
    A prompt's choice changes only at the slopes of the edges of its hull (`pareto_hull`) of its
    candidates' (`answer_nodes`) (cost, quality), so the oracle is constant between consecutive
    breakpoints: -> 0, the midpoint of each pair of consecutive breakpoints, and +inf (midpoints need
    no floating-point tie at a breakpoint to land on the right side)."""
    cost, quality = _end_costs_and_qualities(tree, rows, answer_nodes(tree, stop_action))
    hulls = [pareto_hull(c, q) for c, q in zip(cost, quality)]
    breakpoints = np.unique(np.concatenate([np.diff(h[:, 1]) / np.diff(h[:, 0]) for h in hulls]))
    return np.concatenate([[0.0], (breakpoints[:-1] + breakpoints[1:]) / 2, [np.inf]])


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

    @functools.partial(jax.jit, static_argnums=0)
    def greedy_actions(settings: tuple, arrays, seeds, rows, cost_lambda):
        """-> [S, L, P] the greedy actions of every seed, one program per tree shape (`TreeEnv` less its arrays:
        `settings`)."""
        env = TreeEnv(arrays, *settings)
        return jax.vmap(lambda p: greedy_paths(learner, p, env, rows, cost_lambda)[2])(seeds)

    def policy(tree: PathTree, rows: np.ndarray, cost_lambda: float) -> np.ndarray:
        seeds = params
        if isinstance(params, Mapping) and all(isinstance(k, (int, float)) for k in params):
            if cost_lambda not in params:
                raise EvaluationError(f"No router was trained at cost_lambda={cost_lambda} (trained at "
                                      f"{sorted(params)}): train one there or drop it from the sweep.")
            seeds = params[cost_lambda]
        env = TreeEnv.create(tree, env_config)
        actions = greedy_actions(tuple(env[1:]), env.arrays, seeds, np.asarray(rows), np.float32(cost_lambda))
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

    def scored(node_prob: np.ndarray, note: str = "") -> MethodEval:
        return method_eval(tree, rows, node_prob, note, test.official)

    fixed = {f"single:{n}": scored(fixed_node(tree, rows, i)) for i, n in enumerate(names)}
    if hops > 1:
        fixed |= {f"repeat:{n}": scored(fixed_node(tree, rows, tree.node_of_path([i] * hops)))
                  for i, n in enumerate(names)}
    fixed["random"] = scored(np.broadcast_to(uniform_random_nodes(tree, env.stop_action), (1, rows.size, k)))
    sweep = {name: (result,) * len(lambdas) for name, result in fixed.items()}

    def path_name(node: int) -> str:
        stop = ["STOP"] if tree.depth[node] < hops - 1 else []
        return ">".join([names[int(tree.model[a])] for a in _ancestry(tree, node)] + stop)

    best, knn, routed, oracle = [], [], [], []
    for lam in lambdas:
        node = best_fixed_node(train.tree, train.rows, lam, env.stop_action)
        best.append(scored(fixed_node(tree, rows, node), note=path_name(node)))
        knn.append(scored(one_hot_nodes(knn_one_shot_models(train, test, lam, knn_k)[None], k)))
        nodes = np.asarray(router(tree, rows, lam))
        if nodes.ndim != 2 or nodes.shape[1] != rows.size or nodes.min() < 0 or nodes.max() >= k:
            raise EvaluationError(f"The router policy returned nodes of shape {nodes.shape} in [{nodes.min()}, "
                                  f"{nodes.max()}]; it must return [seeds, {rows.size}] terminal nodes in [0, {k}) "
                                  "(one per held-out prompt and seed).")
        routed.append(scored(one_hot_nodes(nodes, k)))
        oracle.append(scored(one_hot_nodes(oracle_nodes(tree, rows, [lam], env.stop_action), k)))
    sweep |= {"best_fixed": tuple(best), "knn_one_shot": tuple(knn), ROUTER: tuple(routed), ORACLE: tuple(oracle)}
    groups = {OVERALL: np.ones(rows.size, bool)} | {t: np.asarray(test.tasks) == t for t in dict.fromkeys(test.tasks)}
    curve = oracle_nodes(tree, rows, oracle_curve_lambdas(tree, rows, env.stop_action), env.stop_action)  # [B, P]
    prompts = np.arange(rows.size)
    oracle_curve = np.stack([tree.path_cost()[rows][prompts, curve], tree.quality[rows][prompts, curve]], -1)
    official = {} if test.official is None else dict(official_families=test.official.families[rows],
                                                     official_names=test.official.names[rows])
    return Evaluation(float(env.cost_lambda), lambdas, sweep, groups, names, hops, env.stop_action,
                      action_table(tree, env.stop_action), oracle_curve.astype(np.float64), **official)


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


def apgr_anchors(single_points: Mapping[str, Sequence[float]]) -> dict:
    """RouteLLM's weak and strong model among the single-model methods {name: (cost, quality)}: weak =
    the cheapest (ties: the better), strong = the best (ties: the cheaper), i.e. the two ends of the
    single models' hull (the zero router). `reason` says why APGR is undefined (else None): the best
    is also the cheapest, so there is no cost range to average over (equal costs end there too: the
    weak model is the best of the cheapest)."""
    weak = min(single_points, key=lambda n: (single_points[n][0], -single_points[n][1]))
    strong = max(single_points, key=lambda n: (single_points[n][1], -single_points[n][0]))
    (weak_cost, weak_quality), (strong_cost, strong_quality) = single_points[weak], single_points[strong]
    reason = None
    if strong_quality <= weak_quality:
        reason = (f"the best single model, {strong} (quality {fmt(strong_quality)} at cost {fmt(strong_cost)}), is "
                  "also the cheapest: there is no cost range between a weak and a strong model to average over")
    return {"weak": weak, "weak_cost": float(weak_cost), "weak_quality": float(weak_quality), "strong": strong,
            "strong_cost": float(strong_cost), "strong_quality": float(strong_quality), "reason": reason}


def apgr(hull: np.ndarray, anchors: dict) -> float:
    """RouteLLM's APGR of one hull [H, 2]: the mean over cost c in [weak cost, strong cost] of
    PGR(c) = (f(c) - weak quality) / (strong quality - weak quality), f as in `hull_area` (0 left of
    the hull's cheapest point); NaN when `anchors` (`apgr_anchors`) give a reason."""
    if anchors["reason"]:
        return math.nan
    mean_quality = hull_area(hull, anchors["weak_cost"], anchors["strong_cost"])
    return (mean_quality - anchors["weak_quality"]) / (anchors["strong_quality"] - anchors["weak_quality"])


def summarize(ev: Evaluation) -> dict:
    """The JSON-able summary every report reads. Per group ('overall' and each task):

    - `methods[name][group]`: quality, cost, aiq, apgr as {"mean", "low", "high"} (95% t over seeds;
      zero width for deterministic methods), the points [[lambda, cost, quality], ...] of the sweep
      (seed means), the action shares [L][A] at `cost_lambda`, for best_fixed the path and for the
      oracle its exact `frontier` [[cost, quality], ...] (the hull of `Evaluation.oracle_curve`);
      `methods["zero_router"][group]`: aiq and apgr of the hull of every single-model point.
    - `router[group]`: quality, cost, gain_over_best_single = router / best single quality,
      gain_over_average_single = router / mean quality of the single-model methods, gap_recovered,
      apgr, aiq, `apgr_anchors` (`apgr_anchors`); `best_single` (the single-model method of highest
      mean quality in that group, ties: the first listed), its quality, and the oracle's quality.

    gap_recovered (a point ratio at the reported lambda) = (router - best single) / (oracle - best
    single) qualities, the oracle maximising quality - lambda * cost per prompt and the best single
    chosen on these held-out prompts' quality; null when the oracle is no better.
    APGR (RouteLLM's average performance gap recovered, `apgr`): with weak = the cheapest single
    model and strong = the best one (`apgr_anchors`), the mean over normalised cost c in [weak cost,
    strong cost] of PGR(c) = (q(c) - weak quality) / (strong quality - weak quality), where q(c) is
    the method's hull over the lambda sweep (per seed for the router, then the t-interval), read as
    for AIQ; null with a stated `apgr_anchors.reason` when the best single model is also the cheapest.
    RouteLLM's cost axis is the share of calls to the strong model; ours is normalised cost, so a
    router cheaper or better than the strong model can score above 1.
    AIQ (RouterBench's average improvement in quality): each method's (cost, quality) points over the
    lambda sweep (per seed for the router; the oracle's exact curve) give a non-decreasing upper
    convex hull (`pareto_hull`); AIQ = (1 / (c_max - c_min)) * integral over [c_min, c_max] of f(c)
    (`hull_area`), with f = 0 left of the hull's cheapest point, linear between hull points and flat
    to the right of its last; the range `aiq_cost_range[group]` is shared by every method in a group:
    the min and max cost of all points of all methods (every seed, every lambda, the oracle's curve).
    Single models and random routing are one point each. The oracle's curve starts at every prompt's
    cheapest node, so its AIQ and its quality at every cost bound every method's.
    Top level: cost_lambda(s), num_seeds, router_quality / gap_recovered / apgr / aiq (overall
    means), apgr_anchors, best_single_quality, oracle_quality, aiq_by_method (overall means) and
    aiq_cost_range.

    Official metrics (when the held-out split has the tree's `OfficialScores`; `quality` above is the training
    reward, `hrjax.env.mdp.RoutingEnv.quality_fn`): `official_metrics[group]` = {family: its metric names, the
    headline first (`hrjax.tasks.official.HEADLINE_METRIC`)} of the group's prompts; per method and group
    `official_headline` = each prompt's family headline metric, averaged over the group's prompts (over a
    mixture's `overall`, families' different metrics averaged by prompt), and, for a group of one family,
    `official` = {metric: interval} of each of its metrics; the router's also in `router[group]`. Each is
    the expected metric at the method's terminal nodes (the oracle's: at the nodes it picks by reward quality
    - lambda * cost), with the same 95% t-intervals over seeds as quality."""
    methods = {name: {} for name in ev.sweep} | {"zero_router": {}}
    router, cost_range = {}, {}
    shares = {name: np.einsum("spk,kla->spla", ev.at(name).node_prob, ev.action_table) for name in ev.sweep}
    official_metrics = {} if ev.official_names is None else {g: _family_metrics(ev, mask) for g, mask in
                                                             ev.groups.items()}
    for group, mask in ev.groups.items():
        # points[name]: [S, lambdas, 2] (cost, quality), seeds of a deterministic method are 1
        points = {name: np.stack([np.stack([_group_mean(r.cost, mask), _group_mean(r.quality, mask)], -1)
                                  for r in results], axis=1) for name, results in ev.sweep.items()}
        curves = points | {ORACLE: ev.oracle_curve[:, mask].mean(axis=1)[None]}  # the oracle's exact curve
        every = np.concatenate([p.reshape(-1, 2) for p in curves.values()])
        c_min, c_max = float(every[:, 0].min()), float(every[:, 0].max())
        cost_range[group] = [c_min, c_max]
        singles = np.concatenate([points[name][0] for name in ev.single_methods])
        hulls = {name: [pareto_hull(*seed.T) for seed in p] for name, p in curves.items()}
        hulls["zero_router"] = [pareto_hull(*singles.T)]
        anchors = apgr_anchors({name: points[name][0, 0] for name in ev.single_methods})
        aiq = {name: np.array([hull_area(h, c_min, c_max) for h in hs]) for name, hs in hulls.items()}
        recovered = {name: np.array([apgr(h, anchors) for h in hs]) for name, hs in hulls.items()}
        for name in ev.sweep:
            at = ev.at(name)
            entry = {"quality": t_interval(_group_mean(at.quality, mask)),
                     "cost": t_interval(_group_mean(at.cost, mask)), "aiq": t_interval(aiq[name]),
                     "apgr": t_interval(recovered[name]),
                     "points": [[lam, *map(float, p)] for lam, p in zip(ev.cost_lambdas, points[name].mean(axis=0))],
                     "action_share": shares[name][:, mask].mean(axis=(0, 1)).tolist()}
            if at.note:
                entry["path"] = at.note
            if name == ORACLE:
                entry["frontier"] = hulls[ORACLE][0].tolist()
            if at.official is not None:
                entry |= _official_entry(at.official, mask, official_metrics[group])
            methods[name][group] = entry
        methods["zero_router"][group] = {"aiq": t_interval(aiq["zero_router"]),
                                         "apgr": t_interval(recovered["zero_router"])}
        single_quality = {name: float(_group_mean(ev.at(name).quality, mask)[0]) for name in ev.single_methods}
        best_single = max(single_quality, key=single_quality.get)
        best, average = single_quality[best_single], float(np.mean(list(single_quality.values())))
        oracle = float(_group_mean(ev.at(ORACLE).quality, mask)[0])
        quality = _group_mean(ev.at(ROUTER).quality, mask)
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = np.where(oracle > best, (quality - best) / (oracle - best), np.nan)
        router[group] = {"quality": t_interval(quality), "cost": t_interval(_group_mean(ev.at(ROUTER).cost, mask)),
                         "gain_over_best_single": t_interval(_ratio(quality, best)),
                         "gain_over_average_single": t_interval(_ratio(quality, average)),
                         "gap_recovered": t_interval(gap), "apgr": t_interval(recovered[ROUTER]),
                         "aiq": t_interval(aiq[ROUTER]), "apgr_anchors": anchors,
                         "best_single": best_single, "best_single_quality": best,
                         "average_single_quality": average, "oracle_quality": oracle}
        router[group] |= {key: methods[ROUTER][group][key] for key in ("official_headline", "official")
                          if key in methods[ROUTER][group]}
    overall = router[OVERALL]
    summary = {
        "cost_lambda": ev.cost_lambda, "cost_lambdas": list(ev.cost_lambdas), "num_seeds": len(ev.at(ROUTER).quality),
        "num_prompts": {g: int(mask.sum()) for g, mask in ev.groups.items()}, "model_names": list(ev.model_names),
        "num_hops": ev.num_hops, "stop_action": ev.stop_action,
        "router_quality": overall["quality"][0], "best_single": overall["best_single"],
        "best_single_quality": overall["best_single_quality"], "oracle_quality": overall["oracle_quality"],
        "gap_recovered": overall["gap_recovered"][0], "apgr": overall["apgr"][0],
        "apgr_anchors": overall["apgr_anchors"], "aiq": overall["aiq"][0],
        "aiq_by_method": {name: groups[OVERALL]["aiq"][0] for name, groups in methods.items()},
        "aiq_cost_range": cost_range, "methods": methods, "router": router,
    }
    if official_metrics:
        summary["official_metrics"] = official_metrics
    return _jsonable(summary)


def _family_metrics(ev: Evaluation, mask: np.ndarray) -> dict[str, list[str]]:
    """{family: its official metric names, headline first} of the group's prompts, in order of appearance."""
    metrics = {}
    for family, names in zip(ev.official_families[mask], ev.official_names[mask]):
        metrics.setdefault(str(family), [str(n) for n in names if n])
    return metrics


def _official_entry(official: np.ndarray, mask: np.ndarray, family_metrics: dict[str, list[str]]) -> dict:
    """A method's official figures in one group from its expected metrics [S, P, J] (see `summarize`)."""
    entry = {"official_headline": t_interval(_group_mean(official[..., 0], mask))}
    if len(family_metrics) == 1:
        (names,) = family_metrics.values()
        entry["official"] = {name: t_interval(_group_mean(official[..., j], mask)) for j, name in enumerate(names)}
    return entry


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


def write_summary(path: str | os.PathLike, summary: dict) -> RunPath:
    """Writes `summary` (from `summarize`) as JSON to a local or gs:// path (`open_for_writing`) -> the path."""
    path = as_path(path)
    with open_for_writing(path, "w") as f:
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


def official_label(summary: dict, group: str) -> str | None:
    """The official figure shown for a group (`summarize`'s `official_headline`): 'family metric' for a group of
    one family, 'headline metrics' for a mixed one; None when the summary has no official metrics."""
    families = summary.get("official_metrics", {}).get(group)
    if not families:
        return None
    if len(families) == 1:
        ((family, names),) = families.items()
        return f"{family} {names[0]}"
    return "headline metrics"


def markdown_table(summary: dict) -> str:
    """Two Markdown tables: every method's quality (the training reward), official figure (`official_label`,
    when the summary has them and they differ from quality somewhere in the group: the specialist world's and
    reasoning-gym's official metric is their training scorer) and cost per group, its AIQ and APGR (overall; 95%
    intervals over seeds in brackets); then per group the router's gains, gap recovered at lambda, APGR with its
    weak and strong model (or why it is undefined) and AIQ."""
    groups = list(summary["num_prompts"])
    methods = [entry for name, entry in summary["methods"].items() if name != "zero_router"]

    def shows_official(group: str) -> bool:
        return bool(official_label(summary, group)) and any(
            entry[group]["official_headline"] != entry[group]["quality"] for entry in methods)

    columns = [(g, col) for g in groups for col in ("quality", "official_headline", "cost")
               if col != "official_headline" or shows_official(g)]

    def title(group: str, col: str) -> str:
        shown = f"official {official_label(summary, group)}" if col == "official_headline" else col
        return f"{shown} ({group})"

    head = ["method"] + [title(g, col) for g, col in columns] + ["AIQ", "APGR"]
    lines = [_row(head), _row(["---"] * len(head))]
    for name, entry in summary["methods"].items():
        if name == "zero_router":
            cells = [""] * len(columns)
        else:
            cells = [fmt_interval(entry[g][col]) for g, col in columns]
        lines.append(_row([method_label(summary, name)] + cells + [fmt_interval(entry[OVERALL]["aiq"]),
                                                                   fmt_interval(entry[OVERALL]["apgr"])]))
    lines += ["", _row(["group", "router quality", "best single", "oracle", "gain vs best single",
                        "gain vs average single", f"gap recovered at lambda = {summary['cost_lambda']:g}", "APGR",
                        "APGR weak -> strong (cost)", "AIQ"]), _row(["---"] * 10)]
    for g in groups:
        r = summary["router"][g]
        lines.append(_row([g, fmt_interval(r["quality"]), f"{fmt(r['best_single_quality'])} ({r['best_single']})",
                           fmt(r["oracle_quality"]), fmt_interval(r["gain_over_best_single"]),
                           fmt_interval(r["gain_over_average_single"]), fmt_interval(r["gap_recovered"]),
                           fmt_interval(r["apgr"]), anchors_label(r["apgr_anchors"]), fmt_interval(r["aiq"])]))
    return "\n".join(lines) + "\n"


def anchors_label(anchors: dict) -> str:
    """'weak (cost) -> strong (cost)', or why APGR is undefined."""
    if anchors["reason"]:
        return f"n/a: {anchors['reason']}"
    return (f"{anchors['weak']} ({fmt(anchors['weak_cost'])}) -> {anchors['strong']} "
            f"({fmt(anchors['strong_cost'])})")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
