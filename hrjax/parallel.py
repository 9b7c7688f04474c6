"""JAX's multi-controller runtime as hrjax uses it: one program in every process, one global `Mesh`
with a `data` axis (episodes, prompts, tree rows) and a `model` axis (pool-model parameters), and
chief-only outputs.

- `initialize(...)`: `jax.distributed.initialize` from explicit arguments, or from the environment
  (SLURM, TPU slices, HRJAX_DISTRIBUTED=1: JAX's own auto-detection); a single process needs nothing.
- `MeshConfig` / `make_mesh`: the mesh from config axis sizes (-1: the devices left), refused with the
  numbers named when it does not tile the devices; `data_sharding` / `replicated` name the shardings
  the jitted programs constrain their arrays to.
- `is_chief()`: process 0 writes what is written once (config.json, metrics, reports);
  `process_rows` / `local_batch` name this process's share of the work; `all_processes`,
  `sum_over_processes`, `gather_rows` and `global_replicated` are the few collectives the Python
  orchestration needs (each a no-op in a lone process).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging as absl_logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hrjax.errors import HrjaxError

AXES = ("data", "model")
# environment variables that mean "one of several processes" to jax.distributed's auto-detection (SLURM,
# TPU slices on GKE, multislice); HRJAX_DISTRIBUTED=1 asks for it where nothing in the environment says so
# (Cloud TPU VM slices, whose workers JAX finds through the metadata server: launch/tpu_pod.sh sets it)
_CLUSTER_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _cluster_detected() -> bool:
    return os.environ.get("HRJAX_DISTRIBUTED") == "1" or any(
        os.environ.get(name) not in (None, "", "1") for name in _CLUSTER_ENV)


class MeshError(HrjaxError, ValueError):
    """A mesh or batch that does not fit the devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes of the global mesh; -1 (at most one axis): every device the other axis leaves."""

    data: int = -1
    model: int = 1

    def __post_init__(self):
        sizes = (self.data, self.model)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise MeshError(f"config.mesh axes must be positive or -1 (at most one -1), got data={self.data}, "
                            f"model={self.model}.")


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int]:
    """(data, model) sizes on `num_devices` devices, -1 resolved; refuses a mesh that does not tile them."""
    data, model = config.data, config.model
    known = (data if data > 0 else 1) * (model if model > 0 else 1)
    if num_devices % known:
        raise MeshError(f"config.mesh (data={data}, model={model}) needs a multiple of {known} devices, but there "
                        f"are {num_devices}: choose axis sizes whose product divides {num_devices}.")
    rest = num_devices // known
    data, model = (rest if data == -1 else data), (rest if model == -1 else model)
    if data * model != num_devices:
        raise MeshError(f"config.mesh (data={config.data}, model={config.model}) covers {data * model} devices, but "
                        f"there are {num_devices}: make the product {num_devices} or set one axis to -1.")
    return data, model


def make_mesh(config: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The ('data', 'model') mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def training_mesh(config: MeshConfig) -> Optional[Mesh]:
    """The mesh a training run splits its episodes over, checked against the devices; None on one device
    (the unsharded program)."""
    mesh = make_mesh(config)
    return mesh if mesh.size > 1 else None


def sampler_mesh(config: MeshConfig) -> Optional[Mesh]:
    """The mesh this process's pool models generate on: its own devices (a model never spans hosts;
    each process generates its own share of prompts), split `model`-ways as the global mesh is, prompts
    over the rest. None when the model axis is 1: each model whole on one device, as unsharded."""
    model = mesh_shape(config, jax.device_count())[1]
    if model == 1:
        return None
    local = jax.local_devices()
    if len(local) % model:
        raise MeshError(f"config.mesh.model = {model} does not divide this process's {len(local)} devices: a pool "
                        f"model is split over one host's devices only; choose a model axis that divides {len(local)}.")
    return make_mesh(MeshConfig(data=-1, model=model), local)


def check_divisible(mesh: Mesh, what: str, size: int) -> None:
    """Refuses a batch dimension `size` (named `what`) that the data axis cannot split evenly."""
    data = mesh.shape["data"]
    if size % data:
        raise MeshError(f"{what} = {size} does not split over the mesh's data axis of {data} devices: make it a "
                        f"multiple of {data} (or change config.mesh).")


def data_sharding(mesh: Mesh, rank: int, axis: int = 0) -> NamedSharding:
    """Arrays of `rank` dims whose dim `axis` is split over 'data' (replicated over 'model')."""
    spec = [None] * rank
    spec[axis] = "data"
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain_batch(tree, mesh: Optional[Mesh], axis: int = 0):
    """Inside jit: every leaf of `tree` split over 'data' along `axis` (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, data_sharding(mesh, x.ndim, axis)),
                                  tree)


