"""Families loaded beyond tests/tiny_models.py's parametrised parity: Gemma 3 text inside a multimodal
`gemma3` checkpoint, and config defaults that must follow transformers 5 (Qwen2 sliding windows, Mistral's
window, Llama 3's original context)."""

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file
from test_decoder import copy_checkpoint, flax_logits, left_padded_batch, torch_logits
from tiny_models import TINY_COMMON, tiny_hf_config

from hrjax.models import keymap
from hrjax.models.hf import decoder_config_from_hf, load_hf, save_hf

# What a hub gemma3 config.json keeps of its text_config (Gemma 3 4B's keys, tiny values): everything else,
# head_dim and query_pre_attn_scalar included, comes from transformers' Gemma3TextConfig defaults.
PARTIAL_TEXT_CONFIG = dict(model_type="gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                           rope_scaling={"factor": 8.0, "rope_type": "linear"})


def tiny_gemma3_multimodal(out_dir):
    """A random tiny Gemma3ForConditionalGeneration saved with a partial text_config; returns the torch model."""
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    text = tf.Gemma3TextConfig.from_dict({**PARTIAL_TEXT_CONFIG, "head_dim": 16})
    config = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4)
    model = tf.Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    saved = json.loads((out_dir / "config.json").read_text())
    saved["text_config"] = {**PARTIAL_TEXT_CONFIG, "head_dim": 16}
    (out_dir / "config.json").write_text(json.dumps(saved))
    return tf.Gemma3ForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").float().eval()


def test_gemma3_text_of_a_multimodal_checkpoint(tmp_path):
    reference = tiny_gemma3_multimodal(tmp_path / "mm")
    lm = load_hf(tmp_path / "mm")
    assert lm.config.layer_is_sliding == (True,) * 5 + (False,)  # Gemma3TextConfig's every-6th pattern
    assert lm.config.rope.scaling_type == "linear" and lm.config.query_scale == 256 ** -0.5
    tokens, mask = left_padded_batch()
    valid = mask.astype(bool)
    assert np.abs(flax_logits(lm, tokens, mask) - torch_logits(reference, tokens, mask))[valid].max() <= 1e-4
    # exported text only: a Gemma3ForCausalLM that transformers and we load back to the same weights
    save_hf(lm, tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    reloaded = load_hf(tmp_path / "text")
    flat, flat_reloaded = keymap.flatten(lm.params["params"]), keymap.flatten(reloaded.params["params"])
    assert flat.keys() == flat_reloaded.keys()
    assert all(np.array_equal(flat[k], flat_reloaded[k]) for k in flat)
    text_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager").eval()
    assert np.abs(torch_logits(text_model, tokens, mask) - torch_logits(reference, tokens, mask))[valid].max() <= 1e-5
    # the same weights under transformers 5's module names (model.language_model., model.vision_tower., lm_head)
    v5_names = shutil.copytree(tmp_path / "mm", tmp_path / "v5_names")
    tensors = load_file(v5_names / "model.safetensors")
    renamed = {re.sub(r"^language_model\.model\.", "model.language_model.", re.sub(
        r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", name)): value for name, value in tensors.items()}
    save_file({**renamed, "lm_head.weight": tensors["language_model.model.embed_tokens.weight"]},
              v5_names / "model.safetensors")
    flat_v5 = keymap.flatten(load_hf(v5_names).params["params"])
    assert flat_v5.keys() == flat.keys() and all(np.array_equal(flat[k], flat_v5[k]) for k in flat)


def test_qwen2_sliding_window_follows_transformers(tiny_decoder, tmp_path):
    """Without `layer_types` (older config.json files): no window unless use_sliding_window, and then only from
    layer max_window_layers on. 12-token rows against a 4-token window, so a wrong window moves logits."""
    src, _ = tiny_decoder("qwen2")
    tokens, mask = left_padded_batch()
    valid = mask.astype(bool)
    cases = {"off_by_default": ({"sliding_window": 4, "max_window_layers": 0}, ()),
             "from_layer_1": ({"sliding_window": 4, "use_sliding_window": True, "max_window_layers": 1},
                              (False, True, True))}
    for name, (changes, expected_sliding) in cases.items():
        ckpt = copy_checkpoint(src, tmp_path / name, **changes)
        config = json.loads((ckpt / "config.json").read_text())
        for key in ("layer_types", "use_sliding_window") if name == "off_by_default" else ("layer_types",):
            config.pop(key, None)
        (ckpt / "config.json").write_text(json.dumps(config))
        lm = load_hf(ckpt)
        assert lm.config.layer_is_sliding == expected_sliding, name
        reference = tf.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").float().eval()
        assert np.abs(flax_logits(lm, tokens, mask) - torch_logits(reference, tokens, mask))[valid].max() <= 1e-4, name


def test_mistral_window_defaults_to_4096():
    config = tf.MistralConfig(**TINY_COMMON).to_dict()
    del config["sliding_window"]  # absent from config.json: transformers' default; null: no window
    ours = decoder_config_from_hf(config)
    assert ours.sliding_window == 4096 and ours.layer_is_sliding == (True,) * 3
    assert decoder_config_from_hf({**config, "sliding_window": None}).layer_is_sliding == ()


def test_llama3_original_context_defaults_like_transformers():
    """A llama3 rope without `original_max_position_embeddings`: transformers 5 takes max_position_embeddings."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0}
    config = {**tf.LlamaConfig(**{**TINY_COMMON, "max_position_embeddings": 2048}).to_dict(), "rope_parameters": rope}
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](tf.LlamaConfig.from_dict(copy.deepcopy(config)))  # fills it in
    ours = decoder_config_from_hf(config)
    assert ours.rope.original_max_position_embeddings == 2048
    np.testing.assert_allclose(np.asarray(ours.rope.inv_freq(ours.head_dim)), expected.numpy(), rtol=1e-6)


def test_longrope_serves_its_original_context():
    """Within the original context transformers applies longrope's short factors, which we port; beyond it its
    long factors, which we do not: the context is capped there, so longer prompts are refused, not run wrong."""
    config = decoder_config_from_hf(tiny_hf_config("phi3").to_dict())
    assert config.max_position_embeddings == 64 and config.rope.scaling_type == "longrope"
    assert config.rope.attention_factor == pytest.approx((1 + np.log(256 / 64) / np.log(64)) ** 0.5)
