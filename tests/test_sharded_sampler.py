"""The sampler tensor-parallel over a mesh's `model` axis (2 and 4 of 8 host devices) gives the one-device
greedy tokens, for one tiny architecture per parameter layout and SmolLM2-135M, with each parameter and the KV
cache really split (tests/sharded_sampler_run.py, in a process of its own); shapes the axis does not divide stay
whole."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_models
from hrjax import assets
from hrjax.models.hf import decoder_config_from_hf
from hrjax.models.sharding import param_specs, replicated_groups
from jax.sharding import PartitionSpec as P

TESTS = Path(__file__).parent
WIDE_HEADS = dict(num_attention_heads=8, num_key_value_heads=4)  # heads and kv heads divisible by 2 and 4
# one per parameter layout: plain GQA (llama3, mistral, phi3 once loaded: same tensors), q/k/v biases (qwen2),
# q/k norms and sandwich norms (gemma3; qwen3's q/k norms are a subset), a tied LM head (smollm2)
SHARDED_ARCHS = ("llama", "qwen2", "gemma3", "smollm2")


@pytest.fixture(scope="module")
def wide_decoders(tmp_path_factory):
    """arch -> a tiny random checkpoint of `tiny_models`' config with 8 heads and 4 kv heads."""
    plain = tiny_models.tiny_hf_config

    def wide(arch):
        config = plain(arch)
        for name, value in WIDE_HEADS.items():
            setattr(config, name, value)
        return config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_models, "tiny_hf_config", wide)
        root = tmp_path_factory.mktemp("wide_decoders")
        for arch in SHARDED_ARCHS:
            tiny_models.make_tiny_decoder(arch, root / arch)
    return {arch: str(root / arch) for arch in SHARDED_ARCHS}


def test_greedy_tokens_on_model_axes_2_and_4_equal_one_device(wide_decoders):
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, str(TESTS / "sharded_sampler_run.py"), json.dumps(wide_decoders),
                           str(assets.smollm2_gguf_path())], cwd=TESTS, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("devices") == 8
    assert result.pop("pool_miscut") == []  # Pool.from_specs(..., mesh=) hands the mesh to its samplers
    expected = [f"{name}@{m}" for name in (*SHARDED_ARCHS, "smollm2-135m") for m in (2, 4)]
    assert sorted(result) == sorted(expected)
    for case, found in result.items():
        assert found["tokens_equal"] and found["tokens"] == 16, (case, found)
        # SmolLM2's 9 heads / 3 kv heads split over neither 2 nor 4 devices: attention stays whole there
        assert found["whole_groups"] == (["heads"] if case.startswith("smollm2-135m@") else []), (case, found)
        assert not found["miscut_loaded"] and not found["miscut_sampler"], (case, found)
        assert found["cache_split"], case


def test_groups_the_model_axis_does_not_divide_stay_whole_and_are_named():
    config = decoder_config_from_hf({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                                     "intermediate_size": 1536, "num_hidden_layers": 2, "num_attention_heads": 9,
                                     "num_key_value_heads": 3})
    assert replicated_groups(config, 3) == []
    assert replicated_groups(config, 2) == ["heads (num_heads=9, num_kv_heads=3 not all divisible by 2)"]
    specs = param_specs(config, 2)
    assert specs["layers_1/attn/q_proj/kernel"] == specs["layers_1/attn/o_proj/kernel"] == P(None, None)
    assert specs["layers_1/mlp/up_proj/kernel"] == P(None, "model") and specs["layers_1/mlp/down_proj/kernel"] == P(
        "model", None)
    assert specs["embed_tokens/embedding"] == P("model", None) and specs["norm/weight"] == P(None)
