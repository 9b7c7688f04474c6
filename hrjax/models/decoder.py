"""Flax (Linen) port of the decoder-only LMs we route between.

One module covers the Llama family (Llama 2/3.x, Qwen2/2.5, Qwen3, Mistral, SmolLM2, Phi-3.5/Phi-4-mini) and
Gemma 3: the architectures differ only in switches of `DecoderConfig` (q/k/v bias, q/k norm, sandwich norms,
per-layer sliding windows and rope bases, partial rotary, embedding scale, final-logit soft cap;
transformers' Gemma 3 ignores `attn_logit_softcapping`, and so do we) and in their checkpoints' key maps
(Phi-3 fuses q/k/v and gate/up). `hrjax.models.hf` builds the config from a Hugging Face `config.json`.

Shapes: B batch, T new tokens, S cache slots, H query heads, K kv heads, D head dim, E hidden.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hrjax.models.keymap import TRANSPOSE, Rule, Split


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type. `scaling_type` in {'default', 'linear', 'llama3', 'longrope'}; longrope
    within its original context only (its short factors: `hrjax.models.hf` caps the context there)."""

    theta: float = 10000.0
    scaling_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0  # rotate only the first int(D * factor) dims of each head (Phi-4-mini)
    short_factor: tuple[float, ...] = ()  # longrope: [R/2] frequency divisors within the original context
    attention_factor: float = 1.0  # longrope: cos and sin scale (transformers' `attention_scaling`)

    def inv_freq(self, head_dim: int) -> jnp.ndarray:
        """[R/2] float32 inverse frequencies, as transformers computes them; R = int(D * partial_rotary_factor)."""
        head_dim = int(head_dim * self.partial_rotary_factor)
        exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
        inv = 1.0 / (self.theta ** exponent)
        if self.scaling_type == "linear":
            return inv / self.factor
        if self.scaling_type == "longrope":
            return inv / jnp.asarray(self.short_factor, jnp.float32)
        if self.scaling_type == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = jnp.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return jnp.where(medium, smoothed, scaled)
        return inv


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything that shapes a decoder; frozen and hashable so it can be a jit static argument."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    local_rope: Optional[RopeConfig] = None  # rope of sliding layers when it differs (Gemma 3)
    layer_is_sliding: tuple[bool, ...] = ()  # per layer; empty = no sliding layers
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # 'silu' | 'gelu_tanh'
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Gemma 3, Qwen3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) (Gemma)
    sandwich_norm: bool = False  # extra post-attention / post-MLP norms (Gemma 2/3)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    query_scale: Optional[float] = None  # None: head_dim ** -0.5
    final_logit_softcap: Optional[float] = None
    dtype: str = "float32"  # parameter and activation dtype: 'float32' | 'bfloat16'

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_is_sliding) and self.layer_is_sliding[layer]


class KVCache(NamedTuple):
    """Per-layer buffers: keys [B, K, D, S], values [B, K, S, D]. Slot j of every row holds the
    same step. These layouts make both attention matmuls transpose-free (XLA would otherwise copy
    the whole cache into matmul layout at every decode step)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: DecoderConfig, batch: int, slots: int) -> "KVCache":
        kv, d, n = config.num_kv_heads, config.head_dim, config.num_layers
        keys = tuple(jnp.zeros((batch, kv, d, slots), config.jnp_dtype) for _ in range(n))
        values = tuple(jnp.zeros((batch, kv, slots, d), config.jnp_dtype) for _ in range(n))
        return cls(keys, values)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; scales by w (Llama) or 1 + w (Gemma)."""

    eps: float
    plus_one: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
        return weight * normed.astype(x.dtype)


