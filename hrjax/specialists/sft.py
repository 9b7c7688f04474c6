"""Supervised fine-tuning from scratch: next-token loss on answer tokens, one jitted update.

A training set is (prompt, response) text pairs; each becomes `<s> prompt response </s>`,
right-padded. The loss is the mean negative log-likelihood of the response tokens and the EOS
(prompt and padding are masked out), so the model learns to answer and then stop. Each step draws B
pairs uniformly with replacement and packs them into rows (several pairs a row, each attending only to
itself, positions restarting: first-fit decreasing, planned on the host for every step at once), so a
step computes about its real tokens, not B x the longest pair; `STEPS_PER_CALL` updates per call under
`lax.scan`. Models of one shape train together (`train_together`): one program whose update runs over
them in turn (`lax.map`), each with its own data, initialisation, batches and schedule. Shapes: N
pairs, T sequence length, B batch, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hrjax.errors import HrjaxError, TrainingDivergedError
from hrjax.models.decoder import Decoder, DecoderConfig
from hrjax.models.hf import LoadedLM
from hrjax.runtime import RUN_ONCE_COMPILER_OPTIONS
from hrjax.specialists.tokenizer import BOS_ID, EOS_ID, PAD_ID

STEPS_PER_CALL = 50
ROW_PAIRS = 2  # a packed row is as long as this many of the longest training pairs


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """One model's size (a Llama with tied embeddings) and its training schedule."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 64  # prompt + answer tokens the model can take
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3  # peak, after linear warm-up; cosine decay to 5% of it
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0  # initialisation and batch sampling

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}.")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}), got {self.warmup_steps}: "
                             "lower it or train longer.")

    @property
    def shape(self) -> tuple:
        """What models trained in one program (`train_together`) share: the model's size and the batch size."""
        return (self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads,
                self.max_position_embeddings, self.batch_size)

    def decoder_config(self, vocab_size: int) -> DecoderConfig:
        return DecoderConfig(
            model_type="llama", vocab_size=vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_heads, head_dim=self.hidden_size // self.num_heads,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=True)


def llama_hf_config(config: DecoderConfig, **extra) -> dict:
    """The HF `config.json` of a Llama-family `config` (what `hrjax.models.hf.load_hf` reads back)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope.theta, "hidden_act": "silu", "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID, **extra,
    }


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, response) pairs -> (tokens [N, T] int32, target mask [N, T] float32), T the longest
    sequence. `mask[i, t]` is 1 where token t is a response token or the EOS (a target)."""
    if not pairs:
        raise HrjaxError("encode_pairs got no (prompt, response) pairs: give it at least one.")
    prompts, responses = zip(*pairs)  # one batched call each to the Rust tokenizer (12x the speed of the
    # transformers wrapper on 13,000 pairs): <s> prompt, response
    backend = tokenizer.backend_tokenizer
    rows = list(zip([e.ids for e in backend.encode_batch(list(prompts))],
                    [e.ids + [EOS_ID] for e in backend.encode_batch(list(responses), add_special_tokens=False)]))
    length = max(len(p) + len(r) for p, r in rows)
    if length > max_length:
        raise HrjaxError(f"A training sequence has {length} tokens, more than the model's "
                         f"max_position_embeddings={max_length}: raise it in the SFTConfig or shorten the task.")
    tokens = np.full((len(rows), length), PAD_ID, np.int32)
    mask = np.zeros((len(rows), length), np.float32)
    for i, (p, r) in enumerate(rows):
        tokens[i, :len(p) + len(r)] = p + r
        mask[i, len(p):len(p) + len(r)] = 1.0
    return tokens, mask


def sequence_loss(model: Decoder, params, tokens: jax.Array, targets: jax.Array, segment_ids: jax.Array,
                  positions: jax.Array) -> jax.Array:
    """Mean NLL (nats) of the target tokens of packed rows: tokens, segment_ids, positions int32 and
    targets float32 [R, T] (`pack_rows`); token t is predicted from the tokens before it in its own
    sequence. A sequence's first token is never a target, so nothing is predicted across sequences."""
    logits, _ = model.apply(params, tokens[:, :-1], positions[:, :-1], segment_ids[:, :-1] != 0,
                            segment_ids=segment_ids[:, :-1])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
    weights = targets[:, 1:]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class Placement(NamedTuple):
    """Where each drawn pair of each step goes in that step's packed rows: [S, B] int32 each."""

    pairs: Any  # index into the training pairs
    rows: Any  # row of the step's [R, L] input
    offsets: Any  # column of the pair's first token in that row


def place_in_rows(lengths: np.ndarray, draws: np.ndarray, row_length: int) -> tuple[Placement, int]:
    """Packs each step's drawn pairs into rows of `row_length` tokens, longest first, each into the first
    row with room (first-fit decreasing; every step at once in numpy). lengths [N] tokens per pair (none
    over `row_length`), draws [S, B] pair indices -> (placement, R: the most rows a step needs)."""
    order = np.argsort(-lengths[draws], axis=1, kind="stable")
    pairs = np.take_along_axis(draws, order, axis=1)
    steps, batch = draws.shape
    free = np.full((steps, batch), row_length, np.int64)  # tokens left per row; B rows always suffice
    rows, offsets = np.zeros((steps, batch), np.int32), np.zeros((steps, batch), np.int32)
    every = np.arange(steps)
    for k in range(batch):
        length = lengths[pairs[:, k]]
        row = np.argmax(free >= length[:, None], axis=1)
        rows[:, k], offsets[:, k] = row, row_length - free[every, row]
        free[every, row] -= length
    return Placement(pairs.astype(np.int32), rows, offsets), int(rows.max()) + 1


def pack_rows(tokens: jax.Array, mask: jax.Array, lengths: jax.Array, placement: Placement,
              shape: tuple[int, int]):
    """One step's drawn pairs as packed rows, inside jit: tokens [N, T] int32, mask [N, T] float32,
    lengths [N] int32 and the step's placement [B] -> (tokens, targets, segment_ids, positions) [R, L]
    (`shape`, L at least the placement's row length); pair b of the step is segment b + 1 of its row, its
    tokens at positions 0, 1, ..."""
    columns = jnp.arange(tokens.shape[1])
    drawn = placement.pairs
    within = columns[None, :] < lengths[drawn][:, None]
    # each token's column in its row; padding goes past the end and is dropped
    target = jnp.where(within, placement.offsets[:, None] + columns[None, :], shape[1])
    rows = jnp.broadcast_to(placement.rows[:, None], target.shape)

    def scatter(values, fill, dtype):
        empty = jnp.full(shape, fill, dtype)
        return empty.at[rows, target].set(jnp.broadcast_to(values, target.shape).astype(dtype), mode="drop")

    return (scatter(tokens[drawn], PAD_ID, jnp.int32), scatter(mask[drawn], 0, jnp.float32),
            scatter(jnp.arange(1, drawn.shape[0] + 1)[:, None], 0, jnp.int32),
            scatter(columns[None, :], 0, jnp.int32))


class Schedule(NamedTuple):
    """A model's optimiser settings as numbers, so that models trained in one program may differ in
    them: each a scalar, or [models] when stacked."""

    learning_rate: Any  # peak
    warmup_steps: Any
    steps: Any
    weight_decay: Any

    @classmethod
    def of(cls, configs: Sequence[SFTConfig]) -> "Schedule":
        """[models] arrays of each config's settings."""
        return cls(*(np.array([getattr(c, f) for c in configs], dtype) for f, dtype in
                     (("learning_rate", np.float32), ("warmup_steps", np.int32), ("steps", np.int32),
                      ("weight_decay", np.float32))))


def learning_rate_at(count: jax.Array, schedule: Schedule) -> jax.Array:
    """Linear warm-up from 0 to the peak over `warmup_steps`, then cosine decay to 5% of it at `steps`."""
    warmup, decay_steps = schedule.warmup_steps, schedule.steps - schedule.warmup_steps
    progress = jnp.clip(count - warmup, 0, decay_steps) / jnp.maximum(decay_steps, 1)
    cosine = schedule.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return jnp.where(count < warmup, schedule.learning_rate * count / jnp.maximum(warmup, 1), cosine)


def make_optimizer(schedule: Schedule) -> optax.GradientTransformation:
    """AdamW after clipping the global gradient norm to 1; `schedule` may hold traced scalars."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(lambda count: learning_rate_at(count, schedule),
                                   weight_decay=schedule.weight_decay))


def make_update(model: Decoder, rows: tuple[int, int]) -> Callable:
    """`update(state, placements [S, B], tokens [N, T], mask [N, T], lengths [N], schedule) -> (state,
    losses [S])`: S updates, each on the B pairs its placement draws, packed into [R, L] `rows`
    (`pack_rows`); state = (params, opt_state). Pure; map it over models, jit it."""

    def update(state, placements, tokens, mask, lengths, schedule):
        optimizer = make_optimizer(schedule)

        def one(state, placement):
            params, opt_state = state
            batch = pack_rows(tokens, mask, lengths, placement, rows)
            loss, grads = jax.value_and_grad(lambda p: sequence_loss(model, p, *batch))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.scan(one, state, placements)

    return update


def train_together(configs: Sequence[SFTConfig], data: Sequence[tuple[np.ndarray, np.ndarray]], vocab_size: int,
                   on_progress: Optional[Callable[[int, float], None]] = None,
                   labels: Optional[Sequence[str]] = None) -> Iterator[tuple[int, Any, np.ndarray]]:
    """Trains one fresh decoder per config, each on its encoded pairs `data[i]` = (tokens [N_i, T_i],
    mask [N_i, T_i]), all in one jitted program that updates the models in turn (`lax.map`; the configs
    must share `SFTConfig.shape`), each with its own initialisation, batches and schedule from its own
    seed and settings, as if alone. The pairs are padded to a common [N, T]; `STEPS_PER_CALL` updates per call;
    a model whose steps are done stays in the stack, skipped. Yields (index, params, per-step losses [steps]
    float32) as each model finishes, shortest first. `on_progress(steps_done, mean last loss)` (steps
    summed over the models) after every call. A model whose loss turns non-finite is dropped at once;
    `TrainingDivergedError` is raised when the others are done."""
    labels = list(labels) if labels is not None else [f"model {i}" for i in range(len(configs))]
    if len({c.shape for c in configs}) != 1:
        raise HrjaxError(f"Models trained together must share their shape and batch size (SFTConfig.shape), got "
                         f"{sorted({c.shape for c in configs})}: train each shape group separately.")
    config = configs[0]
    model = Decoder(config.decoder_config(vocab_size))
    n, t = max(x.shape[0] for x, _ in data), max(x.shape[1] for x, _ in data)
    tokens = np.full((len(data), n, t), PAD_ID, np.int32)
    mask = np.zeros((len(data), n, t), np.float32)
    for i, (x, m) in enumerate(data):
        tokens[i, :x.shape[0], :x.shape[1]], mask[i, :m.shape[0], :m.shape[1]] = x, m
    lengths = (tokens != PAD_ID).sum(axis=2).astype(np.int32)  # [models, N]; pairs are right-padded
    schedule = Schedule.of(configs)
    optimizer = make_optimizer(schedule)  # for its state, whose structure does not depend on the settings
    most_steps = max(c.steps for c in configs)

    def init_state(key, rows):
        init_key, data_key = jax.random.split(key)
        one_token = jnp.zeros((1, 1), jnp.int32)
        params = model.init(init_key, one_token, one_token, jnp.ones((1, 1), bool))
        # step s draws B pairs uniformly, with replacement, from its own key: the same alone or with others
        draws = jax.vmap(lambda s: jax.random.randint(jax.random.fold_in(data_key, s), (config.batch_size,), 0,
                                                      rows))(jnp.arange(most_steps))
        return (params, optimizer.init(params)), draws

    # One program, not one per eager op, compiled for running once
    state, draws = jax.jit(jax.vmap(init_state), compiler_options=RUN_ONCE_COMPILER_OPTIONS)(
        jnp.stack([jax.random.PRNGKey(c.seed) for c in configs]), jnp.array([x.shape[0] for x, _ in data]))
    # host arrays, slicing them compiles nothing; rows as long as two of the stack's longest pairs (fewer, longer
    # rows: 40.7 against 49.5 ms a step for the generalist at 2x against 1x, one core), every model's pairs
    # packed into them, so a model of short pairs needs fewer of the stack's rows
    placed = [place_in_rows(lengths[i], np.asarray(draws[i, :c.steps]), ROW_PAIRS * t) for i, c in enumerate(configs)]
    placements, num_rows = [p for p, _ in placed], max(r for _, r in placed)
    # In turn, not vmapped: XLA:CPU runs the vmapped backward pass's weight gradients as batched matmuls
    # behind strided transposes, 1.5x the time of the models one after another (2 experts, one core).
    # A model whose steps are done (or that diverged) stays in the stack, skipped by a cond: one program for
    # the whole build (each smaller stack cost a compile of about 10 s on a 2-core AVX2 host).
    update_one = make_update(model, (num_rows, ROW_PAIRS * t))

    def update_or_skip(args):
        state, placement, running, *rest = args
        return jax.lax.cond(running, lambda: update_one(state, placement, *rest),
                            lambda: (state, jnp.zeros(placement.pairs.shape[0], jnp.float32)))

    update = jax.jit(lambda *stacked: jax.lax.map(update_or_skip, stacked), donate_argnums=0)
    running, losses, done, failures = np.ones(len(configs), bool), [[] for _ in configs], 0, []
    stacked = (jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths), Schedule(*map(jnp.asarray, schedule)))
    while running.any():
        ran = np.flatnonzero(running)
        count = min(STEPS_PER_CALL, min(configs[i].steps for i in ran) - done)
        idle = np.zeros((count, config.batch_size), np.int32)
        planned = Placement(*(np.stack([field[done:done + count] if running[i] else idle
                                        for i, field in enumerate(fields)]) for fields in zip(*placements)))
        state, chunk = update(state, planned, running, *stacked)
        chunk, done = np.asarray(chunk), done + count
        for i in ran:
            losses[i].append(chunk[i])
            if not np.all(np.isfinite(chunk[i])):
                bad = int(np.argmin(np.isfinite(chunk[i])))
                failures.append(TrainingDivergedError(
                    f"The SFT loss of {labels[i]} became {chunk[i, bad]} at step {done - count + bad}: lower "
                    f"learning_rate (now {configs[i].learning_rate}) or raise warmup_steps (now "
                    f"{configs[i].warmup_steps})."))
                running[i] = False
            elif done == configs[i].steps:
                running[i] = False
                yield i, jax.tree_util.tree_map(lambda x: x[i], jax.device_get(state[0])), np.concatenate(losses[i])
        if on_progress is not None:
            on_progress(sum(min(done, c.steps) for c in configs), float(chunk[ran, -1].mean()))
    if failures:
        raise failures[0]


def train(config: SFTConfig, tokens: np.ndarray, mask: np.ndarray, vocab_size: int,
          on_progress: Optional[Callable[[int, float], None]] = None) -> tuple[Any, np.ndarray]:
    """Trains a fresh decoder on encoded pairs -> (params, per-step losses [steps] float32): `train_together`
    with one model. Raises `TrainingDivergedError` as soon as a loss is not finite."""
    ((_, params, losses),) = train_together([config], [(tokens, mask)], vocab_size, on_progress)
    return params, losses


def loaded_lm(config: DecoderConfig, params, tokenizer, source: str, **hf_extra) -> LoadedLM:
    """A trained decoder as a `LoadedLM`, ready for `hrjax.models.hf.save_hf`."""
    return LoadedLM(config, jax.device_get(params), tokenizer, llama_hf_config(config, **hf_extra), source)
