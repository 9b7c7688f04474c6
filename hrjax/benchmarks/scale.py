"""Scale-out: what splitting over a mesh costs here, what it moves, and what the paper config needs.

- Tree-mode env steps/s on 1, 2, 4 and 8 host devices (a process of its own with 8 fake CPU devices:
  they share this machine's cores, so the figures measure the overhead of the split program, not a
  speed-up); `sharded_overhead_8dev` = 8-device over 1-device step time (target <= 2) at 2048 episodes:
  256 per device, the one-device default's batch, as a job scaled out keeps its per-device batch.
  `sharded_overhead_8dev_small` is the same at 256 episodes (32 per device). There every one of the 8
  device programs pays each op's fixed cost (a few thousand ops per iteration) on the same 2 cores, so
  the ratio stays near 8 / 2 = 4 or above whatever the collectives cost: a figure of this host's
  emulation, not of the split.
- `allreduce_bytes_per_update`: the bytes all-reduced across the 'data' axis by one PPO update
  (rollout + update of one iteration), counted from the compiled HLO of the 8-device program: every
  all-reduce's operand bytes, times the trip counts of the loops around it; the other collectives
  likewise (`allgather_bytes_per_update`: arrays gathered whole onto every device). Compare
  `param_bytes` x `gradient_steps_per_update`: what a data-parallel update would all-reduce.
- `paper_iteration_model`: a FLOP/byte model of one online iteration of
  experiments/configs/qwen25_paper.py:math (B = 512 episodes, L = 3 hops, up to 512 new tokens per
  hop) and of its path-tree build, on a TPU v5e-16 slice and an 8xH100 node (stated below).
- `sampler_tokens_per_s`: the tensor-parallel sampler's tokens/s at 1, 2, 4, 8 devices of the same
  process (`hrjax.benchmarks.sharded_sampler`; null with the reason when it is absent).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Optional

import numpy as np

from hrjax.benchmarks.common import best_seconds, host_info, random_tree

DEVICE_COUNTS = (1, 2, 4, 8)
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape: 'f32[16,64]{1,0}' or a tuple '(f32[2]{0}, s32[])'."""
    total = 0
    for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", shape):
        total += _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collective_bytes(hlo: str) -> dict:
    """{collective kind: bytes} moved by one execution of the entry computation of compiled HLO text:
    each collective's result bytes (an all-reduce's operand; an all-gather's gathered array), times
    the known trip counts of the while loops around it."""
    return _collective_totals(hlo, _shape_bytes)


def collective_executions(hlo: str) -> dict:
    """{collective kind: how many times one execution of the entry computation runs it} (each one a
    rendezvous of every device: latency that no overlap hides)."""
    return _collective_totals(hlo, lambda shape: 1)


def _collective_totals(hlo: str, size_of) -> dict:
    """{collective kind: sum of size_of(result shape) over every collective executed}."""
    computations, entry, name = {}, None, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            name = header.group(2)
            computations[name] = []
            entry = name if header.group(1) else entry
        elif name is not None and line.startswith(" "):
            computations[name].append(line)
    kinds = "|".join(COLLECTIVES)

    def total(comp: str, seen: tuple = ()) -> dict:
        out = dict.fromkeys(COLLECTIVES, 0)
        if comp not in computations or comp in seen:
            return out
        for line in computations[comp]:
            op = re.search(rf"= (.+?) ({kinds})(?:-start)?\(", line)
            if op:
                out[op.group(2)] += size_of(op.group(1))
                continue
            called = re.findall(r"\bbody=%?([\w.\-]+)", line) or re.findall(r"\bcalls=%?([\w.\-]+)", line)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for callee in called:
                for kind, n in total(callee, seen + (comp,)).items():
                    out[kind] += (int(trips.group(1)) if trips else 1) * n
        return out

    return total(entry)


def _tree_run(tree, num_envs: int, devices: int, num_hops: int, iterations: int):
    """Tree-mode PPO over the first `devices` devices -> (env steps/s, the jitted run, its carry, the PPO config)."""
    import jax

    from hrjax.agent.networks import NetworkConfig
    from hrjax.agent.ppo import PPOConfig
    from hrjax.agent.tree_mode import make_train
    from hrjax.env.mdp import EnvConfig
    from hrjax.parallel import MeshConfig, make_mesh

    ppo = PPOConfig(num_envs=num_envs)
    mesh = make_mesh(MeshConfig(devices, 1), jax.devices()[:devices]) if devices > 1 else None
    trainer = make_train(ppo, NetworkConfig(), EnvConfig(num_hops=num_hops), tree, np.arange(len(tree.quality)),
                         iterations, mesh)
    run = jax.jit(trainer.run, static_argnums=1)
    carry = trainer.init(jax.random.PRNGKey(0))
    jax.block_until_ready(run(carry, iterations))
    seconds = best_seconds(lambda: run(carry, iterations))
    return round(iterations * num_envs * num_hops / seconds), run, carry, ppo


def measure_devices(num_envs: int = 2048, small_num_envs: int = 256, num_prompts: int = 512, embedding_dim: int = 384,
                    num_models: int = 3, num_hops: int = 2, iterations: int = 10) -> dict:
    """In a process with 8 host devices: tree-mode env steps/s and sampler tokens/s over the first 1,
    2, 4, 8 of them, the collectives of one iteration on 8, and the 8-device overhead again at
    `small_num_envs` episodes."""
    import jax

    tree = random_tree(num_prompts, embedding_dim, num_models, num_hops)
    out = {"tree_num_envs": num_envs, "devices_available": jax.device_count()}
    for n in DEVICE_COUNTS:
        out[f"tree_env_steps_per_s_{n}dev"], run, carry, ppo = _tree_run(tree, num_envs, n, num_hops, iterations)
    hlo = run.lower(carry, 1).compile().as_text()  # 8 devices, one iteration: rollout + update
    moved = collective_bytes(hlo)
    out["allreduce_bytes_per_update"] = moved.pop("all-reduce")
    out["allreduces_per_update"] = collective_executions(hlo)["all-reduce"]
    out.update({f"{kind.replace('-', '')}_bytes_per_update": n for kind, n in moved.items() if n})
    out["param_bytes"] = int(sum(x.nbytes for x in jax.tree_util.tree_leaves(carry.params)))
    out["gradient_steps_per_update"] = ppo.epochs * ppo.minibatches
    out["sharded_overhead_8dev"] = round(out["tree_env_steps_per_s_1dev"] / out["tree_env_steps_per_s_8dev"], 3)
    small = [_tree_run(tree, small_num_envs, n, num_hops, iterations)[0] for n in (1, DEVICE_COUNTS[-1])]
    out.update({"small_num_envs": small_num_envs, "tree_env_steps_per_s_1dev_small": small[0],
                "tree_env_steps_per_s_8dev_small": small[1],
                "sharded_overhead_8dev_small": round(small[0] / small[1], 3)})
    out["sampler_tokens_per_s"], out["sampler_tokens_per_s_source"] = sampler_figures(jax.devices())
    return out


# --- the paper config on accelerators: a calculation ------------------------------------------------
# Qwen2.5 (bf16): parameters, layers, KV heads x head dim (the KV cache per token is 2 x layers x that x 2 B)
QWEN25 = {"qwen2.5-0.5b": (0.494e9, 24, 2 * 64), "qwen2.5-1.5b": (1.54e9, 28, 2 * 128)}
PAPER_POOL = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-1.5b")  # qwen25_paper.py: 0.5B, Math-1.5B, Coder-1.5B
# peak dense bf16 FLOP/s and HBM bytes/s per chip (vendor figures)
PLATFORMS = {"tpu_v5e_16": dict(chips=16, flops=197e12, hbm=819e9),
             "h100x8": dict(chips=8, flops=989e12, hbm=3.35e12)}