def rotary_tables(inv_freq: jax.Array, positions: jax.Array):
    """positions [B, T] int -> (cos, sin), each [B, T, 1, D] float32 in HF's half-split layout."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, D]; rotates the two halves of D (transformers' `rotate_half` convention). cos/sin of
    R < D dims (partial rotary): the first R dims rotate, the rest pass through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return jnp.concatenate([apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention_mask(kv_valid: jax.Array, query_slots: jax.Array, window: Optional[int]) -> jax.Array:
    """[B, 1, T, S] bool: key slot s is visible to the query in slot q when valid, s <= q and,
    for sliding layers, q - s < window (transformers' `sliding_window_overlay`)."""
    key_slots = jnp.arange(kv_valid.shape[1])
    visible = key_slots[None, :] <= query_slots[:, None]
    if window is not None:
        visible &= query_slots[:, None] - key_slots[None, :] < window
    return (visible[None] & kv_valid[:, None, :])[:, None]


def segment_mask(segment_ids: jax.Array, positions: jax.Array, window: Optional[int]) -> jax.Array:
    """[B, 1, T, T] bool for packed rows without a cache: token s is visible to token t when both belong to
    the same sequence (segment id >= 1; 0 is padding) and s is at a position <= t's (positions restart
    with each sequence) and, for sliding layers, less than `window` positions back."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return position_mask(jnp.where(segment_ids != 0, positions, -1), positions, window) & same[:, None]


def position_mask(key_positions: jax.Array, positions: jax.Array, window: Optional[int]) -> jax.Array:
    """[B, 1, T, S] bool for a cache whose slot order is not time order (a ring buffer): key slot s is
    visible to query t when it holds a token (key_positions[b, s] >= 0, -1 = empty) at a position <=
    the query's and, for sliding layers, less than `window` positions back."""
    key_pos, query_pos = key_positions[:, None, :], positions[:, :, None]
    visible = (key_pos >= 0) & (key_pos <= query_pos)
    if window is not None:
        visible &= query_pos - key_pos < window
    return visible[:, None]


class Attention(nn.Module):
    config: DecoderConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, kv_valid, query_slots, cache_kv, cache_index, key_positions=None,
                 segment_ids=None):
        cfg = self.config
        dtype = cfg.jnp_dtype
        dense = lambda n, bias, name: nn.Dense(  # noqa: E731
            n, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name)
        b, t, _ = x.shape
        q = dense(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, "q_proj")(x)
        k = dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "k_proj")(x)
        v = dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "v_proj")(x)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, dtype, name="k_norm")(k)
        sliding = cfg.is_sliding(self.layer)
        rope = cfg.local_rope if (sliding and cfg.local_rope is not None) else cfg.rope
        cos, sin = rotary_tables(rope.inv_freq(cfg.head_dim), positions)
        if rope.attention_factor != 1.0:
            cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        k = k.transpose(0, 2, 3, 1)  # [B, K, D, T]
        v = v.transpose(0, 2, 1, 3)  # [B, K, T, D]
        new_kv = (k, v)
        if cache_kv is not None:
            new_kv = (jax.lax.dynamic_update_slice(cache_kv[0], k, (0, 0, 0, cache_index)),
                      jax.lax.dynamic_update_slice(cache_kv[1], v, (0, 0, cache_index, 0)))
        # A prefill (cache_index a Python 0) only sees its own block: skip the still-empty slots.
        prefill = isinstance(cache_index, int) and cache_index == 0
        k, v = (k, v) if prefill else new_kv

        groups = cfg.num_heads // cfg.num_kv_heads
        scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim ** -0.5
        q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
        logits = jnp.einsum("bkgtd,bkds->bkgts", q, k, preferred_element_type=jnp.float32) * scale
        window = cfg.sliding_window if sliding else None
        if segment_ids is not None:
            mask = segment_mask(segment_ids, positions, window)
        elif key_positions is None:
            mask = attention_mask(kv_valid[:, :k.shape[-1]], query_slots, window)
        else:
            mask = position_mask(key_positions, positions, window)
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        # Contract into [B, K, G, T, D] and transpose after: asking einsum for [B, T, ...] directly
        # makes XLA pick a transposed matmul over the whole cache (3x slower decode attention).
        out = jnp.einsum("bkgts,bksd->bkgtd", probs, v).transpose(0, 3, 1, 2, 4)
        out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
        return dense(cfg.hidden_size, cfg.o_bias, "o_proj")(out), new_kv


class MLP(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = cfg.jnp_dtype
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=dtype, name=name)
        act = jax.nn.silu if cfg.hidden_act == "silu" else lambda a: jax.nn.gelu(a, approximate=True)
        hidden = act(dense(cfg.intermediate_size, "gate_proj")(x)) * dense(cfg.intermediate_size, "up_proj")(x)
        return dense(cfg.hidden_size, "down_proj")(hidden)


class DecoderLayer(nn.Module):
    config: DecoderConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, kv_valid, query_slots, cache_kv, cache_index, key_positions=None,
                 segment_ids=None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, cfg.jnp_dtype, name=name)  # noqa: E731
        h, new_kv = Attention(cfg, self.layer, name="attn")(
            norm("input_layernorm")(x), positions, kv_valid, query_slots, cache_kv, cache_index, key_positions,
            segment_ids)
        if cfg.sandwich_norm:
            h = norm("post_attention_layernorm")(h)
        x = x + h
        pre_mlp = "pre_feedforward_layernorm" if cfg.sandwich_norm else "post_attention_layernorm"
        h = MLP(cfg, name="mlp")(norm(pre_mlp)(x))
        if cfg.sandwich_norm:
            h = norm("post_feedforward_layernorm")(h)
        return x + h, new_kv


