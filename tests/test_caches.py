"""What is stored between runs: atomic files (mode, stale temp files), the response cache (sqlite,
several writers), model fingerprints, path-tree keys, chunked tree builds (SIGKILL) and prompt budgets."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from hrjax import assets
from hrjax.env.cache import ResponseCache
from hrjax.errors import HrjaxError
from hrjax.fsutil import atomic_directory, atomic_file
from tiny_models import make_tiny_pool_model

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------------------------
# Atomic files: the umask decides the mode; temp files of dead writers are swept, live ones kept.


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_respect_the_umask(umask, file_mode, dir_mode, tmp_path):
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "report.md", "w") as f:
            f.write("# report\n")
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "model" / "config.json").stat().st_mode) == file_mode


WRITER = """
    import os, signal, sys
    from hrjax.fsutil import atomic_file

    with atomic_file(sys.argv[1], "w") as f:
        f.write("half of it")
        f.flush()
        print("writing", flush=True)
        if sys.argv[2] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()  # a live writer, still inside its write
        f.write(" and the rest")
    print("done", flush=True)
"""


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp." in p.name)


def test_stale_temp_files_are_swept_but_never_a_live_writers(tmp_path):
    dead = run_python(WRITER, tmp_path / "dead.txt", "die")
    assert dead.stdout.readline() == "writing\n" and dead.wait() == -signal.SIGKILL
    (stale,) = temp_files(tmp_path)
    legacy = tmp_path / ".old.npz.tmp.k3j_a9zq"  # the old mkstemp names: swept once a week old
    legacy.write_text("x")
    week_ago = time.time() - 8 * 86400
    os.utime(legacy, (week_ago, week_ago))
    live = run_python(WRITER, tmp_path / "live.txt", "live")
    assert live.stdout.readline() == "writing\n"
    (live_temp,) = [name for name in temp_files(tmp_path) if name.startswith(".live.txt.")]

    with atomic_file(tmp_path / "next.txt", "w") as f:  # the first write into a directory sweeps it
        f.write("x")
    assert temp_files(tmp_path) == [live_temp], f"{stale} (its writer died) should have been swept"
    out, _ = live.communicate("go on\n", timeout=60)
    assert out == "done\n" and (tmp_path / "live.txt").read_text() == "half of it and the rest"
    assert temp_files(tmp_path) == [] and not (tmp_path / "dead.txt").exists()


# ---------------------------------------------------------------------------------------------
# The response cache: indexed on disk (start-up does not grow with it), several writers, atomic flushes.


def fill_cache(directory: Path, n: int, per_flush: int = 500, tokens: int = 64) -> list[str]:
    from hrjax.env.cache import CachedResponse, ResponseCache

    cache, keys = ResponseCache(directory), []
    for i in range(n):
        keys.append(f"{i:064x}")
        cache.put(keys[-1], CachedResponse(tuple(range(i, i + tokens)), f"answer {i}", "eos"))
        if (i + 1) % per_flush == 0:
            cache.flush()
    cache.flush()
    return keys


def test_opening_the_cache_does_not_read_it_whole(tmp_path):
    from hrjax.env.cache import ResponseCache

    keys = fill_cache(tmp_path / "cache", 4000)
    tracemalloc.start()
    try:
        cache = ResponseCache(tmp_path / "cache")
        found = cache.get(keys[1234])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found.tokens == tuple(range(1234, 1298)) and found.text == "answer 1234"
    assert peak < 256 * 1024, f"opening a 4000-entry cache allocated {peak / 2**20:.1f} MiB in Python"
    assert len(cache) == 4000 and cache.get("f" * 64) is None


CACHE_WRITER = """
    import sys
    from hrjax.env.cache import CachedResponse, ResponseCache

    cache, worker = ResponseCache(sys.argv[1]), int(sys.argv[2])
    for i in range(600):
        key = f"shared-{i}" if i % 3 == 0 else f"own-{worker}-{i}"  # every worker writes the shared keys too
        if cache.get(key) is None:
            cache.put(key, CachedResponse((i, i + 1), key, "eos"))
        if i % 20 == 19:
            cache.flush()
    cache.flush()
    print(sum(cache.get(f"shared-{i}") is not None for i in range(0, 600, 3)))
