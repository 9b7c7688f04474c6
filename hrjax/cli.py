"""The `hrjax` console script: `hrjax train|evaluate --config=... --workdir=...` (the absl flags of
`python -m experiments.train|evaluate`) and `hrjax bench sampler|rollout|learner|cache`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hrjax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark; prints one JSON line")
    bench.add_argument("name", choices=["sampler", "rollout", "learner", "cache"], help="which benchmark")
    commands.add_parser("train", help="train a router: --config=<file.py> --workdir=<dir> [--config.a.b=value]",
                        add_help=False)
    commands.add_parser("evaluate", help="train over seeds and evaluate against the baselines (same flags)",
                        add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["train"], ["evaluate"]):
        from hrjax import experiment

        job = experiment.main if argv[0] == "train" else experiment.evaluate_main
        job([f"hrjax {argv[0]}", *argv[1:]])
        return 0
    args = parser.parse_args(argv)
    if args.command == "bench":
        import importlib
        import json

        print(json.dumps(importlib.import_module(f"hrjax.benchmarks.{args.name}").run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
