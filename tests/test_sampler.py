"""The sampler against transformers.generate, its sampling modes, stopping and shape buckets."""

import numpy as np
import pytest

from hrjax.errors import PromptTooLongError
from hrjax.generate.sampler import Generation, Sampler, SamplingParams, generate_arrays
from hrjax.shapes import fine_bucket, pow2_bucket
from hrjax.models.hf import load_hf
from references import hf_greedy

EOS = 2


def varied_prompts(seed=1, lengths=(3, 7, 12, 5)):
    rng = np.random.RandomState(seed)
    return [list(rng.randint(3, 256, n)) for n in lengths]


def test_greedy_matches_transformers_generate(tiny_decoder, decoder_arch):
    path, reference = tiny_decoder(decoder_arch)
    prompts = varied_prompts()
    ours = Sampler.from_loaded(load_hf(path), eos_ids=[EOS]).generate_tokens(
        prompts, SamplingParams(max_new_tokens=32))
    for generation, (tokens, logprobs) in zip(ours, hf_greedy(reference, prompts, 32, [EOS], pad_id=0)):
        assert generation.tokens.tolist() == tokens
        np.testing.assert_allclose(generation.logprobs, logprobs, atol=1e-4)
        assert generation.finish_reason == ("eos" if tokens[-1] == EOS else "length")


@pytest.fixture(scope="module")
def llama_sampler(tiny_decoder):
    return Sampler.from_loaded(load_hf(tiny_decoder("llama")[0]), eos_ids=[EOS])


def test_top_k_one_and_tiny_top_p_equal_greedy(llama_sampler):
    prompts = varied_prompts()
    greedy = llama_sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=16))
    for sampling in (SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1, seed=3),
                     SamplingParams(max_new_tokens=16, temperature=1.5, top_p=1e-6, seed=4)):
        sampled = llama_sampler.generate_tokens(prompts, sampling)
        assert [g.tokens.tolist() for g in sampled] == [g.tokens.tolist() for g in greedy]


def test_sampling_is_seeded(llama_sampler):
    prompts = varied_prompts()
    run = lambda seed: [g.tokens.tolist() for g in llama_sampler.generate_tokens(  # noqa: E731
        prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed))]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampled_tokens_stay_inside_top_k(llama_sampler):
    """With top_k=3, every sampled token is among the 3 most likely under the model."""
    from hrjax.models.decoder import Decoder
    import jax.numpy as jnp

    prompt = varied_prompts(lengths=(6,))[0]
    for seed in range(5):
        g = llama_sampler.generate_tokens([prompt], SamplingParams(max_new_tokens=8, temperature=5.0, top_k=3,
                                                                   seed=seed, ignore_eos=True))[0]
        sequence = np.array([prompt + g.tokens.tolist()])
        logits, _ = Decoder(llama_sampler.config).apply(
            llama_sampler.params, jnp.asarray(sequence), jnp.arange(sequence.shape[1])[None],
            jnp.ones(sequence.shape, bool))
        top3 = np.argsort(-np.asarray(logits[0]), axis=-1)[:, :3]
        for t, token in enumerate(g.tokens):
            assert token in top3[len(prompt) - 1 + t]


def test_ignore_eos_gives_exact_length_and_eos_ends_rows(llama_sampler):
    prompts = varied_prompts()
    exact = llama_sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert all(len(g.tokens) == 40 and g.finish_reason == "length" for g in exact)
    # Declare the first greedy token of row 0 an EOS: that row must stop after one token.
    first = int(exact[0].tokens[0])
    stopped = Sampler(llama_sampler.config, llama_sampler.params, eos_ids=[first]).generate_tokens(
        prompts[:1], SamplingParams(max_new_tokens=40))[0]
    assert stopped.tokens.tolist() == [first] and stopped.finish_reason == "eos"
    # ignore_eos rows run their length and finish as 'length', even when their last token is an EOS id
    last = int(exact[0].tokens[-1])
    for engine in ("static", "inflight"):
        sampler = Sampler(llama_sampler.config, llama_sampler.params, eos_ids=[last])
        generate = sampler.generate_tokens if engine == "static" else sampler.generate_stream
        again = generate(prompts[:1], SamplingParams(max_new_tokens=40, ignore_eos=True))[0]
        assert again.tokens.tolist() == exact[0].tokens.tolist() and again.finish_reason == "length", engine


