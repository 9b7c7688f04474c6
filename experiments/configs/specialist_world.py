"""The embedded default: the specialist world and its pool, trained by hrjax itself (no downloads).

Four task types (add, mul, rev, paren; paren needs the paren expert's rewrite, then the mul
expert), four cheap narrow experts and a 3.5x-cost generalist (`hrjax.specialists.build`,
recipe 'default', built once in about 4 minutes on 2 CPU cores, then cached). L = 2 hops with
STOP; routers trained over 3 seeds at lambda = 0.05 and, for the AIQ sweep, at each lambda of
`evaluate.cost_lambdas`; evaluated on 64 held-out ('test') prompts per task type. The training loop's
eval/* metrics and best/ checkpoint use 16 'validation' prompts per type (8 when reduced): small, so
the path tree grows by a tenth.
`--config=experiments/configs/specialist_world.py:reduced` is the small world CI trains (add and
paren only, three experts). `:conditioned` is the default world with one lambda-conditioned router per seed
(lambda drawn from [0, 2] per episode, entropy 0.2, 5 seeds), for `hrjax trade_offs`.
"""

import dataclasses

from hrjax.config import base_config
from hrjax.tasks.specialist_world import HOP_TEMPLATE, MAX_NEW_TOKENS


def get_config(variant: str = "default"):
    if variant not in ("default", "reduced", "conditioned"):
        raise ValueError(f"specialist_world.py takes 'reduced' or 'conditioned' (or nothing), not '{variant}'.")
    recipe = "reduced" if variant == "reduced" else "default"
    config = base_config()
    config.specialists = recipe
    config.task.name = "specialist_world"
    reduced = recipe == "reduced"
    config.task.options = dict(task_types=["add", "paren"] if reduced else ["add", "mul", "rev", "paren"],
                               n_train=40 if reduced else 100, n_validation=8 if reduced else 16,
                               n_test=32 if reduced else 64, seed=0)
    config.env.num_hops = 2
    config.env.template = dataclasses.asdict(HOP_TEMPLATE)
    config.env.max_new_tokens = MAX_NEW_TOKENS
    config.env.reference_tokens = 20  # a generalist hop of ~15 tokens costs ~0.75, an expert hop ~0.2
    config.env.cost_lambda = 0.05
    config.env.stop_action = True  # one hop where one expert suffices, two where the task needs them
    # STOP after one cheap hop is an early local optimum (paren needs paren then mul): explore past it
    config.ppo.entropy_coef = 0.1
    # the selection prompts' eval/value levels off by iteration 50 in every seed; at 200 the default world's
    # held-out router gave quality 0.891, cost 0.270, AIQ 0.8817 against 0.895, 0.283, 0.8816 at 400
    config.train.num_iterations = 200
    config.train.iterations_per_step = 50
    config.train.eval_every = 1
    config.evaluate.seeds = 3
    config.evaluate.cost_lambdas = (0.0, 0.05, 0.5, 2.0) if reduced else (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0)
    if variant == "conditioned":
        # one policy for every lambda of the sweep; at entropy 0.1 two seeds in five settled into one hop then STOP
        config.ppo.lambda_range = (0.0, 2.0)
        config.ppo.entropy_coef = 0.2
        config.train.num_iterations = 400  # one policy for a range of lambdas: trained as long as before
        config.evaluate.seeds = 5
    return config
