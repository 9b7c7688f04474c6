"""The paper experiment (`qwen25_paper.py`: the six benchmark families, L = 3 hops, answer formats, the
same budgets and PPO settings) over a pool of Qwen3 dense models that share one tokenizer, so answers
are handed between hops as token ids:

    python -m experiments.train --config=experiments/configs/qwen3_pool.py --workdir=runs/qwen3
    python -m experiments.train --config=experiments/configs/qwen3_pool.py:math --workdir=runs/qwen3_math

Qwen3-0.6B, Qwen3-1.7B and Qwen3-4B load from the Hugging Face hub (or a local mirror: set each
`checkpoint` to its directory). base_rate is each model's size in billions of parameters. Qwen3 thinks
before it answers unless told not to; each hop message ends with Qwen3's `/no_think` switch, so the
answer budget goes to the answer (its empty `<think></think>` block stays in the response).
"""

import importlib.util
from pathlib import Path

POOL = [dict(name=f"qwen3-{size.lower()}", checkpoint=f"Qwen/Qwen3-{size}", base_rate=billions, dtype="bfloat16",
             prompt_template="{message} /no_think") for size, billions in (("0.6B", 0.6), ("1.7B", 1.7), ("4B", 4.0))]


def get_config(family: str = ""):
    """`family` '': the mixture of every family; else that family alone (see `qwen25_paper.py`)."""
    spec = importlib.util.spec_from_file_location("qwen25_paper", Path(__file__).with_name("qwen25_paper.py"))
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    config = paper.get_config(family)
    config.pool = POOL
    return config
