"""Greedy decoding on one device and on 8 host devices split into meshes (data, model) = (4, 2) and (2, 4),
for tiny random checkpoints of every ported architecture (loaded by `load_hf(..., mesh=...)`) and
SmolLM2-135M (its GGUF read once, placed by the loaders' `params_from_hf_tensors(..., mesh)`), and a pool
loaded with a mesh. Prints one JSON line: per case, whether the tokens equal the one-device run, the params
whose per-device shard is not the expected tensor-parallel cut, and whether the compiled decode loop holds
its KV cache split.
Run by tests/test_sharded_sampler.py in a process of its own, with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before JAX starts)."""

import json
import re
import sys
import time

import jax
import numpy as np

from hrjax import assets
from hrjax.generate.sampler import Sampler, SamplingParams
from hrjax.models.gguf import read_gguf
from hrjax.models.hf import decoder_config_from_hf, load_hf, params_from_hf_tensors
from hrjax.models.keymap import flatten
from hrjax.models.sharding import replicated_groups
from hrjax.parallel import MeshConfig, make_mesh
from hrjax.pool import ModelSpec, Pool

MODEL_AXES = (2, 4)
SAMPLING = SamplingParams(max_new_tokens=16, ignore_eos=True)
TINY_PROMPTS = [[1, 17, 99, 4, 250], [1, 3, 3, 200, 7, 81, 42, 9]]
# SmolLM2's tokenizer on "The capital of France is" and "def fibonacci(n):" (no specials)
SMOLLM2_PROMPTS = [[504, 3575, 282, 4649, 314], [1604, 3987, 46477, 24, 94, 727]]
# Megatron-style cuts, written out here rather than read from the key map: param path -> (axis split over
# 'model', the group whose counts must divide the axis for the cut to happen)
EXPECTED_CUTS = {
    r"embed_tokens/embedding$": (0, "vocab"), r"lm_head/kernel$": (1, "vocab"),
    r"attn/[qkv]_proj/kernel$": (1, "heads"), r"attn/[qkv]_proj/bias$": (0, "heads"),
    r"attn/o_proj/kernel$": (0, "heads"),
    r"mlp/(gate|up)_proj/kernel$": (1, "mlp"), r"mlp/(gate|up)_proj/bias$": (0, "mlp"),
    r"mlp/down_proj/kernel$": (0, "mlp"),
}


def miscut_params(params, model_size: int, whole_groups: set) -> list[str]:
    """Leaves whose per-device shard is not the expected cut (or that are not device arrays at all)."""
    wrong = []
    for path, leaf in flatten(params["params"]).items():
        if not isinstance(leaf, jax.Array):
            wrong.append(f"{path}: {type(leaf).__name__}, not a device array")
            continue
        want = list(leaf.shape)
        for pattern, (axis, group) in EXPECTED_CUTS.items():
            if re.search(pattern, path) and group not in whole_groups:
                want[axis] //= model_size
        got = list(leaf.sharding.shard_shape(leaf.shape))
        if got != want or len(leaf.sharding.device_set) != jax.device_count():
            wrong.append(f"{path}: shard {got}, expected {want}")
    return wrong


def cache_split(sampler: Sampler, prompts, model_size: int, heads_cut: bool) -> bool:
    """Whether the compiled program holds the KV cache per device as [B/data, K/model, D, S] keys and
    [B/data, K/model, S, D] values (K whole when the heads are not cut), and never whole over kv heads."""
    lowered = sampler.lower(prompts, SAMPLING)
    batch, prompt_len = lowered.args_info[0][1].shape
    config, data = sampler.config, sampler.mesh.shape["data"]
    rows, slots, d, kv = batch // data, prompt_len + 16, config.head_dim, config.num_kv_heads
    local_kv = kv // model_size if heads_cut else kv
    text = lowered.compile().as_text()  # already compiled by the run: served from the cache
    shapes = {f"f32[{rows},{local_kv},{d},{slots}]", f"f32[{rows},{local_kv},{slots},{d}]"}
    whole = {f"f32[{rows},{kv},{d},{slots}]", f"f32[{rows},{kv},{slots},{d}]"} - shapes
    return all(s in text for s in shapes) and not any(s in text for s in whole)


def compare(name: str, load, config, prompts, eos_ids, out: dict) -> None:
    """`load(mesh)` -> (config, params); runs the one-device reference and both meshes."""
    start = time.perf_counter()
    base = Sampler(*load(None), eos_ids=eos_ids).generate_tokens(prompts, SAMPLING)
    times = {"one_device": round(time.perf_counter() - start, 1)}
    for model_size in MODEL_AXES:
        start = time.perf_counter()
        mesh = make_mesh(MeshConfig(-1, model_size))
        loaded_config, params = load(mesh)
        whole = {line.split()[0] for line in replicated_groups(config, model_size)}
        loaded_wrong = miscut_params(params, model_size, whole)
        sampler = Sampler(loaded_config, params, eos_ids=eos_ids, mesh=mesh)
        ours = sampler.generate_tokens(prompts, SAMPLING)
        out[f"{name}@{model_size}"] = {
            "tokens_equal": [g.tokens.tolist() for g in ours] == [g.tokens.tolist() for g in base],
            "tokens": len(ours[0].tokens),
            "logprob_diff": max(float(np.abs(a.logprobs - b.logprobs).max()) for a, b in zip(ours, base)),
            "whole_groups": sorted(whole),
            "miscut_loaded": loaded_wrong, "miscut_sampler": miscut_params(sampler.params, model_size, whole),
            "cache_split": cache_split(sampler, prompts, model_size, "heads" not in whole)}
        times[f"model{model_size}"] = round(time.perf_counter() - start, 1)
    print(name, times, file=sys.stderr, flush=True)


def pool_miscut(checkpoint: str, tokenizer: str) -> list[str]:
    """A pool loaded with a (4, 2) mesh: its member's sampler params, checked as above."""
    pool = Pool.from_specs([ModelSpec("m", checkpoint, 1.0, tokenizer=tokenizer)], mesh=make_mesh(MeshConfig(4, 2)))
    sampler = pool.models[0].sampler
    return miscut_params(sampler.params, 2, set()) + ([] if sampler.mesh.shape["model"] == 2 else ["no mesh"])


def main(tiny: dict, smollm2: str) -> None:
    out = {"devices": jax.device_count(), "pool_miscut": pool_miscut(next(iter(tiny.values())), assets.minilm_path())}
    for arch, path in tiny.items():
        def load(mesh, path=path):
            lm = load_hf(path, mesh=mesh)
            return lm.config, lm.params
        compare(arch, load, load(None)[0], TINY_PROMPTS, [2], out)
    start = time.perf_counter()
    hf_config, lazy = read_gguf(smollm2)
    tensors = dict(lazy)  # dequantised once for the three placements
    print("smollm2 read", round(time.perf_counter() - start, 1), file=sys.stderr, flush=True)
    config = decoder_config_from_hf(hf_config, source=smollm2)
    compare("smollm2-135m", lambda mesh: (config, params_from_hf_tensors(config, tensors, smollm2, mesh)), config,
            SMOLLM2_PROMPTS, np.atleast_1d(hf_config["eos_token_id"]).tolist(), out)
    print(json.dumps(out))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2])
