"""The `hrjax` console script. Each command is one module's `main(argv)`, imported only when run, so
`hrjax serve` never imports the training code and `hrjax train` never imports the server:

  hrjax train|evaluate|trade_offs --config=FILE.py --workdir=DIR [--config.a.b=value]   (absl flags, as experiments/)
  hrjax export --workdir=RUN --out=BUNDLE        a serving bundle from a trained run
  hrjax calibrate --bundle=BUNDLE                the bundle's cost/quality table per lambda
  hrjax route --bundle=BUNDLE "question"         route one question through the pool
  hrjax serve --bundle=BUNDLE                    the OpenAI-compatible server
  hrjax bench NAME                               a benchmark; prints one JSON line

Run `hrjax COMMAND --help` for a command's flags.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# command -> (module, function taking argv with the program name first, one-line help)
COMMANDS = {
    "train": ("hrjax.experiment", "main", "train a router"),
    "evaluate": ("hrjax.experiment", "evaluate_main", "train over seeds and evaluate against the baselines"),
    "trade_offs": ("hrjax.experiment", "trade_offs_main",
                   "a lambda-conditioned router against fixed-lambda routers at each lambda of the sweep"),
    "export": ("hrjax.export", "main", "write a serving bundle from a trained run"),
    "calibrate": ("hrjax.export", "calibrate_main", "a bundle's mean cost and quality at each lambda"),
    "route": ("hrjax.serving.route", "main", "route questions with a bundle"),
    "serve": ("hrjax.serving.server", "main", "serve a bundle over the OpenAI API"),
    "bench": ("hrjax.benchmarks", "main", "run a benchmark (sampler, rollout, learner, cache, scale, serve)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {doc}" for name, (_, _, doc) in COMMANDS.items()]
    return "usage: hrjax COMMAND [flags]\n\ncommands:\n" + "\n".join(lines) + "\n\nhrjax COMMAND --help: its flags."


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'.\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    result = getattr(importlib.import_module(module), function)([f"hrjax {argv[0]}", *argv[1:]])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
