"""Process-level JAX runtime switches that must be set before the first JAX computation."""

from __future__ import annotations

import os

# XLA:CPU hands matmuls to YNNPACK by default: fastest at large batch, but it accumulates with
# about twice the float32 rounding error of torch's sgemm (SmolLM2-135M logits: 1.5e-4 vs 7e-5
# max |delta| against transformers). Turning that library fusion off restores sgemm-like rounding.
PRECISE_CPU_MATMUL_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


# LLVM's -O2 instead of XLA's default -O3 for the code it generates. On a 2-core Intel host the main job's
# programs compiled faster with the same run time: the 9-run tree-mode sweep program in 7.0 s against
# 11.5-11.9 s (runs 22.9-23.6 s either way), the path tree's 8 sampler programs in 9.7 s against 11.1 s
# (the tree bit-identical). The main job compiles dozens of programs and runs most of them briefly.
QUICK_COMPILE_FLAG = "--xla_backend_optimization_level=2"

# Compiler options for a program that runs once (an initialisation): without LLVM's optimisations it
# compiles in a fraction of the time (the SFT init 1.9 s against 6.2 s on a 2-core host; 3 tree-mode
# runs' init 2.7 s against 4.1 s on one AVX2 core).
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _add_xla_flag(flag: str, caller: str) -> None:
    """Appends `flag` to XLA_FLAGS (child processes inherit it) unless XLA_FLAGS already sets that option."""
    import jax._src.xla_bridge as xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(f"{caller}() must be called before the first JAX computation; "
                           "call it at the top of your entry point.")
    flags = os.environ.get("XLA_FLAGS", "")
    if not any(f.split("=")[0] == flag.split("=")[0] for f in flags.split()):
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def use_precise_cpu_matmuls() -> None:
    """Routes XLA:CPU matmuls away from YNNPACK (tighter float32 rounding, slower at batch 64).

    Must run before JAX creates its CPU backend; raises RuntimeError otherwise.
    """
    _add_xla_flag(PRECISE_CPU_MATMUL_FLAG, "use_precise_cpu_matmuls")


def use_quick_compiles() -> None:
    """XLA's code generation at LLVM -O2 (`QUICK_COMPILE_FLAG`) for this process and the children it
    starts, unless XLA_FLAGS already sets the level: for jobs that compile many programs and run most of
    them briefly (the main job). Measured on CPU hosts only; on a GPU the level also applies to the
    kernels XLA generates. Must run before JAX creates its backend; raises RuntimeError otherwise."""
    _add_xla_flag(QUICK_COMPILE_FLAG, "use_quick_compiles")


def use_compilation_cache(directory: str | os.PathLike) -> None:
    """JAX's persistent compilation cache in `directory`: a program that took over a second to compile
    is stored there and loaded, not compiled again, by later runs (a resumed run, the next seed, every
    process of a job on one host). A JAX_COMPILATION_CACHE_DIR set by the user wins. Must run before
    the first compilation (JAX decides once per process whether it uses the cache)."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(directory))