class IdTokenizer:
    """Maps a text of space-separated ids to those ids; enough to drive stop strings."""

    eos_token_id = EOS

    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_stop_strings_end_generation_and_cut_text(llama_sampler):
    prompt = " ".join(map(str, varied_prompts(lengths=(5,))[0]))
    sampler = Sampler(llama_sampler.config, llama_sampler.params, IdTokenizer())
    full = sampler.generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
    stop = " ".join(map(str, full.tokens[4:6]))  # a two-token stop sequence
    cut = sampler.generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.tokens.tolist() == full.tokens[:6].tolist()
    assert cut.text == full.text[:full.text.index(stop)]


@pytest.mark.parametrize("engine", ["static", "inflight"])
def test_a_stop_across_tokens_ends_the_row_while_generating(llama_sampler, engine):
    """A stop that starts inside a token ('5 6' in the text '15 6' of ids 15, 6; not the ids 5, 6) ends the
    row at the token that completes it, while generating: the raw tokens stop there, not at the budget."""
    sampler = Sampler(llama_sampler.config, llama_sampler.params, IdTokenizer())
    prompt = varied_prompts(lengths=(5,))[0]
    tokens = sampler.generate_tokens([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True))[0].tokens.tolist()
    i = next(i for i in range(1, len(tokens)) if tokens[i - 1] >= 10)
    stop = f"{tokens[i - 1]} {tokens[i]}"[1:]
    end = next(n for n in range(1, len(tokens) + 1) if stop in " ".join(map(str, tokens[:n])))
    assert end < len(tokens)
    generate = sampler.generate_tokens if engine == "static" else sampler.generate_stream
    cut = generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,)))[0]
    assert (cut.tokens.tolist(), cut.finish_reason) == (tokens[:end], "stop")


def test_a_stop_found_only_in_the_text_trims_the_tokens(llama_sampler):
    """`with_text` on a generation made without its stop: ids 15, 6 decode to '15 6', which holds the stop
    '5 6': the tokens are trimmed to the one that completed it, so cost counts what was kept."""
    sampler = Sampler(llama_sampler.config, llama_sampler.params, IdTokenizer())
    generation = Generation(np.array([9, 15, 6, 7, 8], np.int32), np.arange(5, dtype=np.float32), "length")
    cut = sampler.with_text(generation, stop=("7 8", "5 6"))
    assert (cut.tokens.tolist(), cut.logprobs.tolist(), cut.finish_reason, cut.text) == ([9, 15, 6], [0, 1, 2],
                                                                                       "stop", "9 1")
    kept = sampler.with_text(generation, stop=("6 9",))
    assert (kept.tokens.tolist(), kept.finish_reason, kept.text) == ([9, 15, 6, 7, 8], "length", "9 15 6 7 8")


def test_stop_tables_eos_and_top_k_are_bucketed(llama_sampler):
    """Greedy requests with different stop tables, ignore_eos or not and any top_k share one program;
    sampled top_k 3 and 4 share the bucket 4. JAX's own cache grows by what `compiled_shapes` records."""
    sampler = Sampler(llama_sampler.config, llama_sampler.params, IdTokenizer())
    prompts = varied_prompts(lengths=(3, 7, 12, 5, 9))  # a batch bucket (6) no other test compiles
    before = generate_arrays._cache_size()
    for stop, ignore_eos, top_k in [((), False, 0), (("7",), True, 5), (("7 9", "3 4 5"), False, 1),
                                    (("1", "2", "3"), True, 0)]:
        sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=8, stop=stop, ignore_eos=ignore_eos,
                                                        top_k=top_k))
    assert generate_arrays._cache_size() - before == len(sampler.compiled_shapes) == 1
    for top_k in (3, 4):
        sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=top_k))
    assert generate_arrays._cache_size() - before == len(sampler.compiled_shapes) == 2


