"""Token budgets checked before anything is generated: every prompt must fit every pool model's context
at every hop, or a run (and its resume) stops at the first prompt that does not.

The longest prompt of a hop is the hop message (template and question) with the earlier answers at
their longest, `max_new_tokens` each; the model then needs room for `max_new_tokens` more. Answers
are counted as `max_new_tokens` of the reading model's own tokens, which is exact when the writer
shares its tokenizer (answers are handed on as token ids); an answer from another tokenizer is
re-tokenised from its text and may take more, so the sampler still checks each prompt it runs.
"""

from __future__ import annotations

from typing import Sequence

from hrjax.env.mdp import Answer, Context, RoutingEnv, hop_prompt
from hrjax.errors import PromptTooLongError
from hrjax.pool import PoolModel

SHOWN = 5  # example ids named in the error


def longest_hop(env: RoutingEnv, model: PoolModel, question: str) -> int:
    """Tokens `model` needs at its longest hop on `question`: prompt plus `max_new_tokens`."""
    budget, hops = env.config.max_new_tokens, env.config.num_hops
    filler = tuple(model.tokenizer.encode("x", add_special_tokens=False)[:1]) * budget
    answers = tuple(Answer("x" * budget, filler, model.tokenizer_id) for _ in range(hops - 1))
    return budget + max(len(hop_prompt(model, env.config.template, Context(question, answers[:hop])))
                        for hop in {0, hops - 1})


def check_prompt_budgets(env: RoutingEnv, ids: Sequence[str], questions: Sequence[str]) -> None:
    """Raises one `PromptTooLongError` naming the examples (`ids[i]` asks `questions[i]`) whose longest
    hop does not fit some pool model's context, and the ways to fix it."""
    too_long = {}  # example index -> (tokens, model name, context)
    for model in env.pool.models:
        context = model.sampler.config.max_position_embeddings
        for i, question in enumerate(questions):
            need = longest_hop(env, model, question)
            if need > context and i not in too_long:
                too_long[i] = (need, model.spec.name, context)
    if not too_long:
        return
    shown = "; ".join(f"{ids[i]} needs {need} tokens, model '{name}' has {context}"
                      for i, (need, name, context) in list(too_long.items())[:SHOWN])
    more = f"; and {len(too_long) - SHOWN} more" if len(too_long) > SHOWN else ""
    config = env.config
    raise PromptTooLongError(
        f"{len(too_long)} of {len(questions)} examples do not fit the pool's contexts at num_hops={config.num_hops}, "
        f"max_new_tokens={config.max_new_tokens} (a hop's prompt holds the question, the template and up to "
        f"{config.num_hops - 1} earlier answer(s) of max_new_tokens each; then max_new_tokens are generated): "
        f"{shown}{more}. Fix: shorten or filter these examples (other task options, or fewer with "
        "config.task.num_train / num_select / num_eval), use models with longer contexts, or lower "
        "config.env.max_new_tokens or config.env.num_hops.")
