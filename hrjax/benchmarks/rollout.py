"""Routed episodes per second on the real offline pool vs a naive transformers loop.

Ours: `hrjax.env.mdp.rollout` over a batch of reasoning-gym prompts, L hops, random routing, an
empty response cache (prefill, decode, context embedding, scoring all included). Naive: for each
prompt and hop, `transformers.generate` of the chosen model on that one prompt (same prompts, same
greedy settings, same token budget), timed on a subset of the prompts (a per-episode rate).
A second identical rollout measures the cache: every answer should be a hit.
"""

from __future__ import annotations

import os
import time

import numpy as np

from hrjax.benchmarks.common import host_info

TASK = "basic_arithmetic"


def run(batch: int = 64, num_hops: int = 2, max_new_tokens: int = 32, naive_prompts: int = 8,
        seed: int = 0) -> dict:
    import reasoning_gym
    import torch
    import transformers

    from hrjax import assets
    from hrjax.env.mdp import EnvConfig, RoutingEnv, rollout
    from hrjax.models.encoder import load_encoder
    from hrjax.pool import ModelSpec, Pool

    torch.set_num_threads(os.cpu_count() or 1)
    dataset = reasoning_gym.create_dataset(TASK, size=batch, seed=seed)
    entries = list(dataset)
    questions = [e["question"] for e in entries]
    specs = [ModelSpec("smollm2-135m", str(assets.smollm2_gguf_path()), base_rate=1.0),
             ModelSpec("gemma3-270m", str(assets.gemma3_gguf_path()), base_rate=2.0)]
    pool = Pool.from_specs(specs)
    quality = lambda entry, text: float(dataset.score_answer(text.strip(), entry))  # noqa: E731
    encoder = load_encoder()
    config = EnvConfig(num_hops=num_hops, max_new_tokens=max_new_tokens)
    actions = np.random.default_rng(seed).integers(0, len(pool), size=(num_hops, batch))
    policy = lambda obs: actions[int(obs.hop[0])]  # noqa: E731  (every row is at the same hop)

    rollout(RoutingEnv(pool, encoder, quality, config), entries, questions, policy)  # compiles every shape
    env = RoutingEnv(pool, encoder, quality, config)  # a fresh, empty cache
    start = time.perf_counter()
    episode = rollout(env, entries, questions, policy)
    ours = time.perf_counter() - start
    generated = env.cache.stats.misses
    rollout(env, entries, questions, policy)
    repeat_hits = env.cache.stats.hits
    repeat_misses = env.cache.stats.misses - generated

    references = [transformers.AutoModelForCausalLM.from_pretrained(
        str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
        for p in (assets.smollm2_gguf_path(), assets.gemma3_gguf_path())]
    start = time.perf_counter()
    for i in range(naive_prompts):
        responses: list[str] = []
        for hop in range(num_hops):
            model = pool.models[actions[hop, i]]
            message = env.config.template.message(questions[i], responses)
            ids = torch.tensor([model.encode_prompt(message)])
            with torch.inference_mode():
                out = references[actions[hop, i]].generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=max_new_tokens, eos_token_id=list(model.sampler.eos_ids),
                    pad_token_id=model.sampler.eos_ids[0])
            responses.append(model.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    naive = time.perf_counter() - start
    return {
        **host_info(), "batch": batch, "num_hops": num_hops, "max_new_tokens": max_new_tokens, "task": TASK,
        "pool": [s.name for s in specs],
        "episodes_per_s": round(batch / ours, 3),
        "naive_episodes_per_s": round(naive_prompts / naive, 3),
        "speedup_vs_naive": round((batch / ours) / (naive_prompts / naive), 2),
        "rollout_seconds": round(ours, 2), "naive_seconds_for_subset": round(naive, 2),
        "naive_subset": naive_prompts,
        "generated_answers": generated,
        "generated_tokens": int(episode.tokens_out.sum()),
        "repeat_cache_hit_rate": round(repeat_hits / max(repeat_hits + repeat_misses, 1), 4),
        "mean_quality": round(float(episode.quality.mean()), 4),
    }
