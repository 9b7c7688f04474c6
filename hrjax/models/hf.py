"""Hugging Face checkpoints <-> our decoder: config parsing, safetensors loading, hub, export."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np

from hrjax.fsutil import atomic_directory
from hrjax.errors import CheckpointError, OfflineError, UnsupportedArchitectureError
from hrjax.models import keymap
from hrjax.models.decoder import DecoderConfig, RopeConfig, abstract_params, key_map

if TYPE_CHECKING:
    from jax.sharding import Mesh

log = logging.getLogger(__name__)

LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral", "phi3")
QWEN = ("qwen2", "qwen3")
GEMMA3 = ("gemma3_text", "gemma3")
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + GEMMA3
TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
# Checkpoint tensors that carry no parameters of ours.
IGNORED_TENSORS = (r"rotary_emb\.inv_freq$",)
# Multimodal `gemma3` checkpoints: the text model's tensors under these prefixes (HF files, which transformers 5
# also writes, and transformers 5's module names) -> a text-only checkpoint's names; vision tensors left out.
GEMMA3_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                        "language_model.lm_head.": "lm_head.", "lm_head.": "lm_head."}
GEMMA3_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                          "model.multi_modal_projector.")


@dataclasses.dataclass
class LoadedLM:
    """A decoder ready to run: its frozen config, params, tokenizer and the HF config it came from."""

    config: DecoderConfig
    params: Any
    tokenizer: Any
    hf_config: dict
    source: str


def _rope_from_hf(params: Mapping[str, Any], hf: Mapping[str, Any], source: str) -> RopeConfig:
    """One layer type's rope from its `rope_parameters`, with transformers 5's defaults: the original context of
    llama3 and longrope is the config's top-level `original_max_position_embeddings` (phi3: 4096 when absent),
    else the rope's own, else `max_position_embeddings`; longrope's attention factor follows from the context
    ratio. Longrope keeps its short factors only: `decoder_config_from_hf` caps the context at the original."""
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind in ("su", "yarn") and hf.get("model_type") == "phi3":
        kind = "longrope"  # transformers' Phi3Config renames Phi-3's early names
    if kind not in ("default", "linear", "llama3", "longrope"):
        raise UnsupportedArchitectureError(
            f"{source}: rope_type '{kind}' is not ported (supported: default, linear, llama3, longrope). "
            "Use a checkpoint with one of those, or add the scaling to hrjax.models.decoder.RopeConfig.")
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    if partial != 1.0 and hf.get("model_type") != "phi3":
        raise UnsupportedArchitectureError(
            f"{source}: partial_rotary_factor {partial} in a '{hf.get('model_type')}' config: transformers' "
            f"{hf.get('model_type')} rotates whole heads, so this checkpoint does not run there either. Only phi3's "
            "partial rotary is ported; remove the key if the model was trained with full rotary.")
    original_context = int(hf.get("original_max_position_embeddings") or (
        4096 if hf.get("model_type") == "phi3" else None) or params.get("original_max_position_embeddings")
        or hf.get("max_position_embeddings", 8192))
    short_factor, attention_factor = (), 1.0
    if kind == "longrope":
        short_factor = tuple(float(f) for f in params["short_factor"])
        factor = params.get("factor") or hf.get("max_position_embeddings", original_context) / original_context
        attention_factor = params.get("attention_factor") or (
            math.sqrt(1 + math.log(factor) / math.log(original_context)) if factor > 1.0 else 1.0)
    return RopeConfig(
        theta=float(params.get("rope_theta", 10000.0)),
        scaling_type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original_context,
        partial_rotary_factor=partial,
        short_factor=short_factor,
        attention_factor=float(attention_factor),
    )


def _rope_parameters(hf: Mapping[str, Any]) -> dict:
    """transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`."""
    if hf.get("rope_parameters"):
        return dict(hf["rope_parameters"])
    merged = dict(hf.get("rope_scaling") or {})
    merged.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return merged


def text_config(hf: Mapping[str, Any]) -> dict:
    """The decoder's config within a HF config: a multimodal `gemma3` config's `text_config`, completed from
    transformers' `Gemma3TextConfig` defaults (checkpoints store only what differs from them) and the top level's
    special token ids; any other config as it is."""
    if hf.get("model_type") != "gemma3":
        return dict(hf)
    from transformers import Gemma3TextConfig

    text = Gemma3TextConfig.from_dict(dict(hf.get("text_config") or {})).to_dict()
    specials = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    return {**text, **specials, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


def _gemma3_text_tensor(name: str) -> Optional[str]:
    """A multimodal gemma3 tensor's name in a text-only checkpoint; None for the vision tower's."""
    for prefix, text_prefix in GEMMA3_TEXT_PREFIXES.items():
        if name.startswith(prefix):
            return text_prefix + name[len(prefix):]
    return None if name.startswith(GEMMA3_VISION_PREFIXES) else name  # unknown: reported as unused


def _sliding_layers(hf: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[Optional[int], list[str]]:
    """(window, layer_types) as transformers 5 derives them: Mistral slides every layer over `sliding_window`
    (4096 when absent); Qwen2/3 only with `use_sliding_window` (default false), from layer `max_window_layers` on;
    Phi-3 every layer when `sliding_window` is set; Llama never."""
    if model_type == "mistral":
        window = hf.get("sliding_window", 4096)
    elif model_type in QWEN:
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    else:
        window = hf.get("sliding_window") if model_type == "phi3" else None
    layer_types = hf.get("layer_types") if model_type in QWEN else None  # the others slide on every layer
    if window is None:
        return None, ["full_attention"] * num_layers
    if layer_types is None:
        first = int(hf.get("max_window_layers", 28)) if model_type in QWEN else 0
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    return int(window), layer_types


def _context(hf: Mapping[str, Any], rope: RopeConfig, source: str) -> int:
    """The context we serve: `max_position_embeddings`, but a longrope model's original context, within which
    transformers uses the short factors we port (beyond it, its long factors would apply)."""
    context = int(hf.get("max_position_embeddings", 2048))
    if rope.scaling_type == "longrope" and context > rope.original_max_position_embeddings:
        log.warning(
            "%s: longrope's long factors are not ported; the context is capped at the original %d tokens "
            "(of %d): longer prompts are refused.", source, rope.original_max_position_embeddings, context)
        context = rope.original_max_position_embeddings
    return context


def decoder_config_from_hf(hf: Mapping[str, Any], dtype: str = "float32", source: str = "config") -> DecoderConfig:
    """Builds our `DecoderConfig` from a HF `config.json` dict (any supported model_type)."""
    quantization = hf.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, Mapping) else quantization
        raise UnsupportedArchitectureError(
            f"{source}: the checkpoint is quantised ({method}, `quantization_config` in config.json); hrjax loads "
            "float weights only. Use the unquantised checkpoint (float32/float16/bfloat16 safetensors), or a GGUF "
            "file, which hrjax.models.gguf.load_gguf dequantises.")
    hf = text_config(hf)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{source}: model_type '{model_type}' has no Flax port. Supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Pick a checkpoint of one of these families.")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype '{dtype}' is not supported: use 'float32' or 'bfloat16'.")
    num_layers = int(hf["num_hidden_layers"])
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    rope_params = _rope_parameters(hf)
    layer_types = hf.get("layer_types")
    is_gemma = model_type in GEMMA3
    window = hf.get("sliding_window")
    if is_gemma:
        if layer_types is None:
            pattern = int(hf.get("sliding_window_pattern", 6))
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                           for i in range(num_layers)]
        if "full_attention" in rope_params:  # per-layer-type rope parameters
            rope = _rope_from_hf(rope_params["full_attention"], hf, source)
            local_rope = _rope_from_hf(rope_params["sliding_attention"], hf, source)
        else:
            rope = _rope_from_hf(rope_params, hf, source)
            local_rope = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))
    else:
        rope, local_rope = _rope_from_hf(rope_params, hf, source), None
        window, layer_types = _sliding_layers(hf, model_type, num_layers)
    if len(layer_types) != num_layers:
        raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers.")
    is_sliding = tuple(t == "sliding_attention" for t in layer_types)
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise UnsupportedArchitectureError(f"{source}: activation '{act}' is not ported (silu, gelu_pytorch_tanh).")
    return DecoderConfig(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position_embeddings=_context(hf, rope, source),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope,
        local_rope=local_rope,
        layer_is_sliding=is_sliding if any(is_sliding) else (),
        sliding_window=window if any(is_sliding) else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        hidden_act="silu" if act == "silu" else "gelu_tanh",
        qk_norm=is_gemma or model_type == "qwen3",
        norm_plus_one=is_gemma,
        sandwich_norm=is_gemma,
        scale_embeddings=is_gemma,
        query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5 if is_gemma else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if is_gemma else None,
        dtype=dtype,
    )


def read_safetensors(model_dir: Path) -> keymap.LazyTensors:
    """All tensors of a HF dir (`model.safetensors` or the shards its index lists), each read from its
    memory-mapped file when looked up."""
    from safetensors import SafetensorError, safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json. hrjax reads "
            "safetensors only: convert a PyTorch .bin checkpoint with `save_pretrained(..., "
            "safe_serialization=True)` first.")
    readers = {}
    for shard in shards:
        path = model_dir / shard
        if not path.exists():
            raise CheckpointError(f"{path}: shard listed in the index is missing; download it again.")
        try:
            handle = safe_open(str(path), framework="numpy")
            for name in handle.keys():
                readers[name] = functools.partial(_read_tensor, handle, name, path)
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(path, e) from e
    return keymap.LazyTensors(readers)


