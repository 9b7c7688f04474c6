"""GGUF (llama.cpp) checkpoints -> our decoder, through the Hugging Face loading path.

A GGUF file holds a config under llama.cpp's metadata keys, tensors under llama.cpp's names in ggml
block formats, and the tokenizer's vocabulary. `read_gguf` turns it into what a HF directory holds:
a `config.json` dict and HF-named float32 arrays, with every transform of llama.cpp's converter
(`convert_hf_to_gguf.py`) undone. `load_gguf` then builds the model with `hrjax.models.hf`. The file
is parsed here (`_parse`: the metadata in one pass, tensors as memory-mapped views), the `gguf`
package dequantises.

Shapes: ggml lists dims fastest-first (`[in, out]` for a matmul weight); numpy arrays here are
row-major `[out, in]`, the order torch checkpoints use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Optional

import numpy as np

from hrjax.errors import CheckpointError, UnsupportedArchitectureError
from hrjax.models.hf import LoadedLM, decoder_config_from_hf, params_from_hf_tensors
from hrjax.models.keymap import LazyTensors

if TYPE_CHECKING:
    from jax.sharding import Mesh

# GGUF `general.architecture` -> (HF model_type, HF architectures entry).
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),  # also Mistral and SmolLM2: llama.cpp files them as llama
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),  # head_dim from attention.key_length; q/k norms stored as they are
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
# Token texts llama.cpp also treats as end of generation; the GGUF's eos id is often only <eos>.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>")
ROPE_FREQS = "rope_freqs.weight"  # Llama 3 rope scaling, stored as per-frequency divisors
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Undo:
    """Inverse of one change llama.cpp's converter made to a tensor: `fn` maps GGUF -> HF array."""

    name: str
    fn: Callable[[np.ndarray], np.ndarray]


KEEP = Undo("none", lambda a: a)
# Gemma's RMSNorm scales by (1 + w); the converter stores w + 1 so llama.cpp can scale by it.
SUBTRACT_ONE = Undo("subtract_one", lambda a: a - np.float32(1.0))


def unpermute_rows(heads: int) -> Undo:
    """The converter's `permute` interleaves each head's two rotary halves (rows [H, 2, D/2] ->
    [H, D/2, 2]) for llama.cpp's adjacent-pair rope; HF keeps the halves split. Rows of [H*D, ...]."""
    def fn(a: np.ndarray) -> np.ndarray:
        return a.reshape(heads, a.shape[0] // heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
    return Undo(f"unpermute_rows({heads} heads)", fn)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """llama.cpp tensor name -> HF tensor name (`{i}` = layer), with the converter's change undone."""

    gguf: str
    hf: str
    undo: Undo = KEEP


def tensor_rules(arch: str, hf_config: Mapping[str, Any]) -> tuple[TensorRule, ...]:
    """The name table of one GGUF architecture (its HF config supplies the head counts)."""
    llama, gemma = arch == "llama", arch == "gemma3"
    q = unpermute_rows(hf_config["num_attention_heads"]) if llama else KEEP
    k = unpermute_rows(hf_config["num_key_value_heads"]) if llama else KEEP
    norm = SUBTRACT_ONE if gemma else KEEP
    layer, attn, mlp = "model.layers.{i}", "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    return (
        TensorRule("token_embd.weight", "model.embed_tokens.weight"),
        TensorRule("output.weight", "lm_head.weight"),
        TensorRule("output_norm.weight", "model.norm.weight", norm),
        TensorRule("blk.{i}.attn_norm.weight", f"{layer}.input_layernorm.weight", norm),
        TensorRule("blk.{i}.attn_q.weight", f"{attn}.q_proj.weight", q),
        TensorRule("blk.{i}.attn_q.bias", f"{attn}.q_proj.bias", q),
        TensorRule("blk.{i}.attn_k.weight", f"{attn}.k_proj.weight", k),
        TensorRule("blk.{i}.attn_k.bias", f"{attn}.k_proj.bias", k),
        TensorRule("blk.{i}.attn_v.weight", f"{attn}.v_proj.weight"),
        TensorRule("blk.{i}.attn_v.bias", f"{attn}.v_proj.bias"),
        TensorRule("blk.{i}.attn_output.weight", f"{attn}.o_proj.weight"),
        TensorRule("blk.{i}.attn_output.bias", f"{attn}.o_proj.bias"),
        TensorRule("blk.{i}.attn_q_norm.weight", f"{attn}.q_norm.weight", norm),
        TensorRule("blk.{i}.attn_k_norm.weight", f"{attn}.k_norm.weight", norm),
        # The norm before the MLP is ffn_norm in every architecture; HF names it by position.
        TensorRule("blk.{i}.ffn_norm.weight",
                   f"{layer}.{'pre_feedforward' if gemma else 'post_attention'}_layernorm.weight", norm),
        TensorRule("blk.{i}.post_attention_norm.weight", f"{layer}.post_attention_layernorm.weight", norm),
        TensorRule("blk.{i}.post_ffw_norm.weight", f"{layer}.post_feedforward_layernorm.weight", norm),
        TensorRule("blk.{i}.ffn_gate.weight", f"{mlp}.gate_proj.weight"),
        TensorRule("blk.{i}.ffn_up.weight", f"{mlp}.up_proj.weight"),
        TensorRule("blk.{i}.ffn_down.weight", f"{mlp}.down_proj.weight"),
    )


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file: `shape` in ggml order (reversed from numpy's), `data` a view of the
    memory-mapped file as gguf's reader gives it (elements for F32/F16/F64/int types, else the raw bytes
    [..., row bytes] that `gguf.quants.dequantize` reads)."""

    name: str
    tensor_type: int
    shape: np.ndarray
    data: np.ndarray


class GGUFContents(NamedTuple):
    """A GGUF file's metadata (key -> Python value: numbers, strings, lists) and tensors."""

    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
            12: "<f8"}  # GGUF value type -> numpy dtype; 8: string, 9: array