class Decoder(nn.Module):
    """A causal LM. Call with tokens [B, T] and get logits [B, T, V] (or [B, V] with `last_only`).

    Args of `__call__`:
      tokens: [B, T] int32 token ids.
      positions: [B, T] int32 rotary positions (count of real tokens before each one).
      kv_valid: [B, S] bool, which key slots hold real tokens (False for left padding); S = T
        without a cache, the cache length with one.
      cache: a `KVCache` or None (plain forward over `tokens`).
      cache_index: int32 scalar, the slot of `tokens[:, 0]` in the cache; a Python 0 (prefill)
        attends within `tokens` only, skipping the still-empty slots.
      last_only: return only the last position's logits (prefill), never [B, T, V].
      key_positions: [B, S] int32 or None; the rotary position of the token in each cache slot (-1:
        empty). Given, it replaces `kv_valid` and slot-order causality (`position_mask`): for caches
        whose slots are not in time order (in-flight batching's ring buffer).
      segment_ids: [B, T] int32 or None; without a cache, several sequences packed into each row: a
        token attends only to earlier tokens of its own sequence (`segment_mask`; ids >= 1, 0 padding),
        `positions` restarting with each sequence. Given, it replaces `kv_valid`.
    Returns (logits float32, new cache or None).
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens, positions, kv_valid, cache: Optional[KVCache] = None,
                 cache_index=0, last_only: bool = False, key_positions=None, segment_ids=None):
        cfg = self.config
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) apply to a plain forward pass, not to one with a KV cache.")
        dtype = cfg.jnp_dtype
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                         name="embed_tokens")
        x = embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, dtype)
        query_slots = cache_index + jnp.arange(tokens.shape[1])
        new_keys, new_values = [], []
        for i in range(cfg.num_layers):
            layer_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, (k, v) = DecoderLayer(cfg, i, name=f"layers_{i}")(
                x, positions, kv_valid, query_slots, layer_kv, cache_index, key_positions, segment_ids)
            new_keys.append(k)
            new_values.append(v)
        if last_only:
            x = x[:, -1]
        x = RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
                              name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cfg.final_logit_softcap is not None:
            logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        new_cache = None if cache is None else KVCache(tuple(new_keys), tuple(new_values))
        return logits, new_cache


def key_map(config: DecoderConfig) -> list[Rule]:
    """HF safetensors names <-> our param paths for every decoder architecture, with each parameter's
    tensor-parallel cut (Megatron style): q/k/v and gate/up split by output columns, o and down by
    input rows, the embedding and LM head by vocabulary rows; norms whole."""
    layer = "layers_{i}"
    if config.model_type == "phi3":
        return _phi3_key_map(config)
    rules = [
        Rule("model.embed_tokens.weight", "embed_tokens/embedding", split=Split(0, "vocab")),
        Rule("model.norm.weight", "norm/weight"),
        Rule("lm_head.weight", "lm_head/kernel", TRANSPOSE, optional=config.tie_word_embeddings,
             split=Split(1, "vocab")),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        reads_heads = proj == "o_proj"  # rows split (an all-reduce joins them), bias whole
        rules.append(Rule(f"model.layers.{{i}}.self_attn.{proj}.weight", f"{layer}/attn/{proj}/kernel", TRANSPOSE,
                          split=Split(0 if reads_heads else 1, "heads")))
        rules.append(Rule(f"model.layers.{{i}}.self_attn.{proj}.bias", f"{layer}/attn/{proj}/bias",
                          split=None if reads_heads else Split(0, "heads")))
    for norm in ("q_norm", "k_norm"):
        rules.append(Rule(f"model.layers.{{i}}.self_attn.{norm}.weight", f"{layer}/attn/{norm}/weight"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        reads_hidden = proj == "down_proj"
        rules.append(Rule(f"model.layers.{{i}}.mlp.{proj}.weight", f"{layer}/mlp/{proj}/kernel", TRANSPOSE,
                          split=Split(0 if reads_hidden else 1, "mlp")))
        rules.append(Rule(f"model.layers.{{i}}.mlp.{proj}.bias", f"{layer}/mlp/{proj}/bias",
                          split=None if reads_hidden else Split(0, "mlp")))
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        rules.append(Rule(f"model.layers.{{i}}.{norm}.weight", f"{layer}/{norm}/weight"))
    return rules


def _phi3_key_map(config: DecoderConfig) -> list[Rule]:
    """Phi-3's checkpoints fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (rows stacked in that
    order); every other tensor is named as in `key_map`."""
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    fused = {"q_proj": ("self_attn.qkv_proj", (0, q_rows)),
             "k_proj": ("self_attn.qkv_proj", (q_rows, q_rows + kv_rows)),
             "v_proj": ("self_attn.qkv_proj", (q_rows + kv_rows, q_rows + 2 * kv_rows)),
             "gate_proj": ("mlp.gate_up_proj", (0, config.intermediate_size)),
             "up_proj": ("mlp.gate_up_proj", (config.intermediate_size, 2 * config.intermediate_size))}
    rules = []
    for rule in key_map(dataclasses.replace(config, model_type="llama")):
        proj = rule.ours.split("/")[-2]
        if proj in fused and rule.ours.endswith("/kernel"):
            hf, rows = fused[proj]
            rule = dataclasses.replace(rule, hf=f"model.layers.{{i}}.{hf}.weight", rows=rows)
        rules.append(rule)
    return rules


def split_sizes(config: DecoderConfig) -> dict[str, dict[str, int]]:
    """Per split group of `key_map`, the counts a mesh's `model` axis must divide to cut it; the KV
    cache (kv heads) follows the 'heads' group."""
    return {"heads": {"num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads},
            "mlp": {"intermediate_size": config.intermediate_size},
            "vocab": {"vocab_size": config.vocab_size}}


def abstract_params(config: DecoderConfig):
    """Our parameter tree as ShapeDtypeStructs, without allocating anything."""
    model = Decoder(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, jnp.ones((1, 1), bool)))
