"""Shared fixtures: tiny random checkpoints (made once per session) and the test environment."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "0")

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
