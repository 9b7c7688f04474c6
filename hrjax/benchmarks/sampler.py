"""Sampler throughput: ours vs `transformers.generate` on SmolLM2-135M-Instruct (same GGUF weights).

Greedy, exactly `new_tokens` new tokens (EOS ignored), prefill included, compile excluded (each
shape is warmed up once first). FLOPs are counted analytically over real (unpadded) tokens.

The `stream` case (`run_stream`): 256 requests queued at once, with answer lengths drawn three ways
(`stream_cases`), through in-flight batching, static batching and llama.cpp's `llama-server` with
continuous batching (`$HRJAX_LLAMA_CPP`: see hrjax/benchmarks/serve.py) on an F32 GGUF of the same weights.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from hrjax.benchmarks.common import best_seconds, host_info, matmul_peak_gflops
from hrjax.models.decoder import DecoderConfig

CHAT_PROMPT = ("Explain in two sentences why the sky is blue, and give one everyday example that "
               "shows the same effect clearly.")


def decoder_flops(config: DecoderConfig, prompt_len: int, new_tokens: int) -> float:
    """Forward FLOPs of one sequence: a prefill of `prompt_len` tokens (LM head on the last only)
    then `new_tokens - 1` decode steps. Matmuls count 2 FLOPs per multiply-add; attention counts
    QK^T and PV over the visible context."""
    c = config
    per_token_linear = 2 * c.hidden_size * (
        (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim
        + 3 * c.intermediate_size) * c.num_layers
    lm_head = 2 * c.hidden_size * c.vocab_size
    attention_per_key = 4 * c.num_heads * c.head_dim * c.num_layers
    prefill = prompt_len * per_token_linear + lm_head + attention_per_key * prompt_len * (prompt_len + 1) / 2
    decode = sum(per_token_linear + lm_head + attention_per_key * (prompt_len + i + 1)
                 for i in range(new_tokens - 1))
    return float(prefill + decode)


def run(batch_sizes: Sequence[int] = (1, 16, 64), new_tokens: int = 64, repeats: int = 2, stream: bool = True) -> dict:
    """Batch 1/16/64 against transformers, then (`stream`) the in-flight `run_stream` case."""
    import torch
    import transformers

    from hrjax import assets
    from hrjax.generate.sampler import Sampler, SamplingParams
    from hrjax.models.gguf import load_gguf

    torch.set_num_threads(os.cpu_count() or 1)
    gguf_path = assets.smollm2_gguf_path()
    load_start = time.perf_counter()
    lm = load_gguf(gguf_path)
    load_seconds = time.perf_counter() - load_start
    sampler = Sampler.from_loaded(lm, max_batch=max(batch_sizes))
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                              add_generation_prompt=True, tokenize=False)
    prompt_ids = lm.tokenizer.encode(prompt, add_special_tokens=False)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()

    peak = matmul_peak_gflops()
    result = {**host_info(), "model": "SmolLM2-135M-Instruct", "prompt_tokens": len(prompt_ids),
              "new_tokens": new_tokens, "dtype": lm.config.dtype, "load_seconds": round(load_seconds, 2),
              "matmul_peak_gflops": round(peak, 1)}
    for batch in batch_sizes:
        prompts = [prompt_ids] * batch
        compile_start = time.perf_counter()
        sampler.generate_tokens(prompts, sampling)
        result[f"first_call_seconds_b{batch}"] = round(time.perf_counter() - compile_start, 2)
        ours = best_seconds(lambda: sampler.generate_tokens(prompts, sampling), repeats)
        input_ids = torch.tensor(prompts)
        with torch.inference_mode():
            generate = lambda: reference.generate(  # noqa: E731
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            theirs = best_seconds(generate, 1)
        flops = batch * decoder_flops(lm.config, len(prompt_ids), new_tokens)
        result[f"ours_tok_s_b{batch}"] = round(batch * new_tokens / ours, 1)
        result[f"transformers_tok_s_b{batch}"] = round(batch * new_tokens / theirs, 1)
        result[f"speedup_b{batch}"] = round(theirs / ours, 2)
        result[f"gflops_b{batch}"] = round(flops / ours / 1e9, 1)
        result[f"peak_fraction_b{batch}"] = round(flops / ours / 1e9 / peak, 3)
    if stream:
        result.update(run_stream())
    return result


STREAM_REQUESTS, STREAM_SLOTS = 256, 32


def stream_cases(model, root, num_requests: int = STREAM_REQUESTS) -> dict[str, tuple[list[list[int]], list[int]]]:
    """case -> (prompt ids, answer lengths in tokens) of `num_requests` requests to `model` (the cpu_pool's
    SmolLM2 `PoolModel`):
    - 'uniform': the chat prompt, lengths uniform in [8, 256] (seeded);
    - 'specialist_world': the chat prompt, the lengths of the specialist world's answers: every hop's response
      to its held-out questions of all four task types, in characters (its experts' tokens) plus EOS;
    - 'cpu_pool': the cpu_pool config's prompts (its reasoning-gym questions of every split, cycled) with the
      lengths of SmolLM2's own greedy answers to them (EOS included) within the config's token budget."""
    import numpy as np

    from hrjax.benchmarks.common import experiment_config
    from hrjax.generate.sampler import SamplingParams
    from hrjax.tasks.datasets import load_task
    from hrjax.tasks.specialist_world import TASK_TYPES, specialist_examples

    chat = model.encode_prompt(CHAT_PROMPT)
    rng = np.random.default_rng(0)
    uniform = rng.integers(8, 257, num_requests).tolist()
    answers = [len(step) + 1 for e in specialist_examples("test", num_requests, task_types=TASK_TYPES)
               for step in e.metadata["steps"]]
    answers = rng.choice(answers, num_requests, replace=False).tolist()  # the task types mixed
    config = experiment_config("cpu_pool", root=root)
    task = config.task
    questions = [e.question for split in (task.eval_split, task.select_split, task.train_split)
                 for e in load_task(task.name, split, task.data_dir, **task.options)]
    prompts = [model.encode_prompt(questions[i % len(questions)]) for i in range(num_requests)]
    greedy = model.sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=config.env.max_new_tokens))
    return {"uniform": ([chat] * num_requests, uniform),
            "specialist_world": ([chat] * num_requests, answers),
            "cpu_pool": (prompts, [len(g.tokens) for g in greedy])}


def static_batches(sampler, prompts, lengths, batch: int) -> float:
    """Seconds to generate every (prompt, length) with static batching: `batch` requests at a time in
    arrival order, each batch decoding until its longest row is done (EOS ignored)."""
    from hrjax.generate.sampler import SamplingParams

    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        sampler.generate_tokens(prompts[i:i + batch], SamplingParams(max_new_tokens=max(lengths[i:i + batch]),
                                                                     ignore_eos=True))
    return time.perf_counter() - start


def inflight_stream(sampler, prompts, lengths, slots: int) -> float:
    """Seconds to generate every (prompt, length) through in-flight batching over `slots` rows, all queued."""
    from hrjax.generate.sampler import SamplingParams

    start = time.perf_counter()
    sampler.generate_stream(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths], slots)
    return time.perf_counter() - start


async def llama_server_stream(url: str, prompts, lengths) -> float:
    """Seconds for llama-server to answer every (prompt ids, length) request, all sent at once (its
    /completion endpoint, greedy, EOS ignored, no prompt cache)."""
    import asyncio

    import httpx

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=len(prompts))) as client:
        async def one(prompt, n):
            response = await client.post(f"{url}/completion", json=dict(
                prompt=prompt, n_predict=n, ignore_eos=True, temperature=0.0, cache_prompt=False))
            response.raise_for_status()
            made = response.json()["tokens_predicted"]
            if made != n:
                raise RuntimeError(f"llama-server made {made} tokens where {n} were asked")
        start = time.perf_counter()
        await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))
        return time.perf_counter() - start


def run_stream(num_requests: int = STREAM_REQUESTS, slots: int = STREAM_SLOTS, llama_cpp=None) -> dict:
    """The `stream` case: per length case, answers/s and generated tokens/s of in-flight batching, static
    batching and (with $HRJAX_LLAMA_CPP) llama-server's continuous batching on an F32 GGUF of the same weights;
    `inflight_speedup` and `stream_vs_llama_cpp` on the uniform case. Compile excluded (a warm-up stream)."""
    import asyncio

    from hrjax.benchmarks.common import experiment_config
    from hrjax.benchmarks.serve import bench_dir, llama_cpp_f32, llama_server, smollm_f32_dir
    from hrjax.generate.inflight import compiled_program_count
    from hrjax.generate.sampler import generate_arrays
    from hrjax.pool import load_model

    root = bench_dir().parent / "sampler"
    root.mkdir(parents=True, exist_ok=True)
    model = load_model(experiment_config("cpu_pool", root=root).pool[0])
    cases = stream_cases(model, root, num_requests)
    result = {"stream_requests": num_requests, "stream_slots": slots}
    timings, compiles = {}, 0
    for case, (prompts, lengths) in cases.items():
        # warm-up: the case's longest request (it sets the engine's capacity) and 2 x slots others
        warm = sorted(range(len(prompts)), key=lambda i: -lengths[i])[:1] + list(range(2 * slots))
        inflight_stream(model.sampler, [prompts[i] for i in warm], [lengths[i] for i in warm], slots)
        static_batches(model.sampler, [prompts[i] for i in warm], [lengths[i] for i in warm], slots)
        before = compiled_program_count() + generate_arrays._cache_size()
        timings[case] = {"inflight": inflight_stream(model.sampler, prompts, lengths, slots),
                         "static": static_batches(model.sampler, prompts, lengths, slots)}
        compiles += compiled_program_count() + generate_arrays._cache_size() - before
    found, why_not = llama_cpp_f32(llama_cpp or os.environ.get("HRJAX_LLAMA_CPP"), smollm_f32_dir(
        bench_dir()), bench_dir())
    if found is None:
        result["stream_llama_cpp_note"] = why_not
    else:
        with llama_server(*found, slots, 512, root / "llama_server.log") as server:
            asyncio.run(llama_server_stream(server.url, cases["uniform"][0][:slots], cases["uniform"][1][:slots]))
            for case, (prompts, lengths) in cases.items():
                timings[case]["llama_server"] = asyncio.run(llama_server_stream(server.url, prompts, lengths))
    for case, (prompts, lengths) in cases.items():
        result[f"stream_{case}_mean_tokens"] = round(sum(lengths) / len(lengths), 1)
        for engine, seconds in timings[case].items():
            result[f"stream_{case}_{engine}_answers_s"] = round(len(prompts) / seconds, 2)
            result[f"stream_{case}_{engine}_tok_s"] = round(sum(lengths) / seconds, 1)
    result["stream_programs_compiled_while_timed"] = compiles  # warm-up misses, counted by JAX
    uniform = timings["uniform"]
    result["inflight_speedup"] = round(uniform["static"] / uniform["inflight"], 2)
    result["stream_vs_llama_cpp"] = (round(uniform["llama_server"] / uniform["inflight"], 3)
                                     if "llama_server" in uniform else None)
    return result
