"""The embedded default end to end, reduced: the framework trains its own specialists (add, mul and
paren experts), builds the path tree of the add + paren world, trains routers over 3 seeds and
evaluates them against every baseline. Fails if routing is broken."""

import json

from PIL import Image
from runs import reduced_specialist_config

from hrjax.pipeline import evaluate_run

# Measured on the 2-core machine (3 seeds): router 0.854, 95% interval [0.832, 0.877], against the
# best single model's 0.453 (the add expert; no single model solves a paren prompt) and the oracle's
# 0.875. The margin below is ten interval half-widths under the measured gap of 0.40: a router that
# stops composing paren -> mul falls to ~0.45 and fails it, seed noise does not.
MARGIN = 0.25


def test_reduced_specialist_world_router_beats_every_single_model(reduced_quickstart):
    tmp_path, run = reduced_quickstart
    summary = run.summary
    assert summary["num_seeds"] == 3 and summary["num_prompts"] == {"overall": 64, "add": 32, "paren": 32}
    assert summary["router_quality"] >= summary["best_single_quality"] + MARGIN
    assert summary["router"]["overall"]["quality"]["low"] > summary["best_single_quality"]
    assert summary["gap_recovered"] >= 0.7
    baselines = {k: v for k, v in summary["aiq_by_method"].items() if k not in ("router", "oracle")}
    assert summary["aiq"] > max(baselines.values()), (summary["aiq"], baselines)
    # paren needs two different models in sequence: the router's paren paths are paren then mul
    paren_share = summary["methods"]["router"]["paren"]["action_share"]
    names = summary["model_names"]
    assert paren_share[0][names.index("paren")] > 0.9 and paren_share[1][names.index("mul")] > 0.9

    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["router_quality"] == summary["router_quality"]
    report = run.report.read_text()
    for png in ("pareto.png", "paths.png", "learning_curves.png"):
        assert f"]({png})" in report
        with Image.open(tmp_path / "run" / png) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert run.table in report

    # a second call reuses the finished seed runs (not retrained), the cached pool and the cached tree
    before = (tmp_path / "run" / "seed_0" / "metrics.jsonl").read_text()
    again = evaluate_run(reduced_specialist_config(tmp_path), tmp_path / "run", progress=False)
    assert again.summary["router_quality"] == summary["router_quality"]
    assert (tmp_path / "run" / "seed_0" / "metrics.jsonl").read_text() == before
