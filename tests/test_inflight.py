"""In-flight batching: greedy rows make exactly what one-at-a-time `Sampler.generate_tokens` makes, sampled
rows depend on their own seed only, and a varied stream compiles a bounded number of programs."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from hrjax.generate.inflight import InflightEngine, InflightError, compiled_program_count
from hrjax.generate.sampler import Sampler, SamplingParams
from hrjax.models.decoder import Decoder, DecoderConfig
from hrjax.models.hf import load_hf
from hrjax.parallel import make_mesh
from test_sampler import IdTokenizer

EOS = 2


def reference_sampler(sampler, max_new_tokens, longest_prompt=64):
    """The same model, tokenizer and EOS ids with minimum buckets that cover every request: one-at-a-time
    reference runs then share a few compiled programs (buckets do not change what decoding makes)."""
    return Sampler(sampler.config, sampler.params, sampler.tokenizer, eos_ids=sampler.eos_ids,
                   min_prompt_bucket=longest_prompt, min_budget_bucket=max_new_tokens)


def one_at_a_time(sampler, prompts, samplings):
    return [sampler.generate_tokens([p], s)[0] for p, s in zip(prompts, samplings)]


def assert_same_greedy(ours, theirs, atol=1e-5):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a.tokens.tolist(), a.finish_reason) == (b.tokens.tolist(), b.finish_reason), f"prompt {i}"
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol, err_msg=f"prompt {i}")


NEVER_MADE = "300 301"  # beyond the tiny vocabulary


def mixed_stream(lm, num_prompts, max_len, budgets, seed=0):
    """(sampler, prompts, samplings): varied lengths and budgets; per row of four: a two-token stop string
    taken from the row's own greedy text (so it fires) beside a one-token one, two random stop strings,
    the same with ignore_eos, plain. A second EOS id is a token that a fair share of the rows make, so EOS
    ends rows too. Every stop table has one shape and the free-running probe is the reference's
    ignore_eos program, so the reference compiles three programs."""
    rng = np.random.RandomState(seed)
    prompts = [list(rng.randint(3, 256, rng.randint(1, max_len + 1))) for _ in range(num_prompts)]
    probe = reference_sampler(Sampler(lm.config, lm.params, IdTokenizer(), eos_ids=[EOS]), budgets[1])
    free_runs = [g.tokens for g in one_at_a_time(probe, prompts, [SamplingParams(
        budgets[1], ignore_eos=True, stop=(NEVER_MADE, NEVER_MADE))] * num_prompts)]
    rows_with = {t: sum(t in run[:32] for run in free_runs) for t in range(3, 256)}
    eos = min(rows_with, key=lambda t: abs(rows_with[t] - num_prompts // 4))
    samplings = []
    for i, run in enumerate(free_runs):
        budget = int(rng.randint(budgets[0], budgets[1] + 1))
        at = rng.randint(0, budget - 1)
        pair = f"{run[at]} {run[at + 1]}"
        kind = i % 4
        one, two = str(rng.randint(3, 256)), " ".join(map(str, rng.randint(3, 256, 2)))
        stop = () if kind == 3 else (pair, one) if kind == 0 else (one, two)
        samplings.append(SamplingParams(max_new_tokens=budget, stop=stop, ignore_eos=kind == 2))
    return Sampler(lm.config, lm.params, IdTokenizer(), eos_ids=[EOS, eos]), prompts, samplings


@pytest.mark.parametrize("arch, num_prompts, max_len, budgets",
                         [("llama", 64, 32, (4, 128)), ("mistral", 16, 16, (4, 48))])
def test_greedy_stream_matches_one_at_a_time(tiny_decoder, arch, num_prompts, max_len, budgets):
    """64 prompts through 4 slots, so slots are refilled many times (Mistral: sliding windows of 5
    positions over a ring of columns)."""
    sampler, prompts, samplings = mixed_stream(load_hf(tiny_decoder(arch)[0]), num_prompts, max_len, budgets)
    ours = InflightEngine(sampler, slots=4).generate_stream(prompts, samplings)
    theirs = one_at_a_time(reference_sampler(sampler, budgets[1]), prompts, samplings)
    assert_same_greedy(ours, theirs)
    reasons = [g.finish_reason for g in theirs]
    assert {"stop", "eos", "length"} <= set(reasons), reasons
    assert len({len(g.tokens) for g in theirs}) > num_prompts // 3  # rows end at many different steps


def test_incremental_stream_grows_capacity_and_bounds_compilations():
    """Requests arrive in two waves through submit/step, the second needing more room (longer prompts,
    budgets and stop strings) while rows of the first still run; every greedy row still matches
    one-at-a-time generation, sampled rows depend on their own seed only, and JAX compiles a bounded
    number of programs (a fresh model config, so every compilation is counted)."""
    config = DecoderConfig(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=48, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=512)
    params = Decoder(config).init(jax.random.PRNGKey(0), *(np.ones((1, 1), np.int32),) * 2, np.ones((1, 1), bool))
    sampler = Sampler(config, params, IdTokenizer(), eos_ids=[EOS])
    rng = np.random.RandomState(5)
    before = compiled_program_count()
    engine = InflightEngine(sampler, slots=4, steps_per_dispatch=8)
    requests, finished, raw_shapes = {}, {}, set()
    for wave, (max_len, max_budget) in enumerate([(12, 16), (24, 64)]):
        for _ in range(20):
            prompt = list(rng.randint(3, 256, rng.randint(1, max_len + 1)))
            stop = (" ".join(map(str, rng.randint(3, 256, 3))),) * wave  # [1, 3] tables in the second wave
            sampling = SamplingParams(max_new_tokens=int(rng.randint(1, max_budget + 1)), stop=stop,
                                      temperature=float(rng.choice([0.0, 0.0, 1.0])), top_k=int(rng.choice([0, 50])),
                                      seed=int(rng.randint(100)))
            requests[engine.submit(prompt, sampling)] = (prompt, sampling)
            raw_shapes.add((len(prompt), sampling.max_new_tokens))
        for _ in range(3):
            finished.update(engine.step())
    assert len(finished) < 40 and not engine.idle  # rows of both waves still running
    finished.update(engine.run_until_idle())
    assert engine.idle and sorted(finished) == sorted(requests)
    compiled = compiled_program_count() - before
    # k in {1, 4} admission groups; first capacity: P = 16, decode; grown: P in {16, 24}, decode
    assert compiled == len(engine.compiled_shapes) <= 2 * 1 + 1 + 2 * 2 + 1 < len(raw_shapes)

    greedy = [h for h, (_, s) in requests.items() if s.greedy]
    reference = one_at_a_time(reference_sampler(sampler, 64), *zip(*(requests[h] for h in greedy)))
    assert_same_greedy([finished[h] for h in greedy], reference)

    handle, (prompt, sampled) = next((h, r) for h, r in requests.items()
                                     if not r[1].greedy and len(finished[h].tokens) > 8)
    alone = engine.generate_stream([prompt], sampled)[0]  # another slot, ring column and batch-mates
    np.testing.assert_array_equal(alone.tokens, finished[handle].tokens)
    np.testing.assert_allclose(alone.logprobs, finished[handle].logprobs, atol=1e-5)
    other_seed = engine.generate_stream([prompt], dataclasses.replace(sampled, seed=sampled.seed + 1))[0]
    top1 = engine.generate_stream([prompt], dataclasses.replace(sampled, top_k=1))[0]
    greedy_alone = engine.generate_stream([prompt], dataclasses.replace(sampled, temperature=0.0))[0]
    assert other_seed.tokens.tolist() != alone.tokens.tolist() != greedy_alone.tokens.tolist()
    np.testing.assert_array_equal(top1.tokens, greedy_alone.tokens)


@pytest.fixture(scope="module")
def llama(tiny_decoder):
    lm = load_hf(tiny_decoder("llama")[0])
    return Sampler(lm.config, lm.params, IdTokenizer(), eos_ids=[EOS])


def test_slots_follow_the_load(llama):
    """A lone request decodes at S = 1, a burst grows S to hold it, and the long row left after the burst
    goes back to S = 1; the rows make the one-at-a-time tokens through every resize."""
    engine = InflightEngine(llama, slots=16, steps_per_dispatch=4)
    long, short = SamplingParams(max_new_tokens=40, ignore_eos=True), SamplingParams(max_new_tokens=6,
                                                                                     ignore_eos=True)
    requests = {engine.submit([7, 8, 9], long): ([7, 8, 9], long)}
    finished = dict(engine.step())
    assert engine.slots == 1 and engine._state.key_positions.shape[0] == 1
    for i in range(5):
        requests[engine.submit([11 + i, 3, 50 + i], short)] = ([11 + i, 3, 50 + i], short)
    finished.update(engine.step())
    assert engine.slots == 16  # 1 running + 5 waiting -> the next power of four
    for _ in range(20):  # bounded
        if len(finished) == 6 or engine.slots == 1:
            break
        finished.update(engine.step())
    assert len(finished) == 5 and engine.slots == 1  # the five short rows are done: the long one runs alone
    finished.update(engine.run_until_idle())
    reference = one_at_a_time(reference_sampler(llama, 64), *zip(*requests.values()))
    assert_same_greedy([finished[h] for h in requests], reference)


def test_a_live_step_answers_a_finished_row_at_once_and_runs_short_while_slots_are_free(llama):
    engine = InflightEngine(llama, slots=4, steps_per_dispatch=16)
    long, short = SamplingParams(max_new_tokens=60, ignore_eos=True), SamplingParams(max_new_tokens=3,
                                                                                     ignore_eos=True)
    first = engine.submit([7, 8, 9], long)
    engine.submit([1, 2], long)
    engine.submit([4], long)
    quick = engine.submit([5, 6], short)

    def generated(handle):
        slot = next(s for s, o in enumerate(engine._occupant) if o is not None and o.handle == handle)
        return int(engine._state.rows.count[slot])
    assert [h for h, _ in engine.step()] == [quick]  # left at the short row's end, not after 16 steps
    assert generated(first) == 3 and engine.slots == 4
    for _ in range(3):  # a slot free: a quarter of the steps per dispatch
        before = generated(first)
        assert engine.step() == [] and generated(first) - before == 16 // 4
    engine.submit([6, 6], long)
    before = generated(first)
    assert engine.step() == [] and generated(first) - before == 16  # every slot busy: whole dispatches


def test_cancelled_requests_free_their_slots_and_leave_the_others_unchanged(llama):
    """A cancelled running row frees its slot at the next step (a waiting request takes it), a cancelled
    waiting one is never admitted, neither is reported, and the rest make their one-at-a-time tokens."""
    engine = InflightEngine(llama, slots=2, steps_per_dispatch=2)
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = {engine.submit([5 + i, 9, 4], long): [5 + i, 9, 4] for i in range(4)}
    handles = list(prompts)
    assert engine.step() == [] and engine.slots == 2  # the first two run, two wait
    engine.cancel(handles[0])  # running
    engine.cancel(handles[3])  # waiting
    assert engine.step() == []
    running = {o.handle for o in engine._occupant if o is not None}
    assert running == {handles[1], handles[2]}  # the freed slot went to the waiting request not cancelled
    finished = dict(engine.run_until_idle())
    assert sorted(finished) == handles[1:3] and engine.idle and not engine._waiting
    reference = one_at_a_time(reference_sampler(llama, 64), [prompts[h] for h in handles[1:3]], [long] * 2)
    assert_same_greedy([finished[h] for h in handles[1:3]], reference)


def test_the_prompt_cache_skips_the_prefill_of_repeated_prompts_and_changes_no_token(llama):
    """60 requests over 10 prompts (three prompt buckets), greedy and seeded sampled rows, arriving in waves,
    through an engine keeping 3 prompts per bucket (so entries are evicted and reused): each row makes the
    tokens it makes without the cache, and greedy ones those of one-at-a-time generation."""
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(3, 256, n)) for n in (3, 5, 9, 14, 20, 30, 31, 2, 17, 40)]
    requests = []
    for i in range(60):
        prompt = prompts[int(rng.randint(len(prompts)))]
        sampled = i % 3 == 0
        requests.append((prompt, SamplingParams(max_new_tokens=int(rng.randint(1, 24)), temperature=1.0 if sampled
                                                else 0.0, seed=int(rng.randint(100)), stop=("9 9",) * (i % 2))))

    def run(engine):
        handles, finished = [], {}
        for wave in range(0, len(requests), 12):
            handles += [engine.submit(*r) for r in requests[wave:wave + 12]]
            finished.update(engine.step())
        finished.update(engine.run_until_idle())
        return [finished[h] for h in handles]
    cached = InflightEngine(llama, slots=8, steps_per_dispatch=4, prompt_cache=3)
    with_cache, without = run(cached), run(InflightEngine(llama, slots=8, steps_per_dispatch=4))
    assert 10 < cached.prompt_cache_hits < 60 - 10  # prompts were reused, and entries evicted
    assert any(key[0] == "place" for key in cached.compiled_shapes)
    for i, (a, b) in enumerate(zip(with_cache, without)):
        assert (a.tokens.tolist(), a.finish_reason) == (b.tokens.tolist(), b.finish_reason), f"request {i}"
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, err_msg=f"request {i}")
    greedy = [i for i, (_, s) in enumerate(requests) if s.greedy]
    reference = one_at_a_time(reference_sampler(llama, 32), *zip(*(requests[i] for i in greedy)))
    assert_same_greedy([with_cache[i] for i in greedy], reference)


def test_a_varied_stream_compiles_few_programs_and_a_second_process_none(tiny_decoder, tmp_path):
    """200 varied requests (tests/compile_cache_run.py) compile at most 3 decode programs (S = 1, 4, 16), 24
    admission programs (k <= S in {1, 4, 16} x 4 prompt buckets) and 6 resizes, as JAX counts them; a second
    process with the same compilation cache compiles none and makes the same tokens."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "compile_cache_run.py", str(tiny_decoder("llama")[0]),
                               str(tmp_path / "xla")], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["programs"] == first["recorded"] <= 3 + 24 + 6, first
    assert first["misses"] >= first["programs"] and first["hits"] == 0, first
    assert second["misses"] == 0 and second["hits"] >= first["programs"], second
    assert second["tokens"] == first["tokens"]