def generation_seconds(platform: dict, params: float, layers: int, kv_width: int, sequences: int, context: int,
                       new_tokens: int) -> dict:
    """One model answering `sequences` contexts of `context` tokens with `new_tokens` each, the
    sequences split evenly over the chips, each chip holding the whole model (data parallel):
    prefill is compute-bound (2 x params FLOPs per token); each decode step on a chip reads the
    weights once plus its sequences' KV caches and does 2 x params FLOPs per sequence; its time is the
    larger of FLOPs / peak and bytes / bandwidth. Attention score FLOPs (~5% at these lengths) are
    left out. -> seconds (lower bound), FLOPs and HBM bytes over all chips."""
    chips = platform["chips"]
    per_chip = -(-sequences // chips)
    kv_per_token = 2 * layers * kv_width * 2
    prefill_flops = 2 * params * sequences * context
    seconds = prefill_flops / (chips * platform["flops"])
    decode_flops = decode_bytes = 0.0
    for step in range(new_tokens):
        flops = 2 * params * per_chip
        nbytes = 2 * params + per_chip * (context + step) * kv_per_token
        seconds += max(flops / platform["flops"], nbytes / platform["hbm"])
        decode_flops += flops * chips
        decode_bytes += nbytes * chips
    return {"seconds": seconds, "flops": prefill_flops + decode_flops, "bytes": decode_bytes}


def paper_model(prompt_tokens: int = 200, new_tokens: int = 512, episodes: int = 512, num_hops: int = 3,
                prompts: int = 1300) -> dict:
    """One online iteration (each hop: the B episodes spread evenly over the 3 models, the context the
    prompt plus the hops before) and the path-tree build (every prompt x every node: at depth d each
    model answers prompts x 3^d contexts), per platform: FLOPs, HBM bytes, lower-bound seconds."""
    m = len(PAPER_POOL)
    out = {"assumptions": f"qwen25_paper.py:math, {prompts} prompts of ~{prompt_tokens} tokens, every answer "
                          f"{new_tokens} tokens (the budget), B = {episodes}, L = {num_hops}, bf16, each chip a "
                          "whole-model replica, perfect batching; decode step = max(FLOPs/peak, bytes/HBM "
                          "bandwidth); PPO update ignored (~1e9 FLOPs)"}
    for name, platform in PLATFORMS.items():
        for what, batch in (("online_iteration", lambda d: episodes // m), ("tree_build", lambda d: prompts * m ** d)):
            flops = nbytes = seconds = 0.0
            for depth in range(num_hops):
                for model in PAPER_POOL:
                    part = generation_seconds(platform, *QWEN25[model], batch(depth),
                                              prompt_tokens + depth * new_tokens, new_tokens)
                    flops, nbytes, seconds = flops + part["flops"], nbytes + part["bytes"], seconds + part["seconds"]
            out[f"{name}_{what}"] = {"tflops": round(flops / 1e12, 1), "hbm_gb": round(nbytes / 1e9, 1),
                                     "seconds_lower_bound": round(seconds, 2),
                                     "arithmetic_intensity_flop_per_byte": round(flops / nbytes, 1)}
    return out


def sampler_figures(devices) -> tuple[Optional[dict], str]:
    """-> ({'<n>dev': tokens/s of the sampler with SmolLM2-135M split over a (1, n) mesh of the first n
    `devices`: the model axis}, where the figures come from), or (None, why there are none)."""
    try:
        from hrjax.benchmarks.sharded_sampler import sampler_tokens_per_s
    except ImportError as e:
        return None, f"no tensor-parallel sampler benchmark to call ({e})"
    from hrjax.parallel import MeshConfig, make_mesh

    meshes = {n: make_mesh(MeshConfig(1, n), devices[:n]) if n > 1 else None for n in DEVICE_COUNTS}
    figures = {f"{n}dev": round(sampler_tokens_per_s(mesh), 1) for n, mesh in meshes.items()}
    return figures, ("hrjax.benchmarks.sharded_sampler.sampler_tokens_per_s: SmolLM2-135M, batch 16, 32 new "
                     "tokens, mesh (data, model) = (1, n)")


def run() -> dict:
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    code = "import json; from hrjax.benchmarks.scale import measure_devices; print(json.dumps(measure_devices()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the 8-device measurement failed: {done.stderr[-2000:]}")
    return {**host_info(), "cpu_cores": os.cpu_count(), **json.loads(done.stdout.strip().splitlines()[-1]),
            "paper_iteration_model": paper_model()}
