"""Shared measurement helpers for the benchmark scripts (each prints one JSON line)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def experiment_config(name: str, *args, root: Path):
    """`experiments/configs/<name>.py`'s `get_config(*args)` as a frozen `RunConfig`, its data and caches under
    `root` (the benchmark's directory)."""
    from hrjax.config import run_config

    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*args)
    config.train.cache_dir, config.task.data_dir = str(root / "cache"), str(root / "data")
    return run_config(config.to_dict())


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of `fn()` over `repeats` runs (results blocked until ready)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 GFLOP/s of one jitted [size, size] @ [size, size] matmul: the peak we
    measure our other figures against."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    return 2 * size ** 3 / best_seconds(lambda: matmul(a, b), repeats) / 1e9


def host_isa() -> str:
    """The widest x86 vector ISA this host has ('avx512', 'avx2', or the machine type), which decides
    XLA:CPU's and torch's kernels: figures from hosts of different ISAs are not comparable."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine()


def matmul_kernel() -> str:
    """The library XLA runs a float32 matmul with on the default backend, read from a compiled dot:
    'ynnpack', 'xnnpack' or 'onednn' (XLA:CPU's library fusions, chosen by its version and `XLA_FLAGS`),
    a custom call's target, or 'xla' (XLA's own dot: Eigen on CPU)."""
    import re

    a = jnp.ones((64, 256), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(a, a.T).compile().as_text()
    kinds = re.findall(r'"kind":"__(ynn|xnn|onednn)_?\w*"', compiled)
    if kinds:
        return {"ynn": "ynnpack", "xnn": "xnnpack"}.get(kinds[0], kinds[0])
    targets = re.findall(r'custom_call_target="([^"]+)"', compiled)
    return targets[0] if targets else "xla"


def host_info() -> dict:
    """What every benchmark line states about its machine's kernels: `host_isa` and `matmul_kernel`."""
    return {"host_isa": host_isa(), "matmul_kernel": matmul_kernel()}


def random_tree(num_prompts: int, embedding_dim: int, num_models: int, num_hops: int):
    """A path tree of random arrays (throughput does not depend on the values)."""
    from hrjax.env.tree import PathTree, decision_nodes, tree_structure

    model, parent, depth = tree_structure(num_models, num_hops)
    k, d, rng = len(model), decision_nodes(num_models, num_hops), np.random.default_rng(0)
    zeros = np.zeros((num_prompts, k), np.int32)
    return PathTree(rng.normal(size=(num_prompts, embedding_dim)).astype(np.float32),
                    rng.normal(size=(num_prompts, d, embedding_dim)).astype(np.float32), zeros, zeros,
                    rng.uniform(size=(num_prompts, k)).astype(np.float32),
                    rng.uniform(size=(num_prompts, k)).astype(np.float32), model, parent, depth)
