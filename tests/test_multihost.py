"""The multi-process path end to end: `launch/local.sh` runs `hrjax train` as 2 processes x 4 host
devices with a coordinator on 127.0.0.1. One job builds the path tree across both processes (each
generating only its share) and is killed mid-run (one process SIGKILLed); its checkpoint is resumed
by a 1-process 1-device run, whose checkpoint the restarted 2-process job resumes (reading the tree
from the shards the killed job left), to the end. Every logged row and the final parameters equal an
unbroken 1-process run's; only the chief wrote outputs. Plus gs:// run directories refused clearly
when they cannot be used (no gcsfs here; no credentials or no answer: a stand-in file system)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
from fsspec.registry import _registry as fsspec_implementations
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hrjax.env.tree import load_extra, shard_path, tree_structure
from hrjax.rundir import RunDirError, run_dir
from runs import REPO, config_file, finish, launch

ITERATIONS = 8
TOLERANCE = 1e-5  # float32 sums in another order over 8 devices (see tests/test_parallel.py)
UNCOMPARABLE = {"step", "action_histogram", "learner_seconds", "rollout_seconds", "episodes_per_s",
                "learner_fraction"}


def local_job(config: Path, workdir: Path, logs: Path, *extra: str) -> subprocess.Popen:
    """`launch/local.sh -n 2 -d 4 -- python -m experiments.train ...` (a free port chosen by the script)."""
    command = [str(REPO / "launch/local.sh"), "-n", "2", "-d", "4", "-l", str(logs), "--", sys.executable, "-m",
               "experiments.train", f"--config={config}", f"--workdir={workdir}", "--noprogress", *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def child_with(parent: int, marker: str) -> int:
    """The pid of `parent`'s child process whose command line holds `marker`."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in map(int, children):
        if marker in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
            return pid
    raise AssertionError(f"no child of {parent} runs {marker}")


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def final_state(workdir: Path) -> dict:
    """{path: array} of the latest checkpoint's state, restored onto this process's one device
    (a checkpoint of several processes needs a target)."""
    directory = (workdir / "checkpoints" / str(saved_steps(workdir)[-1]) / "state").absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                        checkpointer.metadata(directory).item_metadata)
        state = checkpointer.restore(directory, target)
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(state)}


def metrics_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_build_the_tree_in_shares_train_like_one_and_resume_across_process_counts(tiny_pool,
                                                                                                 tmp_path):
    pool = dict(tiny_pool, cache_dir=str(tmp_path / "cache"))  # a cold cache: every answer generated here
    config = config_file(tmp_path / "config.py", pool, iterations=ITERATIONS)
    job, reference = tmp_path / "job", tmp_path / "reference"

    # 1. the 2-process job builds the tree, trains, and loses process 1 (SIGKILL) after checkpoint 2
    first = local_job(config, job, tmp_path / "logs1")
    deadline = time.monotonic() + 600
    while not ((job / "checkpoints" / "2").is_dir() or first.poll() is not None or time.monotonic() > deadline):
        time.sleep(0.05)
    os.kill(child_with(first.pid, "--process_id=1"), signal.SIGKILL)
    out, _ = first.communicate(timeout=120)
    assert first.returncode != 0 and "failed with status" in out, out[-3000:]  # and process 0 stopped
    killed_at = saved_steps(job)[-1]
    assert 2 <= killed_at < ITERATIONS, killed_at

    trees = sorted((tmp_path / "cache" / "trees").glob("*.npz"))
    assert len(trees) == 1  # the whole tree, assembled in every process from both shares
    num_nodes = len(tree_structure(len(pool["pool"]), 2)[0])
    shares = [shard_path(trees[0], p, 2) for p in range(2)]
    rows = [len(np.load(s)["quality"]) for s in shares]
    assert rows == [8, 8]  # 16 prompts (8 train + 4 select + 4 eval), rows p::2
    generated = [int(load_extra(s, "generated")) for s in shares]
    assert generated == [r * num_nodes for r in rows], generated  # each process answered its share, only it
    # only the chief wrote: one TensorBoard event file, one metrics row per logged step
    assert len(list((job / "tensorboard").iterdir())) == 1
    steps = [r["step"] for r in metrics_rows(job)]
    assert steps == sorted(set(steps)) and steps[0] == 0

    # 2. the unbroken 1-process reference (it reads the tree the job assembled)
    finish(launch(config, reference))

    # 3. the killed job's checkpoint (2 processes x 4 devices) resumed by 1 process on 1 device, one iteration
    finish(launch(config, job, f"--config.train.num_iterations={killed_at + 1}"))
    assert saved_steps(job)[-1] == killed_at + 1

    # 4. the job restarted on 2 processes: resumes the 1-device checkpoint; the tree from the shards left
    trees[0].unlink()
    finish(local_job(config, job, tmp_path / "logs2"))
    for p in range(2):
        log = (tmp_path / "logs2" / f"process_{p}.log").read_text()
        assert f"process {p}/2 " in log and f"path tree rows {p}::2 of 16: read from" in log, log[-2000:]
        assert "answers generated, " not in log  # nothing built again

    rows_job, rows_reference = metrics_rows(job), metrics_rows(reference)
    assert [r["step"] for r in rows_job] == [r["step"] for r in rows_reference] == list(range(ITERATIONS + 1))
    for ours, theirs in zip(rows_job, rows_reference):
        assert ours.keys() == theirs.keys(), ours["step"]
        for key in ours.keys() - UNCOMPARABLE:  # relative too: explained_variance reaches -7 (a variance ratio)
            assert np.isclose(ours[key], theirs[key], rtol=TOLERANCE, atol=TOLERANCE), (ours["step"], key, ours[key],
                                                                                       theirs[key])
        assert np.allclose(ours.get("action_histogram", 0), theirs.get("action_histogram", 0), atol=TOLERANCE)
    ours, theirs = final_state(job), final_state(reference)
    assert ours.keys() == theirs.keys() and len(ours) > 5
    for path in ours:
        np.testing.assert_allclose(ours[path], theirs[path], rtol=0, atol=TOLERANCE, err_msg=path)


class _Unreachable(fsspec.AbstractFileSystem):
    """A stand-in for gcsfs where this host has no credentials (raise) or no network (hang)."""

    protocol = ("gcs", "gs")
    hang = False

    def info(self, path, **kwargs):
        raise FileNotFoundError(path)

    def _open(self, path, mode="rb", **kwargs):
        if self.hang:
            time.sleep(3600)
        raise PermissionError("Anonymous caller does not have storage.objects.create access (no credentials)")


@pytest.mark.parametrize("hang", [False, True])
def test_a_gs_workdir_that_cannot_be_used_is_one_clear_error_within_the_timeout(hang, monkeypatch):
    from etils.epath import backend

    monkeypatch.setattr(_Unreachable, "hang", hang)
    monkeypatch.setitem(fsspec_implementations, "gcs", _Unreachable)
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        start = time.monotonic()
        with pytest.raises(RunDirError) as error:
            run_dir("gs://bucket/run", timeout_s=2)
        assert time.monotonic() - start < 10
    finally:
        backend.fsspec_backend._get_filesystem.cache_clear()
    expected = "did not answer within 2 s" if hang else "cannot read the bucket (PermissionError"
    assert expected in str(error.value) and "gcloud auth application-default login" in str(error.value)
