"""Path trees: every routing path of every prompt, generated once and stored as arrays.

A prompt's tree holds K = M + M^2 + ... + M^L nodes in breadth-first order; node k at depth d is
"the context after d + 1 hops along one path", so the structure (`model`, `parent`, `depth`) is the
same for every prompt and `child(k, m)` is arithmetic. With the tree, the environment becomes array
look-ups (exact oracle, jit-speed training). STOP needs no nodes of its own: stopping at node k
scores k's response, which `quality[:, k]` already holds. Generation goes through the env's
response cache, flushed every `chunk_size` answers, so an interrupted build resumes where it stopped
(losing at most one chunk) and paths that rollouts already took are not generated again.
Reports also score every node's response with the official metrics of its prompt's benchmark family
(`build_scored_tree`, given an `OfficialScoring`, one batched call per chunk): `OfficialScores`, saved beside
the tree as extra arrays, never part of `PathTree`, so training neither reads nor carries them.
Prompts are independent rows, so a multi-process job builds the tree of each process's rows into a
shard file of its own (`shard_path`) and assembles the rows (`hrjax.train.build_tree_share`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from hrjax.env.mdp import Context, EmbeddingMemo, RoutingEnv
from hrjax.errors import HrjaxError
from hrjax.fsutil import atomic_file

# part of a saved tree's key: bump it when what the arrays hold or how they are computed changes
# (3: the embeddings follow the env's context view, `hrjax.env.mdp.embed_contexts`; 4: the official metrics,
# `OfficialScores`, saved with it; a change to what a metric gives bumps its family's
# `hrjax.tasks.official.OFFICIAL_VERSIONS` instead, which the key also holds; 5: no embeddings after the last hop;
# 6: texts embedded packed into the encoder's rows, `hrjax.models.sentence_batches`)
FORMAT_VERSION = 6
DEFAULT_CHUNK_SIZE = 256  # answers generated between two flushes of the response cache


class TreeError(HrjaxError, ValueError):
    """Official scores that do not fit the tree or its prompts."""


class PathTree(NamedTuple):
    """N prompts, K nodes each, D of them decided at (`decision_nodes`), E embedding width, M models."""

    root_embedding: np.ndarray  # [N, E] observation embedding (the env's context view) of each question (s_0)
    embedding: np.ndarray  # [N, D, E] observation embedding of the context after the response of node k < D
    tokens_in: np.ndarray  # [N, K] int32
    tokens_out: np.ndarray  # [N, K] int32
    cost: np.ndarray  # [N, K] float32, this hop's normalised cost
    quality: np.ndarray  # [N, K] float32, the node's response scored as the final answer
    model: np.ndarray  # [K] int32, the action that led to the node
    parent: np.ndarray  # [K] int32, -1 at depth 0
    depth: np.ndarray  # [K] int32

    @property
    def num_models(self) -> int:
        return int(self.model[self.depth == 0].size)

    def node_of_path(self, actions: Sequence[int]) -> int:
        """Index of the node reached by following `actions` from the root."""
        m, node = self.num_models, -1
        for depth, action in enumerate(actions):
            first = level_offset(m, depth)
            node = first + (0 if node < 0 else (node - level_offset(m, depth - 1)) * m) + int(action)
        return node

    def path_cost(self) -> np.ndarray:
        """[N, K] cumulative normalised cost from the root to each node."""
        total = self.cost.copy()
        for k in np.flatnonzero(self.parent >= 0):  # parents precede children (BFS order)
            total[:, k] += total[:, self.parent[k]]
        return total

    def value(self, cost_lambda: float) -> np.ndarray:
        """[N, K] quality - lambda * cumulative cost of ending at each node."""
        return self.quality - cost_lambda * self.path_cost()


class OfficialScoring(NamedTuple):
    """How `build_scored_tree` scores the N prompts' nodes with their official metrics (`hrjax.tasks.official`)."""

    families: np.ndarray  # [N] str, each prompt's benchmark family
    names: np.ndarray  # [N, J] str, the family's metric in each column ('' past its metrics); column 0 its headline
    score: Callable[[Sequence[Any], Sequence[str]], Sequence[Mapping[str, float]]]  # (examples, responses) ->
    # one {metric name: value in [0, 1]} per pair, the family's metrics (e.g. `hrjax.tasks.official.official_scores`)


class OfficialScores(NamedTuple):
    """The official metrics of every node's response, for reports only: N prompts, K nodes, J = the most metrics
    of any family in the run. Saved beside the tree (`extras`, `load_official`), never on the training path."""

    values: np.ndarray  # [N, K, J] float32, column j = metric `names[n, j]` of the node's response; NaN past them
    families: np.ndarray  # [N] str, each prompt's benchmark family
    names: np.ndarray  # [N, J] str, '' past the family's metrics; column 0 is the family's headline metric

    def extras(self) -> dict[str, np.ndarray]:
        """The arrays `save_tree` stores beside a tree: `official_<field>`."""
        return {f"official_{name}": np.asarray(value) for name, value in self._asdict().items()}


def level_offset(num_models: int, depth: int) -> int:
    """Index of the first node of `depth` (M + M^2 + ... + M^depth nodes come before it)."""
    return sum(num_models ** (d + 1) for d in range(depth))


def decision_nodes(num_models: int, num_hops: int) -> int:
    """D: how many nodes, the first in breadth-first order (every depth but the last), a policy decides at
    and so observes; after a node of the last depth the episode has ended, so no one embeds its context."""
    return level_offset(num_models, num_hops - 1)


def tree_structure(num_models: int, num_hops: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model [K], parent [K], depth [K]) of the breadth-first node order."""
    model, parent, depth = [], [], []
    for d in range(num_hops):
        for j in range(num_models ** (d + 1)):
            model.append(j % num_models)
            parent.append(-1 if d == 0 else level_offset(num_models, d - 1) + j // num_models)
            depth.append(d)
    return np.array(model, np.int32), np.array(parent, np.int32), np.array(depth, np.int32)


def stand_in_tree(num_prompts: int, num_models: int, num_hops: int, width: int) -> PathTree:
    """A tree of zeros with the shapes, dtypes and structure of a real one (embedding width `width`): what a
    program over a tree compiles from."""
    model, parent, depth = tree_structure(num_models, num_hops)
    n, k, decided = num_prompts, len(model), decision_nodes(num_models, num_hops)
    return PathTree(np.zeros((n, width), np.float32), np.zeros((n, decided, width), np.float32),
                    np.zeros((n, k), np.int32), np.zeros((n, k), np.int32), np.zeros((n, k), np.float32),
                    np.zeros((n, k), np.float32), model, parent, depth)


def build_tree(env: RoutingEnv, examples: Sequence[Any], questions: Sequence[str], progress: bool = True,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> PathTree:
    """Enumerates every path of every prompt, depth by depth, each model answering its nodes in
    batched (cached) calls of at most `chunk_size` answers, each chunk flushed to the response cache
    as soon as it is generated: a killed build loses at most one chunk, and a rerun resumes there."""
    return build_scored_tree(env, examples, questions, None, progress, chunk_size)[0]


def build_scored_tree(env: RoutingEnv, examples: Sequence[Any], questions: Sequence[str],
                      official: OfficialScoring | None, progress: bool = True,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[PathTree, OfficialScores | None]:
    """`build_tree`, and with `official` every node's response scored by `official.score` too, one call per
    chunk (so code runs in its bounded sandbox pool) -> (tree, its `OfficialScores`, or None without)."""
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    m, hops, n = len(env.pool), env.config.num_hops, len(examples)
    if official is not None and (len(official.families) != n or len(official.names) != n):
        raise TreeError(f"official scoring for {len(official.families)} families and {len(official.names)} name "
                        f"rows, but {n} examples: give one of each per example.")
    model, parent, depth = tree_structure(m, hops)
    k = len(model)
    contexts: list[list[Context]] = [[None] * k for _ in range(n)]
    tokens_in, tokens_out = np.zeros((n, k), np.int32), np.zeros((n, k), np.int32)
    cost, quality = np.zeros((n, k), np.float32), np.zeros((n, k), np.float32)
    memo = EmbeddingMemo(env.encoder.encode)  # each question is embedded at every node, once
    root_embedding = env.embed([Context(q) for q in questions], memo)
    embedding = np.zeros((n, decision_nodes(m, hops), root_embedding.shape[-1]), np.float32)
    official_values = None if official is None else np.full((n, k, official.names.shape[1]), np.nan, np.float32)
    bar = tqdm(total=n * k, desc="path tree", unit="answer", disable=not progress)
    for d in range(hops):
        level = np.flatnonzero(depth == d)
        for action in range(m):
            nodes = level[model[level] == action]
            pairs = [(i, node) for i in range(n) for node in nodes]
            for start in range(0, len(pairs), chunk_size):
                chunk = pairs[start:start + chunk_size]
                before = [Context(questions[i]) if parent[node] < 0 else contexts[i][parent[node]] for i, node in chunk]
                hop = env.respond(action, before)
                env.cache.flush()
                after = [c.then(a) for c, a in zip(before, hop.responses)]
                if d + 1 < hops:  # a policy decides after this node's response
                    embedding[[i for i, _ in chunk], [node for _, node in chunk]] = env.embed(after, memo)
                for j, (i, node) in enumerate(chunk):
                    contexts[i][node] = after[j]
                    tokens_in[i, node], tokens_out[i, node] = hop.tokens_in[j], hop.tokens_out[j]
                    cost[i, node] = hop.cost[j]
                    quality[i, node] = env.quality_fn(examples[i], after[j].responses[-1].text)
                if official is not None:
                    _score_official(official, official_values, examples, chunk, [c.responses[-1].text for c in after])
                bar.update(len(chunk))
    bar.close()
    tree = PathTree(root_embedding, embedding, tokens_in, tokens_out, cost, quality, model, parent, depth)
    if official is None:
        return tree, None
    return tree, OfficialScores(official_values, np.asarray(official.families), np.asarray(official.names))


def _score_official(official: OfficialScoring, values: np.ndarray, examples: Sequence[Any],
                    chunk: Sequence[tuple[int, int]], responses: Sequence[str]) -> None:
    """Writes the official metrics of a chunk's (prompt, node) responses into `values` [N, K, J]."""
    scores = official.score([examples[i] for i, _ in chunk], responses)
    for (i, node), got in zip(chunk, scores):
        names = [name for name in official.names[i] if name]
        if sorted(got) != sorted(names):
            raise TreeError(f"the official scorer gave metrics {sorted(got)} for prompt {i} "
                            f"({official.families[i]}), whose columns are {names}: score with the family's metrics.")
        values[i, node, :len(names)] = [got[name] for name in names]


