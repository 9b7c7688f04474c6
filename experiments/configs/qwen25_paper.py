"""Paper-style pool for a GPU/TPU host: three Qwen2.5 models that share one tokenizer (answers are
handed between hops as token ids), L = 3 hops, on one of the six benchmark families:

    python -m experiments.train --config=experiments/configs/qwen25_paper.py:gsm8k --workdir=runs/gsm8k

Families (the HierRouter paper's QA, code and maths): gsm8k, math, mbpp, humaneval, triviaqa,
hotpotqa. The models load from the Hugging Face hub (or a local mirror: set each `checkpoint` to its
directory); every task but humaneval reads its upstream files from `task.manual_dir` (the error
names the files and where to download them). base_rate is each model's size in billions of
parameters, a proxy for its serving price per token.

Splits: the router trains on `train`, its eval/* metrics and best/ checkpoint use the selection
split, and `hrjax evaluate` reports the eval split. gsm8k and math have no upstream validation split:
their builders carve one out of train (`validation_fraction`). triviaqa and hotpotqa publish no test
answers, so their validation split is the reported one and the selection prompts are the
`num_select` training examples after the first `num_train`.
"""

from hrjax.config import base_config

FAMILIES = {  # task name -> (train split, selection split, eval split, answer budget in tokens)
    "gsm8k": ("train", "validation", "test", 384),
    "math": ("train", "validation", "test", 512),
    "mbpp": ("train", "validation", "test", 384),
    "humaneval": ("train", "validation", "test", 384),  # 164 problems carved 60/20/20 by the builder
    "triviaqa": ("train", "train", "validation", 64),
    "hotpotqa": ("train", "train", "validation", 64),
}


def get_config(family: str = "gsm8k"):
    if family not in FAMILIES:
        raise ValueError(f"Unknown benchmark family '{family}'; choose one of {sorted(FAMILIES)}.")
    train_split, select_split, eval_split, budget = FAMILIES[family]
    config = base_config()
    config.pool = [
        dict(name="qwen2.5-0.5b-instruct", checkpoint="Qwen/Qwen2.5-0.5B-Instruct", base_rate=0.5, dtype="bfloat16"),
        dict(name="qwen2.5-math-1.5b-instruct", checkpoint="Qwen/Qwen2.5-Math-1.5B-Instruct", base_rate=1.5,
             dtype="bfloat16"),
        dict(name="qwen2.5-coder-1.5b-instruct", checkpoint="Qwen/Qwen2.5-Coder-1.5B-Instruct", base_rate=1.5,
             dtype="bfloat16"),
    ]
    config.task.name = family
    config.task.train_split, config.task.select_split, config.task.eval_split = train_split, select_split, eval_split
    config.task.num_train = 1000
    config.task.num_select = 100
    config.task.num_eval = 200
    config.task.manual_dir = "~/hrjax_downloads"
    config.env.num_hops = 3
    config.env.max_new_tokens = budget
    config.env.cost_lambda = 0.1
    config.ppo.num_envs = 512
    config.train.num_iterations = 500
    config.train.iterations_per_step = 25
    return config
