"""In-flight (continuous) batching: a fixed set of decode slots, where a finished row's slot takes the
next waiting prompt while the other rows keep decoding.

Design (S slots, W cache columns per slot, N output tokens per slot):
- The KV cache is a ring: every decode step writes one shared column c = t mod W in all S rows (the
  decoder's scalar `cache_index`). Each row keeps the rotary position of every column it owns,
  `key_positions` [S, W] (-1: empty), and attention masks by positions (`Decoder(key_positions=...)`),
  so the order of the columns in the ring does not matter, and sliding windows (Mistral, Gemma 3) are
  measured in positions, not columns.
- Admission: k waiting prompts (k a power of 4, or S; at most a quarter filler rows) are left-padded
  to a half-octave bucket P and prefilled together (the static sampler's prefill, `[k, P]`); their keys
  and values go into their slot rows at the P columns just before the shared column, the rest of each
  row is marked empty, and their first tokens come from the prefill logits. A row admitted there with n
  new tokens owns the columns c-P .. c+n-2 (mod W), so P + n <= W keeps it from wrapping onto itself.
- Prompt cache (`prompt_cache` > 0 prompts per bucket P, off by default): a prefilled prompt's keys,
  values and last logits are kept in a device store per bucket (`PromptStore`, least recently used
  evicted), and a newcomer with exactly a kept prompt is admitted from it without a prefill
  (`place_program`: its first token is drawn from the kept logits with its own settings and seed, so
  it makes what a prefilled row makes). Memory: C entries x P columns x the model's KV bytes per token.
- Decode: one compiled `lax.while_loop` runs up to `steps_per_dispatch` steps over all S rows; it
  leaves early when every row is done or, while prompts wait, when min(waiting, `refill_batch`) slots
  are free, so newcomers are prefilled a few at once (SmolLM2-135M on CPU: one 64-token prompt 100 ms,
  four together 290 ms). A live stream (`step`) also leaves as soon as a row finishes and runs a
  quarter of the steps while slots are free, so a served client gets its answer at once and its next
  request a slot soon.
- Per row: max_new_tokens, temperature, top_k, top_p, seed, ignore_eos and its stop strings' automaton
  [Q, 256] (`hrjax.generate.stops`: a row ends once its decoded text holds a stop). Token
  i of a sampled row is drawn with `fold_in(PRNGKey(seed), i)`: a row's samples depend on its seed
  only, not on its slot, ring column or batch-mates (so rows that should differ need different seeds).
  Greedy rows make the same tokens as `Sampler.generate_tokens` on the prompt alone (and
  log-probabilities equal to float32 rounding). `generate_stream` admits the largest budgets first.
- Slots S follow the load (`_fit_slots`, between dispatches): the power of four that holds the running
  and waiting requests, or `max_slots`; when nothing waits, a dispatch ends once 3/4 of the slots
  are free and the live rows move into a state a quarter the size. A decode step computes every slot,
  so a lone request decodes at S = 1 and a stream's long tail at a few slots, not at `max_slots`.
- Capacity (W, N, Q) grows when a request needs more, live rows included (`_grown`: the ring gets
  empty columns after its last one); a grown size at least doubles, so few capacities are compiled.
  `generate_stream` sizes it once for its whole list.
- Compiled programs, per capacity (S, W, N, Q): one decode program, and one admission program (and,
  with the prompt cache, one placement program) per (k, P) bucket pair; S takes at most log4(max_slots)
  + 2 values.
- One device: a `Sampler` with a mesh is refused (in-flight batching runs unsharded for now).

Two front ends over one engine: `InflightEngine.generate_stream` (a known list; results in input order)
and `submit` / `step` / `run_until_idle` for a scheduler loop (the server). The engine is synchronous:
`submit` may be called from any thread (a deque append), `step` and `cancel` from one thread at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from hrjax.errors import HrjaxError
from hrjax.generate.sampler import (Generation, Sampler, SamplingParams, _select_tokens, left_pad, prompt_positions,
                                    row_generation)
from hrjax.generate.stops import TokenBytes, advance, automaton_states, stop_automaton
from hrjax.models.decoder import Decoder, DecoderConfig, KVCache
from hrjax.shapes import fine_bucket, pow2_bucket, pow4_bucket


# A known list's free slots are refilled once two are free. Measured in one process on SmolLM2-135M, 256
# requests of 8-256 tokens over 32 slots (the sampler bench's uniform stream): 77.7 s against 87.5 s at
# the default S / 4 (static batches: 123.2 s).
LIST_REFILL_BATCH = 2


class InflightError(HrjaxError, ValueError):
    """A request or sampler that in-flight batching cannot serve."""


class RowSettings(NamedTuple):
    """Per-row sampling settings, each [R, ...] over R rows."""

    max_new_tokens: jax.Array  # [R] int32
    temperature: jax.Array  # [R] float32, 0 = greedy
    top_k: jax.Array  # [R] int32, 0 = off
    top_p: jax.Array  # [R] float32, 1 = off
    key: jax.Array  # [R, 2] uint32, PRNGKey(seed)
    ignore_eos: jax.Array  # [R] bool
    stop_transitions: jax.Array  # [R, Q, 256] int32, each row's stop automaton (`hrjax.generate.stops`)
    stop_accepting: jax.Array  # [R, Q] bool


class Rows(NamedTuple):
    """Per-row generation state over R rows; N = output buffer length."""

    last: jax.Array  # [R] int32, the token the next decode step feeds
    position: jax.Array  # [R] int32, the rotary position of `last`
    count: jax.Array  # [R] int32, tokens generated so far
    tokens: jax.Array  # [R, N] int32, -1 past each row's end
    logprobs: jax.Array  # [R, N] float32
    done: jax.Array  # [R] bool (free slots are done)
    stopped: jax.Array  # [R] bool, ended by a stop string
    stop_state: jax.Array  # [R] int32, the row's stop automaton's state
    text_started: jax.Array  # [R] bool, the row's decoded text has begun
    settings: RowSettings


class SlotState(NamedTuple):
    """The engine's device state: S slots, W ring columns."""

    cache: KVCache  # keys [S, K, D, W], values [S, K, W, D]
    key_positions: jax.Array  # [S, W] int32, -1 empty
    column: jax.Array  # int32 scalar, the ring column the next decode step writes
    rows: Rows


