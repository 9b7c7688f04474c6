"""Training runs of the tests: a config file over the tiny random pool, and `hrjax train` launched
as a user would (a subprocess with the real entry points)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIG_FILE = '''
from hrjax.config import base_config


def get_config():
    config = base_config()
    config.pool = {pool!r}
    config.mode = {mode!r}
    config.task.name = "basic_arithmetic"
    config.task.options = dict(n_train=8, n_validation=4, n_test=4, seed=0)
    config.task.data_dir = {data_dir!r}
    config.train.cache_dir = {cache_dir!r}
    config.env.max_new_tokens = 4
    config.env.cost_lambda = 0.5
    config.network.hidden = 16
    config.ppo.num_envs = 8
    config.ppo.shuffle_groups = 8  # the same minibatches on one device and on every data axis (mesh tests)
    config.ppo.minibatches = 2
    config.train.num_iterations = {iterations}
    config.train.iterations_per_step = 1
    config.train.eval_every = 3
    return config
'''


def reduced_specialist_config(root: Path):
    """The main job's config reduced (`experiments/configs/specialist_world.py reduced`), its caches
    and data under `root`."""
    import importlib.util

    from hrjax.config import run_config

    spec = importlib.util.spec_from_file_location("specialist_world", REPO / "experiments/configs/specialist_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("reduced")
    config.train.cache_dir = str(root / "cache")
    config.task.data_dir = str(root / "data")
    return run_config(config.to_dict())


def config_file(path: Path, tiny_pool: dict, mode: str = "tree", iterations: int = 12) -> Path:
    """Writes the config file of a run over `tiny_pool` (the conftest fixture) to `path`."""
    path.write_text(CONFIG_FILE.format(mode=mode, iterations=iterations, **tiny_pool))
    return path


def config_of(tiny_pool: dict, mode: str = "tree", iterations: int = 6, **changes):
    """The frozen `RunConfig` of that config file, with `changes` ({"section.key": value}) applied."""
    from hrjax.config import run_config

    namespace = {}
    exec(CONFIG_FILE.format(mode=mode, iterations=iterations, **tiny_pool), namespace)
    config = namespace["get_config"]()
    for path, value in changes.items():
        section, key = path.split(".")
        config[section][key] = value
    return run_config(config.to_dict())


def launch(config: Path, workdir: Path, *extra: str, entry=("experiments.train",), cwd=REPO,
           **popen) -> subprocess.Popen:
    """`python -m <entry> --config=... --workdir=... --noprogress <extra>`, output captured as text."""
    return subprocess.Popen([sys.executable, "-m", *entry, f"--config={config}", f"--workdir={workdir}",
                             "--noprogress", *extra], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def finish(process: subprocess.Popen) -> str:
    """Waits for a launched run; asserts it succeeded; -> its output."""
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    return out