def test_shape_buckets_bound_compilations(llama_sampler):
    rng = np.random.RandomState(0)
    sampler = Sampler(llama_sampler.config, llama_sampler.params, eos_ids=[EOS])
    before = generate_arrays._cache_size()
    raw_shapes = set()
    for _ in range(40):
        batch, longest, budget = rng.randint(1, 9), rng.randint(1, 31), rng.randint(1, 17)
        prompts = [list(rng.randint(3, 256, rng.randint(1, longest + 1))) for _ in range(batch - 1)]
        prompts.append(list(rng.randint(3, 256, longest)))
        raw_shapes.add((batch, longest, budget))
        sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=int(budget)))
    # batch in {1, 2, 3, 4, 6, 8} x prompt bucket in {16, 20, 24, 28, 32} x budget bucket {16}
    assert generate_arrays._cache_size() - before <= len(sampler.compiled_shapes) <= 30 < len(raw_shapes)
    assert pow2_bucket(5) == 8 and pow2_bucket(5, 16) == 16 and pow2_bucket(16) == 16
    assert [fine_bucket(n, 16) for n in (3, 17, 52, 65)] == [16, 20, 56, 80]
    assert [fine_bucket(n, steps_per_octave=2) for n in (3, 5, 27, 37)] == [3, 6, 32, 48]


def test_batches_beyond_the_largest_bucket_are_chunked(llama_sampler):
    prompts = varied_prompts(lengths=(4,) * 5)
    small = Sampler(llama_sampler.config, llama_sampler.params, eos_ids=[EOS], max_batch=2)
    together = llama_sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=8))
    chunked = small.generate_tokens(prompts, SamplingParams(max_new_tokens=8))
    assert [g.tokens.tolist() for g in chunked] == [g.tokens.tolist() for g in together]


def test_a_batch_runs_in_a_compiled_program_of_up_to_four_times_its_rows(llama_sampler):
    """Padding rows are masked, so a batch reuses a compiled larger bucket (same tokens) rather than compile
    its own; one more than 4x its rows away is not reused."""
    sampler = Sampler(llama_sampler.config, llama_sampler.params, eos_ids=[EOS], min_prompt_bucket=44)  # own programs
    prompts, sampling = varied_prompts(seed=5, lengths=tuple(range(3, 23))), SamplingParams(max_new_tokens=6)
    alone = sampler.generate_tokens(prompts[:13], sampling)  # bucket 16
    before = generate_arrays._cache_size()
    whole = sampler.generate_tokens(prompts, sampling)  # bucket 24
    assert generate_arrays._cache_size() == before + 1
    assert [g.tokens.tolist() for g in whole[:13]] == [g.tokens.tolist() for g in alone]
    again = sampler.generate_tokens(prompts[:11], sampling)  # bucket 12: runs at 16, compiled
    assert [g.tokens.tolist() for g in again] == [g.tokens.tolist() for g in alone[:11]]
    sampler.generate_tokens(prompts[:3], sampling)  # bucket 3: 16 is more than 4x its rows
    assert generate_arrays._cache_size() == before + 2
    assert sorted(key[0][0] for key in sampler.compiled_shapes) == [3, 16, 24]


def test_prompt_longer_than_context_is_refused(llama_sampler):
    limit = llama_sampler.config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match=f"exceeds the model's context of {limit}.*Shorten the prompt"):
        llama_sampler.generate_tokens([[5] * (limit - 3)], SamplingParams(max_new_tokens=8))


def test_bad_sampling_parameters_are_named():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1.0)
