"""The entry points as a new user meets them: help, bad paths, a workdir in use and
log noise. Each run is a real `hrjax` / `python -m experiments.*` process over the tiny pool."""

import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hrjax.checkpoint import RunCheckpoints
from hrjax.config import base_config, run_config
from hrjax.rundir import LOCK_NAME
from hrjax.train import load_data, tree_meta, tree_path
from runs import REPO, config_file, config_of, finish, launch

CLI = ("hrjax.cli", "train")


def run(*args: str, cwd=REPO, **kw) -> tuple[int, str]:
    done = subprocess.run([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600, **kw)
    return done.returncode, done.stdout


@pytest.mark.parametrize("entry", [("hrjax.cli", "train"), ("hrjax.cli", "evaluate"), ("experiments.train",),
                                   ("experiments.evaluate",)])
def test_help_lists_the_flags(entry):
    code, out = run("-m", *entry, "--help")
    assert code == 0, out
    for flag in ("--config=FILE.py[:ARG]", "--workdir:", "--[no]progress:", "--config.SECTION.KEY=VALUE"):
        assert flag in out, (flag, out)
    assert "experiments/configs/" in out


@pytest.mark.parametrize("case", ["config missing", "config is a directory", "workdir is a file", "gs:// workdir"])
def test_bad_paths_get_one_line_and_write_nothing(case, tiny_pool, tmp_path):
    config = config_file(tmp_path / "config.py", tiny_pool)
    (tmp_path / "afile").write_text("x")
    config_arg, workdir, expected = {
        "config missing": (tmp_path / "nope.py", tmp_path / "run", "nope.py does not exist"),
        "config is a directory": (tmp_path, tmp_path / "run", "is a directory"),
        "workdir is a file": (config, tmp_path / "afile", "afile is a file, not a directory"),
        "gs:// workdir": (config, "gs://bucket/run", "gs:// run directories need gcsfs"),  # none here
    }[case]
    process = launch(config_arg, workdir, entry=CLI, cwd=tmp_path)
    out, _ = process.communicate(timeout=600)
    assert process.returncode != 0
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out, out
    assert out.startswith("error: ") and expected in out, out
    assert not (tmp_path / "gs:").exists() and not (tmp_path / "run").exists()


HOLD_LOCK = """
import sys, time
from hrjax.locking import exclusive
with exclusive(sys.argv[1], "held by the test"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_lock(path) -> subprocess.Popen:
    """A process that holds the lock file `path` until it is killed (returns once it holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_workdir_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(tiny_pool, tmp_path):
    config, workdir = config_file(tmp_path / "config.py", tiny_pool, iterations=2), tmp_path / "run"
    holder = hold_lock(workdir / LOCK_NAME)  # as a `hrjax train` on that workdir would
    try:
        second = launch(config, workdir, entry=CLI)
        out, _ = second.communicate(timeout=600)
        assert second.returncode != 0 and len(out.strip().splitlines()) == 1, out
        assert re.search(rf"run directory .*run is in use by pid {holder.pid} on ", out), out
        assert not (workdir / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (workdir / ".lock").exists()  # left behind by the killed holder, and taken over:
    assert "trained to iteration 2" in finish(launch(config, workdir, entry=CLI))


def test_a_tree_build_in_progress_elsewhere_is_waited_for(tiny_pool, tmp_path):
    tiny_pool = dict(tiny_pool, cache_dir=str(tmp_path / "cache"))  # a tree no other test built
    config = config_of(tiny_pool, iterations=2)
    tree = tree_path(config, tree_meta(config, load_data(config).examples))
    holder = hold_lock(tree.with_suffix(".lock"))  # as another run building that tree would
    process = launch(config_file(tmp_path / "config.py", tiny_pool, iterations=2), tmp_path / "run", entry=CLI)
    try:
        line = process.stdout.readline()
        while line and "waiting for" not in line:
            line = process.stdout.readline()
        assert f"waiting for the path tree build {tree}, in use by pid {holder.pid}" in line, line
        time.sleep(1.0)
        assert process.poll() is None and not tree.exists()  # it waits, building nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert "trained to iteration 2" in finish(process) and tree.exists()


def test_a_waiting_builder_names_the_holder_and_goes_on_once_it_is_gone(tmp_path):
    lock = tmp_path / "build.lock"
    code = ("import sys; from hrjax.locking import exclusive\n"
            "with exclusive(sys.argv[1], 'the test build', wait=True):\n    print('got it', flush=True)\n")
    holder = hold_lock(lock)
    waiter = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = waiter.stderr.readline()
        assert f"waiting for the test build, in use by pid {holder.pid}" in line, line
        time.sleep(0.5)
        assert waiter.poll() is None  # still waiting
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip() == "got it"


def test_checkpoints_keep_the_users_log_lines_and_drop_orbax_info(tmp_path, caplog):
    from absl import logging as absl_logging

    config = base_config()
    config.pool = [dict(name="a", checkpoint="x", base_rate=1.0)]
    absl_level = logging.getLogger("absl").level
    with caplog.at_level(logging.INFO):
        checkpoints = RunCheckpoints(tmp_path, run_config(config.to_dict()).to_dict(), 2, "eval/value")
        checkpoints.save(1, {"x": np.zeros(3, np.float32)})
        checkpoints.close()
        absl_logging.info("the user's own line")
        logging.getLogger("jax").info("a JAX line")
    assert logging.getLogger("absl").level == absl_level
    info = [r.getMessage() for r in caplog.records if r.levelno < logging.WARNING]
    assert info == ["the user's own line", "a JAX line"], info  # Orbax's INFO chatter filtered, nothing else


HIDE_TORCH = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'torch' else real(name, *a)
"""


def test_the_first_screen_is_hrjax_own(tiny_pool, tmp_path):
    # as on a user's machine: no torch, a matplotlib without its font cache, a dataset built for the first time
    config = config_file(tmp_path / "config.py", dict(tiny_pool, data_dir=str(tmp_path / "data")), iterations=2)
    env = dict(os.environ, MPLCONFIGDIR=str(tmp_path / "mpl"))
    code, out = run("-c", HIDE_TORCH + "import hrjax, transformers")
    assert code == 0 and not out, out  # transformers' advice to install torch (hrjax never uses it) is dropped
    code, out = run("-c", HIDE_TORCH + "from hrjax.cli import main; sys.exit(main())", "train", f"--config={config}", f"--workdir={tmp_path / 'run'}", "--noprogress",
                    env=env)
    assert code == 0, out
    assert (tmp_path / "mpl").exists()  # matplotlib really started from scratch
    lines = out.strip().splitlines()
    noise = [line for line in lines if re.match(r"[IWE]\d{4} ", line) or any(
        s in line for s in ("PyTorch was not found", "Unable to initialize backend", "font cache",
                            "Downloading and preparing", "downloaded and prepared"))]
    assert not noise, out
    assert lines[-1].startswith("trained to iteration 2"), out
