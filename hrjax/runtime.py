"""Process-level JAX runtime switches that must be set before the first JAX computation."""

from __future__ import annotations

import os

# XLA:CPU hands matmuls to YNNPACK by default: fastest at large batch, but it accumulates with
# about twice the float32 rounding error of torch's sgemm (SmolLM2-135M logits: 1.5e-4 vs 7e-5
# max |delta| against transformers). Turning that library fusion off restores sgemm-like rounding.
PRECISE_CPU_MATMUL_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def use_precise_cpu_matmuls() -> None:
    """Routes XLA:CPU matmuls away from YNNPACK (tighter float32 rounding, slower at batch 64).

    Must run before JAX creates its CPU backend; raises RuntimeError otherwise.
    """
    import jax._src.xla_bridge as xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("use_precise_cpu_matmuls() must be called before the first JAX computation; "
                           "call it at the top of your entry point.")
    flags = os.environ.get("XLA_FLAGS", "")
    if PRECISE_CPU_MATMUL_FLAG not in flags.split():
        os.environ["XLA_FLAGS"] = f"{flags} {PRECISE_CPU_MATMUL_FLAG}".strip()


def use_compilation_cache(directory: str | os.PathLike) -> None:
    """JAX's persistent compilation cache in `directory`: a program that took over a second to compile
    is stored there and loaded, not compiled again, by later runs (a resumed run, the next seed, every
    process of a job on one host). A JAX_COMPILATION_CACHE_DIR set by the user wins. Must run before
    the first compilation (JAX decides once per process whether it uses the cache)."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(directory))
