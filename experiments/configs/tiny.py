"""A tiny run on the real offline pool (SmolLM2-135M-Instruct + Gemma-3-270M): 8 training, 4 selection
('validation': eval/* and best/) and 4 held-out ('test') reasoning-gym prompts, 8-token answers, 20
iterations. For tests and smoke checks."""

from hrjax import assets
from hrjax.config import base_config


def get_config():
    config = base_config()
    config.pool = [
        dict(name="smollm2-135m", checkpoint=str(assets.smollm2_gguf_path()), base_rate=1.0),
        dict(name="gemma3-270m", checkpoint=str(assets.gemma3_gguf_path()), base_rate=2.0),
    ]
    config.task.name = "basic_arithmetic"
    config.task.options = dict(n_train=8, n_validation=4, n_test=4, seed=0)
    config.env.num_hops = 2
    config.env.max_new_tokens = 8
    config.env.cost_lambda = 0.1
    config.network.hidden = 32
    config.ppo.num_envs = 16
    config.ppo.minibatches = 2
    config.train.num_iterations = 20
    config.train.iterations_per_step = 2
    config.train.eval_every = 2
    return config
