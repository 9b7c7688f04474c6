"""A decoder on a ('data', 'model') device mesh: tensor parallelism over `model`, prompts over `data`.

Megatron-style cuts, declared per parameter in the key map (`hrjax.models.decoder.key_map`, `Rule.split`):
q/k/v and gate/up are split by output columns and o/down by input rows, so each device computes whole
heads and a slice of the MLP and one all-reduce per block joins them; the embedding and LM head are split
by vocabulary rows; norms are whole. The KV cache is split over kv heads like k/v, and over `data` by
prompt. A group whose counts the `model` axis does not divide (e.g. SmolLM2-135M's 9 heads over 2 devices)
stays whole on every device of the axis (replicated) and a warning names the numbers; the rest is still cut.

Shapes: B batch, K kv heads, D head dim, S cache slots.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hrjax.models.decoder import DecoderConfig, abstract_params, key_map, split_sizes
from hrjax.models.keymap import flatten, unflatten
from hrjax.parallel import MeshError

MODEL, DATA = "model", "data"
log = logging.getLogger(__name__)


def cut_groups(config: DecoderConfig, model_size: int) -> dict[str, bool]:
    """Split group -> whether it is cut over a `model` axis of `model_size` devices (every count divides)."""
    return {group: all(n % model_size == 0 for n in sizes.values()) for group, sizes in split_sizes(config).items()}


def replicated_groups(config: DecoderConfig, model_size: int) -> list[str]:
    """One line per split group left whole on a `model` axis of `model_size`, naming the counts."""
    return [f"{group} ({', '.join(f'{k}={v}' for k, v in sizes.items())} not all divisible by {model_size})"
            for group, sizes in split_sizes(config).items() if not cut_groups(config, model_size)[group]]


@functools.lru_cache(maxsize=None)
def param_specs(config: DecoderConfig, model_size: int) -> dict[str, PartitionSpec]:
    """Param path -> its PartitionSpec over a `model` axis of `model_size` devices (from the key map)."""
    cut = cut_groups(config, model_size)
    shapes = flatten(abstract_params(config)["params"])
    specs = {}
    for rule in key_map(config):
        for _, path in rule.expand(config.num_layers):
            if path in shapes:
                spec = [None] * len(shapes[path].shape)
                if rule.split is not None and cut[rule.split.group] and model_size > 1:
                    spec[rule.split.axis] = MODEL
                specs[path] = PartitionSpec(*spec)
    return specs


def _model_size(mesh: Mesh) -> int:
    if MODEL not in mesh.shape or DATA not in mesh.shape:
        raise MeshError(f"A sampler mesh needs axes ('data', 'model'), got {tuple(mesh.axis_names)}: build it with "
                         "hrjax.parallel.make_mesh.")
    return mesh.shape[MODEL]


def warn_replicated(config: DecoderConfig, mesh: Mesh) -> None:
    """Logs the groups the mesh's `model` axis leaves whole (replicated), once per config and mesh."""
    _warn_once(config, _model_size(mesh))


@functools.lru_cache(maxsize=None)
def _warn_once(config: DecoderConfig, model_size: int) -> None:
    whole = replicated_groups(config, model_size)
    if whole and model_size > 1:
        log.warning("%s over a model axis of %d devices: %s stay whole on every device of that axis (replicated); "
                    "the other parameters are split.", config.model_type, model_size, "; ".join(whole))


def param_shardings(config: DecoderConfig, mesh: Mesh) -> dict:
    """`{'params': tree}` of NamedShardings matching the decoder's parameter tree."""
    model_size = _model_size(mesh)
    return {"params": unflatten({path: NamedSharding(mesh, spec)
                                 for path, spec in param_specs(config, model_size).items()})}


def placer(config: DecoderConfig, mesh: Mesh) -> Callable[[str, np.ndarray], jax.Array]:
    """(param path, host array) -> a global array in its sharding; each device receives only its own
    shard, and only this process's devices are written (the loaders call it one tensor at a time)."""
    warn_replicated(config, mesh)
    specs = param_specs(config, _model_size(mesh))

    def place(path: str, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(array.shape, NamedSharding(mesh, specs[path]), lambda index: array[index])

    return place


def cache_sharding(config: DecoderConfig, mesh: Mesh) -> NamedSharding:
    """Both KV cache layouts ([B, K, D, S] keys, [B, K, S, D] values): rows over `data`, kv heads over
    `model` when the 'heads' group is cut."""
    heads = MODEL if cut_groups(config, _model_size(mesh))["heads"] and mesh.shape[MODEL] > 1 else None
    return NamedSharding(mesh, PartitionSpec(DATA, heads, None, None))
