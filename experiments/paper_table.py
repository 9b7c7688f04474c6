"""The paper's table of one evaluated run: `python -m experiments.paper_table --workdir=RUN`.

Reads RUN/summary.json (written by `hrjax evaluate`, e.g. of experiments/configs/qwen25_paper.py, the
six-family mixture) and writes RUN/paper_table.md and RUN/paper_table.json: per benchmark and overall, each
single model's official figure (the benchmark's own metric, `hrjax.tasks.official`) and quality (the training
reward), the router's, the oracle's, the router's x-gain over each single model (on the official figure) and the
cost (`hrjax.report.paper_table`). RUN may be local or gs://.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "an evaluated run directory (local or gs://) holding the "
                               "summary.json of `hrjax evaluate`")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]} (flags take the form --name=value).")
    from hrjax.evaluate import EvaluationError
    from hrjax.report import write_paper_table
    from hrjax.rundir import as_path

    path = as_path(_WORKDIR.value) / "summary.json"
    try:
        if not path.is_file():
            raise EvaluationError(f"{path} does not exist: run `hrjax evaluate --config=... "
                                  f"--workdir={_WORKDIR.value}` first, or pass the run directory it wrote.")
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{path} is not JSON ({e}): rerun `hrjax evaluate` to rewrite it.") from e
        markdown, data = write_paper_table(path.parent, summary)
    except EvaluationError as e:
        sys.exit(f"error: {e}")
    print(markdown.read_text())
    print(f"paper table: {markdown} and {data}")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
