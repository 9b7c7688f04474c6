"""Declarative checkpoint key maps: one table per architecture, used for loading and exporting.

A `Rule` maps one Hugging Face tensor name to one path in our parameter tree, with the
transform that turns the checkpoint array into ours and its inverse beside it. `{i}` in both
names stands for the layer index; a fused checkpoint tensor (Phi-3's `qkv_proj`) is several rules,
each taking its `rows`. The same table drives `hf_to_params` and `params_to_hf`, so an export is
always the exact inverse of a load. A rule's `split` says how its parameter is cut over a device
mesh's `model` axis (tensor parallelism, see `hrjax.models.sharding`), so the loaders place each
tensor straight into its shards as they read it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

from hrjax.errors import CheckpointError

ArrayFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A checkpoint-to-ours array transform and its inverse."""

    name: str
    to_ours: ArrayFn
    to_hf: ArrayFn


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# torch Linear stores [out, in]; Flax Dense kernels are [in, out].
TRANSPOSE = Transform("transpose", lambda a: a.T, lambda a: a.T)


@dataclasses.dataclass(frozen=True)
class Split:
    """A parameter cut over the mesh's `model` axis along `axis` of our array, in whole units of
    `group` (e.g. 'heads': every device holds whole heads); the architecture names each group's sizes."""

    axis: int
    group: str


@dataclasses.dataclass(frozen=True)
class Rule:
    """`hf` name (with `{i}` for the layer) -> `ours` slash-separated param path, via `transform`;
    `split`: how it is cut over a mesh's `model` axis (None: whole on every device)."""

    hf: str
    ours: str
    transform: Transform = IDENTITY
    optional: bool = False  # e.g. an untied lm_head that tied checkpoints omit
    split: Optional[Split] = None
    rows: Optional[tuple[int, int]] = None  # [start, stop) of a fused HF tensor's rows (phi3's qkv_proj)

    def expand(self, num_layers: int) -> list[tuple[str, str]]:
        if "{i}" not in self.hf:
            return [(self.hf, self.ours)]
        return [(self.hf.format(i=i), self.ours.format(i=i)) for i in range(num_layers)]


class LazyTensors(Mapping):
    """Checkpoint tensors read one at a time, when looked up: name -> a function returning the array.
    The loaders convert and place each tensor before reading the next, so no whole model sits in host
    memory at once."""

    def __init__(self, readers: Mapping[str, Callable[[], np.ndarray]]):
        self._readers = dict(readers)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._readers[name]()

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def renamed(self, rename: Callable[[str], Optional[str]]) -> "LazyTensors":
        """The same tensors under `rename(name)`; a name it maps to None is left out."""
        return LazyTensors({new: read for name, read in self._readers.items()
                            if (new := rename(name)) is not None})


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """A nested param dict -> {slash-separated path: leaf}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    """The inverse of `flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def hf_to_params(
    tensors: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    num_layers: int,
    expected: Mapping,
    dtype: np.dtype,
    source: str,
    ignore: Iterable[str] = (),
    place: Optional[Callable[[str, np.ndarray], Any]] = None,
) -> dict:
    """Converts HF-named arrays into our parameter tree `{'params': ...}`, one tensor at a time.

    Args:
      tensors: HF name -> array (any float dtype).
      rules: the architecture's key map.
      num_layers: number of transformer layers (expands `{i}`).
      expected: `{"params": tree}` with `.shape` leaves (e.g. from `jax.eval_shape`), used to
        check every shape before any array is converted.
      dtype: parameter dtype of the result.
      source: the checkpoint's location, quoted in errors.
      ignore: regexes of checkpoint names that are legitimately unused (e.g. rotary buffers).
      place: (param path, converted array) -> the leaf to keep, e.g. a device array in its sharding;
        None keeps the numpy array.
    """
    expected_flat = flatten(expected["params"])
    out: dict[str, Any] = {}
    missing, switched_off, used = [], [], set()
    for rule in rules:
        for hf_name, ours in rule.expand(num_layers):
            if ours not in expected_flat:  # the config turns this parameter off (e.g. no q/k/v bias)
                if hf_name in tensors:
                    switched_off.append(hf_name)
                continue
            used.add(hf_name)
            if hf_name not in tensors:
                if not rule.optional:
                    missing.append(hf_name)
                continue
            original = np.asarray(tensors[hf_name])
            if rule.rows is not None:
                original = original[rule.rows[0]:rule.rows[1]]
            array = rule.transform.to_ours(original)
            want = tuple(expected_flat[ours].shape)
            if tuple(array.shape) != want:
                raise CheckpointError(
                    f"{source}: tensor '{hf_name}' has shape {tuple(original.shape)}, which "
                    f"does not match the config (expected {want} after '{rule.transform.name}'). "
                    "The checkpoint and its config.json disagree: use the config.json that was saved "
                    "with these weights.")
            array = array.astype(dtype)
            out[ours] = array if place is None else place(ours, array)
    switched_off = sorted(set(switched_off) - used)
    if switched_off:
        raise CheckpointError(
            f"{source}: the checkpoint holds {len(switched_off)} tensor(s) that its config switches off, e.g. "
            f"{switched_off[:5]} (attention_bias / mlp_bias false, or no q/k norm in this architecture). The "
            "weights would be dropped silently and the model would be wrong: use the config.json saved with them.")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"{source}: the checkpoint lacks {len(missing)} tensor(s) the config needs: {shown}. "
            "The weight files are incomplete or truncated: download them again, or check that every "
            "shard listed in model.safetensors.index.json is present.")
    not_filled = sorted(set(expected_flat) - set(out))
    if not_filled:
        raise CheckpointError(
            f"{source}: no checkpoint tensor fills parameter(s) {not_filled[:5]}; the checkpoint does "
            "not match this architecture's config (e.g. tie_word_embeddings is wrong).")
    ignored = [re.compile(p) for p in ignore]
    unused = [k for k in tensors if k not in used and not any(p.search(k) for p in ignored)]
    if unused:
        raise CheckpointError(
            f"{source}: {len(unused)} checkpoint tensor(s) are not used by the config, e.g. "
            f"{unused[:5]}. The config.json does not describe these weights (wrong num_hidden_layers "
            "or architecture?): use the config.json saved with them.")
    return {"params": unflatten(out)}


def params_to_hf(params: Mapping, rules: Iterable[Rule], num_layers: int) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_params`: our `{'params': ...}` tree -> HF-named numpy arrays."""
    flat = flatten(params["params"])
    out, fused = {}, {}
    for rule in rules:
        for hf_name, ours in rule.expand(num_layers):
            if ours not in flat:
                continue
            array = rule.transform.to_hf(np.asarray(flat[ours]))
            if rule.rows is None:
                out[hf_name] = np.ascontiguousarray(array)
            else:
                fused.setdefault(hf_name, []).append((rule.rows[0], array))
    for hf_name, parts in fused.items():
        out[hf_name] = np.concatenate([array for _, array in sorted(parts, key=lambda part: part[0])])
    return out
