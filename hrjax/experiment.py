"""The absl entry points of a run:

    python -m experiments.train --config=experiments/configs/tiny.py --workdir=runs/tiny \
        [--config.ppo.learning_rate=3e-4 ...]
    python -m experiments.evaluate --config=experiments/configs/specialist_world.py --workdir=runs/sw
    python -m experiments.trade_offs --config=experiments/configs/specialist_world.py:conditioned --workdir=runs/sw_t

(`hrjax train|evaluate|trade_offs ...` take the same flags.) A multi-process job runs the same
command in every process, with `--coordinator_address/--num_processes/--process_id` or, on SLURM and
TPU pods, with none (detected from the environment); see launch/README.md. `train` trains one router in the
workdir; `evaluate` trains `config.evaluate.seeds` of them (or reuses finished ones) and writes the
evaluation against every baseline (summary.json, report.md, PNGs). The config file's `get_config()` returns an
`ml_collections.ConfigDict` (start from `hrjax.config.base_config()`); every field can be
overridden from the command line, and the result is checked and frozen into a `RunConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "an ml_collections config file, optionally with its argument: FILE.py[:ARG] "
    "(e.g. experiments/configs/specialist_world.py:reduced)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; a local path or gs://BUCKET/PATH): "
                               "checkpoints, metrics, TensorBoard events; a finished or interrupted run in it is "
                               "resumed")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process job: HOST:PORT of process 0 (every "
                                   "process gives the same); unset: auto-detected on SLURM and TPU pods, else one "
                                   "process")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process job: how many processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process job: this process's index (0 is the chief)")
_COORDINATOR_TIMEOUT = flags.DEFINE_integer("coordinator_timeout", 300, "multi-process job: seconds to wait for "
                                            "the coordinator and for every process to join before an error")
_JOBS = {"train": "Train one router in --workdir (resumes the run found there).",
         "evaluate": "Train config.evaluate.seeds routers (or reuse finished ones) and evaluate them against every "
                     "baseline: summary.json, report.md and plots in --workdir.",
         "trade_offs": "Train config.evaluate.seeds lambda-conditioned routers (config.ppo.lambda_range) and, with the "
                       "same settings, fixed-lambda routers at each lambda of config.evaluate.cost_lambdas; compare "
                       "their held-out value at each lambda: trade_offs.json and trade_offs.md in --workdir."}
_HELP = ("--help", "-h", "--helpshort", "-?")


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


def _trade_offs(config, workdir, progress) -> None:
    from hrjax.trade_offs import compare_trade_offs, markdown

    print(markdown(compare_trade_offs(config, workdir, progress=progress).result))


def _main(job, argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]} (flags take the form --name=value).")
    import jax

    from hrjax.config import run_config
    from hrjax.errors import HrjaxError
    from hrjax.parallel import initialize
    from hrjax.rundir import local_dir, run_dir
    from hrjax.runtime import use_compilation_cache, use_quick_compiles

    try:
        config = run_config(_CONFIG.value.to_dict())
        workdir = run_dir(_WORKDIR.value, "--workdir")
        cache_dir = local_dir(config.train.cache_dir, "config.train.cache_dir")
        use_quick_compiles()
        use_compilation_cache(cache_dir / "xla")
        initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _COORDINATOR_TIMEOUT.value)
        job(config, workdir, _PROGRESS.value)
    except HrjaxError as e:
        if jax.distributed.is_initialized():
            # one process of a job: end now, not in JAX's shutdown barrier, which would wait (up to the
            # coordinator timeout) for processes now waiting for this one at a collective
            print(f"error: {e}", file=sys.stderr, flush=True)
            os._exit(1)
        sys.exit(f"error: {e}")


def usage(command: str, job: str) -> str:
    """The help text of `command` (`hrjax train`, `python -m experiments.evaluate`, ...)."""
    from hrjax.config import RunConfig

    sections = ", ".join(f.name for f in dataclasses.fields(RunConfig))
    lines = [f"usage: {command} --config=FILE.py[:ARG] --workdir=DIR [--config.SECTION.KEY=VALUE ...] [--noprogress]"
             " [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]",
             "", _JOBS[job], "", "flags:"]
    for flag in sorted(flags.FLAGS.get_flags_for_module(sys.modules[__name__]), key=lambda f: f.name):
        name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
        lines.append(f"  {name}: {flag.help}" + (f" (default: {flag.default})" if flag.default is not None else ""))
    lines += ["  --config.SECTION.KEY=VALUE: override any config field, e.g. --config.ppo.learning_rate=3e-4 or "
              "--config.train.num_iterations=50", f"      (sections: {sections}; see hrjax/config.py)",
              "", "Config files: experiments/configs/ (tiny.py, specialist_world.py[:reduced|conditioned], "
              "cpu_pool.py[:TASK], qwen25_paper.py:FAMILY)."]
    return "\n".join(lines)


def _check_config_file(argv: Sequence[str]) -> None:
    """A --config that names no file gets one line (ml_collections would end in a long traceback)."""
    for arg in argv[1:]:
        if arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
            path = Path(value if Path(value).is_file() else value.rsplit(":", 1)[0]).expanduser()
            if not path.is_file():
                problem = "is a directory" if path.is_dir() else "does not exist"
                sys.exit(f"error: --config={value}: {path} {problem}; pass a config file such as "
                         "experiments/configs/tiny.py (run from the repository root, or give its full path).")


def _check_overrides(argv: Sequence[str]) -> None:
    """Unknown `--config.a.b` keys get one clear line (ml_collections would raise a bare AttributeError)."""
    from hrjax.config import unknown_key

    for arg in argv[1:]:
        if arg.startswith(("--config.", "-config.")):
            problem = unknown_key(arg.lstrip("-").split("=", 1)[0])
            if problem:
                sys.exit(f"error: bad override {arg}: {problem}")


def _launch(job, name: str, argv: Optional[Sequence[str]]) -> None:
    argv = list(argv) if argv is not None else sys.argv
    if any(arg in _HELP for arg in argv[1:]):
        command = argv[0] if argv[0].startswith("hrjax ") else f"python -m experiments.{name}"
        print(usage(command, name))
        sys.exit(0)
    _check_overrides(argv)
    _check_config_file(argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(lambda args: _main(job, args), argv=argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Train one router (`python -m experiments.train`, `hrjax train`)."""
    _launch(_train, "train", argv)


def evaluate_main(argv: Optional[Sequence[str]] = None) -> None:
    """Train over seeds and evaluate (`python -m experiments.evaluate`, `hrjax evaluate`)."""
    _launch(_evaluate, "evaluate", argv)


def trade_offs_main(argv: Optional[Sequence[str]] = None) -> None:
    """Lambda-conditioned against fixed-lambda routers (`python -m experiments.trade_offs`, `hrjax trade_offs`)."""
    _launch(_trade_offs, "trade_offs", argv)