"""


def test_several_processes_write_one_cache(tmp_path):
    from hrjax.env.cache import ResponseCache

    workers = [run_python(CACHE_WRITER, tmp_path / "cache", w) for w in range(3)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0 and out.strip() == "200", err[-2000:]
    cache = ResponseCache(tmp_path / "cache")
    assert len(cache) == 200 + 3 * 400
    for key in ("shared-0", "shared-597", "own-0-1", "own-2-599"):
        assert cache.get(key).text == key


FLUSH_KILLED = """
    import sys
    from hrjax.env.cache import CachedResponse, ResponseCache

    cache = ResponseCache(sys.argv[1])
    for i in range(100):
        cache.put(f"first-{i}", CachedResponse((i,), "x", "eos"))
    cache.flush()
    for i in range(50_000):
        cache.put(f"second-{i}", CachedResponse(tuple(range(32)), "y" * 50, "eos"))
    print("flushing", flush=True)
    cache.flush()
    print("flushed", flush=True)
"""


@pytest.mark.parametrize("delay_s", [0.0, 0.1, 0.3])  # the kill lands before, during or after the commit
def test_a_flush_killed_midway_stores_all_or_nothing(delay_s, tmp_path):
    from hrjax.env.cache import ResponseCache

    child = run_python(FLUSH_KILLED, tmp_path / "cache")
    assert child.stdout.readline() == "flushing\n"
    time.sleep(delay_s)
    child.kill()
    child.wait()
    assert len(ResponseCache(tmp_path / "cache")) in (100, 50_100)


def test_old_jsonl_shards_are_ignored_with_a_warning(tmp_path, caplog):
    from hrjax.env.cache import ResponseCache

    (tmp_path / "shard-00000000000000000001-1.jsonl").write_text(
        json.dumps({"key": "k", "tokens": [1, 2], "text": "old", "finish_reason": "eos"}) + "\n")
    cache = ResponseCache(tmp_path)
    assert cache.get("k") is None
    assert "1 response-cache shard(s) of an older hrjax" in caplog.text and "Delete them" in caplog.text


# ---------------------------------------------------------------------------------------------
# Model fingerprints: the weights' content and the tokenizer, not the checkpoint's name.


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Two tiny random Llamas over MiniLM's vocabulary (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return [make_tiny_pool_model(root / f"tiny-{i}", assets.minilm_path(), seed=i) for i in range(2)]


def fingerprint(checkpoint, **spec):
    from hrjax.pool import ModelSpec, load_model

    return load_model(ModelSpec("m", str(checkpoint), base_rate=1.0, **spec)).fingerprint


def test_fingerprint_follows_the_weights_content_not_the_path(tiny_checkpoints, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoints[0], model)
    before = fingerprint(model)
    other = (tiny_checkpoints[1] / "model.safetensors").read_bytes()
    with open(model / "model.safetensors", "r+b") as f:  # overwritten in place: same path, size and inode
        f.write(other)
    assert fingerprint(model) != before
    assert fingerprint(model) == fingerprint(tiny_checkpoints[1])  # the same content elsewhere: the same answers


def test_fingerprint_follows_the_tokenizer(tiny_checkpoints, tmp_path):
    from transformers import AutoTokenizer

    cased = AutoTokenizer.from_pretrained(str(tiny_checkpoints[0]), do_lower_case=False)  # same vocabulary
    cased.save_pretrained(tmp_path / "cased")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "cased")).encode("Hi") != cased.encode("hi")
    assert fingerprint(tiny_checkpoints[0], tokenizer=str(tmp_path / "cased")) != fingerprint(tiny_checkpoints[0])


def test_file_digests_are_memoised_until_the_file_changes(tmp_path):
    import hashlib

    from hrjax.pool import FileDigests

    weights = tmp_path / "model.gguf"
    weights.write_bytes(os.urandom(1 << 20))
    truth = hashlib.sha256(weights.read_bytes()).hexdigest()
    first = FileDigests(tmp_path / "digests.json")
    assert first.digest(weights) == truth
    first.save()
    index = json.loads((tmp_path / "digests.json").read_text())
    index[str(weights.resolve())][4] = "remembered"  # proves a later process reads the index, not the file
    (tmp_path / "digests.json").write_text(json.dumps(index))
    assert FileDigests(tmp_path / "digests.json").digest(weights) == "remembered"
    with open(weights, "r+b") as f:  # rewritten in place, same size
        f.write(b"\0" * 16)
    assert FileDigests(tmp_path / "digests.json").digest(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_hub_snapshots_are_fingerprinted_by_their_commit(tiny_checkpoints, tmp_path):
    import shutil

    from hrjax.pool import FileDigests, checkpoint_fingerprint

    snapshots = tmp_path / "models--owner--tiny" / "snapshots"
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_checkpoints[0], snapshots / commit)
    digests = FileDigests()
    assert checkpoint_fingerprint(snapshots / ("a" * 40), digests) == f"hub:models--owner--tiny@{'a' * 40}"
    assert fingerprint(snapshots / ("a" * 40)) != fingerprint(snapshots / ("b" * 40))
    assert not digests.known  # no weight file was read


# ---------------------------------------------------------------------------------------------
# Path trees: keyed by what each example holds; built in flushed chunks; prompt budgets checked first.


def config_of(checkpoints, tmp_path, **env):
    from hrjax.config import base_config, run_config

    config = base_config()
    config.pool = [dict(name=f"tiny-{i}", checkpoint=str(c), base_rate=float(i + 1), use_chat_template=False)
                   for i, c in enumerate(checkpoints)]
    config.train.cache_dir = str(tmp_path / "cache")
    config.env.update(env)
    return run_config(config.to_dict())


def test_tree_key_covers_what_each_example_holds_and_its_scorer_and_official_versions(tiny_checkpoints, tmp_path,
                                                                                     monkeypatch):
    from test_task_datasets import hotpot_orig, write_json

    from hrjax.tasks import official, scorers
    from hrjax.tasks.datasets import load_task
    from hrjax.train import tree_meta

    write_json(tmp_path / "manual" / "hotpot_train_v1.1.json", [hotpot_orig(i, "train") for i in range(4)])
    plain = load_task("hotpotqa", "train", tmp_path / "data", tmp_path / "manual")
    with_context = load_task("hotpotqa", "train", tmp_path / "data", tmp_path / "manual", include_context=True)
    assert [e.id for e in plain] == [e.id for e in with_context]
    config = config_of(tiny_checkpoints, tmp_path)
    key = lambda examples: json.dumps(tree_meta(config, examples), sort_keys=True)  # noqa: E731
    assert key(plain) != key(with_context)
    before = key(plain)
    monkeypatch.setitem(scorers.SCORER_VERSIONS, "f1", scorers.SCORER_VERSIONS["f1"] + 1)  # a scorer fix
    assert key(plain) != before
    before = key(plain)
    monkeypatch.setitem(official.OFFICIAL_VERSIONS, "hotpotqa", official.OFFICIAL_VERSIONS["hotpotqa"] + 1)
    assert key(plain) != before  # an official metric's fix: its family's trees are scored again
    before = key(plain)
    monkeypatch.setitem(official.OFFICIAL_VERSIONS, "gsm8k", official.OFFICIAL_VERSIONS["gsm8k"] + 1)
    assert key(plain) == before  # another family's fix leaves this tree alone


def test_prompts_that_cannot_fit_are_named_before_anything_is_generated(tiny_checkpoints, tmp_path):
    from hrjax.env.cache import ResponseCache
    from hrjax.errors import PromptTooLongError
    from hrjax.tasks.datasets import TaskExample
    from hrjax.train import load_or_build_tree

    config = config_of(tiny_checkpoints, tmp_path, max_new_tokens=48, num_hops=2)  # tiny models: 256-token context
    examples = [TaskExample(f"short/{i}", "t", f"What is {i} plus {i}?", ("x",), "exact", {}) for i in range(3)]
    # hop 0 fits (150 + 48 tokens), hop 1 does not: the question, a 48-token answer and the template, then 48 more
    examples += [TaskExample(f"long/{i}", "t", "word " * (150 + i), ("x",), "exact", {}) for i in range(2)]
    with pytest.raises(PromptTooLongError, match=r"2 of 5 examples .*long/0 needs 2\d\d tokens, model 'tiny-0' has "
                                                 r"256; long/1 .*max_new_tokens or config.env.num_hops"):
        load_or_build_tree(config, examples, progress=False)
    assert len(ResponseCache(tmp_path / "cache" / "responses")) == 0  # nothing was generated


TREE_BUILDER = """
    import sys
    from hrjax.env.cache import ResponseCache
    from hrjax.env.mdp import EnvConfig, RoutingEnv
    from hrjax.env.tree import build_tree
    from hrjax.models.encoder import load_encoder
    from hrjax.pool import ModelSpec, Pool

    cache_dir, log, chunk_size, *checkpoints = sys.argv[1:]
    pool = Pool.from_specs([ModelSpec(f"m{i}", c, base_rate=1.0) for i, c in enumerate(checkpoints)])
    with open(log, "a") as out:
        for model in pool.models:  # logs how many answers each generation call made, once it returned
            def logged(prompts, sampling, generate=model.sampler.generate_tokens):
                generations = generate(prompts, sampling)
                out.write(f"{len(prompts)}\\n")
                out.flush()
                return generations
            model.sampler.generate_tokens = logged
        env = RoutingEnv(pool, load_encoder(None), lambda example, text: 0.0, EnvConfig(num_hops=2, max_new_tokens=4),
                         ResponseCache(cache_dir))
        questions = [f"Question number {i}: what comes next?" for i in range(24)]
        build_tree(env, questions, questions, progress=False, chunk_size=int(chunk_size))
    print("built")
