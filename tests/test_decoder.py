"""Logit parity of the Flax decoder against transformers, loading, export and load errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hrjax.errors import CheckpointError, UnsupportedArchitectureError
from hrjax.models.decoder import Decoder
from hrjax.models.hf import decoder_config_from_hf, load_hf, save_hf


def flax_logits(lm, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits, _ = Decoder(lm.config).apply(lm.params, jnp.asarray(tokens), jnp.asarray(positions),
                                         jnp.asarray(mask, bool))
    return np.asarray(logits)


def torch_logits(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


def left_padded_batch(seed=0, lengths=(12, 7, 3)):
    rng = np.random.RandomState(seed)
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.randint(3, 256, n)
        mask[i, width - n:] = 1
    return tokens, mask


def test_logit_parity_float32(tiny_decoder, decoder_arch):
    path, reference = tiny_decoder(decoder_arch)
    lm = load_hf(path)
    tokens, mask = left_padded_batch()
    ours, theirs = flax_logits(lm, tokens, mask), torch_logits(reference, tokens, mask)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - theirs[valid]).max() <= 1e-4


def test_bfloat16_parameters_run_close_to_float32(tiny_decoder):
    path, _ = tiny_decoder("llama")
    lm32, lm16 = load_hf(path), load_hf(path, dtype="bfloat16")
    assert lm16.params["params"]["layers_0"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    tokens, mask = left_padded_batch()
    diff = np.abs(flax_logits(lm32, tokens, mask) - flax_logits(lm16, tokens, mask))[mask.astype(bool)]
    assert diff.max() < 0.1


def test_export_round_trip_through_transformers(tiny_decoder, decoder_arch, tmp_path):
    path, _ = tiny_decoder(decoder_arch)
    lm = load_hf(path)
    save_hf(lm, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "exported", attn_implementation="eager").float().eval()
    tokens, mask = left_padded_batch(seed=1)
    valid = mask.astype(bool)
    assert np.abs(flax_logits(lm, tokens, mask) - torch_logits(reloaded, tokens, mask))[valid].max() <= 1e-4


def test_sharded_checkpoint_loads(tiny_decoder, tmp_path):
    _, reference = tiny_decoder("qwen2")
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tokens, mask = left_padded_batch()
    valid = mask.astype(bool)
    assert np.abs(flax_logits(load_hf(tmp_path), tokens, mask) - torch_logits(reference, tokens, mask))[valid].max() <= 1e-4


def copy_checkpoint(src, dst, **config_changes):
    """A copy of checkpoint `src` at `dst`, its config.json updated with `config_changes`."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dst


def test_unknown_architecture_is_named(tiny_decoder, tmp_path):
    ckpt = copy_checkpoint(tiny_decoder("llama")[0], tmp_path / "ckpt", model_type="falcon")
    with pytest.raises(UnsupportedArchitectureError, match="'falcon' has no Flax port.*Supported: llama"):
        load_hf(ckpt)


def test_missing_weight_file(tiny_decoder, tmp_path):
    ckpt = copy_checkpoint(tiny_decoder("llama")[0], tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(ckpt)


def test_truncated_weight_file(tiny_decoder, tmp_path):
    ckpt = copy_checkpoint(tiny_decoder("llama")[0], tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt: download it again"):
        load_hf(ckpt)


def test_missing_shard(tiny_decoder, tmp_path):
    _, reference = tiny_decoder("llama")
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard listed in the index is missing"):
        load_hf(tmp_path)


def test_shapes_disagreeing_with_config(tiny_decoder, tmp_path):
    ckpt = copy_checkpoint(tiny_decoder("llama")[0], tmp_path / "ckpt", intermediate_size=128)
    with pytest.raises(CheckpointError, match="does not match the config.*use the config.json"):
        load_hf(ckpt)


def test_fewer_layers_in_config_than_checkpoint(tiny_decoder, tmp_path):
    ckpt = copy_checkpoint(tiny_decoder("llama")[0], tmp_path / "ckpt", num_hidden_layers=2)
    with pytest.raises(CheckpointError, match="not used by the config"):
        load_hf(ckpt)


def test_unported_rope_scaling_is_named():
    config = transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}).to_dict()
    with pytest.raises(UnsupportedArchitectureError, match="rope_type 'yarn' is not ported"):
        decoder_config_from_hf(config)


def test_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    from hrjax.errors import OfflineError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match="not in the local Hugging Face cache.*pass the local directory"):
        load_hf("HuggingFaceTB/SmolLM2-135M-Instruct")
