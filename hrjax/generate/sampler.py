"""The sampler: jit-compiled prefill plus a `lax.while_loop` decode over a KV cache.

Prompts are left-padded into shape buckets (batch rounded up to half-octave steps, prompt length
to quarter-octave steps, the generation budget to a power of two), so a stream of varied requests
compiles a handful of programs. Greedy, temperature, top-k and top-p sampling; EOS ids and stop
strings (found in the decoded text as it is made, `hrjax.generate.stops`) end a row; every row
reports its generated length, finish reason and the model's log-probability of each token.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hrjax.errors import PromptTooLongError
from hrjax.generate.stops import (TokenBytes, advance, automaton_states, no_token_bytes, stop_automaton,
                                  token_bytes)
from hrjax.shapes import fine_bucket, pow2_bucket
from hrjax.models.decoder import Decoder, DecoderConfig, KVCache
from hrjax.models.sharding import cache_sharding, param_shardings, warn_replicated
from hrjax.parallel import data_sharding

# A static batch runs in a program already compiled for up to this many times its rows (the padding rows
# are masked): static generation serves answer budgets under `hrjax.env.mdp.INFLIGHT_MIN_TOKENS`, where a
# compile (seconds) costs more than decoding a few padded rows. Without it the default world's path tree
# compiled 9 batch buckets per model shape (1 to 64 rows: the cache misses a chunk leaves vary).
BATCH_REUSE_FACTOR = 4
# batch sizes `generate_arrays` was compiled for, by everything else its program depends on
# (`Sampler.program_key` without the batch); module-wide, as JAX's cache of the program is
_COMPILED_BATCHES: dict[tuple, set[int]] = collections.defaultdict(set)

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to decode. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings: generation ends once one appears, text is cut before it
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class Generation:
    """One row's result. `tokens` excludes the prompt and includes a final EOS if one was made."""

    tokens: np.ndarray  # [n] int32
    logprobs: np.ndarray  # [n] float32, log p(token) under the model (temperature 1, no filters)
    finish_reason: str  # 'eos' | 'stop' | 'length'
    text: Optional[str] = None


def _argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis, lowest index on ties; two plain reductions, which XLA:CPU runs
    several times faster than its variadic argmax reduce."""
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    best = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == best, iota, x.shape[-1]), axis=-1)


def _select_tokens(logits, key, temperature, top_p, greedy: bool, top_k: int, use_top_p: bool, top_k_limit=None):
    """logits [B, V] float32 -> (tokens [B] int32, logprobs [B] float32 of those tokens). `top_k` (static)
    is the candidate bucket; `top_k_limit` (int32 scalar, <= top_k) keeps only that many of them."""
    # Keeps XLA from fusing the LM-head matmul into the reductions below (a naive-loop dot).
    logits = jax.lax.optimization_barrier(logits)
    if greedy:
        tokens = _argmax(logits)
    else:
        scaled = logits / temperature
        if top_k:
            candidates, candidate_ids = jax.lax.top_k(scaled, top_k)  # sorted descending
            if top_k_limit is not None:
                rank = jax.lax.broadcasted_iota(jnp.int32, candidates.shape, candidates.ndim - 1)
                candidates = jnp.where(rank < top_k_limit, candidates, -jnp.inf)
        else:
            candidate_ids = jnp.argsort(-scaled, axis=-1)
            candidates = jnp.take_along_axis(scaled, candidate_ids, axis=-1)
        if use_top_p:
            probs = jax.nn.softmax(candidates, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            candidates = jnp.where(mass_before < top_p, candidates, -jnp.inf)
        choice = jax.random.categorical(key, candidates, axis=-1)
        tokens = jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0]
    tokens = tokens.astype(jnp.int32)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - jax.nn.logsumexp(logits, axis=-1)


def prompt_positions(prompt_valid: jax.Array) -> jax.Array:
    """[B, P] bool (left padding False) -> [B, P] int32 rotary positions (padding gets 0)."""
    return jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], batch: int, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens [batch, prompt_len] int32, valid [batch, prompt_len] bool), left-padded;
    filler rows past the prompts attend to one token so softmax stays finite."""
    tokens = np.zeros((batch, prompt_len), np.int32)
    valid = np.zeros((batch, prompt_len), bool)
    for i, p in enumerate(prompts):
        tokens[i, prompt_len - len(p):] = p
        valid[i, prompt_len - len(p):] = True
    valid[len(prompts):, -1] = True
    return tokens, valid