"""


def generated(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


def test_a_killed_tree_build_loses_at_most_one_chunk(tiny_checkpoints, tmp_path):
    """24 prompts x (2 + 4) nodes: answer groups of 24 and 48 per model, chunks of 8."""
    from hrjax.env.cache import ResponseCache

    chunk, log = 8, tmp_path / "generated.log"
    build = lambda: run_python(TREE_BUILDER, tmp_path / "cache", log, chunk, *tiny_checkpoints)  # noqa: E731
    child, deadline = build(), time.time() + 300
    while generated(log) < 60:  # depth 0 (48 answers) done, depth 1 under way
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.002)
    child.kill()
    child.wait()
    made, stored = generated(log), len(ResponseCache(tmp_path / "cache"))
    lost = made - stored  # generated but never flushed
    out, err = build().communicate(timeout=300)
    assert out.strip() == "built", err[-3000:]
    regenerated = generated(log) - made
    total = len(ResponseCache(tmp_path / "cache"))
    print(f"killed after {made} answers: {stored} stored, {lost} lost; the restart generated {regenerated} of {total}")
    assert total == 24 * 6 and regenerated == total - stored  # the restart generated exactly what was not stored
    assert 0 <= lost <= chunk, f"the kill lost {lost} answers, more than one chunk ({chunk})"


def _open_cache(directory, barrier, errors):
    barrier.wait()
    try:
        ResponseCache(directory)
    except HrjaxError as e:
        errors.put(str(e))


def test_processes_opening_a_new_cache_at_once_all_get_it(tmp_path):
    """The processes of a multi-process job on one host open the shared cache together: two asking SQLite
    to switch a new database to WAL at once got 'database is locked' at once (this test failed 3 runs in 3
    before the retry), which killed a 2-process job in CI."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    for trial in range(20):
        barrier = context.Barrier(8)
        processes = [context.Process(target=_open_cache, args=(tmp_path / str(trial), barrier, errors))
                     for _ in range(8)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=120)
            assert p.exitcode == 0
    assert errors.empty(), errors.get()
