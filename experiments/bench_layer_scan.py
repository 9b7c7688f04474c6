"""Layers under `lax.scan` (what `nn.scan` compiles to) against our unrolled layers, for SmolLM2-135M
decode: `python -m experiments.bench_layer_scan` prints one JSON line per batch size with each form's
compile seconds and decode milliseconds per step (3 repeats), in one process.

The scanned forms stack each layer's parameters [L, ...] and the KV cache [L, B, K, D, S] and run our
`DecoderLayer` once per layer inside the scan: 'scanned' passes each layer's cache in and out as the
scan's inputs and outputs (nn.scan's form), 'carried' keeps the stacked cache in the scan's carry and
updates layer l in place. All three make the same greedy tokens (checked). This is the measurement behind
keeping the layers unrolled (issue 13, item 2: scan only if it cuts compile time without slowing decode).
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hrjax import assets
from hrjax.benchmarks.common import host_info
from hrjax.generate.sampler import untie_lm_head
from hrjax.models.decoder import Decoder, DecoderLayer, KVCache, RMSNorm
from hrjax.models.gguf import load_gguf

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to measure.")
_STEPS = flags.DEFINE_integer("steps", 64, "Decode steps timed per repeat.")
PROMPT = 32  # cache columns already filled before the timed steps


def decode_programs(config, params, batch: int, steps: int):
    """{form: (jitted decode(cache, last, steps) -> (cache, last token, token sum), its arguments)}."""
    slots = PROMPT + steps
    inner = params["params"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[inner[f"layers_{i}"] for i in range(config.num_layers)])
    layer, model = DecoderLayer(config, 0), Decoder(config)
    norm = RMSNorm(config.rms_norm_eps, config.norm_plus_one, config.jnp_dtype)
    kv_valid = jnp.ones((batch, slots), bool)

    def head(x):
        return norm.apply({"params": inner["norm"]}, x[:, -1]) @ inner["lm_head"]["kernel"]

    def scanned_step(keys, values, last, index, carried):
        x = inner["embed_tokens"]["embedding"][last[:, None]]
        positions, query_slots = jnp.full((batch, 1), index, jnp.int32), index + jnp.arange(1)
        run = lambda p, x, k, v: layer.apply({"params": p}, x, positions, kv_valid, query_slots, (k, v), index)  # noqa: E731
        if carried:
            def body(carry, layer_inputs):
                x, keys, values = carry
                i, p = layer_inputs
                x, (k, v) = run(p, x, keys[i], values[i])
                return (x, keys.at[i].set(k), values.at[i].set(v)), None

            (x, keys, values), _ = jax.lax.scan(body, (x, keys, values), (jnp.arange(config.num_layers), stacked))
        else:
            def body(x, layer_inputs):
                p, k, v = layer_inputs
                x, kv = run(p, x, k, v)
                return x, kv

            x, (keys, values) = jax.lax.scan(body, x, (stacked, keys, values))
        return head(x), keys, values

    def loop(step_fn, cache, last, n):
        def body(i, carry):
            cache, last, total = carry
            logits, cache = step_fn(cache, last, PROMPT + i)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            return cache, token, total + token

        return jax.lax.fori_loop(0, n, body, (cache, last, jnp.zeros((batch,), jnp.int32)))

    def unrolled_step(cache, last, index):
        return model.apply(params, last[:, None], jnp.full((batch, 1), index, jnp.int32), kv_valid, cache, index,
                           last_only=True)

    def stacked_step(carried):
        def step(cache, last, index):
            logits, keys, values = scanned_step(*cache, last, index, carried)
            return logits, (keys, values)
        return step

    rng = np.random.RandomState(0)
    zeros = KVCache.zeros(config, batch, slots)
    cache = KVCache(*(tuple(jnp.asarray(0.1 * rng.randn(*a.shape), jnp.float32) for a in part) for part in zeros))
    stacked_cache = (jnp.stack(cache.keys), jnp.stack(cache.values))
    return {"unrolled": (jax.jit(lambda c, t, n: loop(unrolled_step, c, t, n), static_argnums=2), cache),
            "scanned": (jax.jit(lambda c, t, n: loop(stacked_step(False), c, t, n), static_argnums=2), stacked_cache),
            "carried": (jax.jit(lambda c, t, n: loop(stacked_step(True), c, t, n), static_argnums=2), stacked_cache)}


def measure(config, params, batch: int, steps: int) -> dict:
    last = jnp.asarray(np.random.RandomState(1).randint(0, 1000, batch), jnp.int32)
    programs = decode_programs(config, params, batch, steps)
    result, tokens = {**host_info(), "batch": batch, "steps": steps}, {}
    for form, (program, cache) in programs.items():
        start = time.perf_counter()
        program.lower(cache, last, steps).compile()
        result[f"{form}_compile_s"] = round(time.perf_counter() - start, 2)
        tokens[form] = np.asarray(program(cache, last, steps)[2])
    result["same_tokens"] = all((t == tokens["unrolled"]).all() for t in tokens.values())
    for _ in range(3):
        for form, (program, cache) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(program(cache, last, steps))
            result.setdefault(f"{form}_ms_per_step", []).append(round(1000 * (time.perf_counter() - start) / steps, 2))
    return result


def main(argv):
    del argv
    lm = load_gguf(assets.smollm2_gguf_path())
    config, params = untie_lm_head(lm.config, lm.params)
    params = jax.device_put(params)
    for batch in _BATCH_SIZES.value:
        print(json.dumps(measure(config, params, int(batch), _STEPS.value)), flush=True)


if __name__ == "__main__":
    app.run(main)
