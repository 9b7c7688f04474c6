"""The real offline pool on a CPU machine: SmolLM2-135M-Instruct + Gemma-3-270M (both GGUF, installed
from PyPI), L = 2 hops with STOP, over reasoning-gym's offline tasks.

- `--config=experiments/configs/cpu_pool.py:mixture`: one router over four easy reasoning-gym tasks
  (`MIXTURE_TASKS`: 80 training, 16 selection and 50 held-out test prompts each), every hop asked as a
  few-shot completion (`FEW_SHOT`: no chat template, the answer ends at the line's end), where each model
  is the better one on some tasks: the pool's routing showcase. The path tree is 3,504 answers.
- `--config=experiments/configs/cpu_pool.py[:TASK]` (default basic_arithmetic; any name of
  `hrjax.tasks.datasets.TASKS`): that one task, asked through each model's chat template; 100 training,
  25 selection and 50 test prompts (1,050 answers).

The path tree is generated once (cached), then tree-mode PPO trains in seconds.
"""

from hrjax import assets
from hrjax.config import base_config

# reasoning-gym's default basic_arithmetic (up to 6 terms of 4 digits) is beyond these models
EASY_ARITHMETIC = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, allow_parentheses=False,
                       allow_negation=False, operators=["+", "-", "*"])
# reasoning-gym dataset -> its config: the tasks where a probe of both models' one-hop answers (40 prompts a task,
# drawn with seed 0) found one model at least 0.08 better than the other (of 12 easy tasks probed); the mixture
# draws its prompts with seed 2, so its held-out figures are not the probe's
MIXTURE_TASKS = {
    "basic_arithmetic": EASY_ARITHMETIC,
    "gcd": dict(min_numbers=2, max_numbers=2, min_value=2, max_value=30),
    "letter_counting": dict(min_words=3, max_words=5),
    "spell_backward": dict(min_word_len=3, max_word_len=5),
}
FEW_SHOT = ("Answer each question with only the answer.\n\n"
            "Question: Calculate 2 + 3.\nAnswer: 5\n\n"
            "Question: Spell this word backward (example: sun -> nus): cat\nAnswer: tac\n\n"
            "Question: How many times does the letter \"o\" appear in the text: \"good food\"?\nAnswer: 4\n\n"
            "Question: {message}\nAnswer:")
# a later hop shows the latest answer inside the question line, so the few-shot pattern still holds
FEW_SHOT_HOPS = dict(first="{question}", later="{question} (A first attempt answered: {answers}. Check it.)",
                     answer_item="{response}", last_only=True)


def get_config(task: str = "basic_arithmetic"):
    config = base_config()
    mixture = task == "mixture"
    if mixture:
        member = dict(prompt_template=FEW_SHOT, use_chat_template=False)
    else:
        member = dict(prompt_template="{message}\nReply with only the final number.")
    config.pool = [
        dict(name="smollm2-135m", checkpoint=str(assets.smollm2_gguf_path()), base_rate=1.0, **member),
        dict(name="gemma3-270m", checkpoint=str(assets.gemma3_gguf_path()), base_rate=2.0, **member),
    ]
    if mixture:
        config.task.name = "reasoning_gym"
        config.task.options = dict(tasks=list(MIXTURE_TASKS), task_configs=MIXTURE_TASKS, n_train=80,
                                   n_validation=16, n_test=50, seed=2)
        config.env.stop = ("\n",)
        config.env.template = FEW_SHOT_HOPS
    else:
        config.task.name = task
        config.task.options = dict(n_train=100, n_validation=25, n_test=50, seed=0)
        if task == "basic_arithmetic":
            config.task.options["task_configs"] = {task: EASY_ARITHMETIC}
    config.env.num_hops = 2
    config.env.max_new_tokens = 16
    config.env.cost_lambda = 0.1
    config.env.stop_action = True  # a second hop often garbles a right first answer: let the router stop
    config.ppo.num_envs = 256
    config.train.num_iterations = 300
    config.train.iterations_per_step = 20
    return config