_ELEMENT_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}  # stored as elements; every other type as raw bytes


def _parse(path: Path) -> GGUFContents:
    """Reads a little-endian GGUF (version 2 or 3): metadata with `struct` reads in one pass (gguf's own
    reader slices the memory map once per vocabulary entry: 15 s for a 262k-token vocabulary), tensors
    as memory-mapped views. ValueError when the file is not one, or is cut short."""
    import gguf

    data = np.memmap(path, dtype=np.uint8, mode="r")
    buffer = memoryview(data)
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from(fmt, buffer, offset)
        offset += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal offset
        length = take("<Q")
        if offset + length > len(buffer):
            raise ValueError(f"a string at byte {offset} runs past the end of the file")
        offset += length
        return bytes(buffer[offset - length:offset]).decode("utf-8")

    def value(kind: int):
        nonlocal offset
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, count = take("<I"), take("<Q")
            if item_kind in _SCALARS:
                items = np.frombuffer(buffer, _SCALARS[item_kind], count, offset)
                offset += items.nbytes
                return items.tolist()
            return [value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind} at byte {offset}")
        item = np.frombuffer(buffer, _SCALARS[kind], 1, offset)
        offset += item.nbytes
        return item.item()

    magic, version, num_tensors, num_keys = take("<4sIQQ")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"magic {magic!r} version {version}: not a little-endian GGUF of version 2 or 3")
    metadata = {}
    for _ in range(num_keys):
        key = string()
        metadata[key] = value(take("<I"))
    infos = []
    for _ in range(num_tensors):
        name = string()
        num_dims = take("<I")
        dims = np.frombuffer(buffer, "<u8", num_dims, offset).astype(np.int64)
        offset += 8 * num_dims
        infos.append((name, dims, take("<I"), take("<Q")))
    alignment = int(metadata.get("general.alignment", 32))
    start = offset + (-offset) % alignment
    tensors = []
    for name, dims, type_id, tensor_offset in infos:
        ggml_type = gguf.GGMLQuantizationType(type_id)
        shape = tuple(int(d) for d in reversed(dims.tolist()))
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        n_bytes = int(np.prod(dims)) * type_size // block_size
        begin = start + tensor_offset
        if begin + n_bytes > len(data):
            raise ValueError(f"tensor '{name}' runs past the end of the file")
        element = _ELEMENT_TYPES.get(ggml_type.name)
        if element is None:
            view = data[begin:begin + n_bytes].reshape(gguf.quants.quant_shape_to_byte_shape(shape, ggml_type))
        else:
            view = data[begin:begin + n_bytes].view(element).reshape(shape)
        tensors.append(GGUFTensor(name, type_id, dims, view))
    return GGUFContents(metadata, tensors)


