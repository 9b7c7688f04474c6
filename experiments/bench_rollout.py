"""Rollout benchmark: `python -m experiments.bench_rollout` prints one JSON line.

Routed episodes/s on the real offline pool (SmolLM2-135M + Gemma-3-270M) vs a naive
transformers.generate loop, plus the cache hit rate of a repeated rollout.
"""

import json

from absl import app, flags

from hrjax.benchmarks import rollout

_BATCH = flags.DEFINE_integer("batch", 64, "Prompts per rollout.")
_HOPS = flags.DEFINE_integer("num_hops", 2, "Hops per episode (L).")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Token budget per answer.")
_NAIVE = flags.DEFINE_integer("naive_prompts", 8, "Prompts the naive loop is timed on.")


def main(argv):
    del argv
    print(json.dumps(rollout.run(_BATCH.value, _HOPS.value, _NEW_TOKENS.value, _NAIVE.value)))


if __name__ == "__main__":
    app.run(main)
