"""Sampler benchmark: `python -m experiments.bench_sampler` prints one JSON line.

Ours vs transformers.generate on SmolLM2-135M-Instruct, greedy, 64 new tokens, batch 1/16/64.
"""

import json

from absl import app, flags

from hrjax.benchmarks import sampler

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "Batch sizes to measure.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Exact number of generated tokens per row.")


def main(argv):
    del argv
    print(json.dumps(sampler.run([int(b) for b in _BATCH_SIZES.value], _NEW_TOKENS.value)))


if __name__ == "__main__":
    app.run(main)
