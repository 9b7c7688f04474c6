"""Tiny random HF checkpoints of every ported decoder architecture, written by transformers."""

from __future__ import annotations

from pathlib import Path

TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_hf_config(arch: str):
    """A transformers config of a tiny model of `arch` (one per ported family and feature)."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY_COMMON, tie_word_embeddings=False)
    if arch == "llama3":  # Llama 3.x rope scaling, attention/mlp bias off, tied (Llama 3.2 style)
        return tf.LlamaConfig(**{**TINY_COMMON, "max_position_embeddings": 1024}, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64})
    if arch == "smollm2":  # Llama with tied embeddings
        return tf.LlamaConfig(**TINY_COMMON, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY_COMMON, tie_word_embeddings=False)
    if arch == "qwen3":  # q/k norm over an explicit head_dim (not hidden / heads), tied embeddings
        return tf.Qwen3Config(**TINY_COMMON, head_dim=24, tie_word_embeddings=True)
    if arch == "phi3":  # Phi-4-mini: fused qkv and gate/up, 3/4 rotary, longrope; and every layer sliding. 8 heads
        # and 4 kv heads, the widths test_sharded_sampler gives every arch (head_dim 8, rotary 6: 3 factors)
        return tf.Phi3Config(**{**TINY_COMMON, "max_position_embeddings": 256, "num_attention_heads": 8,
                                "num_key_value_heads": 4}, original_max_position_embeddings=64,
                             partial_rotary_factor=0.75, sliding_window=6, rope_parameters={
                                 "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.7, 2.9],
                                 "long_factor": [4.0, 6.0, 8.0]})
    if arch == "mistral":
        return tf.MistralConfig(**TINY_COMMON, sliding_window=5, head_dim=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**TINY_COMMON, head_dim=32, sliding_window=4, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    raise KeyError(arch)


DECODER_ARCHS = ("llama", "llama3", "smollm2", "qwen2", "qwen3", "mistral", "phi3", "gemma3")


def make_tiny_decoder(arch: str, out_dir: Path, seed: int = 0):
    """Saves a random tiny `arch` model (float32 safetensors + config.json); returns the torch model."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_hf_config(arch)
    # eager attention: sdpa silently drops Gemma's attention soft cap
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random norms so (1 + w) vs w conventions are actually exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3) if arch == "gemma3" else p.normal_(1.0, 0.3)
    model.save_pretrained(out_dir)
    return model


def make_tiny_pool_model(out_dir: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A tiny random Llama over a real tokenizer's vocabulary, saved with that tokenizer: a pool
    member whose answers are fast, deterministic (greedy) nonsense."""
    import torch
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = tf.LlamaConfig(**{**TINY_COMMON, "vocab_size": len(tokenizer), "num_hidden_layers": 2,
                               "eos_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id,
                               "pad_token_id": tokenizer.pad_token_id})
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_pool_member(arch: str, out_dir: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A tiny random `arch` model (`tiny_hf_config`, e.g. "qwen2" for the paper's Qwen2.5 pools) over a real
    tokenizer's vocabulary, saved with that tokenizer: a pool member whose answers are fast, deterministic
    (greedy) nonsense, as `make_tiny_pool_model`'s Llamas."""
    import torch
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = tiny_hf_config(arch)
    config.update(dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.sep_token_id,
                       bos_token_id=tokenizer.cls_token_id, pad_token_id=tokenizer.pad_token_id))
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
