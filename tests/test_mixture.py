"""One router over a mixture of tasks (`config.task.name = "mixture"`): the paper-style config over the six
benchmark families, its config checks, and one end-to-end run on tiny random Qwen2 models (the paper pool's
architecture) and fixture files in each family's upstream format, laid out as the paper's table by
`experiments/paper_table.py`."""

import copy
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from runs import REPO
from test_task_datasets import (
    gsm8k_rows, hotpot_orig, humaneval_rows, math_files, mbpp_row, MBPP_IDS, trivia_orig_row, write_json,
    write_jsonl,
)
from tiny_models import make_tiny_pool_member

from hrjax.config import ConfigError, TaskConfig, TaskPart, run_config
from hrjax.evaluate import fmt, fmt_interval
from hrjax.report import paper_table, paper_table_markdown

FAMILIES = ["gsm8k", "math", "mbpp", "humaneval", "triviaqa", "hotpotqa"]


def paper_config(*args):
    spec = importlib.util.spec_from_file_location("qwen25_paper", REPO / "experiments/configs/qwen25_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def test_the_paper_config_is_one_run_over_the_six_families():
    config = run_config(paper_config().to_dict())
    assert config.task.name == "mixture" and [p.name for p in config.task.parts] == FAMILIES
    held_out = {p.name: (p.select_split, p.eval_split) for p in config.task.parts}
    assert held_out["triviaqa"] == held_out["hotpotqa"] == ("train", "validation")  # no public test answers
    assert held_out["gsm8k"] == ("validation", "test")
    assert all((p.num_train, p.num_select, p.num_eval) == (1000, 100, 200) for p in config.task.parts)
    assert [(m.name, m.checkpoint, m.dtype) for m in config.pool] == [
        ("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "bfloat16"),
        ("qwen2.5-math-1.5b-instruct", "Qwen/Qwen2.5-Math-1.5B-Instruct", "bfloat16"),
        ("qwen2.5-coder-1.5b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "bfloat16")]
    assert config.env.num_hops == 3 and config.env.max_new_tokens == 512  # the largest family's budget
    assert config.task.answer_format and "\nQuestion:" in config.env.stop  # the QA families' format stop
    one = run_config(paper_config("hotpotqa").to_dict())
    assert (one.task.name, one.task.mixture, one.task.parts[0].eval_split, one.env.max_new_tokens) == (
        "hotpotqa", (), "validation", 64)
    with pytest.raises(ValueError, match="choose one of"):
        paper_config("gsm8")


def test_the_qwen3_pool_config_is_the_paper_experiment_over_qwen3():
    spec = importlib.util.spec_from_file_location("qwen3_pool", REPO / "experiments/configs/qwen3_pool.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for family in ("", "math"):
        qwen3, paper = run_config(module.get_config(family).to_dict()), run_config(paper_config(family).to_dict())
        assert [(m.name, m.checkpoint, m.base_rate, m.prompt_template) for m in qwen3.pool] == [
            (f"qwen3-{size}", f"Qwen/Qwen3-{size.upper()}", rate, "{message} /no_think")
            for size, rate in (("0.6b", 0.6), ("1.7b", 1.7), ("4b", 4.0))]
        assert (qwen3.task, qwen3.env, qwen3.ppo) == (paper.task, paper.env, paper.ppo)


@pytest.mark.parametrize("task, message", [
    (dict(name="mixture"), "config.task.mixture is empty"),
    (dict(name="gsm8k", mixture=[dict(name="math")]), "set config.task.name = 'mixture'"),
    (dict(name="mixture", num_train=5, mixture=[dict(name="math")]), "config.task.num_train is set but"),
    (dict(name="mixture", mixture=[dict(name="math"), dict(name="triviaqa", eval_split="train")]),
     r"config.task.mixture\[1\].eval_split and train_split are both 'train'"),
    (dict(name="mixture", mixture=[dict(name="math", num_trian=3)]), r"config.task.mixture\[0\].num_trian: unknown"),
])
def test_a_bad_mixture_is_one_clear_error(task, message):
    with pytest.raises(ConfigError, match=message):
        run_config({"pool": [dict(name="m", checkpoint="x", base_rate=1.0)], "task": task})
    assert TaskConfig().parts == (TaskPart(),)  # one task: itself


def write_fixture_files(manual):
    """A few records of each family, in its upstream file layout."""
    for split in ("train", "test"):
        write_jsonl(manual / "gsm8k" / f"{split}.jsonl", gsm8k_rows(split))
    math_files(manual / "math")
    write_jsonl(manual / "mbpp" / "mbpp.jsonl", [mbpp_row(i) for ids in MBPP_IDS.values() for i in ids])
    write_jsonl(manual / "humaneval" / "HumanEval.jsonl", humaneval_rows())
    trivia = [trivia_orig_row(f"tc_{i}", f"Question {i}?", f"Answer {i}", [f"A{i}"]) for i in range(5)]
    write_json(manual / "triviaqa" / "qa" / "web-train.json", {"Data": trivia[:3]})
    write_json(manual / "triviaqa" / "qa" / "web-dev.json", {"Data": trivia[3:]})
    write_json(manual / "hotpotqa" / "hotpot_train_v1.1.json", [hotpot_orig(i, "train") for i in range(3)])
    write_json(manual / "hotpotqa" / "hotpot_dev_distractor_v1.json", [hotpot_orig(i, "dev") for i in range(2)])


@pytest.fixture(scope="module")
def tiny_qwen2_pool(tiny_pool, tmp_path_factory):
    """`tiny_pool` with tiny random Qwen2 members (the paper pool's architecture: q/k/v biases) of the same names
    and rates over the same tokenizer; its data and cache dirs."""
    from hrjax import assets

    root = tmp_path_factory.mktemp("tiny_qwen2_pool")
    tokenizer = assets.minilm_path()
    pool = [{**member, "checkpoint": str(make_tiny_pool_member("qwen2", root / member["name"], tokenizer, i))}
            for i, member in enumerate(tiny_pool["pool"])]
    return {**tiny_pool, "pool": pool}


def test_the_paper_mixture_trains_and_evaluates_end_to_end(tiny_qwen2_pool, tmp_path):
    from hrjax.pipeline import evaluate_run

    write_fixture_files(tmp_path / "manual")
    config = paper_config()
    options = {"gsm8k": dict(validation_fraction=0.4), "math": dict(validation_fraction=0.34),
               "humaneval": dict(source="manual")}  # enough rows to carve a validation split; the fixture file
    for part in config.task.mixture:
        part.update(num_train=1, num_select=1, num_eval=1, options=options.get(part["name"], {}))
    config.pool = tiny_qwen2_pool["pool"]
    config.task.update(data_dir=str(tmp_path / "data"), manual_dir=str(tmp_path / "manual"))
    config.train.update(cache_dir=tiny_qwen2_pool["cache_dir"], num_iterations=2, iterations_per_step=1)
    config.env.update(num_hops=1, max_new_tokens=4)
    config.network.hidden = 16
    config.ppo.update(num_envs=8, minibatches=2)
    config.evaluate.update(seeds=1, cost_lambdas=[config.env.cost_lambda])  # no sweep to train
    config = run_config(config.to_dict())
    run = evaluate_run(config, tmp_path / "run", progress=False)

    summary = run.summary
    assert summary["num_prompts"] == {"overall": 6, **{family: 1 for family in FAMILIES}}
    for family in ["overall", *FAMILIES]:  # the per-family and overall report of every method
        router = summary["router"][family]
        assert router["quality"]["mean"] is not None
        assert summary["methods"]["oracle"][family]["quality"]["mean"] >= router["best_single_quality"]
    single = summary["methods"]["single:tiny-0"]  # overall: the mean over the families' prompts
    assert single["overall"]["quality"]["mean"] == pytest.approx(
        sum(single[family]["quality"]["mean"] for family in FAMILIES) / len(FAMILIES))
    report = run.report.read_text()
    assert all(f"| {family} |" in report for family in FAMILIES)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_prompts"] == summary["num_prompts"]
    check_official_scores(config, summary)
    check_paper_table(tmp_path / "run", summary)


def check_official_scores(config, summary):
    """The run's path tree holds the official metrics of every node's response, recomputed here from the env's
    cached responses (the formatted answer's: `formatted_official_score`); a shard build (the multi-process path)
    holds the same; the summary's official figures are the means of the tree's at each single model's node."""
    from hrjax.env.mdp import Context
    from hrjax.env.tree import shard_path
    from hrjax.tasks.answers import formatted_official_score
    from hrjax.tasks.official import HEADLINE_METRIC, official_metrics
    from hrjax.train import build_tree_share, load_data, load_or_build_scored_tree, make_env, tree_meta, tree_path

    data = load_data(config)
    tree, official = load_or_build_scored_tree(config, data.examples, progress=False)  # the run's, from the cache
    env = make_env(config)
    families = [e.task for e in data.examples]
    assert official.families.tolist() == families and official.values.shape == (len(families), 2, 2)
    for i, family in enumerate(families):  # the headline metric first, '' past the family's metrics
        names = [HEADLINE_METRIC[family], *sorted(set(official_metrics(family)) - {HEADLINE_METRIC[family]})]
        assert official.names[i].tolist() == names + [""] * (2 - len(names))
        assert np.isnan(official.values[i, :, len(names):]).all()
    for model in range(len(config.pool)):  # one hop: node m is model m's answer
        responses = env.respond(model, [Context(e.question) for e in data.examples]).responses
        for i, (example, response) in enumerate(zip(data.examples, responses)):
            expected = formatted_official_score(example, response.text)
            names = [n for n in official.names[i] if n]
            assert official.values[i, model, :len(names)].tolist() == [expected[n] for n in names]
    meta = tree_meta(config, data.examples)
    for _ in ("built", "read back"):
        part, shared = build_tree_share(config, data.examples, meta, tree_path(config, meta), progress=False)
        np.testing.assert_array_equal(shared.values, official.values)
        assert shared.names.tolist() == official.names.tolist() and part.quality.tolist() == tree.quality.tolist()
    assert shard_path(tree_path(config, meta), 0, 1).exists()

    eval_rows = data.rows("eval")
    for family in FAMILIES:
        rows = eval_rows[[data.examples[r].task == family for r in eval_rows]]
        assert summary["official_metrics"][family] == {family: [n for n in official.names[rows[0]] if n]}
        for model, name in enumerate(summary["model_names"]):
            figures = summary["methods"][f"single:{name}"][family]
            assert figures["official_headline"]["mean"] == pytest.approx(official.values[rows, model, 0].mean())
            for j, metric in enumerate(summary["official_metrics"][family][family]):
                assert figures["official"][metric]["mean"] == pytest.approx(official.values[rows, model, j].mean())


def test_answer_formats_are_asked_for_and_only_the_formatted_answer_scores(tmp_path, monkeypatch):
    import dataclasses

    from hrjax.tasks.answers import formatted_score
    from hrjax.tasks.datasets import BUILDERS
    from hrjax.tasks.scorers import score_example
    from hrjax.tasks.official import official_score
    from hrjax.train import load_data, official_scoring, quality_fn, tree_meta

    write_fixture_files(tmp_path / "manual")
    task = dict(name="mixture", data_dir=str(tmp_path / "data"), manual_dir=str(tmp_path / "manual"),
                mixture=[dict(name="gsm8k", num_train=2, options=dict(validation_fraction=0.4)),
                         dict(name="triviaqa", select_split="train", eval_split="validation", num_train=2, num_select=1),
                         dict(name="humaneval", num_train=2, options=dict(source="manual"))])
    pool = [dict(name="m", checkpoint=str(tmp_path), base_rate=1.0)]
    asked = run_config(dict(pool=pool, task=dict(task, answer_format=True), env=dict(stop=["\n\n\n"])))
    plain = run_config(dict(pool=pool, task=task, env=dict(stop=["\n\n\n"])))
    formats = {name: BUILDERS[name].ANSWER_FORMAT for name in ("gsm8k", "triviaqa", "humaneval")}
    assert asked.env.stop == ("\n\n\n", *dict.fromkeys(s for f in formats.values() for s in f.stop))
    assert plain.env.stop == ("\n\n\n",) and run_config(asked.to_dict()).env.stop == asked.env.stop
    with_format, without = load_data(asked), load_data(plain)
    assert len(with_format.examples) == len(without.examples) > 0
    for example, original in zip(with_format.examples, without.examples):
        assert example.question == formats[example.task].ask(original.question)
        assert example.question.endswith(formats[example.task].instruction)
    assert tree_meta(asked, with_format.examples) != tree_meta(plain, with_format.examples)
    before = tree_meta(asked, with_format.examples)
    monkeypatch.setattr(BUILDERS["gsm8k"], "ANSWER_FORMAT", dataclasses.replace(formats["gsm8k"], version=2))
    assert tree_meta(asked, with_format.examples) != before  # an extractor fix: formatted answers are scored again
    monkeypatch.setattr(BUILDERS["gsm8k"], "ANSWER_FORMAT", formats["gsm8k"])
    assert (quality_fn(asked), quality_fn(plain)) == (formatted_score, score_example)  # the env's scorer

    gsm8k = next(e for e in with_format.examples if e.task == "gsm8k")
    answer = gsm8k.answers[0]
    assert formatted_score(gsm8k, f"Adding them up gives {answer}.") == 0.0  # not in the format: not read
    assert formatted_score(gsm8k, f"Adding them up.\n#### {answer}") == 1.0

    # the tree's official scores (one batch per chunk): of the formatted answer, each metric 0.0 without one
    trivia = next(e for e in with_format.examples if e.task == "triviaqa")
    batch, gold = [trivia, gsm8k, trivia], trivia.metadata["normalized_aliases"][0]  # the official golds
    responses = [f"It is well known.\nAnswer: {gold}", f"Adding them up gives {answer}.", gold]
    formatted = official_scoring(asked, batch).score(batch, responses)
    assert formatted == [official_score(trivia, gold), {"strict_match": 0.0, "flexible_extract": 0.0},
                         {"exact_match": 0.0, "f1": 0.0}]
    raw = official_scoring(plain, batch).score(batch, responses)
    assert raw == [official_score(e, r) for e, r in zip(batch, responses)] and raw != formatted
    assert formatted[0]["exact_match"] == raw[2]["exact_match"] == 1.0
    with pytest.raises(ConfigError, match="none of the tasks \\['specialist_world'\\] declares an answer format"):
        run_config(dict(pool=pool, task=dict(name="specialist_world", answer_format=True)))


def markdown_rows(markdown: str) -> list[list[str]]:
    """The cells of a Markdown table's body rows."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][2:]
    return [line[2:-2].split(" | ") for line in lines]


def check_paper_table(run_dir, summary):
    """`python -m experiments.paper_table` on an evaluated run: its rows against the run's summary.json, the
    official figure (each benchmark's headline metric) beside the reward quality; the x-gains (on the official
    figure) and an n/a for a 0 denominator on a copy of the summary with a scoring single model (the tiny random
    models score 0 everywhere)."""
    done = subprocess.run([sys.executable, "-m", "experiments.paper_table", f"--workdir={run_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = json.loads((run_dir / "paper_table.json").read_text())
    rows, models, methods = table["rows"], summary["model_names"], summary["methods"]
    assert [r["benchmark"] for r in rows] == [*FAMILIES, "overall"] and table["model_names"] == models
    figures = {"quality": "quality", "official": "official_headline", "cost": "cost"}  # row key: summary key
    for row in rows:
        group = row["benchmark"]
        assert row["prompts"] == summary["num_prompts"][group]
        assert row["single"] == {m: {key: methods[f"single:{m}"][group][at]["mean"] for key, at in figures.items()}
                                 for m in models}
        assert row["router"] == {key: summary["router"][group][at] for key, at in figures.items()}
        assert row["oracle"]["quality"] == summary["router"][group]["oracle_quality"]
        assert row["oracle"]["cost"] == methods["oracle"][group]["cost"]["mean"]
        assert row["oracle"]["official"] == methods["oracle"][group]["official_headline"]["mean"]
        headline = {"gsm8k": "strict_match", "math": "accuracy", "mbpp": "pass@1", "humaneval": "pass@1",
                    "triviaqa": "exact_match", "hotpotqa": "f1"}.get(group)
        assert row["metric"] == (f"{group} {headline}" if headline else "headline metrics")
        assert row["x_gain"] == {m: None for m in models} and row["x_gain_on"] == "official"  # singles score 0
    benchmarks, overall = rows[:-1], rows[-1]  # overall: every prompt, each benchmark weighed by its prompts
    weights = [r["prompts"] for r in benchmarks]
    for cell in [lambda r: r["router"]["cost"]["mean"], lambda r: r["oracle"]["cost"],
                 *[lambda r, m=m: r["single"][m]["cost"] for m in models]]:
        assert cell(overall) == pytest.approx(np.average([cell(r) for r in benchmarks], weights=weights))
    cells = markdown_rows((run_dir / "paper_table.md").read_text())
    assert [c[:2] for c in cells] == [[r["benchmark"], str(r["prompts"])] for r in rows]

    def shown(key):
        return ([fmt(overall["single"][m][key]) for m in models]
                + [fmt_interval(overall["router"][key]), fmt(overall["oracle"][key])])

    assert cells[-1][2:] == ["headline metrics", *shown("official"), *shown("quality"), *["n/a"] * len(models),
                             *shown("cost")]

    scoring = copy.deepcopy(summary)  # on math tiny-0 scores 0.25 and 0.2 official, the router 0.5 [0.4, 0.6]
    scoring["methods"]["single:tiny-0"]["math"]["quality"]["mean"] = 0.25  # official, the oracle 0.75 both
    scoring["methods"]["single:tiny-0"]["math"]["official_headline"]["mean"] = 0.2
    scoring["router"]["math"]["quality"] = scoring["router"]["math"]["official_headline"] = {"mean": 0.5, "low": 0.4,
                                                                                             "high": 0.6}
    scoring["methods"]["oracle"]["math"]["quality"]["mean"] = scoring["router"]["math"]["oracle_quality"] = 0.75
    scoring["methods"]["oracle"]["math"]["official_headline"]["mean"] = 0.75
    rows = paper_table(scoring)
    math_row = rows[FAMILIES.index("math")]
    assert (math_row["single"]["tiny-0"]["quality"], math_row["oracle"]["quality"]) == (0.25, 0.75)
    assert (math_row["single"]["tiny-0"]["official"], math_row["oracle"]["official"]) == (0.2, 0.75)
    assert math_row["x_gain"] == {"tiny-0": pytest.approx({"mean": 2.5, "low": 2.0, "high": 3.0}), "tiny-1": None}
    table = paper_table_markdown(scoring, rows)
    assert "- **router x-gain vs a model**: router official figure / that model's official figure" in table
    math_cells = markdown_rows(table)[FAMILIES.index("math")]
    assert math_cells[2:4] + math_cells[11:13] == ["math accuracy", "0.200", "2.500 [2.000, 3.000]", "n/a"]
