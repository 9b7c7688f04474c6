"""Training metrics to a JSONL file and TensorBoard event files (tensorboardX, no TensorFlow).

One JSONL row per logged step: {"step": iteration, <name>: value, ...} (a fresh run's first row is
step 0, the untrained router's eval/* only); per-hop action shares go in as `action_histogram`
([L][A] nested list) and to TensorBoard as `actions/hop<l>/<action name>`.
A resumed run first drops the rows past the checkpoint it resumed from (they are logged again).
Only the chief of a multi-process job writes (`enabled`); the run directory may be gs://, where the
JSONL object is rewritten whole on each write (a bucket object cannot be appended to).
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePath
from typing import Mapping, Optional, Sequence

import numpy as np


class MetricsWriter:
    def __init__(self, workdir, action_names: Sequence[str], resume_step: Optional[int], enabled: bool = True):
        """`workdir`: a local path or an `etils.epath.Path`; `enabled=False`: writes nothing (not the chief)."""
        self.action_names, self.enabled = list(action_names), enabled
        self.path = (workdir if isinstance(workdir, PurePath) else Path(workdir)) / "metrics.jsonl"
        self.local = isinstance(self.path, Path)
        self.rows: list[dict] = []  # gs://: every row, rewritten whole on each write
        self.tensorboard = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        if self.path.exists():
            rows = read_metrics(self.path)
            kept = [r for r in rows if resume_step is not None and r["step"] <= resume_step]
            self.rows = [] if self.local else kept
            if len(kept) != len(rows):
                self._rewrite(kept)
        self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))

    def _rewrite(self, rows: list[dict]) -> None:
        from hrjax.rundir import write_text

        write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        self.write_rows([(step, metrics)])

    def write_rows(self, rows: Sequence[tuple[int, Mapping[str, object]]]) -> None:
        """Logs (step, metrics) rows: one JSONL line and one TensorBoard event (every finite scalar of the row)
        per row, flushed once at the end."""
        if not self.enabled:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        logged = []
        for step, metrics in rows:
            row, scalars = {"step": int(step)}, []
            for name, value in metrics.items():
                value = np.asarray(value)
                if name == "action_histogram":
                    row[name] = value.tolist()
                    scalars += [(f"actions/hop{hop}/{action}", float(share)) for hop, shares in enumerate(value)
                                for action, share in zip(self.action_names, shares)]
                else:
                    row[name] = float(value)
                    if math.isfinite(row[name]):
                        scalars.append((name, row[name]))
            self.tensorboard.file_writer.add_summary(
                Summary(value=[Summary.Value(tag=tag, simple_value=x) for tag, x in scalars]), int(step))
            logged.append(row)
        if self.local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(row) + "\n" for row in logged))
        else:
            self.rows += logged
            self._rewrite(self.rows)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (a last line cut short by a kill is dropped)."""
    rows = []
    with (path if isinstance(path, PurePath) else Path(path)).open(encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows
