"""One process of test_inflight's compilation-cache test: 200 varied requests (prompt lengths, budgets,
greedy and sampled rows, top-k, top-p, stop strings, ignore_eos) through in-flight batching on a tiny
Llama, with JAX's persistent compilation cache in argv[2]. Prints one JSON line: the programs JAX
compiled for the engine, what the engine recorded, the cache's hits and misses, and a digest of the tokens."""

import hashlib
import json
import sys

import jax
import numpy as np

from hrjax.runtime import use_compilation_cache

checkpoint, cache = sys.argv[1], sys.argv[2]
use_compilation_cache(cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the tiny model's programs compile fast
events = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}
jax.monitoring.register_event_listener(lambda event, **_: event in events and events.update({event: events[event] + 1}))

from hrjax.generate.inflight import InflightEngine, compiled_program_count  # noqa: E402
from hrjax.generate.sampler import Sampler, SamplingParams  # noqa: E402
from hrjax.models.hf import load_hf  # noqa: E402
from test_sampler import IdTokenizer  # noqa: E402

lm = load_hf(checkpoint)
sampler = Sampler(lm.config, lm.params, IdTokenizer(), eos_ids=[2])
rng = np.random.RandomState(0)
prompts = [list(map(int, rng.randint(3, 256, rng.randint(1, 41)))) for _ in range(200)]
samplings = [SamplingParams(max_new_tokens=int(rng.randint(4, 33)), temperature=float(rng.choice([0.0, 0.7])),
                            top_k=int(rng.choice([0, 5, 40])), top_p=float(rng.choice([1.0, 0.9])), seed=i,
                            stop=tuple(" ".join(map(str, rng.randint(3, 256, rng.randint(1, 4))))
                                       for _ in range(rng.randint(0, 4))),
                            ignore_eos=bool(rng.rand() < 0.3)) for i in range(200)]
engine = InflightEngine(sampler, slots=16)
generations = engine.generate_stream(prompts, samplings)
digest = hashlib.sha256(json.dumps([g.tokens.tolist() for g in generations]).encode()).hexdigest()
print(json.dumps({"programs": compiled_program_count(), "recorded": len(engine.compiled_shapes),
                  "hits": events["/jax/compilation_cache/cache_hits"],
                  "misses": events["/jax/compilation_cache/cache_misses"], "tokens": digest}))