def _open(path: Path) -> GGUFContents:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file. Pass the path of a .gguf file.")
    try:
        return _parse(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            raise CheckpointError(
                f"{path}: a tensor has a ggml type id that gguf {_version('gguf')} does not know ({e}). "
                "Upgrade it (`pip install -U gguf`) or re-quantise the model to a common type such as "
                "Q8_0 or F16.") from e
        raise CheckpointError(
            f"{path}: cannot parse the file as GGUF ({e}). It is truncated, corrupt or not a GGUF: "
            "download it again.") from e
    except (OSError, IndexError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: cannot read the file as GGUF ({type(e).__name__}: {e}). It is truncated or "
            "corrupt: download it again.") from e


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _metadata(reader: GGUFContents) -> dict[str, Any]:
    """Every metadata value as a Python scalar, string or list, except the vocabulary arrays."""
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges")
    return {key: value for key, value in reader.metadata.items() if key not in skip}


def _float32_decimal(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.9999997e-06. Recover the shortest decimal."""
    return float(str(np.float32(value)))


def _dequantize(tensor, source: Path) -> np.ndarray:
    """One tensor as float32 [out, in] (ggml's dims reversed)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        array = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise CheckpointError(
            f"{source}: tensor '{tensor.name}' is stored as {qtype.name}, which gguf "
            f"{_version('gguf')} cannot dequantise. Re-quantise the model to a supported type "
            "(e.g. Q8_0, Q4_K_M or F16) with llama.cpp's llama-quantize.") from e
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if array.shape != shape:
        raise CheckpointError(
            f"{source}: tensor '{tensor.name}' dequantises to {array.shape}, not its declared {shape}. "
            "The file is corrupt: download it again.")
    # F32 data is a view of the memory-mapped file: copy so the arrays outlive the reader.
    return np.array(array, dtype=np.float32)


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, source: Path) -> dict:
    """Llama 3 rope parameters from the converter's `rope_freqs` divisors, checked to reproduce them.

    The converter writes only the divisors, computed with low/high frequency factors 1 and 4 and an
    original context of 8192 (its defaults, and Llama 3.x's values); `factor` is the largest divisor.
    """
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": float(factors.max()),
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen < 8192 / 4.0, 1.0, np.where(
        wavelen > 8192 / 1.0, params["factor"], 1.0 / ((1 - smooth) / params["factor"] + smooth)))
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise UnsupportedArchitectureError(
            f"{source}: '{ROPE_FREQS}' holds rope frequency divisors that are not Llama 3 scaling "
            f"with {params}. Only that scaling is ported; load the original HF checkpoint instead.")
    return params


def _hf_config(arch: str, meta: Mapping[str, Any], shapes: Mapping[str, tuple], rope_factors,
               source: Path) -> dict:
    """The HF `config.json` dict that llama.cpp's converter read to write this metadata."""
    def key(name: str, default: Any = _REQUIRED):
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is _REQUIRED:
            raise CheckpointError(f"{source}: metadata key '{full}' is missing; the GGUF is incomplete or "
                                  "was written by an incompatible converter. Convert the model again.")
        return default

    heads, hidden = key("attention.head_count"), key("embedding_length")
    if isinstance(heads, list) or isinstance(key("attention.head_count_kv", 0), list):
        raise UnsupportedArchitectureError(f"{source}: per-layer head counts are not ported.")
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or hidden // heads
    num_layers = key("block_count")
    model_type, hf_class = ARCHITECTURES[arch]
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{source}: no 'token_embd.weight' tensor; the file is incomplete: download it again.")
    hf = {
        "model_type": model_type,
        "architectures": [hf_class],
        # The embedding matrix, not the token list, fixes the logit width (vocabularies get padded).
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": _float32_decimal(key("attention.layer_norm_rms_epsilon")),
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    theta = _float32_decimal(key("rope.freq_base", 10000.0))
    scaling = key("rope.scaling.type", "none")
    if rope_factors is not None:
        rope = _llama3_rope(rope_factors, theta, head_dim, source)
    elif scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": _float32_decimal(key("rope.scaling.factor"))}
    else:  # any other scaling (yarn, ...) goes through by name; the HF loader says it is not ported
        rope = {"rope_type": "default" if scaling == "none" else scaling, "rope_theta": theta}
    if arch == "gemma3":
        hf.update(_gemma3_config(key, num_layers, head_dim, hidden, heads, rope))
    else:
        hf.update(hidden_act="silu", rope_parameters=rope,
                  attention_bias=arch != "qwen2" and "blk.0.attn_q.bias" in shapes)  # qwen2's are implied
    return hf


def _gemma3_config(key, num_layers: int, head_dim: int, hidden: int, heads: int, rope: dict) -> dict:
    """Gemma 3 settings that llama.cpp hard-codes rather than reads (`llama_load_hparams_gemma3`):
    every 6th layer global, local rope base 10000 without scaling, the query scale, no logit soft caps."""
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": key("attention.sliding_window"),
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)],
        "rope_parameters": {"full_attention": rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        # queries scale by 1/sqrt(head_dim), except in the 62-layer 27B: 1/sqrt(hidden / heads)
        "query_pre_attn_scalar": hidden // heads if num_layers == 62 else head_dim,
    }