def _read_tensor(handle, name: str, path: Path) -> np.ndarray:
    from safetensors import SafetensorError

    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: cannot read the weight file ({error}). It is truncated or corrupt: "
                           "download it again.")


def params_from_hf_tensors(config: DecoderConfig, tensors: Mapping[str, np.ndarray], source: str,
                           mesh: Optional["Mesh"] = None):
    """Our params from HF-named tensors: numpy arrays, or with `mesh` global arrays placed tensor by
    tensor in their tensor-parallel shardings (`hrjax.models.sharding`)."""
    place = None
    if mesh is not None:
        from hrjax.models.sharding import placer

        place = placer(config, mesh)
    return keymap.hf_to_params(_without_tied_head_copy(config, tensors, source), key_map(config), config.num_layers,
                               abstract_params(config), np.dtype(config.jnp_dtype), source, ignore=IGNORED_TENSORS,
                               place=place)


def _without_tied_head_copy(config: DecoderConfig, tensors: Mapping[str, np.ndarray], source: str) -> Mapping:
    """Some exporters write a tied model's `lm_head.weight` anyway: left out when it is the embedding, refused
    when it is not (an untied model whose config says tied would lose its head)."""
    if not config.tie_word_embeddings or TIED_HEAD not in tensors:
        return tensors
    if not np.array_equal(tensors[TIED_HEAD], tensors[TIED_EMBEDDING]):
        raise CheckpointError(
            f"{source}: config.json sets tie_word_embeddings, but the checkpoint's {TIED_HEAD} differs from its "
            f"{TIED_EMBEDDING}: the head would be dropped. Set tie_word_embeddings to false if these weights are "
            "untied.")
    return keymap.LazyTensors({name: functools.partial(tensors.__getitem__, name) for name in tensors
                               if name != TIED_HEAD})


