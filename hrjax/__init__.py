"""hrjax: JAX-native reinforcement learning for hierarchical routing of small language models."""

from hrjax.logs import filter_library_noise

filter_library_noise()
