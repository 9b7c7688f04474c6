"""Plots and a Markdown report of an evaluation summary (`hrjax.evaluate.summarize`).

Figures are plain `matplotlib.figure.Figure`s rendered with Agg (no pyplot, no display), and every
number drawn on them is formatted by `hrjax.evaluate.fmt` from the same summary the tables use.
`write_report(run_dir, summary, runs)` writes summary.json, pareto.png, paths.png,
learning_curves.png (when the seeds' metrics rows are given) and report.md, each whole
(`hrjax.rundir.open_for_writing`: atomically to a local directory, one object upload each on gs://).
`paper_table(summary)` lays one evaluated run out as the paper's table (per benchmark: each single model,
the router, the oracle, the router's x-gain over each single model and the cost);
`write_paper_table(run_dir, summary)` writes it as paper_table.md and paper_table.json.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from hrjax.evaluate import (OVERALL, ROUTER, EvaluationError, _row, anchors_label, fmt, fmt_interval, markdown_table,
                            method_label, official_label, pareto_hull, write_summary)
from hrjax.rundir import RunPath, as_path, open_for_writing, write_text

LEARNING_CURVE_KEYS = ("return", "quality", "cost", "eval/quality", "eval/cost", "eval/value")
SWEPT = ("best_fixed", "knn_one_shot", ROUTER, "oracle")  # methods whose points move with lambda
# hollow or distinct markers, so methods that land on the same point stay visible
MARKERS = {ROUTER: dict(marker="*", ms=13), "oracle": dict(marker="D", ms=9, mfc="none"),
           "knn_one_shot": dict(marker="s", ms=7, mfc="none"), "best_fixed": dict(marker="^", ms=7),
           "random": dict(marker="X", ms=7)}


def pareto_figure(summary: dict) -> Figure:
    """Cost-quality plane, one panel per group: every method's points across the lambda sweep with
    their non-decreasing hull (one point for single models and random routing; for the oracle its
    exact frontier), the single models' hull (RouterBench's zero router) dashed, and each method's
    point at the reported lambda annotated with its quality."""
    groups = list(summary["num_prompts"])
    fig = _figure(len(groups), width=6.0, height=4.5)
    colors = _colors(len(summary["methods"]))
    for ax, group in zip(fig.axes, groups):
        singles = []
        for color, (name, entry) in zip(colors, summary["methods"].items()):
            if name == "zero_router":
                continue
            data = entry[group]
            points = np.array([p[1:] for p in data["points"]], np.float64)
            if name.startswith(("single:", "repeat:")):
                singles.append(points[0])
            label = f"{method_label(summary, name)}, AIQ {fmt(data['aiq']['mean'])}"
            if name in SWEPT:
                hull = np.array(data["frontier"]) if "frontier" in data else pareto_hull(points[:, 0], points[:, 1])
                ax.plot(hull[:, 0], hull[:, 1], "-", color=color, lw=1.5 if name == ROUTER else 1.0, alpha=0.8)
                ax.plot(points[:, 0], points[:, 1], ".", color=color, alpha=0.5)
            cost, quality = data["cost"]["mean"], data["quality"]["mean"]
            ax.plot([cost], [quality], ls="none", color=color, label=label, **MARKERS.get(name, dict(marker="o", ms=6)))
            ax.annotate(fmt(quality), (cost, quality), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=color)
        hull = pareto_hull(*np.array(singles).T)
        zero_aiq = summary["methods"]["zero_router"][group]["aiq"]["mean"]
        ax.plot(hull[:, 0], hull[:, 1], "--", color="grey", lw=1.0,
                label=f"zero router (single-model hull), AIQ {fmt(zero_aiq)}")
        ax.set(title=f"{group} (lambda = {summary['cost_lambda']:g})", xlabel="mean normalised cost",
               ylabel="mean quality")
        ax.grid(alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=7)
    return fig


def paths_figure(summary: dict, method: str = ROUTER) -> Figure:
    """Heat map per group of the share of held-out prompts taking each action at each hop (rows =
    hops, columns = models, + STOP); a row sums to less than 1 when earlier hops stopped."""
    groups = list(summary["num_prompts"])
    actions = list(summary["model_names"]) + (["STOP"] if summary["stop_action"] else [])
    fig = _figure(len(groups), width=1.0 + 0.9 * len(actions), height=1.2 + 0.7 * summary["num_hops"])
    for ax, group in zip(fig.axes, groups):
        share = np.array(summary["methods"][method][group]["action_share"])
        ax.imshow(share, vmin=0.0, vmax=1.0, cmap="Blues", aspect="auto")
        for (hop, action), value in np.ndenumerate(share):
            ax.text(action, hop, fmt(value), ha="center", va="center", fontsize=8,
                    color="white" if value > 0.6 else "black")
        ax.set_xticks(range(len(actions)), actions, rotation=30, fontsize=8)
        ax.set_yticks(range(share.shape[0]), [f"hop {h + 1}" for h in range(share.shape[0])])
        ax.set_title(f"{method}: {group}", fontsize=9)
    return fig


def learning_curves_figure(runs: Sequence[Sequence[Mapping]], keys: Sequence[str] = LEARNING_CURVE_KEYS) -> Figure:
    """One panel per metric of `keys` that the runs hold, against step: the mean over the runs (one
    per seed; each the rows of its metrics.jsonl, {"step": int, name: value}) and a band from their
    min to their max, at the steps where every run logged the metric (eval/* from step 0, the
    untrained router; training metrics from the first Python step)."""
    def series(rows, key) -> dict:
        return {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}

    curves = {}
    for key in keys:
        per_run = [series(rows, key) for rows in runs]
        steps = sorted(set.intersection(*(set(s) for s in per_run))) if per_run else []
        if steps:
            curves[key] = (np.array(steps), np.array([[s[step] for step in steps] for s in per_run]))  # [R, T]
    if not curves:
        raise EvaluationError(f"No step of the metrics rows holds any of {list(keys)} in every run: pass each seed's "
                              "metrics.jsonl rows (hrjax.metrics.read_metrics) or name the keys to plot.")
    fig = _figure(len(curves), width=4.0, height=3.0)
    fig.suptitle(f"mean over {len(runs)} seed(s); band: min to max", fontsize=9)
    for ax, (key, (steps, values)) in zip(fig.axes, curves.items()):
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.25, lw=0)
        ax.plot(steps, values.mean(axis=0), ".-" if len(steps) < 30 else "-", lw=1.0)
        ax.set(title=key, xlabel="iteration")
        ax.grid(alpha=0.3)
    return fig


def write_report(run_dir: str | os.PathLike, summary: dict,
                 runs: Sequence[Sequence[Mapping]] | None = None) -> RunPath:
    """Writes summary.json, the PNGs and report.md (the tables, how their metrics are computed and
    the PNGs) into `run_dir` (local or gs://) -> the report.md path. `runs`: each seed's metrics.jsonl rows."""
    run_dir = as_path(run_dir)
    write_summary(run_dir / "summary.json", summary)
    figures = {"pareto.png": ("Cost-quality trade-off", pareto_figure(summary)),
               "paths.png": ("Routing paths of the held-out prompts", paths_figure(summary))}
    if runs:
        figures["learning_curves.png"] = ("Learning curves (selection prompts for eval/*)",
                                          learning_curves_figure(runs))
    for name, (_, fig) in figures.items():
        save_png(fig, run_dir / name)
    lines = [f"# Router evaluation (lambda = {summary['cost_lambda']:g}, {summary['num_seeds']} seeds)", "",
             f"Held-out prompts: {', '.join(f'{g} {n}' for g, n in summary['num_prompts'].items())}. "
             "Intervals in brackets are 95% t-intervals over seeds.", "", markdown_table(summary),
             *metric_definitions(summary), ""]
    for name, (title, _) in figures.items():
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    path = run_dir / "report.md"
    with open_for_writing(path, "w") as f:
        f.write("\n".join(lines))
    return path


def metric_definitions(summary: dict) -> list[str]:
    """report.md's lines saying what quality and the official figures are and how the gap recovered, APGR and AIQ
    are computed (`summarize`)."""
    lam = f"{summary['cost_lambda']:g}"
    return [
        "- **quality**: the training reward (the env's scorer) of the final answer, as the router was trained on it; "
        "the gains, gap recovered, APGR and AIQ are on it.",
        *official_definitions(summary),
        f"- **gap recovered at lambda = {lam}**: (router - best single) / (oracle - best single) mean quality at "
        f"lambda = {lam}; the oracle maximises quality - lambda * cost per prompt, the best single model is chosen "
        "on these held-out prompts' quality.",
        "- **APGR** (RouteLLM's average performance gap recovered): the mean over normalised cost c from the weak "
        "to the strong model's cost of (q(c) - weak quality) / (strong quality - weak quality), q(c) read off the "
        "method's hull over the lambda sweep (0 left of its cheapest point; per seed, then the t-interval). Weak = "
        "the cheapest single model, strong = the best one (the two ends of the single models' hull); overall: "
        f"{anchors_label(summary['apgr_anchors'])}. A method whose curve rises above the strong model's quality "
        "scores above 1.",
        "- **AIQ** (RouterBench): the mean quality of a method's hull over the lambda sweep across the cost range "
        "of all methods' points in the group (overall: "
        f"{fmt(summary['aiq_cost_range'][OVERALL][0])} to {fmt(summary['aiq_cost_range'][OVERALL][1])}), 0 left of "
        "its cheapest point. The oracle's curve is exact (every lambda in [0, +inf], from each prompt's cheapest "
        "answer), so it bounds every method.",
        "- **eval/* learning curves**: the greedy router on the selection prompts (which also choose each seed's "
        "best/ checkpoint), never on the held-out prompts scored here; the routers scored here are the final ones.",
    ]


def official_definitions(summary: dict) -> list[str]:
    """The lines defining the official figures of a summary that has them (none otherwise)."""
    if "official_metrics" not in summary:
        return []
    families = {family: names for groups in summary["official_metrics"].values() for family, names in groups.items()}
    each = "; ".join(f"{family}: {names[0]}" + (f" (also {', '.join(names[1:])} in summary.json)" if names[1:] else "")
                     for family, names in families.items())
    return [
        "- **official**: the benchmark's own metric (`hrjax.tasks.official`, reproducing its reference evaluation) of "
        f"the final answer, per family the headline metric: {each}. A group of several families (overall) shows the "
        "mean over its prompts of each prompt's family headline metric. The oracle's is at the answers it picks by "
        "reward quality."]


def paper_table(summary: dict) -> list[dict]:
    """The paper's table of one evaluated run (`hrjax.evaluate.summarize`): one row per benchmark (each task of
    the summary, in its order), then an `overall` row over every held-out prompt (so a benchmark weighs by its
    number of prompts). A row (interval: {"mean", "low", "high"}, 95% t over seeds):

        {"benchmark": str, "prompts": int,
         "metric": str or None,                    # the official figure's name (`official_label`)
         "single": {model: {"quality": float, "official": float, "cost": float}},  # the model's one-hop answer
         "router": {"quality": interval, "official": interval, "cost": interval},
         "oracle": {"quality": float, "official": float, "cost": float},  # per-prompt best at the reported lambda
         "x_gain": {model: interval or None},
         "x_gain_on": "official" or "quality"}

    quality is the training reward; official the benchmark's own metric (the summary's `official_headline`: per
    benchmark its headline metric, overall the mean over prompts of each one's), present (and `metric` set) when
    the summary has official metrics. x-gain over a single model = router / that model's figure, on the official
    metric when there is one, else on quality; a single model is deterministic, so the router's interval over
    seeds divided by it is the x-gain's. None where the model's figure is 0 (the ratio is undefined; the
    Markdown shows n/a). Costs are mean cumulative normalised costs per prompt."""
    missing = [key for key in ("num_prompts", "model_names", "methods", "router") if key not in summary]
    if missing:
        raise EvaluationError(f"The summary lacks {missing}: pass the summary.json that `hrjax evaluate` writes "
                              "(hrjax.evaluate.summarize), not another file.")
    methods, groups = summary["methods"], [g for g in summary["num_prompts"] if g != OVERALL] + [OVERALL]
    absent = [f"single:{m}" for m in summary["model_names"] if f"single:{m}" not in methods]
    if absent:
        raise EvaluationError(f"The summary has no {absent} methods for its models {summary['model_names']}: "
                              "pass an unedited summary.json of `hrjax evaluate`.")

    gain_on = "official" if "official_metrics" in summary else "quality"
    figures = {"quality": "quality", "official": "official_headline", "cost": "cost"}  # row key: summary key
    figures = {key: at for key, at in figures.items() if key != "official" or gain_on == "official"}

    def point(name: str, group: str) -> dict:
        return {key: methods[name][group][at]["mean"] for key, at in figures.items()}

    def ratio(interval: dict, denominator: float | None) -> dict | None:
        if not denominator or interval["mean"] is None:
            return None
        return {key: value / denominator for key, value in interval.items()}

    rows = []
    for group in groups:
        single = {m: point(f"single:{m}", group) for m in summary["model_names"]}
        router = {key: summary[ROUTER][group][at] for key, at in figures.items()}
        rows.append({"benchmark": group, "prompts": summary["num_prompts"][group],
                     "metric": official_label(summary, group), "single": single, "router": router,
                     "oracle": point("oracle", group), "x_gain_on": gain_on,
                     "x_gain": {m: ratio(router[gain_on], p[gain_on]) for m, p in single.items()}})
    return rows


def paper_table_markdown(summary: dict, rows: Sequence[dict]) -> str:
    """paper_table.md: the rows of `paper_table` as one Markdown table (official figure when there is one, quality,
    x-gain, cost) and what they mean."""
    models = summary["model_names"]
    official = any(r["metric"] for r in rows)

    def titles(key: str) -> list[str]:
        return [f"{key} {m}" for m in models] + [f"{key} router", f"{key} oracle"]

    def cells(r: dict, key: str) -> list[str]:
        return [fmt(r["single"][m][key]) for m in models] + [fmt_interval(r["router"][key]), fmt(r["oracle"][key])]

    head = (["benchmark", "prompts"] + (["official metric", *titles("official")] if official else [])
            + titles("quality") + [f"router x-gain vs {m}" for m in models] + titles("cost"))
    lines = [f"# Paper table (lambda = {summary['cost_lambda']:g}, {summary['num_seeds']} seed(s))", "",
             _row(head), _row(["---"] * len(head))]
    for r in rows:
        gains = [fmt_interval(r["x_gain"][m]) if r["x_gain"][m] else "n/a" for m in models]
        shown = [r["metric"], *cells(r, "official")] if official else []
        lines.append(_row([r["benchmark"], str(r["prompts"]), *shown, *cells(r, "quality"), *gains,
                           *cells(r, "cost")]))
    lam = f"{summary['cost_lambda']:g}"
    on = "official figure" if official else "quality"
    return "\n".join(lines + [
        "", f"- **quality**: mean training reward (the env's scorer) of the held-out prompts' final answers; a single "
        f"model answers once; the router's paths are greedy at lambda = {lam} (95% t-interval over seeds in "
        f"brackets); the oracle takes, per prompt, the answer of best quality - {lam} * cost over every path a "
        "method here can end with.",
        *(["- **official**: the benchmark's own metric (column `official metric`; `hrjax.tasks.official` reproduces "
           "its reference evaluation) of the same final answers; overall: the mean over every prompt of its "
           "benchmark's headline metric. The oracle's is at the answers it picks by reward quality."]
          if official else []),
        f"- **router x-gain vs a model**: router {on} / that model's {on} (the router's interval divided by "
        "it); n/a where the model scores 0 on the benchmark, so the ratio is undefined.",
        "- **cost**: mean cumulative normalised cost per prompt.",
        f"- **overall**: every held-out prompt ({rows[-1]['prompts']}), so each benchmark weighs by its prompts.", ""])


def write_paper_table(run_dir: str | os.PathLike, summary: dict) -> tuple[RunPath, RunPath]:
    """Writes `paper_table(summary)` into `run_dir` (local or gs://, each file whole: `open_for_writing`) as
    paper_table.md and paper_table.json ({"cost_lambda", "num_seeds", "model_names", "rows"}) -> both paths."""
    run_dir = as_path(run_dir)
    rows = paper_table(summary)
    table = {key: summary[key] for key in ("cost_lambda", "num_seeds", "model_names")} | {"rows": rows}
    markdown, data = run_dir / "paper_table.md", run_dir / "paper_table.json"
    write_text(data, json.dumps(table, indent=2) + "\n")
    write_text(markdown, paper_table_markdown(summary, rows))
    return markdown, data


def save_png(fig: Figure, path: str | os.PathLike) -> RunPath:
    """Renders `fig` with Agg to a PNG at a local or gs:// path (`open_for_writing`) -> the path. The
    figures use the constrained layout, which already fits titles, labels and the outside legend:
    `bbox_inches="tight"` would draw each twice (the 3 report figures 3.3-4.1 s against 2.6-3.3 s)."""
    path = as_path(path)
    with open_for_writing(path) as f:
        fig.savefig(f, format="png", dpi=120)
    return path


def _figure(panels: int, width: float, height: float) -> Figure:
    """A figure with `panels` axes on a grid of at most 3 columns (unused cells removed)."""
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.remove()
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    name = "tab10" if n <= 10 else "tab20"
    return [colormaps[name](i % colormaps[name].N) for i in range(n)]
