"""The worker loop (segsearch.worker.run_worker) and the launcher's supervision
(segsearch.launcher), in-process and fast: real studies on temporary SQLite files, tiny trials,
real signals and real child processes. The slow layer runs the same code as separate processes
(tests/test_search.py, tests/test_faults.py); these tests reach it where mutation testing sees it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from test_study_side import GOOD, SPACE, Run, empty_database  # noqa: F401 (a fixture)

import segsearch.worker
from segsearch.interrupts import Interrupts
from segsearch.worker import DEADLINE_ENV, GAVE_UP, GIVE_UP_AFTER, run_worker

# whole worker loops with real signals: the slow layer, and mutation testing runs them too
pytestmark = [pytest.mark.slow, pytest.mark.mutation]


@pytest.fixture(autouse=True)
def handlers(monkeypatch):
    """run_worker installs its signal handlers in this process: put pytest's back after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.delenv(DEADLINE_ENV, raising=False)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def budget_of(n: int) -> dict:
    raw = json.loads(json.dumps(SPACE))
    raw["study"]["n_trials"] = n
    return raw


def trials(run: Run) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="s", storage=run.url).trials


def test_a_worker_runs_trials_until_the_budget_is_met(tmp_path, monkeypatch):
    run = Run(tmp_path, monkeypatch)  # a budget of 3 trials
    optuna.create_study(study_name="another", storage=run.url)  # the worker must name its own
    assert run_worker("s", run.url, seed=3, device="cpu") == 0
    done = trials(run)
    assert [t.state for t in done] == [TrialState.COMPLETE] * 3
    assert {t.user_attrs["pid"] for t in done} == {os.getpid()}
    assert {t.user_attrs["sampler_seed"] for t in done} == {3}
    assert all(t.user_attrs["device"] == "cpu" for t in done)
    assert isinstance(signal.getsignal(signal.SIGTERM), Interrupts)
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM)
    assert run_worker("s", run.url, seed=3, device="cpu") == 0  # met: nothing more
    assert len(trials(run)) == 3


def test_the_time_limit_its_own_or_the_searchs(tmp_path, monkeypatch, caplog):
    """`timeout` counts from the worker's start; a search's workers share the search's deadline
    (DEADLINE_ENV), which wins over their own. The same seed samples the same trials."""
    run = Run(tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO, logger="segsearch.worker"):
        assert run_worker("s", run.url, 3, "cpu", timeout=0) == 0
    assert trials(run) == []  # past the limit: no trial started
    said = [r.getMessage() for r in caplog.records if r.name == "segsearch.worker"]
    assert said == ["time limit reached: no new trial"]
    assert run_worker("s", run.url, 3, "cpu", timeout=600) == 0
    first = [t.params for t in trials(run)]
    assert len(first) == 3
    (tmp_path / "b").mkdir()
    run = Run(tmp_path / "b", monkeypatch)
    monkeypatch.setenv(DEADLINE_ENV, repr(time.time() - 1))
    assert run_worker("s", run.url, 3, "cpu", timeout=600) == 0
    assert trials(run) == []
    monkeypatch.setenv(DEADLINE_ENV, repr(time.time() + 600))
    assert run_worker("s", run.url, 3, "cpu", timeout=0) == 0
    assert [t.params for t in trials(run)] == first


def test_a_trial_running_past_the_time_limit_stops_and_is_retried_later(tmp_path, monkeypatch):
    raw = budget_of(5)
    raw["fixed"]["epochs"] = 200  # far longer than the limit
    run = Run(tmp_path, monkeypatch, raw=raw)
    assert run_worker("s", run.url, 0, "cpu", timeout=1.0) == 0
    done = trials(run)
    assert [t.state for t in done] == [TrialState.FAIL, TrialState.WAITING]
    assert done[0].user_attrs["fail_reason"].startswith("stopped at the time limit")
    assert 0 < len(done[0].intermediate_values) < 200


def test_a_worker_gives_up_after_trials_fail_in_a_row_and_a_success_resets_the_count(
    tmp_path, monkeypatch, caplog
):
    """Diverging trials (lr 1e30) end FAIL; GIVE_UP_AFTER of them in a row stop the worker with
    GAVE_UP, which the launcher does not restart. A good trial in between starts the count anew."""
    run = Run(tmp_path, monkeypatch, raw=budget_of(100))
    bad = {"patch_size": 16, "lr": 1.0e30}
    for params in [bad] * (GIVE_UP_AFTER - 1) + [GOOD] + [bad] * (GIVE_UP_AFTER + 1):
        run.study.enqueue_trial(params)
    with caplog.at_level(logging.ERROR, logger="segsearch.worker"):
        assert run_worker("s", run.url, 0, "cpu") == GAVE_UP
    states = [t.state for t in trials(run) if t.state != TrialState.WAITING]
    fail, complete = TrialState.FAIL, TrialState.COMPLETE
    assert states == [fail] * (GIVE_UP_AFTER - 1) + [complete] + [fail] * GIVE_UP_AFTER
    assert [r.getMessage() for r in caplog.records if r.name == "segsearch.worker"] == [
        f"{GIVE_UP_AFTER} trials in a row failed; giving up (see their fail_reason)"
    ]


def test_a_signal_stops_the_worker_with_130_and_its_trial_is_retried(tmp_path, monkeypatch):
    raw = budget_of(100)
    raw["fixed"]["epochs"] = 50  # long trials: the signal comes during one
    run = Run(tmp_path, monkeypatch, raw=raw)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert run_worker("s", run.url, 0, "cpu") == 130
    finally:
        timer.cancel()
    done = trials(run)
    assert [t.state for t in done] == [TrialState.FAIL, TrialState.WAITING]  # one stopped, retried
    assert done[0].user_attrs["fail_reason"].startswith("interrupted")


def test_a_worker_waits_while_another_holds_the_last_slot(tmp_path, monkeypatch):
    """Budget 1, held by another worker's RUNNING trial: the worker waits (it may fail and be
    retried) instead of stopping or running a second trial, and stops once that one is told."""
    monkeypatch.setattr(segsearch.worker, "WAIT_S", 0.1)
    run = Run(tmp_path, monkeypatch, raw=budget_of(1))
    other = run.study.ask()
    timer = threading.Timer(1.0, lambda: optuna.load_study(study_name="s", storage=run.url)
                            .tell(other.number, 0.5))  # fmt: skip
    timer.start()
    started = time.monotonic()
    assert run_worker("s", run.url, 0, "cpu") == 0
    assert time.monotonic() - started >= 1.0
    assert [t.state for t in trials(run)] == [TrialState.COMPLETE]
