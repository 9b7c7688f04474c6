"""The device mesh: axis sizes checked against the devices, and PPO split over 8 host devices giving
the one-device result: tree mode's program on every mesh (tests/sharded_tree_run.py, in a process of
its own, data-parallel: gradients all-reduced, nothing gathered), and `hrjax train` in online mode
resumed through meshes (8, 1), (4, 2), (2, 4) and one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hrjax.config import ConfigError, base_config, run_config
from hrjax.parallel import MeshConfig, MeshError, initialize, mesh_shape

TESTS = Path(__file__).parent


@pytest.mark.parametrize("config, devices, shape", [
    (MeshConfig(), 8, (8, 1)), (MeshConfig(-1, 2), 8, (4, 2)), (MeshConfig(2, -1), 8, (2, 4)),
    (MeshConfig(2, 4), 8, (2, 4)), (MeshConfig(), 1, (1, 1)),
])
def test_mesh_axes_resolve_against_the_devices(config, devices, shape):
    assert mesh_shape(config, devices) == shape


@pytest.mark.parametrize("config, devices, message", [
    (MeshConfig(3, 1), 8, r"needs a multiple of 3 devices, but there are 8"),
    (MeshConfig(-1, 3), 8, r"needs a multiple of 3 devices, but there are 8"),
    (MeshConfig(2, 2), 8, r"covers 4 devices, but there are 8"),
    (MeshConfig(2, 1), 1, r"needs a multiple of 2 devices, but there are 1"),
])
def test_a_mesh_that_does_not_tile_the_devices_is_refused_with_the_numbers(config, devices, message):
    with pytest.raises(MeshError, match=message):
        mesh_shape(config, devices)


def test_mesh_config_is_checked_with_the_run_config():
    config = base_config()
    config.pool = [dict(name="a", checkpoint="x", base_rate=1.0)]
    config.mesh.data, config.mesh.model = -1, -1
    with pytest.raises(ConfigError, match=r"config.mesh axes must be positive or -1 \(at most one -1\)"):
        run_config(config.to_dict())


def test_a_coordinator_that_never_answers_is_a_clear_error_not_a_hang(tiny_pool, tmp_path):
    from runs import config_file, launch

    config = config_file(tmp_path / "config.py", tiny_pool)
    process = launch(config, tmp_path / "run", "--coordinator_address=127.0.0.1:9", "--num_processes=2",
                     "--process_id=1", "--coordinator_timeout=5", entry=("hrjax.cli", "train"))
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in out and "SIGABRT" not in out, out  # raised, not aborted
    assert out.strip().splitlines()[-1].startswith("error: The coordinator 127.0.0.1:9 did not answer within 5 s"), out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_lone_process_needs_no_coordinator(monkeypatch):
    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    initialize()  # returns at once: nothing to join


def test_tree_mode_on_8_devices_matches_one_device_on_every_mesh():
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, str(TESTS / "sharded_tree_run.py"), "2"], cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    for mesh in ("8x1", "4x2", "2x4"):
        split = result[mesh]
        assert split["devices"] == 8, (mesh, split)  # really split
        # data-parallel: each gradient step all-reduces the gradients (the params' bytes; measured 1.0006 with
        # the metrics' scalars), and no step gathers the trajectory onto every device (a global shuffle would)
        assert 1.0 <= split["allreduce_per_gradient_step"] < 1.1 and split["allgather_bytes"] == 0, (mesh, split)
        # one all-reduce per gradient step (gradients, the forward's sums and the metrics together; each one a
        # rendezvous of every device) and 5 per iteration around the update: 13 / 8 = 1.625 (3.625 when each
        # minibatch summed its own valid steps before its gradient could be reduced)
        assert split["allreduces_per_gradient_step"] <= 1.625, (mesh, split)
        # float32 sums in another order, each ~1e-7: over 20 iterations (2 epochs x 4 minibatches of Adam each)
        # measured <= 5e-7 on the parameters and <= 1e-6 on the losses. The reference runs one seed at a time:
        # a vmapped one-device run batches its matmuls into other kernels, and Adam turns a rounding-level
        # gradient into a learning-rate-sized step, so that is not the one-device result a user gets.
        assert split["params"] <= 1e-5 and split["losses"] <= 1e-5, (mesh, split)
    assert result["refused"].startswith("config.ppo.num_envs = 252 does not split over the mesh's data axis of 8")


# (iterations at the segment's end, mesh data x model; None: one device): all data, then a model axis that
# splits the samplers' heads and MLPs. Tree mode's program is checked on every mesh above (4 x 2 too), the
# sampler on model axes 2 and 4 in test_sharded_sampler, `hrjax train` in tree mode across process and device
# counts in test_multihost. Each segment is a process of its own (about 45 s on a 2-core host).
ONLINE_SEGMENTS = [(2, (8, 1)), (4, (2, 4)), (6, None)]


def test_hrjax_train_online_through_data_and_model_meshes_then_one_device_matches_one_device(tiny_pool, tmp_path):
    from runs import config_file, finish, launch
    from test_train import CACHE_COUNTERS, TIMING, final_state

    eight = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
    total = ONLINE_SEGMENTS[-1][0]
    # the one-device run goes first, so every segment after it sees a warm response cache
    finish(launch(config_file(tmp_path / "config.py", tiny_pool, "online", iterations=total), tmp_path / "one_device"))
    for end, mesh in ONLINE_SEGMENTS:  # each segment resumes the last one's checkpoint on another mesh
        config = config_file(tmp_path / f"config{end}.py", tiny_pool, "online", iterations=end)
        if mesh is None:
            finish(launch(config, tmp_path / "moved"))
        else:
            finish(launch(config, tmp_path / "moved", f"--config.mesh.data={mesh[0]}", f"--config.mesh.model={mesh[1]}",
                          env=eight))
    reference, moved = final_state(tmp_path / "one_device"), final_state(tmp_path / "moved")
    assert moved.keys() == reference.keys()
    numeric = [path for path, value in reference.items() if value.dtype != object]  # optax's empty states: None
    assert len(numeric) > 5
    for path in numeric:  # float32 sums in another order (see the test above)
        np.testing.assert_allclose(moved[path], reference[path], rtol=0, atol=1e-5, err_msg=path)
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one_device", "moved")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == list(range(total + 1))
    for ours, theirs in zip(*rows):  # every mesh's iterations logged the one-device losses
        for key in set(ours) - set(TIMING) - {"step", "action_histogram", *CACHE_COUNTERS}:
            # float32 sums in another order: 1e-5 relative to the metric's size (explained variance reaches ~10)
            assert abs(ours[key] - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (ours["step"], key, ours[key],
                                                                                       theirs[key])
