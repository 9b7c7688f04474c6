"""Checkpoints hrjax does not load right are refused with an error naming what is not ported, never loaded
silently wrong: quantised weights, tensors the config switches off, rope variants and pooling modes."""

import json

import pytest
import transformers as tf
from test_decoder import copy_checkpoint
from tiny_models import TINY_COMMON

from hrjax import assets
from hrjax.errors import CheckpointError, UnsupportedArchitectureError
from hrjax.models.encoder import load_encoder
from hrjax.models.hf import decoder_config_from_hf, load_hf


def test_quantised_checkpoint(tiny_decoder, tmp_path):
    ckpt = copy_checkpoint(tiny_decoder("llama")[0], tmp_path / "ckpt",
                           quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    with pytest.raises(UnsupportedArchitectureError, match=r"quantised \(gptq.*loads float weights only.*GGUF"):
        load_hf(ckpt)


@pytest.mark.parametrize("arch,tensor", [("qwen2", r"self_attn\.q_proj\.bias"), ("qwen3", r"self_attn\.q_norm")])
def test_tensors_the_config_switches_off(tiny_decoder, tmp_path, arch, tensor):
    """A Qwen2 checkpoint (q/k/v biases) or a Qwen3 one (q/k norms) labelled as Llama, which has neither."""
    ckpt = copy_checkpoint(tiny_decoder(arch)[0], tmp_path / "ckpt", model_type="llama", architectures=None)
    with pytest.raises(CheckpointError, match=f"that its config switches off.*{tensor}.*use the config.json"):
        load_hf(ckpt)


def test_untied_head_under_a_tied_config(tiny_decoder, tmp_path):
    """A tied checkpoint's copy of the embedding as lm_head loads (tests/test_model_families.py); a real head
    under tie_word_embeddings is refused."""
    ckpt = copy_checkpoint(tiny_decoder("llama")[0], tmp_path / "ckpt", tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="sets tie_word_embeddings, but the checkpoint's lm_head.weight differs"):
        load_hf(ckpt)


def test_partial_rotary_outside_phi3():
    config = {**tf.LlamaConfig(**TINY_COMMON).to_dict(), "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedArchitectureError, match="partial_rotary_factor 0.5 in a 'llama' config"):
        decoder_config_from_hf(config)


def test_unported_phi3_rope_scaling():
    config = {**tf.Phi3Config(**TINY_COMMON).to_dict(), "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(UnsupportedArchitectureError, match="rope_type 'dynamic' is not ported"):
        decoder_config_from_hf(config)


@pytest.mark.parametrize("pooling", [
    {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
    {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},
    {"pooling_mode": "lasttoken"},
])
def test_pooling_other_than_mean(tmp_path, pooling):
    """all-MiniLM-L6-v2's directory with its 1_Pooling/config.json changed."""
    source = assets.minilm_path()
    for item in source.iterdir():
        if item.name != "1_Pooling":
            (tmp_path / item.name).symlink_to(item)
    (tmp_path / "1_Pooling").mkdir()
    mean_only = json.loads((source / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({**mean_only, **pooling}))
    with pytest.raises(UnsupportedArchitectureError, match=r"pooling \[.*\] is not ported.*mean pooling"):
        load_encoder(tmp_path)
