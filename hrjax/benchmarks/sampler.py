"""Sampler throughput: ours vs `transformers.generate` on SmolLM2-135M-Instruct (same GGUF weights).

Greedy, exactly `new_tokens` new tokens (EOS ignored), prefill included, compile excluded (each
shape is warmed up once first). FLOPs are counted analytically over real (unpadded) tokens.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from hrjax.benchmarks.common import best_seconds, host_isa, matmul_peak_gflops
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


def run(batch_sizes: Sequence[int] = (1, 16, 64), new_tokens: int = 64, repeats: int = 2) -> dict:
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
    result = {"host_isa": host_isa(), "model": "SmolLM2-135M-Instruct", "prompt_tokens": len(prompt_ids),
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
    return result