def row_generation(tokens: np.ndarray, logprobs: np.ndarray, length: int, stopped: bool,
                   eos_ids: Sequence[int]) -> Generation:
    """One row of the output buffers ([N] tokens and logprobs, its length, whether a stop string
    ended it) -> its `Generation`; `eos_ids` the ids that ended it ((): ignore_eos, so 'length')."""
    n = int(length)
    row = tokens[:n]
    reason = FINISH_STOP if stopped else (FINISH_EOS if n and int(row[-1]) in eos_ids else FINISH_LENGTH)
    return Generation(row.astype(np.int32), logprobs[:n].astype(np.float32), reason)


class _StaticRows(NamedTuple):
    """The static sampler's per-row decode state over B rows and N output tokens."""

    tokens: jax.Array  # [B, N] int32, -1 past each row's end
    logprobs: jax.Array  # [B, N] float32
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool, ended by a stop string
    lengths: jax.Array  # [B] int32
    stop_state: jax.Array  # [B] int32, the stop automaton's state
    text_started: jax.Array  # [B] bool (`hrjax.generate.stops.advance`)


@functools.partial(jax.jit, static_argnames=("config", "budget", "greedy", "top_k", "use_top_p", "mesh"))
def generate_arrays(params, prompt, prompt_valid, row_active, eos_ids, token_table, stop_transitions, stop_accepting,
                    max_new_tokens, key, temperature, top_p, top_k_limit, *, config: DecoderConfig, budget: int,
                    greedy: bool, top_k: int, use_top_p: bool, mesh: Optional[Mesh] = None):
    """The compiled sampler over one bucket.

    Args:
      prompt: [B, P] int32 left-padded prompts; prompt_valid: [B, P] bool (False on padding).
      row_active: [B] bool, False for rows that only fill the batch bucket.
      eos_ids: [E] int32 (-1: none).
      token_table: the tokenizer's `TokenBytes`; stop_transitions [Q, 256] int32, stop_accepting [Q] bool:
        the stop strings' automaton (`hrjax.generate.stops`), which ends a row once its text holds one.
      max_new_tokens: int32 scalar <= budget; budget: static N, the output buffer length.
      key: PRNG key; temperature, top_p: float32 scalars.
      top_k_limit: int32 scalar, the top-k filter's k (<= the static bucket `top_k`; 0 with top_k 0: off).
      mesh: a ('data', 'model') mesh whose shardings `params` carry (`hrjax.models.sharding`); the KV
        cache is then split like them (rows over 'data', kv heads over 'model'). None: one device.
    Returns (tokens [B, N] int32 (-1 past each row's end), logprobs [B, N] float32,
      lengths [B] int32, stopped [B] bool: ended by a stop string rather than EOS).
    """
    model = Decoder(config)
    batch, prompt_len = prompt.shape
    slots = prompt_len + budget
    kv_valid = jnp.concatenate([prompt_valid, jnp.ones((batch, budget), bool)], axis=1)
    positions = prompt_positions(prompt_valid)
    real_lengths = prompt_valid.sum(axis=1).astype(jnp.int32)
    split_cache = functools.partial(_constrain_cache, config=config, mesh=mesh)
    cache = split_cache(KVCache.zeros(config, batch, slots))
    logits, cache = model.apply(params, prompt, positions, kv_valid, cache, 0, last_only=True)
    cache = split_cache(cache)
    select = functools.partial(_select_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                               top_k=top_k, use_top_p=use_top_p, top_k_limit=top_k_limit)

    transitions = jnp.broadcast_to(stop_transitions, (batch, *stop_transitions.shape))
    accepting = jnp.broadcast_to(stop_accepting, (batch, *stop_accepting.shape))

    def finish(tokens, logprobs, rows: _StaticRows, step) -> _StaticRows:
        done = rows.done
        tokens = jnp.where(done, -1, tokens)
        stop_state, text_started, hit_stop = advance(tokens, rows.stop_state, rows.text_started, ~done, token_table,
                                                     transitions, accepting)
        hit_eos = jnp.any(tokens[:, None] == eos_ids[None], axis=-1) & ~done
        return _StaticRows(rows.tokens.at[:, step].set(tokens),
                           rows.logprobs.at[:, step].set(jnp.where(done, 0.0, logprobs)),
                           done | hit_eos | hit_stop, rows.stopped | hit_stop, jnp.where(done, rows.lengths, step + 1),
                           stop_state, text_started)

    key, first_key = jax.random.split(key)
    first, first_lp = select(logits, first_key)
    zeros = jnp.zeros((batch,), jnp.int32)
    rows = finish(first, first_lp, _StaticRows(jnp.full((batch, budget), -1, jnp.int32), jnp.zeros((batch, budget)),
                                               ~row_active, zeros > 0, zeros, zeros, zeros > 0), 0)

    def cond(state):
        step, _, _, rows, _ = state
        return (step < max_new_tokens) & ~jnp.all(rows.done)

    def body(state):
        step, cache, last, rows, key = state
        key, step_key = jax.random.split(key)
        logits, cache = model.apply(params, last[:, None], (real_lengths + step - 1)[:, None], kv_valid,
                                    cache, prompt_len + step - 1, last_only=True)
        cache = split_cache(cache)
        tokens, logprobs = select(logits, step_key)
        return step + 1, cache, jnp.maximum(tokens, 0), finish(tokens, logprobs, rows, step), key

    state = (jnp.int32(1), cache, jnp.maximum(rows.tokens[:, 0], 0), rows, key)
    rows = jax.lax.while_loop(cond, body, state)[3]
    return rows.tokens, rows.logprobs, rows.lengths, rows.stopped


