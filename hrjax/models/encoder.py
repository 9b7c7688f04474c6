"""Flax (Linen) port of BERT-family sentence encoders (BERT, MiniLM) with sentence-transformers pooling.

`BertEncoder` reproduces transformers' `BertModel` last hidden states (absolute positions, post-LN
layers, exact erf GELU); `mean_pool_normalize` is sentence-transformers' mean pooling followed by
L2 normalisation. `SentenceEncoder` tokenises in Python and runs one jitted function on texts packed
into a few row shapes (`hrjax.models.sentence_batches`). `load_encoder` / `save_encoder` read and
write HF directories through the declarative `encoder_key_map`.

Shapes: B batch, T tokens, E hidden, H heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hrjax import assets
from hrjax.errors import CheckpointError, UnsupportedArchitectureError
from hrjax.fsutil import atomic_directory
from hrjax.models import keymap, sentence_batches
from hrjax.models.hf import read_safetensors
from hrjax.models.keymap import TRANSPOSE, Rule

SUPPORTED_MODEL_TYPES = ("bert",)
# Buffers and heads that carry no encoder parameters: the pooler (sentence-transformers never uses
# it) and the position-id buffer older transformers saved.
IGNORED_TENSORS = (r"^pooler\.", r"^embeddings\.position_ids$")
# Task models (BertForMaskedLM, ...) nest the encoder under this prefix beside their heads.
TASK_MODEL_PREFIX = "bert."
DEFAULT_MAX_SEQ_LENGTH = 256
POOLING_MODULE = "sentence_transformers.models.Pooling"


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Everything that shapes a BERT encoder; frozen and hashable so it can be a jit static argument."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"  # parameter and activation dtype: 'float32' | 'bfloat16'

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], dtype: str = "float32", source: str = "config") -> "EncoderConfig":
        """Builds the config from a HF BERT `config.json` dict."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"{source}: model_type '{model_type}' has no Flax encoder port. Supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use a BERT/MiniLM checkpoint (e.g. "
                "sentence-transformers/all-MiniLM-L6-v2).")
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise UnsupportedArchitectureError(
                f"{source}: hidden_act '{act}' is not ported (only 'gelu', the exact erf GELU). "
                "Use a checkpoint trained with hidden_act 'gelu'.")
        position_type = hf.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UnsupportedArchitectureError(
                f"{source}: position_embedding_type '{position_type}' is not ported (only 'absolute'). "
                "Use a checkpoint with absolute position embeddings.")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype '{dtype}' is not supported: use 'float32' or 'bfloat16'.")
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if hidden % heads:
            raise CheckpointError(
                f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                "the config.json is corrupt: use the one saved with the weights.")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            dtype=dtype,
        )

    def to_hf(self) -> dict:
        """The transformers `BertModel` config.json of this config."""
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "position_embedding_type": "absolute",
            "pad_token_id": 0,
            "dtype": self.dtype,
            "torch_dtype": self.dtype,
        }


def _layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it; statistics in float32 for bfloat16 too.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype,
                        use_fast_variance=False, name=name)


def _dense(cfg: EncoderConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype, name=name)


class SelfAttention(nn.Module):
    """Bidirectional attention within each segment, then output dense, residual and LayerNorm."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x, segment_ids):
        """x [B, T, E], segment_ids [B, T] (k >= 1: the row's k-th text, 0: padding) -> [B, T, E]."""
        cfg = self.config
        b, t, _ = x.shape
        split = lambda a: a.reshape(b, t, cfg.num_heads, cfg.head_dim)  # noqa: E731
        q = split(_dense(cfg, cfg.hidden_size, "query")(x))
        k = split(_dense(cfg, cfg.hidden_size, "key")(x))
        v = split(_dense(cfg, cfg.hidden_size, "value")(x))
        logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        logits = logits * cfg.head_dim ** -0.5
        visible = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids != 0)[:, None, :]
        logits = jnp.where(visible[:, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(cfg.jnp_dtype)
        out = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, cfg.hidden_size)
        return _layer_norm(cfg, "attention_norm")(_dense(cfg, cfg.hidden_size, "output")(out) + x)


class EncoderLayer(nn.Module):
    """One post-LN BERT layer: attention block, then GELU MLP with residual and LayerNorm."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x, segment_ids):
        """x [B, T, E], segment_ids [B, T] -> [B, T, E]."""
        cfg = self.config
        x = SelfAttention(cfg, name="attention")(x, segment_ids)
        h = jax.nn.gelu(_dense(cfg, cfg.intermediate_size, "intermediate")(x), approximate=False)
        return _layer_norm(cfg, "output_norm")(_dense(cfg, cfg.hidden_size, "output")(h) + x)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> [B, T] int32: each token's index within its run of equal segment ids (0 at a run's
    start), so positions restart with every packed text."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


class BertEncoder(nn.Module):
    """BERT encoder: input_ids [B, T] int, segment_ids [B, T] -> last hidden [B, T, E].

    `segment_ids` generalises the attention mask: a row holds one text (ids 1 then 0 for padding, the
    usual mask) or several packed one after another (ids 1, 2, ...): a token attends to its own text
    only, and positions restart at 0 with each text, so a packed text's states equal its states alone.
    `token_type_ids` [B, T] defaults to zeros (single-segment input). Padding goes on the right.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, segment_ids, token_type_ids=None):
        cfg = self.config
        dtype = cfg.jnp_dtype
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=dtype, param_dtype=dtype,  # noqa: E731
                                         name=name)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
             + embed(cfg.max_position_embeddings, "position_embeddings")(segment_positions(segment_ids))
             + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
        x = _layer_norm(cfg, "embeddings_norm")(x)
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, name=f"layer_{i}")(x, segment_ids)
        return x


