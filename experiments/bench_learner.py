"""Learner benchmark: `python -m experiments.bench_learner` prints one JSON line.

Tree mode: environment steps/s of the fused jitted rollout + PPO update, FLOPs per step and the
share of a float32 matmul peak; online mode on the real offline pool: the learner's share of an
iteration's wall time (cold and warm response cache).
"""

import json

from absl import app, flags

from hrjax.benchmarks import learner

_TREE_ENVS = flags.DEFINE_integer("tree_num_envs", learner.PPO_DEFAULTS.num_envs, "Episodes per tree-mode iteration.")
_ONLINE = flags.DEFINE_bool("online", True, "Also measure online mode on the real offline pool.")


def main(argv):
    del argv
    print(json.dumps(learner.run(_TREE_ENVS.value, _ONLINE.value)))


if __name__ == "__main__":
    app.run(main)
