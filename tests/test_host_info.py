"""What a benchmark line says about its machine: the matmul kernel is read from what XLA compiled."""

import json
import os
import subprocess
import sys

import pytest

from hrjax.benchmarks.common import host_isa
from hrjax.runtime import PRECISE_CPU_MATMUL_FLAG


def _host_info_with(xla_flags: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", "import json; from hrjax.benchmarks.common import host_info; "
                           "print(json.dumps(host_info()))"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# jaxlib 0.10's XLA:CPU runs float32 dots through YNNPACK unless told otherwise (constraints.txt pins it).
@pytest.mark.parametrize("flags, kernel", [("", "ynnpack"), (PRECISE_CPU_MATMUL_FLAG, "xla")])
def test_host_info_names_the_matmul_library_xla_compiled(flags, kernel):
    assert _host_info_with(flags) == {"host_isa": host_isa(), "matmul_kernel": kernel}


QUICK_COMPILES = """
import os, jax, jax.numpy as jnp
from hrjax.runtime import use_quick_compiles
use_quick_compiles()
print(os.environ["XLA_FLAGS"])
print(float(jax.jit(lambda x: x.sum())(jnp.ones(3))))
try:
    use_quick_compiles()
except RuntimeError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("flags, expected", [
    ("", "--xla_backend_optimization_level=2"),
    ("--xla_backend_optimization_level=1", "--xla_backend_optimization_level=1"),  # the user's level is kept
    (PRECISE_CPU_MATMUL_FLAG, f"{PRECISE_CPU_MATMUL_FLAG} --xla_backend_optimization_level=2")])
def test_quick_compiles_set_the_llvm_level_before_jax_starts_and_refuse_after(flags, expected):
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", QUICK_COMPILES], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[:2] == [expected, "3.0"]
    assert lines[2].startswith("refused: use_quick_compiles() must be called before the first JAX computation")