def _special_tokens(meta: Mapping[str, Any], end_of_turn_ids: list[int]) -> dict:
    """bos/eos/pad ids; eos also lists the end-of-turn ids (eot/eom metadata, `END_OF_TURN_TOKENS`)
    that end a chat reply, as HF's generation_config.json does."""
    out = {}
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            out[hf_key] = meta[f"tokenizer.ggml.{gguf_key}"]
    eos = [meta[f"tokenizer.ggml.{k}"] for k in ("eos_token_id", "eot_token_id", "eom_token_id")
           if f"tokenizer.ggml.{k}" in meta]
    eos = list(dict.fromkeys(eos + end_of_turn_ids))
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


def _end_of_turn_ids(reader: GGUFContents) -> list[int]:
    """Ids of `END_OF_TURN_TOKENS` in the vocabulary."""
    wanted = set(END_OF_TURN_TOKENS)
    return [i for i, token in enumerate(reader.metadata.get("tokenizer.ggml.tokens", ())) if token in wanted]


def _convert(reader, source: Path) -> tuple[dict, LazyTensors]:
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: GGUF architecture '{arch}' has no Flax port. Supported: {', '.join(ARCHITECTURES)}. "
            "Pick a GGUF of one of these families.")
    if int(meta.get("split.count", 1)) > 1:
        raise CheckpointError(
            f"{source}: this is one shard of a {meta['split.count']}-part split GGUF. Merge the parts "
            "first: `llama-gguf-split --merge first-part.gguf merged.gguf`.")
    by_name = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in by_name.items()}
    rope_factors = _dequantize(by_name[ROPE_FREQS], source) if ROPE_FREQS in by_name else None
    hf_config = _hf_config(arch, meta, shapes, rope_factors, source)
    hf_config.update(_special_tokens(meta, _end_of_turn_ids(reader)))
    rules = {}
    for rule in tensor_rules(arch, hf_config):
        layers = range(hf_config["num_hidden_layers"]) if "{i}" in rule.gguf else [None]
        for i in layers:
            rules[rule.gguf.format(i=i)] = (rule.hf.format(i=i), rule.undo)
    unknown = sorted(set(by_name) - set(rules) - {ROPE_FREQS})
    if unknown:
        raise UnsupportedArchitectureError(
            f"{source}: {len(unknown)} tensor(s) have no HF counterpart in the '{arch}' table, e.g. "
            f"{unknown[:5]}. The model uses a feature hrjax does not port (or block_count is wrong).")
    readers = {}
    for name, tensor in by_name.items():
        if name != ROPE_FREQS:
            hf_name, undo = rules[name]
            readers[hf_name] = functools.partial(_read_tensor, tensor, undo, source)
    return hf_config, LazyTensors(readers)


def _read_tensor(tensor, undo: Undo, source: Path) -> np.ndarray:
    return undo.fn(_dequantize(tensor, source))


def read_gguf(path: str | os.PathLike) -> tuple[dict, LazyTensors]:
    """(HF config dict, HF-named float32 arrays) of a GGUF file; every ggml type gguf can dequantise.
    Each array is dequantised from the memory-mapped file when looked up."""
    path = Path(path)
    return _convert(_open(path), path)


def _tokenizer(path: Path, reader, tokenizer: Optional[str | os.PathLike], model_type: str):
    """The tokenizer of a GGUF: from a HF tokenizer directory when given, else built by transformers
    from the file's vocabulary; None when the file has no vocabulary. Keeps the GGUF's chat template.
    The tokenizer class is named by `model_type` where transformers maps it (the class AutoTokenizer
    would choose), so transformers does not parse the whole file a second time to find it."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    elif "tokenizer.ggml.tokens" not in reader.metadata:
        return None
    else:
        try:
            known = {"tokenizer_type": model_type} if TOKENIZER_MAPPING_NAMES.get(model_type) else {}
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **known)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise CheckpointError(
                f"{path}: transformers cannot build a tokenizer from this GGUF's vocabulary ({e}). Pass "
                "tokenizer=<directory with the model's HF tokenizer files> to load_gguf.") from e
    template = reader.metadata.get("tokenizer.chat_template")
    if template is not None and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


def load_gguf(path: str | os.PathLike, dtype: str = "float32", tokenizer: Optional[str | os.PathLike] = None,
              mesh: Optional["Mesh"] = None) -> LoadedLM:
    """Loads a decoder from a GGUF file, dequantised to `dtype` ('float32' | 'bfloat16').

    `tokenizer`: a HF tokenizer directory to use instead of the vocabulary stored in the GGUF.
    `mesh`: params placed tensor-parallel over its `model` axis, one tensor at a time as it is
    dequantised (see `hrjax.models.sharding`).
    """
    path = Path(path)
    reader = _open(path)
    hf_config, tensors = _convert(reader, path)
    config = decoder_config_from_hf(hf_config, dtype, str(path))
    params = params_from_hf_tensors(config, tensors, str(path), mesh)
    return LoadedLM(config, params, _tokenizer(path, reader, tokenizer, hf_config["model_type"]), hf_config, str(path))
