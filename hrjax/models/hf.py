"""Hugging Face checkpoints <-> our decoder: config parsing, safetensors loading, hub, export."""

from __future__ import annotations

import dataclasses
import functools
import json
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

LLAMA_FAMILY = ("llama", "qwen2", "mistral")
GEMMA3 = ("gemma3_text", "gemma3")
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + GEMMA3
# Checkpoint tensors that carry no parameters of ours.
IGNORED_TENSORS = (r"rotary_emb\.inv_freq$",)


@dataclasses.dataclass
class LoadedLM:
    """A decoder ready to run: its frozen config, params, tokenizer and the HF config it came from."""

    config: DecoderConfig
    params: Any
    tokenizer: Any
    hf_config: dict
    source: str


def _rope_from_hf(params: Mapping[str, Any], source: str) -> RopeConfig:
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"{source}: rope_type '{kind}' is not ported (supported: default, linear, llama3). "
            "Use a checkpoint with one of those, or add the scaling to hrjax.models.decoder.RopeConfig.")
    return RopeConfig(
        theta=float(params.get("rope_theta", 10000.0)),
        scaling_type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _rope_parameters(hf: Mapping[str, Any]) -> dict:
    """transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`."""
    if hf.get("rope_parameters"):
        return dict(hf["rope_parameters"])
    merged = dict(hf.get("rope_scaling") or {})
    merged.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return merged


def decoder_config_from_hf(hf: Mapping[str, Any], dtype: str = "float32", source: str = "config") -> DecoderConfig:
    """Builds our `DecoderConfig` from a HF `config.json` dict (any supported model_type)."""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
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
    if is_gemma:
        if layer_types is None:
            pattern = int(hf.get("sliding_window_pattern", 6))
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                           for i in range(num_layers)]
        if "full_attention" in rope_params:  # per-layer-type rope parameters
            rope = _rope_from_hf(rope_params["full_attention"], source)
            local_rope = _rope_from_hf(rope_params["sliding_attention"], source)
        else:
            rope = _rope_from_hf(rope_params, source)
            local_rope = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))
    else:
        rope, local_rope = _rope_from_hf(rope_params, source), None
        if layer_types is None:
            sliding = hf.get("sliding_window") is not None and hf.get("use_sliding_window", True)
            layer_types = ["sliding_attention" if sliding else "full_attention"] * num_layers
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
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope,
        local_rope=local_rope,
        layer_is_sliding=is_sliding if any(is_sliding) else (),
        sliding_window=hf.get("sliding_window") if any(is_sliding) else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        hidden_act="silu" if act == "silu" else "gelu_tanh",
        qk_norm=is_gemma,
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
    return keymap.hf_to_params(tensors, key_map(config), config.num_layers, abstract_params(config),
                               np.dtype(config.jnp_dtype), source, ignore=IGNORED_TENSORS, place=place)


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
    params = params_from_hf_tensors(config, read_safetensors(path), str(path), mesh)
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
