"""Paper-style pool for a GPU/TPU host: three Qwen2.5 models that share one tokenizer (answers are
handed between hops as token ids), L = 3 hops, one router over the six benchmark families (a mixture:
reports break results down per family), or on one family:

    python -m experiments.train --config=experiments/configs/qwen25_paper.py --workdir=runs/paper
    python -m experiments.train --config=experiments/configs/qwen25_paper.py:gsm8k --workdir=runs/gsm8k

Families (the HierRouter paper's QA, code and maths): gsm8k, math, mbpp, humaneval, triviaqa,
hotpotqa; each contributes `num_train` / `num_select` / `num_eval` prompts (fewer where the family has
fewer). A mixture answers within the largest family's budget (`env.max_new_tokens` is one value).
The models load from the Hugging Face hub (or a local mirror: set each `checkpoint` to its
directory); every task but humaneval reads its upstream files from `task.manual_dir` (the error
names the files and where to download them). Each model is asked for its family's answer format
(`#### n`, `\\boxed{}`, an `Answer:` line, a code block: `config.task.answer_format`) and scored on that
answer only. base_rate is each model's size in billions of parameters, a proxy for its serving price
per token.

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


NUM_TRAIN, NUM_SELECT, NUM_EVAL = 1000, 100, 200  # prompts per family


def task_part(family: str) -> dict:
    """The `config.task` fields (a `hrjax.config.TaskPart`) of one family."""
    train_split, select_split, eval_split, _ = FAMILIES[family]
    return dict(name=family, train_split=train_split, select_split=select_split, eval_split=eval_split,
                num_train=NUM_TRAIN, num_select=NUM_SELECT, num_eval=NUM_EVAL)


def get_config(family: str = ""):
    """`family` '': the mixture of every family; else that family alone."""
    if family and family not in FAMILIES:
        raise ValueError(f"Unknown benchmark family '{family}'; choose one of {sorted(FAMILIES)}, or none for the "
                         "mixture of all six.")
    config = base_config()
    config.pool = [
        dict(name="qwen2.5-0.5b-instruct", checkpoint="Qwen/Qwen2.5-0.5B-Instruct", base_rate=0.5, dtype="bfloat16"),
        dict(name="qwen2.5-math-1.5b-instruct", checkpoint="Qwen/Qwen2.5-Math-1.5B-Instruct", base_rate=1.5,
             dtype="bfloat16"),
        dict(name="qwen2.5-coder-1.5b-instruct", checkpoint="Qwen/Qwen2.5-Coder-1.5B-Instruct", base_rate=1.5,
             dtype="bfloat16"),
    ]
    if family:
        config.task.update(task_part(family))
    else:
        config.task.name = "mixture"
        config.task.mixture = [task_part(f) for f in FAMILIES]
    config.task.manual_dir = "~/hrjax_downloads"
    config.task.answer_format = True  # each family's format asked for, and only that answer scored
    config.env.num_hops = 3
    config.env.max_new_tokens = FAMILIES[family][3] if family else max(f[3] for f in FAMILIES.values())
    config.env.cost_lambda = 0.1
    config.ppo.num_envs = 512
    config.train.num_iterations = 500
    config.train.iterations_per_step = 25
    return config