def mean_pool_normalize(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """hidden [B, T, E], segment_ids [B, T] -> [B, num_segments, E] float32 unit vectors, slot k - 1
    holding segment k's.

    sentence-transformers' mean over a text's tokens, then L2 normalisation (an empty slot gives the
    zero vector).
    """
    members = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=jnp.float32)  # segment 0 (padding): none
    summed = jnp.einsum("btk,bte->bke", members, hidden.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    mean = summed / jnp.maximum(jnp.sum(members, axis=1)[..., None], 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def packed_sentence_embeddings(config: EncoderConfig, params, input_ids, segment_ids) -> jax.Array:
    """Pure: params, input_ids [B, T], segment_ids [B, T] (`hrjax.models.sentence_batches.pack`) ->
    [B, max_segments(T), E] float32 unit vectors, one per packed text."""
    hidden = BertEncoder(config).apply(params, input_ids, segment_ids)
    return mean_pool_normalize(hidden, segment_ids, sentence_batches.max_segments(input_ids.shape[1]))


def sentence_embeddings(config: EncoderConfig, params, input_ids, attention_mask) -> jax.Array:
    """Pure: params, input_ids [B, T], attention_mask [B, T] (one text per row) -> [B, E] float32 unit
    vectors."""
    hidden = BertEncoder(config).apply(params, input_ids, attention_mask)
    return mean_pool_normalize(hidden, attention_mask, 1)[:, 0]


@functools.lru_cache(maxsize=None)
def jitted_embed(config: EncoderConfig):
    """`embed(params, input_ids, attention_mask) -> [B, E]`, jitted once per config."""
    return jax.jit(functools.partial(sentence_embeddings, config))


@functools.lru_cache(maxsize=None)
def jitted_packed_embed(config: EncoderConfig):
    """`embed(params, input_ids, segment_ids) -> [B, max_segments(T), E]`, jitted once per config."""
    return jax.jit(functools.partial(packed_sentence_embeddings, config))


def encoder_key_map(config: EncoderConfig) -> list[Rule]:
    """HF `BertModel` safetensors names (no task prefix) <-> our param paths."""
    del config  # one layout for every BERT size
    layer = "encoder.layer.{i}"
    ours = "layer_{i}"
    rules = [
        Rule("embeddings.word_embeddings.weight", "word_embeddings/embedding"),
        Rule("embeddings.position_embeddings.weight", "position_embeddings/embedding"),
        Rule("embeddings.token_type_embeddings.weight", "token_type_embeddings/embedding"),
        Rule("embeddings.LayerNorm.weight", "embeddings_norm/scale"),
        Rule("embeddings.LayerNorm.bias", "embeddings_norm/bias"),
    ]
    dense = [
        ("attention.self.query", "attention/query"),
        ("attention.self.key", "attention/key"),
        ("attention.self.value", "attention/value"),
        ("attention.output.dense", "attention/output"),
        ("intermediate.dense", "intermediate"),
        ("output.dense", "output"),
    ]
    for hf, path in dense:
        rules.append(Rule(f"{layer}.{hf}.weight", f"{ours}/{path}/kernel", TRANSPOSE))
        rules.append(Rule(f"{layer}.{hf}.bias", f"{ours}/{path}/bias"))
    norms = [("attention.output.LayerNorm", "attention/attention_norm"), ("output.LayerNorm", "output_norm")]
    for hf, path in norms:
        rules.append(Rule(f"{layer}.{hf}.weight", f"{ours}/{path}/scale"))
        rules.append(Rule(f"{layer}.{hf}.bias", f"{ours}/{path}/bias"))
    return rules


def abstract_params(config: EncoderConfig):
    """Our parameter tree as ShapeDtypeStructs, without allocating anything."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: BertEncoder(config).init(jax.random.PRNGKey(0), ids, ids))


def canonical_bert_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint names as `BertModel` saves them.

    Task models (`BertForMaskedLM`, ...) prefix the encoder with 'bert.' and add heads: keep only
    the encoder. TF-era checkpoints name LayerNorm parameters gamma/beta: rename to weight/bias.
    """
    if any(name.startswith(TASK_MODEL_PREFIX) for name in tensors):
        tensors = {name[len(TASK_MODEL_PREFIX):]: value for name, value in tensors.items()
                   if name.startswith(TASK_MODEL_PREFIX)}
    renamed = {}
    for name, value in tensors.items():
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        renamed[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)] = value
    return renamed


def params_from_hf_tensors(config: EncoderConfig, tensors: Mapping[str, np.ndarray], source: str):
    """HF BERT tensors (any naming `canonical_bert_names` accepts) -> `{'params': ...}` numpy tree."""
    return keymap.hf_to_params(canonical_bert_names(tensors), encoder_key_map(config), config.num_layers,
                               abstract_params(config), np.dtype(config.jnp_dtype), source,
                               ignore=IGNORED_TENSORS)


class SentenceEncoder:
    """A sentence encoder ready to run: config, params, tokenizer and sentence-transformers settings.

    `encode` packs texts into the encoder's rows (`hrjax.models.sentence_batches.pack`: no padding
    between texts, a few [B, T] shapes) and runs `embed_packed` once per call. `embed(params,
    input_ids, attention_mask) -> [B, E]` is the jitted pure function of one text per row, callable
    inside other jitted code.
    """

    def __init__(self, config: EncoderConfig, params, tokenizer, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                 do_lower_case: bool = False, source: str = ""):
        self.config = config
        self.params = jax.device_put(params)
        self.tokenizer = tokenizer
        self.max_seq_length = min(int(max_seq_length), config.max_position_embeddings)
        self.do_lower_case = do_lower_case
        self.source = source
        self.embed = jitted_embed(config)
        self.embed_packed = jitted_packed_embed(config)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text ([CLS] ... [SEP]), truncated to `max_seq_length`, as sentence-transformers."""
        return sentence_batches.tokenize(self.tokenizer, texts, self.do_lower_case, self.max_seq_length)

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """texts -> [N, E] float32 unit vectors, in input order."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text as [text].")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return sentence_batches.embed_packed(
            self.tokenize(texts), lambda ids, segments: self.embed_packed(self.params, ids, segments), self.dim,
            batch_size, self.tokenizer.pad_token_id or 0, self.max_seq_length)


