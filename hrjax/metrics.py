"""Training metrics to a JSONL file and TensorBoard event files (tensorboardX, no TensorFlow).

One JSONL row per logged step: {"step": iteration, <name>: value, ...} (a fresh run's first row is
step 0, the untrained router's eval/* only); per-hop action shares go in as `action_histogram`
([L][A] nested list) and to TensorBoard as `actions/hop<l>/<action name>`.
A resumed run first drops the rows past the checkpoint it resumed from (they are logged again).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from hrjax.fsutil import atomic_file


class MetricsWriter:
    def __init__(self, workdir: str | Path, action_names: Sequence[str], resume_step: Optional[int]):
        from tensorboardX import SummaryWriter

        self.path = Path(workdir) / "metrics.jsonl"
        self.action_names = list(action_names)
        if self.path.exists():
            rows = read_metrics(self.path)
            kept = [r for r in rows if resume_step is not None and r["step"] <= resume_step]
            if len(kept) != len(rows):
                with atomic_file(self.path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
        self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        row = {"step": int(step)}
        for name, value in metrics.items():
            value = np.asarray(value)
            if name == "action_histogram":
                row[name] = value.tolist()
                for hop, shares in enumerate(value):
                    for action, share in zip(self.action_names, shares):
                        self.tensorboard.add_scalar(f"actions/hop{hop}/{action}", float(share), step)
            else:
                row[name] = float(value)
                if math.isfinite(row[name]):
                    self.tensorboard.add_scalar(name, row[name], step)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (a last line cut short by a kill is dropped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows
