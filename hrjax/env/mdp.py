"""HierRouter's routing MDP over a batch of prompts (Python orchestration; arrays out).

State s_t = (c_t, l_t, C_t): the context (question plus every earlier response), the hop index and
the cumulative cost. An action picks a pool model (or STOP, when enabled); the chosen model answers
c_t through the hop template, `c_{t+1} = c_t + r_t`, the step costs
`delta_t = base_rate(m) * (tokens_in + tokens_out)`, and after L hops (or STOP) the latest response
is scored. The policy sees c_t through a context view (`CONTEXT_VIEWS`: by default the question and the
latest answer, embedded apart), the hop and the costs. Costs are normalised by
`max_m base_rate(m) * reference_tokens`, so one lambda means the same across pools. Reward:
quality - lambda * cost, charged per step or at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from hrjax.env.cache import CachedResponse, ResponseCache, cache_key
from hrjax.generate.sampler import SamplingParams
from hrjax.pool import Pool, PoolModel


@dataclasses.dataclass(frozen=True)
class HopTemplate:
    """How a hop's user message is written. Placeholders: {question}, {answers}; {index}, {response}.
    `last_only`: {answers} holds only the latest response (each hop rewrites the previous answer)."""

    first: str = "{question}"
    later: str = ("{question}\n\nEarlier answers:\n{answers}\n\n"
                  "Check the earlier answers and give an improved final answer.")
    answer_item: str = "Answer {index}: {response}"
    last_only: bool = False

    def message(self, question: str, responses: Sequence[str]) -> str:
        if not responses:
            return self.first.format(question=question)
        start = len(responses) - 1 if self.last_only else 0
        answers = "\n".join(self.answer_item.format(index=i + 1, response=r)
                             for i, r in enumerate(responses[start:], start))
        return self.later.format(question=question, answers=answers)


CONTEXT_VIEWS = {"joined": 1, "question_and_latest": 2, "question_latest_pooled": 3}
"""How an observation embeds the context c_t -> how many encoder widths D its embedding spans:
'joined': the question and every answer as one text (the encoder reads only its first max_seq_length
tokens, so long answers push the later ones out); 'question_and_latest': [question, latest answer], each
embedded on its own; 'question_latest_pooled': [question, latest answer, mean of every answer's
embedding]. Before the first answer the answer parts are zeros."""
# answer budgets (max_new_tokens) from which a hop generates through in-flight batching (`RoutingEnv._generate`).
# SmolLM2-135M, 128 cpu_pool prompts, greedy, 64 rows, AVX-512, one process: budget 16 (12 tokens made on
# average) in-flight at 0.92x static batching's speed; budget 32 (16 on average) 1.23x; 64 (19 on average) 1.7x
INFLIGHT_MIN_TOKENS = 32
TEXT_CONTEXT_VIEW = "question_and_latest"  # what 'auto' means outside the specialist world (`hrjax.config`)


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    num_hops: int = 2  # L
    cost_lambda: float = 0.0
    cost_timing: str = "end"  # 'end': one charge with the quality; 'step': each hop pays its own cost
    reference_tokens: int = 1000  # cost normaliser: max base rate x this many tokens costs 1.0
    stop_action: bool = False  # our extension: action M ends the episode (not at hop 0)
    max_new_tokens: int = 128  # per answer; decoding is greedy, which is what makes the cache exact
    stop: tuple[str, ...] = ()
    template: HopTemplate = HopTemplate()
    # a CONTEXT_VIEWS key, or 'auto': a run config resolves it by task (`hrjax.config.default_context_view`);
    # an env given 'auto' directly uses the text view
    context_view: str = "auto"

    def __post_init__(self):
        if self.context_view != "auto" and self.context_view not in CONTEXT_VIEWS:
            raise ValueError(f"context_view must be 'auto' or one of {sorted(CONTEXT_VIEWS)}, got "
                             f"'{self.context_view}'.")
        if self.num_hops < 1:
            raise ValueError(f"num_hops must be >= 1, got {self.num_hops}.")
        if self.cost_timing not in ("end", "step"):
            raise ValueError(f"cost_timing must be 'end' or 'step', got '{self.cost_timing}'.")
        if self.reference_tokens <= 0:
            raise ValueError(f"reference_tokens must be > 0, got {self.reference_tokens}.")

    @property
    def view(self) -> str:
        """The context view observations are built with ('auto' resolved to the text view)."""
        return TEXT_CONTEXT_VIEW if self.context_view == "auto" else self.context_view


@dataclasses.dataclass(frozen=True)
class Answer:
    """One hop's response: its text and, for models that share the writer's tokenizer, its ids."""

    text: str
    tokens: tuple[int, ...]  # the writer's ids without special tokens; () if they differ from `text`
    tokenizer_id: str


@dataclasses.dataclass(frozen=True)
class Context:
    """c_t of one prompt: the question and the responses so far."""

    question: str
    responses: tuple[Answer, ...] = ()

    def text(self) -> str:
        """What the 'joined' view embeds: the question followed by every response."""
        return "\n\n".join((self.question, *(a.text for a in self.responses)))

    def then(self, answer: Answer) -> "Context":
        """c_{t+1} = c_t + r_t."""
        return Context(self.question, self.responses + (answer,))


def observation_width(encoder_dim: int, view: str) -> int:
    """E of an observation's embedding: the encoder's width times the view's parts (`CONTEXT_VIEWS`)."""
    return encoder_dim * CONTEXT_VIEWS[view]


def embed_contexts(embed: Callable[[list[str]], np.ndarray], contexts: Sequence[Context], view: str) -> np.ndarray:
    """[B, observation_width(D, view)] float32 embeddings of B contexts; `embed(texts) -> [N, D]` is
    called once, on each distinct text of the batch (questions and answers together)."""
    if view == "joined":
        parts = [[c.text()] for c in contexts]
    elif view in CONTEXT_VIEWS:
        keep = slice(-1, None) if view == "question_and_latest" else slice(None)
        parts = [[c.question, *(a.text for a in c.responses[keep])] for c in contexts]
    else:
        raise ValueError(f"Unknown context view '{view}': one of {sorted(CONTEXT_VIEWS)}.")
    texts = list(dict.fromkeys(t for p in parts for t in p))
    vectors = np.asarray(embed(texts), np.float32)
    row = {t: i for i, t in enumerate(texts)}
    out = np.zeros((len(contexts), CONTEXT_VIEWS[view], vectors.shape[-1]), np.float32)
    for i, (first, *answers) in enumerate(parts):
        out[i, 0] = vectors[row[first]]
        if answers:
            out[i, 1] = vectors[row[answers[-1]]]
            if view == "question_latest_pooled":
                out[i, 2] = vectors[[row[t] for t in answers]].mean(0)
    return out.reshape(len(contexts), -1)


class EmbeddingMemo:
    """`memo(texts) -> [N, D]` float32: `encode` run once per text. Vectors of texts seen before come from
    a bounded memo (the least recently used leave first beyond `capacity` texts), the others from one
    `encode` call on their distinct texts. A path tree embeds each question at every node, and an
    answer text again wherever a later hop echoes it. A memoised vector was computed in another batch,
    so it may differ from a fresh one by float32 rounding (the encoder's padded shape)."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], capacity: int = 65_536):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 text, got {capacity}.")
        self._encode, self.capacity = encode, capacity
        self._vectors: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        self.misses, self.hits = self.misses + len(new), self.hits + len(texts) - len(new)
        if new:
            self._vectors.update(zip(new, np.asarray(self._encode(new), np.float32)))
        for text in texts:
            self._vectors.move_to_end(text)
        out = np.stack([self._vectors[t] for t in texts]) if texts else np.asarray(self._encode([]), np.float32)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)
        return out


_MARK = re.compile("\ue000(\\d+)\ue001")


def hop_prompt(model: PoolModel, template: HopTemplate, context: Context) -> list[int]:
    """The prompt ids of `model` for `context`. Answers written with the model's own tokenizer are
    spliced in as their token ids (the template around them is tokenised piecewise); when none is,
    the whole message is tokenised from text."""
    own = [a.tokens if a.tokenizer_id == model.tokenizer_id else () for a in context.responses]
    if not any(own):
        return model.encode_prompt(template.message(context.question, [a.text for a in context.responses]))
    text, add_special_tokens = model.render(
        template.message(context.question, [f"\ue000{i}\ue001" for i in range(len(own))]))
    encode = lambda piece: model.tokenizer.encode(piece, add_special_tokens=False)  # noqa: E731
    ids = []
    for k, piece in enumerate(_MARK.split(text)):
        if k % 2:
            ids += own[int(piece)] or encode(context.responses[int(piece)].text)
        elif piece:
            ids += encode(piece)
    if add_special_tokens:
        before, after = model.special_affixes
        ids = before + ids + after
    return ids


def make_answer(model: PoolModel, tokens: Sequence[int], text: str, finish_reason: str) -> Answer:
    """A hop's `Answer` from a generation (tokens incl. a final EOS, decoded text, finish reason): the
    ids are kept without special tokens, unless a stop string cut the text short of them (then only
    the text is the answer)."""
    kept = () if finish_reason == "stop" else tuple(int(t) for t in tokens if int(t) not in model.special_ids)
    return Answer(text, kept, model.tokenizer_id)


def cost_unit(base_rates: Sequence[float], reference_tokens: int) -> float:
    """The cost normaliser: `reference_tokens` tokens of the most expensive model cost 1.0."""
    return max(base_rates) * reference_tokens or 1.0


def hop_cost(base_rate: float, tokens_in, tokens_out, unit: float) -> np.ndarray:
    """A hop's normalised cost, float32 (scalar or [n]): base_rate * (tokens in + out) / unit."""
    return np.asarray(base_rate * (np.asarray(tokens_in) + np.asarray(tokens_out)) / unit).astype(np.float32)


def action_mask(hop: np.ndarray, num_models: int, stop_action: bool) -> np.ndarray:
    """[B, A] bool for hop indices [B]: every model, and STOP (action M, if enabled) once there is
    an answer to stop on (hop > 0)."""
    hop = np.asarray(hop)
    mask = np.ones((len(hop), num_models + int(stop_action)), bool)
    if stop_action:
        mask[:, num_models] = hop > 0
    return mask


def cost_features(cost: np.ndarray, last_cost: np.ndarray) -> np.ndarray:
    """[B, 2] float32 the policy's cost inputs: cumulative normalised cost C_t and the last hop's cost."""
    return np.stack([np.asarray(cost, np.float32), np.asarray(last_cost, np.float32)], -1)


def routing_reward(finished, quality, total_cost, step_cost, valid, cost_lambda, cost_timing: str):
    """One step's reward [B] (NumPy or traced arrays): quality - lambda * cost, the cost charged
    with the quality when the episode finishes ('end') or hop by hop ('step').

    finished, valid: [B] bool (the episode ended with / took this step); quality: [B] score of the
    final answer (read where finished); total_cost, step_cost: [B] normalised; cost_lambda: scalar or [B].
    """
    if cost_timing == "step":
        return jnp.where(valid, -cost_lambda * step_cost, 0.0) + jnp.where(finished, quality, 0.0)
    return jnp.where(finished, quality - cost_lambda * total_cost, 0.0)


class Hop(NamedTuple):
    """One model's answers to a list of contexts."""

    responses: list[Answer]
    tokens_in: np.ndarray  # [n] int32
    tokens_out: np.ndarray  # [n] int32
    cost: np.ndarray  # [n] float32, normalised


class Observation(NamedTuple):
    """Arrays the policy sees. E: embedding width (`observation_width`), A: number of actions (M, or M + 1
    with STOP)."""

    embedding: np.ndarray  # [B, E] float32 context embedding (`embed_contexts`)
    hop: np.ndarray  # [B] int32 hop index l_t
    cost: np.ndarray  # [B, 2] float32: cumulative normalised cost C_t, the last hop's cost
    action_mask: np.ndarray  # [B, A] bool


@dataclasses.dataclass
class State:
    examples: list
    contexts: list[Context]
    hop: np.ndarray  # [B] int32
    cost: np.ndarray  # [B] float32, normalised cumulative
    last_cost: np.ndarray  # [B] float32
    done: np.ndarray  # [B] bool
    quality: np.ndarray  # [B] float32, set when a row finishes


class StepResult(NamedTuple):
    """What a step returns; observe the next state with `env.observe(result.state)` when needed
    (embedding the contexts is the costly part, and a finished batch needs none)."""

    state: State
    reward: np.ndarray  # [B] float32
    done: np.ndarray  # [B] bool (after this step)
    tokens_in: np.ndarray  # [B] int32 (0 where no model ran)
    tokens_out: np.ndarray  # [B] int32


class RoutingEnv:
    """The MDP over a pool. `quality_fn(example, response_text) -> [0, 1]` scores final answers;
    `encoder.encode(texts) -> [N, D]` embeds texts (the paper uses a sentence-transformer), which the
    observations combine per the config's context view (`embed_contexts`)."""

    def __init__(self, pool: Pool, encoder: Any, quality_fn: Callable[[Any, str], float],
                 config: EnvConfig = EnvConfig(), cache: Optional[ResponseCache] = None):
        self.pool, self.encoder, self.quality_fn, self.config = pool, encoder, quality_fn, config
        self.cache = cache if cache is not None else ResponseCache()
        self.cost_unit = cost_unit(pool.base_rates, config.reference_tokens)
        self.sampling = SamplingParams(max_new_tokens=config.max_new_tokens, stop=config.stop)
        self.decoding = repr(self.sampling)

    @property
    def num_actions(self) -> int:
        return len(self.pool) + int(self.config.stop_action)

    @property
    def stop(self) -> Optional[int]:
        return len(self.pool) if self.config.stop_action else None

    def respond(self, model: int, contexts: Sequence[Context]) -> Hop:
        """Pool model `model` answers each context: cached answers are reused, the rest are
        generated in one batched call, each distinct prompt once."""
        pool_model = self.pool.models[model]
        prompts = [hop_prompt(pool_model, self.config.template, c) for c in contexts]
        keys = [cache_key(pool_model.fingerprint, self.decoding, p) for p in prompts]
        found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, r in found.items() if r is None]
        if missing:
            prompt_of = dict(zip(keys, prompts))
            sampler = pool_model.sampler
            for key, gen in zip(missing, self._generate(sampler, [prompt_of[k] for k in missing])):
                gen = sampler.with_text(gen, self.sampling.stop)
                found[key] = CachedResponse(tuple(int(t) for t in gen.tokens), gen.text, gen.finish_reason)
                self.cache.put(key, found[key])
        tokens_in = np.array([len(p) for p in prompts], np.int32)
        tokens_out = np.array([len(found[k].tokens) for k in keys], np.int32)
        cost = hop_cost(pool_model.spec.base_rate, tokens_in, tokens_out, self.cost_unit)
        answers = [make_answer(pool_model, found[k].tokens, found[k].text, found[k].finish_reason) for k in keys]
        return Hop(answers, tokens_in, tokens_out, cost)

    def _generate(self, sampler, prompts: list) -> list:
        """A hop's prompts (token ids) -> greedy generations: through in-flight batching when the answer budget is
        at least `INFLIGHT_MIN_TOKENS` and the sampler unsharded (`Sampler.generate_stream` over `max_batch`
        slots: a finished row's slot takes the next prompt, where a static batch decodes to its longest answer;
        the same tokens), else in static batches (`generate_tokens`), the faster for short budgets."""
        if self.sampling.max_new_tokens >= INFLIGHT_MIN_TOKENS and sampler.mesh is None:
            return sampler.generate_stream(prompts, self.sampling, sampler.max_batch)
        return sampler.generate_tokens(prompts, self.sampling)

    def action_mask(self, hop: np.ndarray) -> np.ndarray:
        """[B, A] bool (`action_mask`)."""
        return action_mask(hop, len(self.pool), self.config.stop_action)

    @property
    def observation_dim(self) -> int:
        """E of the observations' embeddings (`observation_width`)."""
        return observation_width(self.encoder.dim, self.config.view)

    def embed(self, contexts: Sequence[Context], memo: Optional[EmbeddingMemo] = None) -> np.ndarray:
        """[B, E] the contexts' embeddings under the config's context view (`embed_contexts`), each text
        through `memo` when given. Without one, a context's embedding depends only on the batch it is
        embedded with, so a resumed run embeds bit for bit as an unbroken one."""
        return embed_contexts(memo if memo is not None else self.encoder.encode, contexts, self.config.view)

    def observe(self, state: State) -> Observation:
        embedding = self.embed(state.contexts)
        return Observation(embedding, state.hop.copy(), cost_features(state.cost, state.last_cost),
                           self.action_mask(state.hop))

    def reset(self, examples: Sequence[Any], questions: Sequence[str]) -> tuple[State, Observation]:
        """Starts one episode per example; `questions[i]` is example i's question text."""
        b = len(examples)
        state = State(list(examples), [Context(q) for q in questions], np.zeros(b, np.int32),
                      np.zeros(b, np.float32), np.zeros(b, np.float32), np.zeros(b, bool),
                      np.zeros(b, np.float32))
        return state, self.observe(state)

    def step(self, state: State, actions: np.ndarray) -> StepResult:
        """Applies actions [B] (ignored on rows already done); returns the next state and rewards."""
        actions = np.asarray(actions)
        b = len(state.contexts)
        if actions.shape != (b,):
            raise ValueError(f"actions must have shape ({b},), got {actions.shape}.")
        active = ~state.done
        if np.any(active & ((actions < 0) | (actions >= self.num_actions))):
            raise ValueError(f"actions must lie in [0, {self.num_actions}), got {actions[active]}.")
        allowed = self.action_mask(state.hop)[np.arange(b), np.clip(actions, 0, self.num_actions - 1)]
        if np.any(active & ~allowed):
            raise ValueError("STOP is not allowed at hop 0: the episode has no answer to stop on.")
        contexts, hop, cost = list(state.contexts), state.hop.copy(), state.cost.copy()
        last_cost = np.zeros(b, np.float32)
        tokens_in, tokens_out = np.zeros(b, np.int32), np.zeros(b, np.int32)
        done = state.done.copy()
        for model in range(len(self.pool)):
            rows = np.flatnonzero(active & (actions == model))
            if rows.size == 0:
                continue
            result = self.respond(model, [contexts[i] for i in rows])
            for j, i in enumerate(rows):
                contexts[i] = contexts[i].then(result.responses[j])
            tokens_in[rows], tokens_out[rows], last_cost[rows] = result.tokens_in, result.tokens_out, result.cost
        moved = active & (actions < len(self.pool))
        hop[moved] += 1
        cost += last_cost
        stopped = actions == self.stop if self.stop is not None else np.zeros(b, bool)
        finished = active & ((hop >= self.config.num_hops) | stopped)
        done |= finished
        quality = state.quality.copy()
        for i in np.flatnonzero(finished):
            quality[i] = self.quality_fn(state.examples[i], contexts[i].responses[-1].text)
        reward = np.asarray(routing_reward(finished, quality, cost, last_cost, active, self.config.cost_lambda,
                                           self.config.cost_timing))
        self.cache.flush()
        new_state = State(state.examples, contexts, hop, cost, last_cost, done, quality)
        return StepResult(new_state, reward.astype(np.float32), done, tokens_in, tokens_out)


class Episode(NamedTuple):
    """A batched rollout as fixed-shape arrays [T, B, ...], T = num_hops; `valid` masks the steps
    taken (False after a row's episode ended)."""

    embedding: np.ndarray  # [T, B, E]
    hop: np.ndarray  # [T, B]
    cost_features: np.ndarray  # [T, B, 2]
    action_mask: np.ndarray  # [T, B, A]
    action: np.ndarray  # [T, B]
    reward: np.ndarray  # [T, B]
    done: np.ndarray  # [T, B]
    valid: np.ndarray  # [T, B]
    tokens_in: np.ndarray  # [T, B]
    tokens_out: np.ndarray  # [T, B]
    cost: np.ndarray  # [T, B] the step's normalised cost
    quality: np.ndarray  # [B] final-answer quality
    total_cost: np.ndarray  # [B] normalised


def rollout(env: RoutingEnv, examples: Sequence[Any], questions: Sequence[str],
            policy: Callable[[Observation], np.ndarray]) -> Episode:
    """Runs one batched episode; `policy(obs) -> actions [B]`."""
    state, obs = env.reset(examples, questions)
    steps = []
    for t in range(env.config.num_hops):
        actions = np.asarray(policy(obs), np.int32)
        valid = ~state.done
        result = env.step(state, actions)
        steps.append((obs, np.where(valid, actions, 0), result.reward * valid, result.done, valid,
                      result.tokens_in, result.tokens_out, result.state.last_cost))
        state = result.state
        if t + 1 < env.config.num_hops:
            obs = env.observe(state)
    stack = lambda i: np.stack([s[i] for s in steps])  # noqa: E731
    observations = [s[0] for s in steps]
    return Episode(
        embedding=np.stack([o.embedding for o in observations]),
        hop=np.stack([o.hop for o in observations]),
        cost_features=np.stack([o.cost for o in observations]),
        action_mask=np.stack([o.action_mask for o in observations]),
        action=stack(1), reward=stack(2), done=stack(3), valid=stack(4), tokens_in=stack(5),
        tokens_out=stack(6), cost=stack(7), quality=state.quality, total_cost=state.cost)
