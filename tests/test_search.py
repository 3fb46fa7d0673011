"""The search service end to end: real worker processes on a real SQLite file, checked with the
independent `optuna` command line."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import torch
from helpers import ROOT, cli, env, states, tiny_space, trials_via_optuna_cli

from segcore.study import trial_artifacts


def study_exists(db, study):
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            rows = con.execute("SELECT 1 FROM studies WHERE study_name = ?", (study,)).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return False
    return bool(rows)


def wait_running(workdir, study, enough, timeout=60):
    """Poll the study until `enough(running trials)` holds; returns those trials."""
    db = workdir / "storage" / f"{study}.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not study_exists(db, study):  # read-only check: never races table creation
            continue
        s = optuna.load_study(study_name=study, storage=f"sqlite:///{db}")
        running = s.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        if enough(running):
            return running
    raise AssertionError(f"study {study}: trials did not start")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    cli(tmp, "data", "--out", "d", "--n", 6, "--height", 48, "--width", 32)
    (tmp / "space.yaml").write_text(tiny_space(4, 2))
    (tmp / "slow.yaml").write_text(tiny_space(20, 40))
    # never pruned: a trial cannot end on its own in the moment the test interrupts it
    (tmp / "long.yaml").write_text(tiny_space(20, 40, pruner="none"))
    return tmp


@pytest.fixture(scope="module")
def searched(workdir):
    out = cli(workdir, "search", "--space", "space.yaml", "--study", "s", "--data", "d",
              "--workers", 2, "--quiet")  # fmt: skip
    assert "best trial" in out.stdout
    return workdir


def test_budget_met_exactly_with_pruning_and_nothing_running(searched):
    trials = trials_via_optuna_cli(searched, "s")
    counts = states(trials)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 8, counts
    assert counts.get("PRUNED", 0) >= 1 and counts.get("RUNNING", 0) == 0
    pids = {t["user_attrs"]["pid"] for t in trials if "pid" in t["user_attrs"]}
    assert len(pids) == 2  # two worker processes shared the study
    for t in trials:  # the full config of every counted trial is in its user attributes
        if t["state"] != "FAIL":
            assert t["user_attrs"]["config"]["patch_size"] == t["params"]["patch_size"]
        else:  # the only failure possible here: two workers raced for the last slot
            assert t["user_attrs"]["fail_reason"].startswith("over budget")
    assert (searched / "storage" / "s" / "worker-0.log").stat().st_size > 0


def test_checkpoints_only_for_top_k(searched):
    trials = trials_via_optuna_cli(searched, "s")
    done = sorted((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: -t["value"])
    top = {t["number"] for t in done[:2]}
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{searched}/storage/s.db")
    number_of = {t._trial_id: t.number for t in study.trials}
    live = {meta["artifact_id"]: number_of[trial_id] for trial_id, _, meta in trial_artifacts(study)
            if meta["filename"] == "checkpoint.pt"}  # fmt: skip
    files = {f.name for f in (searched / "storage" / "s" / "artifacts").iterdir()}
    checkpoints = files - {a for _, _, m in trial_artifacts(study) for a in [m["artifact_id"]]
                           if m["filename"] != "checkpoint.pt"}  # fmt: skip
    assert checkpoints == set(live) and set(live.values()) == top, (live, top)


def test_scores_and_best_json_retrain_reproduces(searched):
    scores = json.loads((searched / "reports" / "s" / "scores.json").read_text())
    assert len(scores) == 2 and all(0 <= s["miou"] <= 1 for s in scores.values())
    best = json.loads((searched / "reports" / "s" / "best.json").read_text())
    assert str(best["trial"]) in scores
    assert best["full_image_miou"] == max(s["miou"] for s in scores.values())
    assert set(best) >= {"config", "study", "trial", "patch_miou", "full_image_miou", "params",
                         "versions"}  # fmt: skip
    cli(searched, "train", "--config", "reports/s/best.json", "--data", "d", "--out", "re.pt",
        "--quiet")  # fmt: skip
    again = torch.load(searched / "re.pt", weights_only=True)["extra"]["patch_miou"]
    assert abs(again - best["patch_miou"]) <= 0.01, (again, best["patch_miou"])


def test_resume_tops_up_to_the_budget(searched):
    cli(searched, "search", "--space", "space.yaml", "--study", "s", "--data", "d",
        "--workers", 2, "--n-trials", 10, "--quiet")  # fmt: skip
    counts = states(trials_via_optuna_cli(searched, "s"))
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 10, counts


def test_score_and_export_commands(searched):
    out = cli(searched, "score", "--study", "s", "--top-k", 1)
    assert out.stdout.count("full-image mIoU") == 1
    cli(searched, "export", "--study", "s", "--out", "b2.json")
    assert json.loads((searched / "b2.json").read_text())["study"] == "s"


def test_killed_worker_trial_is_failed_and_retried(workdir):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_optuna.py"), "search", "--space", "slow.yaml",
         "--study", "k", "--data", "d", "--workers", "2", "--quiet"],
        cwd=workdir, env=env(TRAIN_OPTUNA_HEARTBEAT="1,4"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    running = wait_running(
        workdir, "k", lambda ts: any("pid" in t.user_attrs and t.intermediate_values for t in ts)
    )
    victim = next(t for t in running if "pid" in t.user_attrs and t.intermediate_values)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "exited with status -9" in err
    trials = trials_via_optuna_cli(workdir, "k")
    by_number = {t["number"]: t for t in trials}
    assert by_number[victim.number]["state"] == "FAIL"
    retried = [t for t in trials if t["number"] > victim.number and t["params"] == victim.params]
    assert retried, "the failed trial was not retried"
    counts = states(trials)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 8 and "RUNNING" not in counts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_workers_leaves_nothing_running_and_resumes(workdir, sig):
    study = f"i{int(sig)}"
    args = [sys.executable, str(ROOT / "train_optuna.py"), "search", "--space", "long.yaml",
            "--study", study, "--data", "d", "--workers", "2", "--n-trials", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=workdir, env=env(), stderr=subprocess.PIPE, text=True)
    running = wait_running(
        workdir, study, lambda ts: len(ts) == 2 and all("pid" in t.user_attrs for t in ts)
    )
    pids = {t.user_attrs.get("pid") for t in running}
    started = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30 and proc.returncode == 130, err[-2000:]
    for pid in pids:  # every worker process is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    trials = trials_via_optuna_cli(workdir, study)
    assert "RUNNING" not in states(trials)
    reasons = {t["user_attrs"].get("fail_reason") for t in trials if t["state"] == "FAIL"}
    assert reasons == {"interrupted (Ctrl-C or SIGTERM)"}, (trials, err)
    cli(workdir, "search", "--space", "long.yaml", "--study", study, "--data", "d", "--quiet")
    counts = states(trials_via_optuna_cli(workdir, study))
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 2 and "RUNNING" not in counts