ROW_FIELDS = ("root_embedding", "embedding", "tokens_in", "tokens_out", "cost", "quality")  # [N, ...] per prompt


def shard_path(path: str | os.PathLike, index: int, count: int) -> Path:
    """Where process `index` of `count` keeps its rows of the tree at `path` while a multi-process job
    builds it: `<tree>.shards/<index>-of-<count>.npz` (one writer per file, so no two processes race)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.shards") / f"{index:05d}-of-{count:05d}.npz"


def save_tree(tree: PathTree, path: str | os.PathLike, meta: dict, **extra: np.ndarray) -> None:
    """Writes the tree, a JSON `meta` (pool, env config, dataset) and any `extra` arrays to one .npz,
    atomically."""
    with atomic_file(Path(path)) as f:
        np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **tree._asdict(), **extra)


def load_extra(path: str | os.PathLike, name: str) -> np.ndarray:
    """The `extra` array `name` saved with a tree."""
    with np.load(path) as data:
        return data[name]


def load_official(path: str | os.PathLike) -> OfficialScores:
    """The `OfficialScores` saved beside a tree (`OfficialScores.extras`)."""
    with np.load(path) as data:
        missing = [f"official_{name}" for name in OfficialScores._fields if f"official_{name}" not in data.files]
        if missing:
            raise TreeError(f"{path} holds no official metrics ({missing} missing): build the tree with them "
                            "(`build_scored_tree`, as `hrjax.train.load_or_build_tree` does).")
        return OfficialScores(**{name: data[f"official_{name}"] for name in OfficialScores._fields})


def load_tree(path: str | os.PathLike, expected_meta: dict) -> PathTree:
    """Reads a tree saved by `save_tree`; refuses one built for another pool/config/dataset."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        if meta != json.loads(json.dumps(expected_meta, sort_keys=True)):
            raise ValueError(f"{path} was built for {meta}, not {expected_meta}: build a new tree "
                             "(or point to the matching file).")
        return PathTree(**{name: data[name] for name in PathTree._fields})