def _sample_rows(logits, keys, temperature, top_k, top_p):
    """logits [R, V] float32, keys [R, 2], per-row temperature (> 0), top_k (0 off), top_p (1 off)
    -> [R] int32 tokens drawn from each row's filtered, tempered distribution with its own key."""
    scaled = logits / temperature[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    candidates = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jax.lax.broadcasted_iota(jnp.int32, candidates.shape, 1)
    candidates = jnp.where((top_k[:, None] == 0) | (rank < top_k[:, None]), candidates, -jnp.inf)
    probs = jax.nn.softmax(candidates, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    candidates = jnp.where((top_p[:, None] >= 1.0) | (mass_before < top_p[:, None]), candidates, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, candidates)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _select_rows(logits, settings: RowSettings, count, active):
    """logits [R, V] -> (tokens [R] int32, logprobs [R] float32): greedy rows by argmax (as the static
    sampler), sampled rows with their own key folded with the token index `count` [R]. The sampling
    branch runs only when an active row samples."""
    greedy_tokens, greedy_logprobs = _select_tokens(logits, None, None, None, greedy=True, top_k=0, use_top_p=False)
    sampled = settings.temperature > 0

    def sample(_):
        keys = jax.vmap(jax.random.fold_in)(settings.key, count)
        drawn = _sample_rows(logits, keys, jnp.where(sampled, settings.temperature, 1.0), settings.top_k,
                             settings.top_p)
        tokens = jnp.where(sampled, drawn, greedy_tokens)
        chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
        return tokens, jnp.where(sampled, chosen - jax.nn.logsumexp(logits, axis=-1), greedy_logprobs)

    return jax.lax.cond(jnp.any(sampled & active), sample, lambda _: (greedy_tokens, greedy_logprobs), None)


def _record(rows: Rows, tokens, logprobs, eos_ids, token_table: TokenBytes) -> Rows:
    """Appends tokens [R] / logprobs [R] to the rows not done and ends rows on EOS, a stop string or
    their max_new_tokens (the static sampler's `finish`, per row)."""
    active = ~rows.done
    settings = rows.settings
    index = jnp.arange(tokens.shape[0])
    at = jnp.where(active, rows.count, rows.tokens.shape[1])  # out of range: dropped
    out_tokens = rows.tokens.at[index, at].set(tokens, mode="drop")
    out_logprobs = rows.logprobs.at[index, at].set(logprobs, mode="drop")
    count = rows.count + active
    stop_state, text_started, hit_stop = advance(tokens, rows.stop_state, rows.text_started, active, token_table,
                                                 settings.stop_transitions, settings.stop_accepting)
    hit_eos = jnp.any(tokens[:, None] == eos_ids[None], axis=-1) & ~settings.ignore_eos & active
    hit_length = (count >= settings.max_new_tokens) & active
    return rows._replace(last=jnp.where(active, tokens, rows.last), position=rows.position + active, count=count,
                         tokens=out_tokens, logprobs=out_logprobs, done=rows.done | hit_stop | hit_eos | hit_length,
                         stopped=rows.stopped | hit_stop, stop_state=stop_state, text_started=text_started)


class PromptStore(NamedTuple):
    """Prefilled prompts kept for reuse, C entries of one prompt bucket P: each entry's keys and values
    (as the prefill left them, left-padded) and the logits of its last position."""

    cache: KVCache  # keys [C, K, D, P], values [C, K, P, D]
    logits: jax.Array  # [C, V] float32


def _place(state: SlotState, slot_ids, cache: KVCache, logits, prompt_valid, settings: RowSettings,
           eos_ids, token_table: TokenBytes) -> SlotState:
    """Puts k prefilled newcomers into their slots: their first token drawn from `logits` [k, V] and
    recorded, their keys and values (`cache`, [k, ..., P]) written to the P ring columns before the
    shared one. slot_ids [k]: S (out of range) for rows that only fill the k bucket."""
    k, p = prompt_valid.shape
    slots, width = state.key_positions.shape
    positions = prompt_positions(prompt_valid)
    fresh = Rows(last=jnp.zeros((k,), jnp.int32), position=positions[:, -1], count=jnp.zeros((k,), jnp.int32),
                 tokens=jnp.full((k, state.rows.tokens.shape[1]), -1, jnp.int32),
                 logprobs=jnp.zeros((k, state.rows.tokens.shape[1]), jnp.float32),
                 done=jnp.zeros((k,), bool), stopped=jnp.zeros((k,), bool), stop_state=jnp.zeros((k,), jnp.int32),
                 text_started=jnp.zeros((k,), bool), settings=settings)
    tokens, logprobs = _select_rows(logits, settings, fresh.count, slot_ids < slots)
    fresh = _record(fresh, tokens, logprobs, eos_ids, token_table)

    columns = (state.column - p + jnp.arange(p)) % width  # the P columns before the shared one
    put = lambda full, new: full.at[slot_ids].set(new, mode="drop")  # noqa: E731
    rows = jax.tree.map(put, state.rows, fresh)
    key_positions = put(state.key_positions, jnp.full((k, width), -1, jnp.int32).at[:, columns].set(
        jnp.where(prompt_valid, positions, -1)))
    slot, column = slot_ids[:, None], columns[None, :]  # advanced indices [k, P] lead the result's dims
    keys = tuple(full.at[slot, :, :, column].set(new.transpose(0, 3, 1, 2), mode="drop")
                 for full, new in zip(state.cache.keys, cache.keys))
    values = tuple(full.at[slot, :, column, :].set(new.transpose(0, 2, 1, 3), mode="drop")
                   for full, new in zip(state.cache.values, cache.values))
    return SlotState(KVCache(keys, values), key_positions, state.column, rows)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state", "store"))
def admit_program(params, state: SlotState, slot_ids, prompt, prompt_valid, settings: RowSettings, eos_ids,
                  token_table: TokenBytes, store: Optional[PromptStore] = None, entry_ids=None, *,
                  config: DecoderConfig) -> tuple[SlotState, Optional[PromptStore]]:
    """Prefills k newcomers and puts them into their slots (`_place`).

    Args:
      slot_ids: [k] int32 slot of each newcomer; S (out of range) for rows that only fill the k bucket.
      prompt: [k, P] int32 left-padded prompts; prompt_valid: [k, P] bool.
      settings: `RowSettings` of the k newcomers (stop automata [k, Q, 256] at the engine's Q).
      eos_ids: [E] int32; token_table: the sampler's `TokenBytes`.
      store, entry_ids: a `PromptStore` of bucket P and [k] int32 entries that keep each row's prefill
        (C, out of range: not kept); None: nothing kept.
    Returns (the new state, each newcomer's first token recorded (it may already be done); the store).
    """
    k, p = prompt.shape
    logits, cache = Decoder(config).apply(params, prompt, prompt_positions(prompt_valid), prompt_valid,
                                          KVCache.zeros(config, k, p), 0, last_only=True)
    if store is not None:
        keep = lambda full, new: full.at[entry_ids].set(new, mode="drop")  # noqa: E731
        store = PromptStore(jax.tree.map(keep, store.cache, cache), keep(store.logits, logits))
    return _place(state, slot_ids, cache, logits, prompt_valid, settings, eos_ids, token_table), store


@functools.partial(jax.jit, donate_argnames=("state",))
def place_program(state: SlotState, store: PromptStore, entry_ids, slot_ids, prompt_valid, settings: RowSettings,
                  eos_ids, token_table: TokenBytes) -> SlotState:
    """Admits k newcomers whose prompts the store holds (entry_ids [k] int32) without prefilling them;
    otherwise as `admit_program`."""
    cache = jax.tree.map(lambda full: full[entry_ids], store.cache)
    return _place(state, slot_ids, cache, store.logits[entry_ids], prompt_valid, settings, eos_ids, token_table)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def decode_program(params, state: SlotState, eos_ids, token_table: TokenBytes, max_steps, leave_when_done, *,
                   config: DecoderConfig) -> tuple[SlotState, jax.Array]:
    """Up to `max_steps` decode steps over every slot; stops early when all rows are done or when
    `leave_when_done` (int32 scalar) rows are (free slots count as done). Returns (state, steps run)."""
    model = Decoder(config)
    width = state.key_positions.shape[1]

    def cond(carry):
        step, s = carry
        return (step < max_steps) & ~jnp.all(s.rows.done) & (jnp.sum(s.rows.done) < leave_when_done)

    def body(carry):
        step, s = carry
        rows = s.rows
        key_positions = s.key_positions.at[:, s.column].set(rows.position)
        logits, cache = model.apply(params, rows.last[:, None], rows.position[:, None], None, s.cache, s.column,
                                    last_only=True, key_positions=key_positions)
        tokens, logprobs = _select_rows(logits, rows.settings, rows.count, ~rows.done)
        rows = _record(rows, tokens, logprobs, eos_ids, token_table)
        return step + 1, SlotState(cache, key_positions, (s.column + 1) % width, rows)

    steps, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state, steps


def _pad_to(x: jax.Array, axis: int, size: int, fill) -> jax.Array:
    """`x` padded on the right with `fill` along `axis` up to `size`."""
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pads, constant_values=fill)


def _grown(state: SlotState, width: int, budget: int, stop_states: int) -> SlotState:
    """`state` with W, N, Q raised to these sizes. A wider ring gets empty columns on the right and
    keeps its shared column c: a live row owns a block of u columns ending at c - 1 (mod old W) and
    writes at most old W - u more, which now run from c into the new columns and end before its block
    starts again (mod new W). Stop automata get states no row reaches."""
    rows = state.rows
    settings = rows.settings._replace(stop_transitions=_pad_to(rows.settings.stop_transitions, 1, stop_states, 0),
                                      stop_accepting=_pad_to(rows.settings.stop_accepting, 1, stop_states, False))
    rows = rows._replace(tokens=_pad_to(rows.tokens, 1, budget, -1), logprobs=_pad_to(rows.logprobs, 1, budget, 0.0),
                         settings=settings)
    cache = KVCache(tuple(_pad_to(k, 3, width, 0) for k in state.cache.keys),
                    tuple(_pad_to(v, 2, width, 0) for v in state.cache.values))
    return SlotState(cache, _pad_to(state.key_positions, 1, width, -1), state.column, rows)


@functools.partial(jax.jit, static_argnames=("slots", "config"))
def _resized(state: SlotState, order, *, slots: int, config: DecoderConfig) -> SlotState:
    """`state` with `slots` slots: row i is its row order[i] (order [min(S, slots)] int32: live rows
    first, then free ones), then, when growing, free rows; W, N, Q and the shared column unchanged.
    One program per (S, slots, capacity)."""
    rows, cache, key_positions = jax.tree.map(lambda x: x[order], (state.rows, state.cache, state.key_positions))
    extra = slots - order.shape[0]
    if extra:
        free = _empty_state(config, extra, key_positions.shape[1], rows.tokens.shape[1],
                            rows.settings.stop_accepting.shape[1])
        rows, cache, key_positions = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), (rows, cache, key_positions),
                                                  (free.rows, free.cache, free.key_positions))
    return SlotState(cache, key_positions, state.column, rows)