def resolve_hub(repo_id: str, revision: Optional[str] = None) -> Path:
    """Downloads (or finds in the HF cache) a hub repo's config, tokenizer and safetensors."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise OfflineError(
            f"'{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached ({e}). "
            "Download it on a machine with network access (`hf download {repo_id}`) and pass the "
            "local directory instead.") from e
    except OSError as e:
        raise OfflineError(
            f"'{repo_id}' could not be fetched from the hub ({e}). Check the repo id and the network, "
            "or pass a local directory.") from e


def load_hf(path_or_repo: str | os.PathLike, dtype: str = "float32", revision: Optional[str] = None,
            mesh: Optional["Mesh"] = None) -> LoadedLM:
    """Loads a decoder from a local HF directory or a hub id. No torch needed. `mesh`: params placed
    tensor-parallel over its `model` axis as they are read (see `hrjax.models.sharding`)."""
    from transformers import AutoTokenizer

    path = Path(path_or_repo)
    if not path.exists():
        if str(path_or_repo).startswith((".", "/")) or str(path_or_repo).count("/") != 1:
            raise CheckpointError(f"{path_or_repo}: no such directory, and it is not a hub id (owner/name).")
        path = resolve_hub(str(path_or_repo), revision)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json; a HF model directory needs one beside its weights.")
    hf_config = json.loads(config_file.read_text())
    config = decoder_config_from_hf(hf_config, dtype, str(path))
    tensors = read_safetensors(path)
    if hf_config.get("model_type") == "gemma3":  # text inside a multimodal checkpoint: loaded, exported, text only
        hf_config, tensors = text_config(hf_config), tensors.renamed(_gemma3_text_tensor)
    params = params_from_hf_tensors(config, tensors, str(path), mesh)
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer_config.json").exists() or (
        path / "tokenizer.json").exists() else None
    return LoadedLM(config, params, tokenizer, hf_config, str(path))


def save_hf(model: LoadedLM, out_dir: str | os.PathLike) -> Path:
    """Exports params to a HF directory (config.json + model.safetensors [+ tokenizer]), atomically."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    tensors = keymap.params_to_hf(model.params, key_map(model.config), model.config.num_layers)
    with atomic_directory(out) as tmp:
        hf_config = dict(model.hf_config)
        hf_config["torch_dtype"] = hf_config["dtype"] = model.config.dtype
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
    return out
