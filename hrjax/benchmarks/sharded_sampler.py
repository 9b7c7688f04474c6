"""Sampler throughput tensor-parallel over a mesh's `model` axis: SmolLM2-135M-Instruct (GGUF), greedy,
exactly `new_tokens` per row, prefill included, compile excluded.

`run()` measures one device unsharded and 8 host CPU devices as meshes (data, model) = (8, 1), (4, 2),
(2, 4), (1, 8), in a process of its own (the device count is fixed when JAX starts). Fake CPU devices
share this host's cores: the figures show the overhead of splitting, not a speed-up. SmolLM2's 9 heads
split over none of these axes, so its attention stays whole and the MLP and vocabulary are split.
`sampler_tokens_per_s(mesh)` is the measurement itself, for any mesh (e.g. real accelerators).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Optional

import numpy as np

from hrjax.benchmarks.common import best_seconds, host_info

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))


@functools.lru_cache(maxsize=1)
def _gguf_tensors(path: str) -> tuple[dict, dict]:
    """(HF config, HF-named float32 arrays) of a GGUF, dequantised once for every placement."""
    from hrjax.models.gguf import read_gguf

    hf_config, tensors = read_gguf(path)
    return hf_config, dict(tensors)


def sampler_tokens_per_s(mesh, batch: int = 16, new_tokens: int = 32, prompt_tokens: int = 32,
                         checkpoint: Optional[str] = None, repeats: int = 2) -> float:
    """Generated tokens per second of the sampler with its params placed on `mesh` (None: one device),
    over `batch` rows of `prompt_tokens` random prompt tokens; `checkpoint`: a GGUF (default SmolLM2-135M).
    `batch` must be a multiple of the mesh's data axis (else rows are padded and the figure undercounts)."""
    from hrjax import assets
    from hrjax.generate.sampler import Sampler, SamplingParams
    from hrjax.models.hf import decoder_config_from_hf, params_from_hf_tensors

    path = str(checkpoint or assets.smollm2_gguf_path())
    hf_config, tensors = _gguf_tensors(path)
    config = decoder_config_from_hf(hf_config, source=path)
    sampler = Sampler(config, params_from_hf_tensors(config, tensors, path, mesh), eos_ids=[0], max_batch=batch,
                      mesh=mesh)
    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt_tokens)).tolist()
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    sampler.generate_tokens(prompts, sampling)  # compile
    return batch * new_tokens / best_seconds(lambda: sampler.generate_tokens(prompts, sampling), repeats)


def _measure() -> dict:
    """In a process started with 8 host devices: tokens/s unsharded and on every mesh of `MESHES`."""
    import jax

    from hrjax.parallel import MeshConfig, make_mesh

    out = {"devices": jax.device_count(), "tok_s_unsharded": round(sampler_tokens_per_s(None), 1)}
    for data, model in MESHES:
        out[f"tok_s_model{model}"] = round(sampler_tokens_per_s(make_mesh(MeshConfig(data, model))), 1)
    return out


def run() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, "-m", "hrjax.benchmarks.sharded_sampler"], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"The 8-device measurement failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    one = figures["tok_s_unsharded"]
    overhead = {f"slowdown_model{m}": round(one / figures[f"tok_s_model{m}"], 2) for _, m in MESHES}
    return {**host_info(), "model": "SmolLM2-135M-Instruct", "batch": 16, "new_tokens": 32,
            "prompt_tokens": 32, **figures, **overhead}


if __name__ == "__main__":
    print(json.dumps(_measure()))
