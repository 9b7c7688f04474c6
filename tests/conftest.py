"""Shared fixtures: tiny random checkpoints (made once per session) and the test environment."""

import gc
import sys
from pathlib import Path

import jax
import pytest

from hrjax.runtime import use_precise_cpu_matmuls, use_quick_compiles

# Parity targets are 1e-4 in float32: use sgemm-like matmul rounding (see hrjax/runtime.py).
use_precise_cpu_matmuls()
# The suite compiles thousands of programs and runs most of them briefly: LLVM -O2, as the main job does (the
# test processes' children inherit it). test_sampler + test_tree_learning took 164 s against 189 s at -O3.
use_quick_compiles()
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import DECODER_ARCHS, make_tiny_decoder, make_tiny_pool_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """arch -> (checkpoint dir, torch reference model); each made on first use."""
    made = {}

    def get(arch):
        if arch not in made:
            out = tmp_path_factory.mktemp(f"tiny_{arch}")
            made[arch] = (out, make_tiny_decoder(arch, out))
        return made[arch]

    return get


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drops JAX's compiled programs after each test module. Every XLA:CPU program holds about a dozen
    memory maps until it is freed; the suite in one process compiles thousands, and past the kernel's
    `vm.max_map_count` (65530 by default) the next compilation segfaults inside XLA."""
    yield
    jax.clear_caches()
    gc.collect()


QUICKSTART_FIXTURE = "reduced_quickstart"
# The test files that use it (a check below keeps this list whole): under pytest-xdist they run on one worker
QUICKSTART_FILES = ("test_evaluate.py", "test_export.py", "test_pipeline_speed.py", "test_quickstart.py",
                    "test_serve.py", "test_trade_offs.py")


# Under pytest-xdist these start right after QUICKSTART_FILES (their tests were the longest on a 2-core host),
# so that no long file starts last while the other worker idles
LONG_FILES = ("test_parallel.py", "test_multihost.py", "test_train.py", "test_sharded_sampler.py", "test_inflight.py",
              "test_gguf.py", "test_real_pool.py")


def pytest_collection_modifyitems(config, items):
    """Checks QUICKSTART_FILES; orders the files QUICKSTART_FILES, LONG_FILES, then the rest (each file's tests
    in their order): the order in which pytest-xdist hands them out."""
    order = {name: rank for rank, name in enumerate((*QUICKSTART_FILES, *LONG_FILES))}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))
    strays = sorted({item.path.name for item in items if QUICKSTART_FIXTURE in getattr(item, "fixturenames", ())
                     and item.path.name not in QUICKSTART_FILES})
    if strays:
        raise pytest.UsageError(f"{strays} use the {QUICKSTART_FIXTURE} fixture: add them to QUICKSTART_FILES in "
                                "tests/conftest.py, so that pytest-xdist runs them on the worker that makes it.")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """The README's test command runs the suite on pytest-xdist workers, one test file at a time per worker
    (its module fixtures made once), the QUICKSTART_FILES together as one unit (the reduced main job, minutes
    to make, made once), in collection order (`pytest_collection_modifyitems`: the longest first)."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # else the units go out by their number of tests

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "quickstart" if path.rsplit("/", 1)[-1] in QUICKSTART_FILES else path

    return FileScheduling(config, log)


def pytest_generate_tests(metafunc):
    if "decoder_arch" in metafunc.fixturenames:
        metafunc.parametrize("decoder_arch", DECODER_ARCHS)


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory):
    """A pool of two tiny random Llamas over MiniLM's vocabulary, plus the data and cache dirs the
    training runs of the tests share (see tests/runs.py)."""
    from hrjax import assets

    root = tmp_path_factory.mktemp("tiny_pool")
    pool = [dict(name=f"tiny-{i}", checkpoint=str(make_tiny_pool_model(root / f"tiny-{i}", assets.minilm_path(), i)),
                 base_rate=float(i + 1), use_chat_template=False) for i in range(2)]
    return dict(pool=pool, data_dir=str(root / "data"), cache_dir=str(root / "cache"))


@pytest.fixture(scope="session")
def reduced_quickstart(tmp_path_factory):
    """The main job reduced (specialist world: add, mul and paren experts; add + paren prompts; 3 seeds),
    run once per session: (the config's directory root, the `EvaluationRun`). Tests that need a trained
    router on the specialist world (the quickstart's claims, export, serving) share it."""
    from runs import reduced_specialist_config

    from hrjax.pipeline import evaluate_run

    root = tmp_path_factory.mktemp("quickstart")
    return root, evaluate_run(reduced_specialist_config(root), root / "run", progress=False)


@pytest.fixture(scope="session")
def quickstart_bundle(reduced_quickstart, tmp_path_factory):
    """The serving bundle of the reduced main job's router (`hrjax export`), exported once per session
    for the export and serving tests; tests that change a bundle change a copy."""
    from hrjax.export import export_bundle

    root, _ = reduced_quickstart
    return export_bundle(root / "run", tmp_path_factory.mktemp("bundle") / "b", progress=False)