def check_pooling(path: Path) -> None:
    """Refuses a sentence-transformers directory whose pooling (`1_Pooling/config.json`, or the Pooling module
    `modules.json` lists) is not mean pooling, the one `mean_pool_normalize` implements. A plain HF directory
    (no pooling config) is mean-pooled."""
    pooling_dir = path / "1_Pooling"
    if (path / "modules.json").exists():
        modules = json.loads((path / "modules.json").read_text())
        pooling_dir = next((path / m["path"] for m in modules if m.get("type") == POOLING_MODULE), pooling_dir)
    config_file = pooling_dir / "config.json"
    if not config_file.exists():
        return
    config = json.loads(config_file.read_text())
    modes = sorted(key.removeprefix("pooling_mode_") for key, on in config.items()
                   if key.startswith("pooling_mode_") and on is True)
    if isinstance(config.get("pooling_mode"), str):  # newer sentence-transformers: one named mode
        modes = [config["pooling_mode"]]
    if modes not in (["mean_tokens"], ["mean"]):
        raise UnsupportedArchitectureError(
            f"{config_file}: pooling {modes or 'none'} is not ported; hrjax's sentence encoders mean-pool token "
            "states (pooling_mode_mean_tokens only). Use a sentence-transformers model trained with mean pooling, "
            "e.g. all-MiniLM-L6-v2.")


def load_encoder(path: Optional[str | os.PathLike] = None, dtype: str = "float32") -> SentenceEncoder:
    """Loads a BERT sentence encoder from a local HF / sentence-transformers directory.

    `path` None loads the bundled all-MiniLM-L6-v2 (`hrjax.assets.minilm_path`). No torch needed.
    """
    from transformers import AutoTokenizer

    path = assets.minilm_path() if path is None else Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; pass the local directory of a BERT model.")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json; a HF model directory needs one beside its weights.")
    config = EncoderConfig.from_hf(json.loads(config_file.read_text()), dtype, str(path))
    check_pooling(path)
    params = params_from_hf_tensors(config, read_safetensors(path), str(path))
    if not ((path / "tokenizer.json").exists() or (path / "vocab.txt").exists()):
        raise CheckpointError(
            f"{path}: no tokenizer (tokenizer.json or vocab.txt). Save the tokenizer beside the "
            "weights with `tokenizer.save_pretrained(dir)`.")
    st_config_file = path / "sentence_bert_config.json"
    st_config = json.loads(st_config_file.read_text()) if st_config_file.exists() else {}
    return SentenceEncoder(config, params, AutoTokenizer.from_pretrained(str(path)),
                           max_seq_length=st_config.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH,
                           do_lower_case=bool(st_config.get("do_lower_case", False)), source=str(path))


def save_encoder(encoder: SentenceEncoder, out_dir: str | os.PathLike) -> Path:
    """Exports to a HF `BertModel` directory (config.json, model.safetensors, tokenizer,
    sentence_bert_config.json), atomically. `load_encoder` and transformers both read it."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    params = jax.tree.map(np.asarray, encoder.params)
    tensors = keymap.params_to_hf(params, encoder_key_map(encoder.config), encoder.config.num_layers)
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(encoder.config.to_hf(), indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        encoder.tokenizer.save_pretrained(str(tmp))
        (tmp / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": encoder.max_seq_length, "do_lower_case": encoder.do_lower_case}, indent=2))
    return out
