"""The `hrjax` console script: `hrjax bench sampler|rollout` (more subcommands arrive with later issues)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hrjax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark; prints one JSON line")
    bench.add_argument("name", choices=["sampler", "rollout"], help="which benchmark")
    args = parser.parse_args(argv)
    if args.command == "bench":
        import importlib
        import json

        print(json.dumps(importlib.import_module(f"hrjax.benchmarks.{args.name}").run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
