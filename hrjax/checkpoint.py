"""Run checkpoints with Orbax: the latest `max_to_keep` under `<workdir>/checkpoints`, the best by
an evaluation metric under `<workdir>/best`.

Each checkpoint holds the training state pytree (params, optimiser state, RNG key, data position,
iteration) and, as JSON, the frozen run config. Orbax writes a step into a temporary directory and
renames it when complete, so a run killed mid-save leaves the previous step intact. Resuming checks
the saved config against the current one; a damaged or incompatible checkpoint is an error, never a
silent fresh start.

In a multi-process job every process saves and restores (Orbax writes each array's shards from the
process that holds them, and the metadata from process 0): the state must be global `jax.Array`s.
A restore takes the shardings of the `like` state it is given, so a checkpoint written over N
devices restores over M. The run directory may be `gs://` (`hrjax.rundir.run_dir`).
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any, Optional

import orbax.checkpoint as ocp

from hrjax.config import ConfigError, config_difference, resumable_keys
from hrjax.errors import CheckpointError


def _manager(directory, **options) -> ocp.CheckpointManager:
    directory = directory.absolute() if isinstance(directory, Path) else directory  # gs:// stays as it is
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        **{"create": True, "enable_async_checkpointing": False, **options}))


def latest_saved_step(workdir) -> Optional[int]:
    """The latest step checkpointed in run directory `workdir` (None when there is none), read without
    opening the run (no config check, nothing created)."""
    workdir = workdir if isinstance(workdir, PurePath) else Path(workdir)
    if not (workdir / "checkpoints").exists():
        return None
    manager = _manager(workdir / "checkpoints", create=False, read_only=True)
    try:
        return manager.latest_step()
    finally:
        manager.close()


class RunCheckpoints:
    """The checkpoints of one run directory, for one config (a dict, as saved)."""

    def __init__(self, workdir, config: dict, max_to_keep: int, best_metric: str):
        """`workdir`: a local path, or an `etils.epath.Path` (gs://)."""
        self.workdir = workdir if isinstance(workdir, PurePath) else Path(workdir)
        self.config, self.best_metric = config, best_metric
        self.latest = _manager(self.workdir / "checkpoints", max_to_keep=max_to_keep)
        self.best = _manager(self.workdir / "best", max_to_keep=1, best_fn=lambda m: m[best_metric],
                             best_mode="max")
        try:
            saved = self._saved_config()
        except CheckpointError:
            self.close()
            raise
        difference = saved is not None and config_difference(saved, config, resumable_keys(config))
        if difference:
            self.close()
            raise ConfigError(
                    f"{self.workdir} holds checkpoints of another config (first difference: {difference}). "
                    "Resume with the config it was started with, or pass a new --workdir.")

    def _saved_config(self) -> Optional[dict]:
        step = self.latest.latest_step()
        if step is None:
            return None
        try:
            return self.latest.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as e:  # noqa: BLE001 - any Orbax failure is reported as one clear error
            raise self._damaged(step, e) from e

    def _damaged(self, step: int, error: Exception) -> CheckpointError:
        path = self.workdir / "checkpoints" / str(step)
        detail = (str(error).strip().splitlines() or [""])[0][:200]
        return CheckpointError(
            f"{path}: the checkpoint cannot be read ({type(error).__name__}: {detail}). It is damaged or was "
            f"written by an incompatible version of the code: delete {path} to resume from the step before it, "
            "or start a fresh --workdir.")

    @property
    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    def restore(self, like: Any) -> tuple[Optional[int], Any]:
        """-> (step, state shaped and sharded like `like`), or (None, `like`) when there is no checkpoint."""
        step = self.latest.latest_step()
        if step is None:
            return None, like
        try:
            restored = self.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like)))
        except Exception as e:  # noqa: BLE001
            raise self._damaged(step, e) from e
        return step, restored.state

    def save(self, step: int, state: Any) -> None:
        self.latest.save(step, args=self._args(state))

    def save_best(self, step: int, state: Any, metrics: dict) -> None:
        """Offers `state` to the best-checkpoint slot (kept if `metrics[best_metric]` is the highest yet)."""
        if self.best_metric not in metrics:
            raise ConfigError(f"config.train.best_metric '{self.best_metric}' is not an evaluation metric; "
                              f"choose one of {sorted(metrics)}.")
        if step in self.best.all_steps():  # offered before a kill that came ahead of this step's latest save
            return
        self.best.save(step, args=self._args(state), metrics={k: float(v) for k, v in metrics.items()})

    def _args(self, state: Any) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self.config))

    def close(self) -> None:
        self.latest.close()
        self.best.close()
