"""Supervised fine-tuning from scratch: next-token loss on answer tokens, one jitted update.

A training set is (prompt, response) text pairs; each becomes `<s> prompt response </s>`,
right-padded. The loss is the mean negative log-likelihood of the response tokens and the EOS
(prompt and padding are masked out), so the model learns to answer and then stop. Batches are drawn
uniformly with replacement inside the jitted update, `STEPS_PER_CALL` updates per call under
`lax.scan`. Shapes: N pairs, T sequence length, B batch, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hrjax.errors import HrjaxError, TrainingDivergedError
from hrjax.models.decoder import Decoder, DecoderConfig
from hrjax.models.hf import LoadedLM
from hrjax.specialists.tokenizer import BOS_ID, EOS_ID, PAD_ID

STEPS_PER_CALL = 50


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
    rows = []
    for prompt, response in pairs:
        prompt_ids = tokenizer.encode(prompt)  # <s> prompt
        rows.append((prompt_ids, tokenizer.encode(response, add_special_tokens=False) + [EOS_ID]))
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


def sequence_loss(model: Decoder, params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean NLL (nats) of the masked targets; tokens, mask [B, T]; token t is predicted from < t."""
    inputs = tokens[:, :-1]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    logits, _ = model.apply(params, inputs, positions, jnp.ones(inputs.shape, bool))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
    weights = mask[:, 1:]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_optimizer(config: SFTConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                                  config.steps, config.learning_rate * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay))


def make_update(model: Decoder, optimizer: optax.GradientTransformation, batch_size: int) -> Callable:
    """`update(state, keys [S, 2], tokens [N, T], mask [N, T]) -> (state, losses [S])`: S updates,
    each on B pairs drawn uniformly; state = (params, opt_state). Pure; jit it."""

    def one(state, key, tokens, mask):
        params, opt_state = state
        rows = jax.random.randint(key, (batch_size,), 0, tokens.shape[0])
        loss, grads = jax.value_and_grad(lambda p: sequence_loss(model, p, tokens[rows], mask[rows]))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def update(state, keys, tokens, mask):
        return jax.lax.scan(lambda s, k: one(s, k, tokens, mask), state, keys)

    return update


def train(config: SFTConfig, tokens: np.ndarray, mask: np.ndarray, vocab_size: int,
          on_progress: Optional[Callable[[int, float], None]] = None) -> tuple[Any, np.ndarray]:
    """Trains a fresh decoder on encoded pairs -> (params, per-step losses [steps] float32).
    `on_progress(steps_done, last_loss)` is called after every `STEPS_PER_CALL` updates. Raises
    `TrainingDivergedError` as soon as a loss is not finite."""
    model = Decoder(config.decoder_config(vocab_size))
    init_key, data_key = jax.random.split(jax.random.PRNGKey(config.seed))
    one_token = jnp.zeros((1, 1), jnp.int32)
    params = model.init(init_key, one_token, one_token, jnp.ones((1, 1), bool))
    optimizer = make_optimizer(config)
    update = jax.jit(make_update(model, optimizer, config.batch_size), donate_argnums=0)
    state = (params, optimizer.init(params))
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    keys = jax.random.split(data_key, config.steps)
    losses = []
    for start in range(0, config.steps, STEPS_PER_CALL):
        state, chunk = update(state, keys[start:start + STEPS_PER_CALL], tokens, mask)
        chunk = np.asarray(chunk)
        if not np.all(np.isfinite(chunk)):
            bad = start + int(np.argmin(np.isfinite(chunk)))
            raise TrainingDivergedError(
                f"The SFT loss became {chunk[bad - start]} at step {bad}: lower learning_rate (now "
                f"{config.learning_rate}) or raise warmup_steps (now {config.warmup_steps}).")
        losses.append(chunk)
        if on_progress is not None:
            on_progress(start + len(chunk), float(chunk[-1]))
    return state[0], np.concatenate(losses)


def loaded_lm(config: DecoderConfig, params, tokenizer, source: str, **hf_extra) -> LoadedLM:
    """A trained decoder as a `LoadedLM`, ready for `hrjax.models.hf.save_hf`."""
    return LoadedLM(config, jax.device_get(params), tokenizer, llama_hf_config(config, **hf_extra), source)
