"""The absl entry points of a run:

    python -m experiments.train --config=experiments/configs/tiny.py --workdir=runs/tiny \
        [--config.ppo.learning_rate=3e-4 ...]
    python -m experiments.evaluate --config=experiments/configs/specialist_world.py --workdir=runs/sw

(`hrjax train ...` and `hrjax evaluate ...` take the same flags.) `train` trains one router in the
workdir; `evaluate` trains `config.evaluate.seeds` of them (or reuses finished ones) and writes the
evaluation against every baseline (summary.json, report.md, PNGs). The config file's `get_config()` returns an
`ml_collections.ConfigDict` (start from `hrjax.config.base_config()`); every field can be
overridden from the command line, and the result is checked and frozen into a `RunConfig`.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to an ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, TensorBoard events")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")


def _train(config, workdir, progress) -> None:
    from hrjax.train import train

    result = train(config, workdir, progress=progress)
    last = result.history[-1] if result.history else {}
    summary = {k: round(float(v), 4) for k, v in last.items() if k.startswith("eval/")}
    print(f"trained to iteration {result.iteration} in {workdir}; last evaluation: {summary or 'none'}")


def _evaluate(config, workdir, progress) -> None:
    from hrjax.pipeline import evaluate_run

    run = evaluate_run(config, workdir, progress=progress)
    print(run.table)
    print(f"report: {run.report}")


def _main(job, argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]} (flags take the form --name=value).")
    from hrjax.config import run_config
    from hrjax.errors import HrjaxError

    try:
        job(run_config(_CONFIG.value.to_dict()), _WORKDIR.value, _PROGRESS.value)
    except HrjaxError as e:
        sys.exit(f"error: {e}")


def _check_overrides(argv: Sequence[str]) -> None:
    """Unknown `--config.a.b` keys get one clear line (ml_collections would raise a bare AttributeError)."""
    from hrjax.config import unknown_key

    for arg in argv[1:]:
        if arg.startswith(("--config.", "-config.")):
            problem = unknown_key(arg.lstrip("-").split("=", 1)[0])
            if problem:
                sys.exit(f"error: bad override {arg}: {problem}")


def _launch(job, argv: Optional[Sequence[str]]) -> None:
    argv = list(argv) if argv is not None else sys.argv
    _check_overrides(argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(lambda args: _main(job, args), argv=argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Train one router (`python -m experiments.train`, `hrjax train`)."""
    _launch(_train, argv)


def evaluate_main(argv: Optional[Sequence[str]] = None) -> None:
    """Train over seeds and evaluate (`python -m experiments.evaluate`, `hrjax evaluate`)."""
    _launch(_evaluate, argv)
