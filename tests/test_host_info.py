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
