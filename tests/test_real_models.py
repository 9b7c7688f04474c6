"""The real offline SmolLM2-135M-Instruct, loaded from its GGUF by our loader, generates exactly
what transformers' PyTorch model (loaded from the same GGUF) generates."""

import numpy as np
import pytest
import torch

from hrjax import assets
from hrjax.generate.sampler import Sampler, SamplingParams
from hrjax.models.gguf import load_gguf
from references import hf_greedy

QUESTIONS = (
    "What is 17 + 25?",
    "Name the capital of France.",
    "Write a haiku about the sea and the wind that moves across it at night.",
    "List three prime numbers greater than ten, and explain briefly how you know each one is prime.",
)


@pytest.fixture(scope="module")
def smollm2():
    path = assets.smollm2_gguf_path()
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return load_gguf(path), reference


def chat_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_smollm2_greedy_matches_transformers_generate(smollm2):
    lm, reference = smollm2
    sampler = Sampler.from_loaded(lm)
    prompts = [chat_ids(lm.tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: real left padding
    ours = sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=32))

    theirs = hf_greedy(reference, prompts, 32, sampler.eos_ids, pad_id=sampler.eos_ids[0])
    for generation, (tokens, logprobs) in zip(ours, theirs):
        assert generation.tokens.tolist() == tokens
        np.testing.assert_allclose(generation.logprobs, logprobs, atol=1e-3)
        assert len(tokens) == 32 or generation.finish_reason == "eos"
    assert sum(len(g.tokens) for g in ours) > 64  # real text, not immediate EOS
    assert np.all(np.concatenate([g.logprobs for g in ours]) <= 0)