def constrain_replicated(tree, mesh: Optional[Mesh]):
    """Inside jit: every leaf of `tree` whole on every device (no-op without a mesh)."""
    return tree if mesh is None else jax.lax.with_sharding_constraint(tree, replicated(mesh))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, timeout_s: int = 300) -> None:
    """Joins the multi-process job: with explicit arguments, or auto-detected where a cluster
    environment says there are several processes (SLURM with more than one task, TPU slices: see
    `_CLUSTER_ENV`); a lone process does nothing.
    `timeout_s`: how long a process other than 0 waits for the coordinator before a clear error
    (process 0 hosts it; XLA itself ends it when its peers do not all join within the timeout)."""
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit and not _cluster_detected():
        return
    if jax.distributed.is_initialized():  # a second job in the same process (hrjax evaluate's seed runs)
        return
    if coordinator_address is not None and process_id not in (None, 0):
        # XLA aborts the whole process (SIGABRT) when the coordinator never answers: find out first
        _wait_for_coordinator(coordinator_address, timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=_slurm_node_gpus(),
                                   initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - every failure to join is one clear error
        raise HrjaxError(f"jax.distributed.initialize(coordinator_address={coordinator_address!r}, num_processes="
                         f"{num_processes}, process_id={process_id}) failed within {timeout_s} s: "
                         f"{(str(e).strip().splitlines() or [''])[0][:300]}. Check that every process was started "
                         "with the same coordinator address and process count, and that the coordinator (process "
                         "0) is up and reachable.") from e
    _log_with_process_index()


def _slurm_node_gpus() -> Optional[list[int]]:
    """Every GPU of the node when SLURM runs one task per node (launch/slurm.sbatch); else None (JAX's
    SLURM detection then gives each task the one GPU of its local rank)."""
    if os.environ.get("SLURM_NTASKS_PER_NODE") == "1" and os.environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return list(range(int(os.environ["SLURM_GPUS_ON_NODE"])))
    return None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once a TCP connection to `address` ('host:port') opens; a clear error after `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise HrjaxError(f"The coordinator {address} did not answer within {timeout_s:g} s ({e}): start "
                                 "process 0 first, with the same --coordinator_address, and check that this host "
                                 "can reach it.") from None
            time.sleep(0.5)


def is_chief() -> bool:
    """Whether this process writes the outputs written once per job."""
    return jax.process_index() == 0


def _log_with_process_index() -> None:
    """absl log lines of a multi-process job start with 'process I/N'."""
    index, count = jax.process_index(), jax.process_count()

    class Formatter(absl_logging.PythonFormatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"process {index}/{count} " + super().format(record)

    absl_logging.get_absl_handler().setFormatter(Formatter())


def process_rows(num_rows: int) -> np.ndarray:
    """[n_p] int: this process's share of `num_rows` independent work items (rows p, p + P, p + 2P, ...:
    shares differ by at most one row whatever the order of the rows' costs)."""
    return np.arange(num_rows)[jax.process_index()::jax.process_count()]


def local_batch(mesh: Optional[Mesh], size: int) -> slice:
    """The contiguous part of a global batch of `size` (split over 'data' on axis 0) that this process's
    devices hold: what it feeds `jax.make_array_from_process_local_data`. Everything without a mesh."""
    if mesh is None or jax.process_count() == 1:
        return slice(0, size)
    spans = {(i[0].start or 0, i[0].stop or size) for i in data_sharding(mesh, 1).addressable_devices_indices_map(
        (size,)).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
        raise MeshError(f"This process's devices hold rows {sorted(spans)} of the batch, not one contiguous part: "
                        "build the mesh from jax.devices() in order (hrjax.parallel.make_mesh).")
    return slice(start, stop)


def global_batch(tree, mesh: Optional[Mesh], axis: int = 0):
    """Each process's `local_batch` part of a batch (numpy leaves) -> global arrays split over 'data' on
    `axis` (unchanged in a lone process: jit splits them itself)."""
    if mesh is None or jax.process_count() == 1:
        return tree
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(data_sharding(mesh, np.ndim(x), axis), np.asarray(x)), tree)


def global_replicated(tree, mesh: Optional[Mesh]):
    """`tree`, equal in every process, as arrays whole on every device of `mesh`: what a jitted program
    over the mesh takes, and the shardings a checkpoint restored like it gets (a state restored on one
    device would be committed there, which a program over the mesh refuses)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))


def all_processes(flag: bool) -> bool:
    """Whether `flag` holds in every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """The element-wise sum of `values` (same shape in every process) over the processes."""
    if jax.process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values))).sum(axis=0)


def gather_rows(local, num_rows: int):
    """Every process's `process_rows(num_rows)` rows (a pytree of numpy arrays, rows on axis 0) -> the
    whole [num_rows, ...] pytree, in every process."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    count, share = jax.process_count(), -(-num_rows // jax.process_count())

    def gather(x):
        x = np.asarray(x)
        padded = np.zeros((share, *x.shape[1:]), x.dtype)
        padded[:len(x)] = x
        stacked = np.asarray(multihost_utils.process_allgather(padded))  # [P, share, ...]
        out = np.zeros((num_rows, *x.shape[1:]), x.dtype)
        for p in range(count):
            rows = np.arange(num_rows)[p::count]
            out[rows] = stacked[p, :len(rows)]
        return out

    return jax.tree_util.tree_map(gather, local)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op in a lone process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