def test_bad_requests_are_named(llama):
    engine = InflightEngine(llama, slots=2)
    with pytest.raises(ValueError, match="Prompt 0 is empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(InflightError, match="one per prompt"):
        engine.generate_stream([[5], [6]], [SamplingParams()] * 3)
    engine.submit([5, 6], SamplingParams(max_new_tokens=3))
    with pytest.raises(InflightError, match="idle engine"):
        engine.generate_stream([[5]])
    sharded = Sampler(llama.config, llama.params, eos_ids=[EOS], mesh=make_mesh())
    with pytest.raises(InflightError, match="runs unsharded for now"):
        InflightEngine(sharded)


@pytest.fixture(scope="module")
def smollm2():
    from hrjax import assets
    from hrjax.errors import CheckpointError
    from hrjax.models.gguf import load_gguf

    try:
        path = assets.smollm2_gguf_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    return load_gguf(path)


QUESTIONS = ("What is 17 + 25?", "Name the capital of France.", "Write a haiku about the sea.",
             "List three prime numbers greater than ten.", "Why is the sky blue?", "Say hello in Spanish.")


@pytest.mark.parametrize("num_prompts, max_budget", [
    (12, 32), pytest.param(64, 128, marks=pytest.mark.skipif(not os.environ.get("HRJAX_LONG_TESTS"),
                                                            reason="about 2 minutes: set HRJAX_LONG_TESTS=1"))])
def test_smollm2_stream_matches_one_at_a_time(smollm2, num_prompts, max_budget):
    """Chat prompts, budgets 4..max_budget, mixed stop strings, 4 slots. CI runs 12 prompts; the acceptance
    stream of 64 prompts with budgets 4..128 runs with HRJAX_LONG_TESTS=1."""
    tokenizer = smollm2.tokenizer
    sampler = Sampler.from_loaded(smollm2)
    rng = np.random.RandomState(0)
    prompts, samplings = [], []
    stops = ((".", "\n"), (" the", "!"), ("\n\n", ","))
    for i in range(num_prompts):
        text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                             add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text + "x" * (i // len(QUESTIONS)), add_special_tokens=False))
        samplings.append(SamplingParams(max_new_tokens=int(rng.randint(4, max_budget + 1)), stop=stops[i % 3]))
    ours = InflightEngine(sampler, slots=4).generate_stream(prompts, samplings)
    theirs = one_at_a_time(reference_sampler(sampler, max_budget), prompts, samplings)
    assert_same_greedy(ours, theirs, atol=1e-4)
    assert "stop" in {g.finish_reason for g in theirs}
    # rows ended on the text while generating: trimming the text afterwards cuts no token
    assert [len(sampler.with_text(g, s.stop).tokens) for g, s in zip(ours, samplings)] == [len(g.tokens) for g in ours]
