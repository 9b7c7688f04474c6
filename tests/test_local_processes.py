"""`hrjax.local_processes.run_pinned`: children pinned to their share of the cores, their results in order,
progress summed, and their failures raised here."""

from pathlib import Path

import pytest

from hrjax.errors import HrjaxError, TrainingDivergedError
from hrjax.local_processes import PinnedChildren, default_processes, run_pinned, usable_cores


@pytest.fixture(autouse=True)
def targets_importable(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))


def test_children_run_pinned_and_report_in_order():
    cores, reports = usable_cores(), []
    results = run_pinned("local_process_targets:cores_of", [3, 5], lambda done, postfix: reports.append(done))
    assert results == [cores[0::2] or cores, cores[1::2] or cores]
    assert sorted(reports)[-1] == 8 and len(reports) == 2


def test_children_read_their_payloads_side_by_side():
    """A child reads its payload while it imports the modules the payload names (JAX, in the real payloads),
    so a payload larger than a pipe's buffer, written by one writer, would start each child only once the
    last had imported them."""
    from slow_to_import import IMPORT_SECONDS, Named

    payload = (Named(), b"x" * (4 << 20))  # past any pipe buffer, after the slow import
    starts = run_pinned("local_process_targets:started_at", [payload, payload])
    assert abs(starts[1] - starts[0]) < IMPORT_SECONDS / 2, starts


def test_children_keep_what_they_hold_from_one_job_to_the_next():
    with PinnedChildren(2) as children:
        first = children.run("local_process_targets:remember", ["a", "b"])
        second = children.run("local_process_targets:remember", ["c"], children=[1])  # child 0 idles
        third = children.run("local_process_targets:remember", ["d", "e"])
    (pid_0, _), (pid_1, _) = first
    assert pid_0 != pid_1 and first == [(pid_0, ["a"]), (pid_1, ["b"])]
    assert second == [(pid_1, ["b", "c"])]
    assert third == [(pid_0, ["a", "d"]), (pid_1, ["b", "c", "e"])]


def test_a_child_that_died_takes_no_further_job():
    with PinnedChildren(1) as children:
        with pytest.raises(HrjaxError, match=r"local_process_targets:die on payload 0 died \(exit status 3\)"):
            children.run("local_process_targets:die", [3])
        with pytest.raises(HrjaxError, match=r"Child processes \[0\] have ended"):
            children.run("local_process_targets:remember", ["x"])


def test_a_childs_exception_is_raised_as_its_own_type():
    with pytest.raises(TrainingDivergedError, match="loss became nan"):
        run_pinned("local_process_targets:diverge", ["loss became nan"])


def test_a_child_that_dies_is_named():
    with pytest.raises(HrjaxError, match=r"local_process_targets:die on payload 0 died \(exit status 7\)"):
        run_pinned("local_process_targets:die", [7])


def test_default_processes():
    from hrjax.config import ConfigError, base_config, run_config

    config = base_config()
    config.pool = [dict(name="a", checkpoint="x", base_rate=1.0)]
    config.train.local_processes = -1
    with pytest.raises(ConfigError, match=r"config.train.local_processes must be >= 0"):
        run_config(config.to_dict())
    assert default_processes(3) == 3
    assert 1 <= default_processes() <= len(usable_cores())  # the suite computes on the CPU
    with pytest.raises(HrjaxError, match=">= 0"):
        default_processes(-1)