@functools.partial(jax.jit, donate_argnames=("state",))
def _ended(state: SlotState, rows_to_end) -> SlotState:
    """`state` with the rows of `rows_to_end` [S] bool marked done (their slots free for admission)."""
    return state._replace(rows=state.rows._replace(done=state.rows.done | rows_to_end))


def _empty_state(config: DecoderConfig, slots: int, width: int, budget: int, stop_states: int) -> SlotState:
    """Every slot free (done)."""
    settings = RowSettings(max_new_tokens=jnp.ones((slots,), jnp.int32), temperature=jnp.zeros((slots,)),
                           top_k=jnp.zeros((slots,), jnp.int32), top_p=jnp.ones((slots,)),
                           key=jnp.zeros((slots, 2), jnp.uint32), ignore_eos=jnp.zeros((slots,), bool),
                           stop_transitions=jnp.zeros((slots, stop_states, 256), jnp.int32),
                           stop_accepting=jnp.zeros((slots, stop_states), bool))
    rows = Rows(last=jnp.zeros((slots,), jnp.int32), position=jnp.zeros((slots,), jnp.int32),
                count=jnp.zeros((slots,), jnp.int32), tokens=jnp.full((slots, budget), -1, jnp.int32),
                logprobs=jnp.zeros((slots, budget), jnp.float32), done=jnp.ones((slots,), bool),
                stopped=jnp.zeros((slots,), bool), stop_state=jnp.zeros((slots,), jnp.int32),
                text_started=jnp.zeros((slots,), bool), settings=settings)
    return SlotState(KVCache.zeros(config, slots, width), jnp.full((slots, width), -1, jnp.int32), jnp.int32(0), rows)


