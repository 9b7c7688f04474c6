"""`hrjax bench NAME`: each benchmark is a module here with `run() -> dict`; the figures are printed as
one JSON line (with the host's ISA: see `common.py`)."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
from typing import Sequence


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=argv[0], description=__doc__)
    parser.add_argument("name", choices=names(), help="which benchmark")
    args = parser.parse_args(argv[1:])
    print(json.dumps(importlib.import_module(f"hrjax.benchmarks.{args.name}").run()))
    return 0
