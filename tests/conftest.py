"""Shared fixtures: tiny random checkpoints (made once per session) and the test environment."""

import sys
from pathlib import Path

import pytest

from hrjax.runtime import use_precise_cpu_matmuls

# Parity targets are 1e-4 in float32: use sgemm-like matmul rounding (see hrjax/runtime.py).
use_precise_cpu_matmuls()
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import DECODER_ARCHS, make_tiny_decoder  # noqa: E402


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


def pytest_generate_tests(metafunc):
    if "decoder_arch" in metafunc.fixturenames:
        metafunc.parametrize("decoder_arch", DECODER_ARCHS)