@dataclasses.dataclass(frozen=True)
class _Request:
    handle: int
    prompt: tuple[int, ...]  # hashable: the prompt cache's key
    sampling: SamplingParams
    stop_states: int  # Q of its stop automaton (`hrjax.generate.stops.automaton_states`)


class InflightEngine:
    """In-flight batching over one `Sampler`'s model (see the module docstring).

    slots: the most rows decoded together (rounded up to a power of two); the engine decodes at the
      smallest power of four S that holds its running and waiting requests (`_fit_slots`), or `slots`.
    steps_per_dispatch: decode steps per compiled call in `step()` (bounds how long a new request waits
      for a free slot to be noticed); `run_until_idle` with nothing arriving uses whole budgets.
    refill_batch: while more requests wait, a decode dispatch runs until this many slots are free, so
      newcomers are prefilled together (default S / 4; 1 refills every slot at once).
    prompt_cache: prompts kept per prompt bucket for admission without a prefill (0: none).
    """

    def __init__(self, sampler: Sampler, slots: int = 16, steps_per_dispatch: int = 32,
                 refill_batch: Optional[int] = None, prompt_cache: int = 0):
        if sampler.mesh is not None:
            raise InflightError("In-flight batching runs unsharded for now: build the Sampler without a mesh, or "
                                "use Sampler.generate_tokens for sharded generation.")
        if slots < 1 or steps_per_dispatch < 1 or (refill_batch is not None and refill_batch < 1):
            raise InflightError(f"slots, steps_per_dispatch and refill_batch must be >= 1, got {slots}, "
                                f"{steps_per_dispatch} and {refill_batch}.")
        if prompt_cache < 0:
            raise InflightError(f"prompt_cache is a number of prompts per prompt bucket (0: off), got {prompt_cache}.")
        self.sampler = sampler
        self.max_slots = pow2_bucket(slots)
        self.steps_per_dispatch = steps_per_dispatch
        self._refill_batch = refill_batch
        # ('admit', k, P, S, W, N, Q) / ('decode' | 'end', S, W, N, Q) / ('resize', S, S', W, N, Q)
        self.compiled_shapes: set[tuple] = set()
        self._eos_ids = jnp.asarray(sampler.eos_ids, jnp.int32)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._occupant: list[Optional[_Request]] = [None]  # one per slot: S = len
        self._handles = itertools.count()
        self._state: Optional[SlotState] = None
        self._cancelled: set[int] = set()  # handles to drop at the next step
        self.prompt_cache = prompt_cache
        self._stores: dict[int, PromptStore] = {}  # prompt bucket P -> its store of `prompt_cache` entries
        self._kept: collections.OrderedDict[tuple[int, ...], tuple[int, int]] = collections.OrderedDict()  # LRU
        self.prompt_cache_hits = 0  # newcomers admitted from the store, without a prefill

    # ---- front end: a scheduler loop ----

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams = SamplingParams()) -> int:
        """Queues one request; returns its handle (`step` and `run_until_idle` report it with its result)."""
        handle = next(self._handles)
        self.sampler.check_request(handle, prompt_ids, sampling)
        self._waiting.append(_Request(handle, tuple(int(t) for t in prompt_ids), sampling,
                                      automaton_states(sampling.stop)))
        return handle

    def cancel(self, handle: int) -> None:
        """Drops a submitted request (its client went away) at the next `step`: a waiting one is never
        admitted, a running one frees its slot. Unknown or finished handles are ignored. Call it from the
        thread that calls `step`."""
        self._cancelled.add(handle)

    @property
    def slots(self) -> int:
        """S, the slots decoded now: the power of four that fits the load, or `max_slots` (`_fit_slots`)."""
        return len(self._occupant)

    @property
    def refill_batch(self) -> int:
        return min(max(self._refill_batch or self.slots // 4, 1), self.slots)

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        return not self._waiting and all(o is None for o in self._occupant)

    def step(self, max_steps: Optional[int] = None) -> list[tuple[int, Generation]]:
        """Admits waiting requests into free slots, runs one decode dispatch of at most `max_steps`
        (default `steps_per_dispatch`), and returns the requests that finished, as (handle, Generation).
        For a live stream, the dispatch ends as soon as a row finishes (its client gets the result at
        once), and while slots are free it runs at most a quarter of `max_steps` (a request arriving
        meanwhile is admitted soon)."""
        return self._step(max_steps or self.steps_per_dispatch, live=True)

    def run_until_idle(self) -> list[tuple[int, Generation]]:
        """Steps until every submitted request is finished; returns them in order of finishing. Each
        dispatch runs until min(waiting, refill_batch) slots are free while requests wait, else until all
        rows are done."""
        finished = []
        while not self.idle:
            finished.extend(self._step(None))
        return finished

    def _step(self, max_steps: Optional[int], live: bool = False) -> list[tuple[int, Generation]]:
        """`step` (live) or a step of `run_until_idle`; max_steps None: the output buffer's length (every
        running row can finish)."""
        self._drop_cancelled()
        self._admit_waiting()
        if self.idle:
            return []
        capacity = self._capacity()
        self.compiled_shapes.add(("decode", *capacity))
        # while requests wait: until refill_batch slots are free for them; else until 3/4 of the slots are
        # free, when the state shrinks to the rows still running (a long row's tail runs at a small S)
        waiting, free = len(self._waiting), self._occupant.count(None)
        leave_when_done = min(waiting, self.refill_batch) if waiting else self.slots - self.slots // 4
        leave_when_done = max(leave_when_done, free + 1)  # at least one running row finishes: progress
        if live:  # the first row to finish is answered at once; free slots are refilled soon
            leave_when_done = leave_when_done if waiting else free + 1
            max_steps = max(1, max_steps // 4) if free else max_steps
        self._state, _ = decode_program(self.sampler.params, self._state, self._eos_ids, self.sampler.token_table,
                                        jnp.int32(max_steps or capacity[2]), jnp.int32(leave_when_done),
                                        config=self.sampler.config)
        return self._harvest()

    # ---- front end: a known list ----

    def generate_stream(self, prompts: Sequence[Sequence[int]], samplings: Union[
            SamplingParams, Sequence[SamplingParams]] = SamplingParams()) -> list[Generation]:
        """Token-id prompts (each with its own `SamplingParams`, or one for all) -> one `Generation` per
        prompt, in input order. The engine must be idle. Requests are admitted largest max_new_tokens first,
        so the last rows to run (while slots empty) are short ones."""
        if not self.idle:
            raise InflightError("generate_stream needs an idle engine: finish the submitted requests first "
                                "(run_until_idle).")
        if isinstance(samplings, SamplingParams):
            samplings = [samplings] * len(prompts)
        if len(samplings) != len(prompts):
            raise InflightError(f"Got {len(prompts)} prompts but {len(samplings)} SamplingParams: give one per "
                                "prompt, or a single one for all.")
        for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):
            self.sampler.check_request(i, prompt, sampling)  # errors name the input index
        order = sorted(range(len(prompts)), key=lambda i: -samplings[i].max_new_tokens)
        handles = {i: self.submit(prompts[i], samplings[i]) for i in order}
        self._reserve(list(self._waiting))
        results = dict(self.run_until_idle())
        return [results[handles[i]] for i in range(len(prompts))]

    # ---- internals ----

    def _prompt_bucket(self, length: int) -> int:
        return fine_bucket(length, self.sampler.min_prompt_bucket, steps_per_octave=2)

    def _capacity(self) -> tuple[int, int, int, int]:
        """(S, W, N, Q) of the current state."""
        rows, width = self._state.rows, self._state.key_positions.shape[1]
        return self.slots, width, rows.tokens.shape[1], rows.settings.stop_accepting.shape[1]

    def _reserve(self, requests: Sequence[_Request]) -> None:
        """Grows (or first makes) the state so every one of `requests` fits; a grown size at least doubles,
        so a stream of ever larger requests compiles few capacities."""
        budget = pow2_bucket(max(r.sampling.max_new_tokens for r in requests), self.sampler.min_budget_bucket)
        prompt = self._prompt_bucket(max(len(r.prompt) for r in requests))
        width = fine_bucket(prompt + budget, steps_per_octave=2)
        stop_states = max(r.stop_states for r in requests)
        if self._state is None:
            self._state = _empty_state(self.sampler.config, self.slots, width, budget, stop_states)
            return
        _, old_width, old_budget, old_q = self._capacity()
        grow = lambda need, old: old if need <= old else max(need, 2 * old)  # noqa: E731
        new = (grow(width, old_width), grow(budget, old_budget), grow(stop_states, old_q))
        if new != (old_width, old_budget, old_q):
            self._state = _grown(self._state, *new)

    def _fit_slots(self) -> None:
        """Resizes the slots to the load (live rows in their order, then free ones): up to the power of four
        that holds every running and waiting request (or `max_slots`), or, when nothing waits and at most a
        quarter of the slots run, down to the power of four that holds the running rows. A decode step
        computes every slot, so a lone request runs at S = 1, not at `max_slots`; powers of four keep the
        programs compiled for a varying load few (S, and with it each program's shapes, takes
        log4(max_slots) + 2 values at most)."""
        live = [s for s, o in enumerate(self._occupant) if o is not None]
        need = min(pow4_bucket(len(live) + len(self._waiting)), self.max_slots)
        if not (need > self.slots or (not self._waiting and 4 * len(live) <= self.slots and need < self.slots)):
            return
        order = (live + [s for s, o in enumerate(self._occupant) if o is None])[:need]
        if self._state is not None:
            self.compiled_shapes.add(("resize", self.slots, need, *self._capacity()[1:]))
            self._state = _resized(self._state, jnp.asarray(order, jnp.int32), slots=need, config=self.sampler.config)
        self._occupant = [self._occupant[s] for s in order] + [None] * (need - len(order))

    def _admit_sizes(self) -> list[int]:
        """The k buckets of an admission: powers of four below S, and S."""
        return sorted({min(4 ** i, self.slots) for i in range(self.slots.bit_length())})

    def _admit_waiting(self) -> None:
        self._fit_slots()
        admit_sizes = self._admit_sizes()
        free = [s for s, o in enumerate(self._occupant) if o is None]
        while free and self._waiting:
            count = min(len(free), len(self._waiting))
            k = next(size for size in admit_sizes if size >= count)  # count <= S = the largest
            if 4 * count < 3 * k:  # more than a quarter of the prefill would be filler rows: a smaller group
                k = count = max(size for size in admit_sizes if size <= count)
            count = min(count, k)
            newcomers = [r for r in (self._waiting.popleft() for _ in range(count)) if r.handle not in self._cancelled]
            if not newcomers:
                continue
            count = len(newcomers)
            self._reserve(newcomers + list(self._waiting))  # room for everything queued: grows once per wave
            slots = free[:count]
            free = free[count:]
            for slot, request in zip(slots, newcomers):
                self._occupant[slot] = request
            self._run_admit(k, slots, newcomers)

    def _run_admit(self, k: int, slots: list[int], newcomers: list[_Request]) -> None:
        """Admits `newcomers` into `slots`: those whose prompt the prompt cache holds from their stored
        prefill (one `place_program` per prompt bucket), the others prefilled together in a k bucket."""
        kept = [self._kept.get(r.prompt) for r in newcomers]
        for bucket in sorted({entry[0] for entry in kept if entry is not None}):
            rows = [i for i, entry in enumerate(kept) if entry is not None and entry[0] == bucket]
            for i in rows:
                self._kept.move_to_end(newcomers[i].prompt)
            self._place_kept(bucket, [slots[i] for i in rows], [newcomers[i] for i in rows],
                             [kept[i][1] for i in rows])
        rows = [i for i, entry in enumerate(kept) if entry is None]
        if rows:
            if len(rows) < len(newcomers):
                k = next(size for size in self._admit_sizes() if size >= len(rows))
            self._prefill(k, [slots[i] for i in rows], [newcomers[i] for i in rows])

    def _row_inputs(self, k: int, prompt_len: int, newcomers: list[_Request]):
        """(tokens [k, P], valid [k, P], RowSettings [k]) of newcomers left-padded to `prompt_len`."""
        stop_states = self._capacity()[3]
        tokens, valid = left_pad([r.prompt for r in newcomers], k, prompt_len)
        transitions = np.zeros((k, stop_states, 256), np.int32)
        accepting = np.zeros((k, stop_states), bool)
        fields = dict(max_new_tokens=np.ones((k,), np.int32), temperature=np.zeros((k,), np.float32),
                      top_k=np.zeros((k,), np.int32), top_p=np.ones((k,), np.float32), key=np.zeros((k, 2), np.uint32),
                      ignore_eos=np.zeros((k,), bool))
        for i, r in enumerate(newcomers):
            s = r.sampling
            fields["max_new_tokens"][i], fields["temperature"][i] = s.max_new_tokens, s.temperature
            fields["top_k"][i], fields["top_p"][i], fields["ignore_eos"][i] = s.top_k, s.top_p, s.ignore_eos
            fields["key"][i] = np.asarray(jax.random.PRNGKey(s.seed))
            transitions[i], accepting[i] = stop_automaton(s.stop, stop_states)
        return tokens, valid, RowSettings(**fields, stop_transitions=transitions, stop_accepting=accepting)

    def _slot_ids(self, k: int, slots: list[int]) -> np.ndarray:
        slot_ids = np.full((k,), self.slots, np.int32)  # S: filler rows, dropped
        slot_ids[:len(slots)] = slots
        return slot_ids

    def _prefill(self, k: int, slots: list[int], newcomers: list[_Request]) -> None:
        """Prefills newcomers together and admits them; with a prompt cache, each prompt whose own
        bucket is the batch's is kept in the store (evicting the least recently used)."""
        prompt_len = self._prompt_bucket(max(len(r.prompt) for r in newcomers))
        tokens, valid, settings = self._row_inputs(k, prompt_len, newcomers)
        store, entry_ids, keys = None, None, {}
        if self.prompt_cache:
            store = self._stores.get(prompt_len) or self._new_store(prompt_len)
            entry_ids = np.full((k,), self.prompt_cache, np.int32)  # C: not kept
            for i, r in enumerate(newcomers):
                key = r.prompt
                if self._prompt_bucket(len(key)) == prompt_len and key not in keys and len(keys) < self.prompt_cache:
                    keys[key] = entry_ids[i] = self._free_entry(prompt_len, keys.values())
        self.compiled_shapes.add(("admit", k, prompt_len, *self._capacity(), self.prompt_cache))
        self._state, store = admit_program(self.sampler.params, self._state, self._slot_ids(k, slots), tokens, valid,
                                           settings, self._eos_ids, self.sampler.token_table, store, entry_ids,
                                           config=self.sampler.config)
        if store is not None:
            self._stores[prompt_len] = store
            for key, entry in keys.items():
                self._kept[key] = (prompt_len, int(entry))

    def _place_kept(self, prompt_len: int, slots: list[int], newcomers: list[_Request], entries: list[int]) -> None:
        k = next(size for size in self._admit_sizes() if size >= len(newcomers))
        _, valid, settings = self._row_inputs(k, prompt_len, newcomers)
        entry_ids = np.zeros((k,), np.int32)
        entry_ids[:len(entries)] = entries
        self.compiled_shapes.add(("place", k, prompt_len, *self._capacity(), self.prompt_cache))
        self._state = place_program(self._state, self._stores[prompt_len], entry_ids, self._slot_ids(k, slots), valid,
                                    settings, self._eos_ids, self.sampler.token_table)
        self.prompt_cache_hits += len(newcomers)

    def _new_store(self, prompt_len: int) -> PromptStore:
        config = self.sampler.config
        return PromptStore(KVCache.zeros(config, self.prompt_cache, prompt_len),
                           jnp.zeros((self.prompt_cache, config.vocab_size), jnp.float32))

    def _free_entry(self, prompt_len: int, taken) -> int:
        """An entry of bucket `prompt_len`'s store for a new prompt: an unused one, else the least
        recently used one's (not among `taken`, this admission's)."""
        used = {entry for bucket, entry in self._kept.values() if bucket == prompt_len} | set(taken)
        unused = [e for e in range(self.prompt_cache) if e not in used]
        if unused:
            return unused[0]
        for key, (bucket, entry) in self._kept.items():  # oldest first
            if bucket == prompt_len and entry not in taken:
                del self._kept[key]
                return entry
        raise AssertionError("more prompts kept in one admission than the store has entries")

    def _drop_cancelled(self) -> None:
        """Frees the slots of cancelled running requests (their rows end as done; nothing is reported)."""
        if not self._cancelled:
            return
        dropped = [s for s, o in enumerate(self._occupant) if o is not None and o.handle in self._cancelled]
        self._cancelled &= {r.handle for r in list(self._waiting)}  # the rest are skipped at admission
        if dropped:
            self.compiled_shapes.add(("end", *self._capacity()))
            self._state = _ended(self._state, jnp.asarray(np.isin(np.arange(self.slots), dropped)))
            for s in dropped:
                self._occupant[s] = None

    def _harvest(self) -> list[tuple[int, Generation]]:
        rows = self._state.rows
        done = np.asarray(rows.done)
        finished = [s for s, o in enumerate(self._occupant) if o is not None and done[s]]
        if not finished:
            return []
        tokens, logprobs, count, stopped = jax.device_get((rows.tokens, rows.logprobs, rows.count, rows.stopped))
        results = []
        for s in finished:
            request = self._occupant[s]
            eos_ids = () if request.sampling.ignore_eos else self.sampler.eos_ids
            results.append((request.handle, row_generation(tokens[s], logprobs[s], count[s], stopped[s], eos_ids)))
            self._occupant[s] = None
        return results


def compiled_program_count() -> int:
    """How many programs JAX has compiled for in-flight batching in this process (admission, placement from
    the prompt cache, decode, resize, end)."""
    return (admit_program._cache_size() + place_program._cache_size() + decode_program._cache_size()
            + _resized._cache_size() + _ended._cache_size())
