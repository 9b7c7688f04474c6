"""Learner benchmark: `python -m experiments.bench_learner` prints one JSON line.

Tree mode: environment steps/s of the fused jitted rollout + PPO update, FLOPs per step and the
share of a float32 matmul peak; online mode on the real offline pool: the learner's share of an
iteration's wall time (cold and warm response cache).
"""

import json

from absl import app

from hrjax.benchmarks import learner


def main(argv):
    del argv
    print(json.dumps(learner.run()))


if __name__ == "__main__":
    app.run(main)