def _constrain_cache(cache: KVCache, config: DecoderConfig, mesh: Optional[Mesh]) -> KVCache:
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_sharding(config, mesh))


def untie_lm_head(config: DecoderConfig, params):
    """A tied model with its own [E, V] LM-head kernel (a transposed copy of the embedding): the
    same logits, but XLA:CPU's matmul reads [E, V] much faster than the embedding's [V, E]."""
    if not config.tie_word_embeddings:
        return config, params
    inner = dict(params["params"])
    embedding = inner["embed_tokens"]["embedding"]  # numpy, or a (sharded) jax array: transposed where it lies
    inner["lm_head"] = {"kernel": embedding.T.copy()}
    return dataclasses.replace(config, tie_word_embeddings=False), {**params, "params": inner}


class Sampler:
    """Generates from one decoder over bucketed, left-padded batches.

    `eos_ids` default to the tokenizer's EOS (and the HF config's `eos_token_id`s). `mesh`: a
    ('data', 'model') mesh (`hrjax.parallel.make_mesh`): params and KV cache tensor-parallel over
    'model' (`hrjax.models.sharding`; params loaded with the same mesh are already in place), prompts
    over 'data' (each batch bucket rounded up to a multiple of its size).
    """

    def __init__(self, config: DecoderConfig, params, tokenizer=None, eos_ids: Optional[Sequence[int]] = None,
                 max_batch: int = 64, min_prompt_bucket: int = 16, min_budget_bucket: int = 16,
                 mesh: Optional[Mesh] = None):
        self.mesh = mesh
        self.config, params = untie_lm_head(config, params)
        if mesh is not None:
            warn_replicated(self.config, mesh)
        # once, not per call; arrays already in their sharding stay where they are
        self.params = jax.device_put(params, None if mesh is None else param_shardings(self.config, mesh))
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_ids = [] if eos is None else [eos]
        if not eos_ids:
            raise ValueError("No EOS token id: pass eos_ids=[...] or a tokenizer with an eos_token.")
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.max_batch = pow2_bucket(max_batch)
        self.min_prompt_bucket, self.min_budget_bucket = min_prompt_bucket, min_budget_bucket
        self.compiled_shapes: set[tuple] = set()

    @classmethod
    def from_loaded(cls, lm, **kwargs) -> "Sampler":
        """From a `LoadedLM`; EOS ids from its HF config and, for a HF directory, its
        `generation_config.json` (each an int or a list; chat models often end turns on a second id
        there), and its tokenizer."""
        eos_ids = []
        generation_config = Path(lm.source) / "generation_config.json"
        sources = [lm.hf_config, json.loads(generation_config.read_text()) if generation_config.is_file() else {}]
        for eos in [source.get("eos_token_id") for source in sources] + [getattr(lm.tokenizer, "eos_token_id", None)]:
            for token in [eos] if isinstance(eos, int) else list(eos or []):
                if token not in eos_ids:
                    eos_ids.append(token)
        return cls(lm.config, lm.params, lm.tokenizer, eos_ids=kwargs.pop("eos_ids", eos_ids), **kwargs)

    @functools.cached_property
    def token_table(self) -> TokenBytes:
        """The tokenizer's `TokenBytes` (`hrjax.generate.stops`), read once (about 1 s for 50k tokens);
        without a tokenizer, or one whose text is not its pieces joined, a table that ends no row early."""
        table = None if self.tokenizer is None else token_bytes(self.tokenizer, self.config.vocab_size)
        return no_token_bytes() if table is None else table

    def check_request(self, index: int, prompt: Sequence[int], sampling: SamplingParams) -> None:
        """Raises a clear error when prompt number `index` cannot be generated with `sampling`."""
        if sampling.stop and self.tokenizer is None:
            raise ValueError("Stop strings need a tokenizer: construct the Sampler with one.")
        limit = self.config.max_position_embeddings
        if len(prompt) == 0:
            raise ValueError(f"Prompt {index} is empty: give at least one token (e.g. BOS).")
        if len(prompt) + sampling.max_new_tokens > limit:
            raise PromptTooLongError(
                f"Prompt {index} has {len(prompt)} tokens; with max_new_tokens={sampling.max_new_tokens} that "
                f"exceeds the model's context of {limit} tokens. Shorten the prompt or lower "
                "max_new_tokens.")

    def generate_tokens(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Generation]:
        """Token-id prompts -> one `Generation` per prompt, in order."""
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            self.check_request(i, p, sampling)
        key = jax.random.PRNGKey(sampling.seed)
        results: list[Generation] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = prompts[start:start + self.max_batch]
            key, chunk_key = jax.random.split(key)
            results.extend(self._generate_chunk(chunk, sampling, chunk_key))
        return results

    def generate_stream(self, prompts: Sequence[Sequence[int]], samplings, slots: int = 16) -> list[Generation]:
        """Token-id prompts, each with its own `SamplingParams` (or one for all), through in-flight
        batching over `slots` rows (`hrjax.generate.inflight`, refilled two at a time: `LIST_REFILL_BATCH`)
        -> one `Generation` per prompt, in order."""
        from hrjax.generate.inflight import LIST_REFILL_BATCH, InflightEngine

        return InflightEngine(self, slots, refill_batch=LIST_REFILL_BATCH).generate_stream(prompts, samplings)

    def lower(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> jax.stages.Lowered:
        """The program `generate_tokens` runs on `prompts` (at most `max_batch`), lowered: read its HLO,
        cost or (after `.compile()`, cached once run) its per-device shapes and collectives."""
        args, static = self._program_inputs(prompts[:self.max_batch], sampling, jax.random.PRNGKey(sampling.seed))
        return generate_arrays.lower(*args, **static)

    def _program_inputs(self, prompts, sampling, key, batch: Optional[int] = None) -> tuple[tuple, dict]:
        """The arguments of `generate_arrays` for one chunk: left-padded into its bucket (split over the
        mesh's data axis) or `batch` rows, and the static ones."""
        if batch is None:
            batch = fine_bucket(len(prompts), steps_per_octave=2)
            if self.mesh is not None:  # every device of the data axis gets whole rows
                data = self.mesh.shape["data"]
                batch = -(-batch // data) * data
        prompt_len = fine_bucket(max(len(p) for p in prompts), self.min_prompt_bucket)
        budget = pow2_bucket(sampling.max_new_tokens, self.min_budget_bucket)
        tokens, valid = left_pad(prompts, batch, prompt_len)
        active = np.arange(batch) < len(prompts)
        if self.mesh is not None:
            tokens, valid, active = (jax.device_put(a, data_sharding(self.mesh, a.ndim))
                                     for a in (tokens, valid, active))
        transitions, accepting = stop_automaton(sampling.stop, automaton_states(sampling.stop))
        eos_ids = jnp.asarray([-1] * len(self.eos_ids) if sampling.ignore_eos else self.eos_ids, jnp.int32)
        top_k = 0 if sampling.greedy or not sampling.top_k else min(pow2_bucket(sampling.top_k), self.config.vocab_size)
        static = dict(config=self.config, budget=budget, greedy=sampling.greedy, top_k=top_k,
                      use_top_p=sampling.top_p < 1.0 and not sampling.greedy, mesh=self.mesh)
        args = (self.params, tokens, valid, active, eos_ids, self.token_table, jnp.asarray(transitions),
                jnp.asarray(accepting), jnp.int32(sampling.max_new_tokens), key,
                jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p), jnp.int32(sampling.top_k))
        return args, static

    def program_key(self, args: tuple, static: dict) -> tuple:
        """Everything `generate_arrays` compiles a program for: the shape of every array argument and the
        static arguments (so `compiled_shapes` counts programs as JAX does)."""
        return (*(tuple(a.shape) for a in args[1:] if hasattr(a, "shape") and a.ndim), *static.values())

    def _generate_chunk(self, prompts, sampling, key) -> list[Generation]:
        args, static = self._program_inputs(prompts, sampling, key)
        program = self.program_key(args, static)
        batch, rest = program[0][0], (program[0][1], *program[3:])  # tokens [B, T], valid [B, T], active [B]
        compiled = [b for b in _COMPILED_BATCHES[rest] if batch < b <= BATCH_REUSE_FACTOR * len(prompts)]
        if compiled:
            args, static = self._program_inputs(prompts, sampling, key, batch=min(compiled))
            program = self.program_key(args, static)
        _COMPILED_BATCHES[rest].add(program[0][0])
        self.compiled_shapes.add(program)
        out_tokens, out_logprobs, lengths, stopped = jax.device_get(generate_arrays(*args, **static))
        eos_ids = () if sampling.ignore_eos else self.eos_ids
        return [row_generation(out_tokens[i], out_logprobs[i], lengths[i], stopped[i], eos_ids)
                for i in range(len(prompts))]

    def generate(self, prompts: Sequence[str], sampling: SamplingParams,
                 add_special_tokens: bool = True) -> list[Generation]:
        """Text prompts -> generations with `.text` decoded (special tokens skipped) and cut at the
        first stop string."""
        if self.tokenizer is None:
            raise ValueError("Text prompts need a tokenizer: construct the Sampler with one, or call "
                             "generate_tokens with token ids.")
        ids = [self.tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
        return [self.with_text(g, sampling.stop) for g in self.generate_tokens(ids, sampling)]

    def with_text(self, generation: Generation, stop: Sequence[str] = ()) -> Generation:
        """`generation` with `.text` decoded (special tokens skipped) and cut before the first stop
        string. A stop found in the text also trims the tokens and logprobs to the shortest prefix whose
        text holds it (the token completing the stop stays: it was generated) and makes the finish reason
        'stop', so cost is charged on what was kept. Generation already ends a row at the token that completes a
        stop; this trims a generation made without its stops, or by a tokenizer without a `token_table`."""
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        tokens = generation.tokens.tolist()
        text = decode(tokens)
        cuts = [text.find(s) for s in stop if s in text]
        if not cuts:
            return dataclasses.replace(generation, text=text)
        # the shortest prefix whose text holds a stop (a prefix's text is a prefix of the text); mostly
        # the whole answer, which generation ended at the stop
        holds_stop = lambda n: any(s in decode(tokens[:n]) for s in stop)  # noqa: E731
        low, high = (len(tokens), len(tokens)) if not holds_stop(len(tokens) - 1) else (1, len(tokens) - 1)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if holds_stop(mid) else (mid + 1, high)
        return Generation(generation.tokens[:high], generation.logprobs[:high], FINISH_STOP, text[:min(cuts)])
