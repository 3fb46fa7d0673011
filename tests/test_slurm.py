"""SLURM as the launcher, on a real single-node cluster (.ci/slurm starts one and prints its
partition, which $TRAIN_OPTUNA_TEST_SLURM names): a study's workers as a job array, one task
cancelled in the middle of a trial, the finishing job after the array."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import optuna
import pytest
from helpers import cli, states, tiny_space, trials_via_optuna_cli

pytestmark = pytest.mark.slow

PARTITION = os.environ.get("TRAIN_OPTUNA_TEST_SLURM")


@pytest.fixture
def slurm():
    if not PARTITION or not shutil.which("sbatch"):
        if os.environ.get("CI"):
            pytest.fail("CI: TRAIN_OPTUNA_TEST_SLURM is not set (.ci/run sets it)")
        pytest.skip("no SLURM: run .ci/slurm and export TRAIN_OPTUNA_TEST_SLURM=<its output>")
    return PARTITION


def job_states(job: str) -> list[str]:
    """States of a job's (or array's) tasks, finished ones included (MinJobAge)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return out.stdout.split()


def test_job_array_survives_a_cancelled_task_and_finishes(tmp_path, slurm):
    cli(tmp_path, "data", "--out", "d", "--n", 6, "--height", 48, "--width", 32)
    # never pruned, epochs long enough that a task can be cancelled in the middle of a trial
    (tmp_path / "space.yaml").write_text(tiny_space(10, 30, 4, pruner="{name: none}"))
    out = cli(tmp_path, "slurm", "--space", "space.yaml", "--study", "sl", "--data", "d",
              "--workers", 2, "--cpus-per-worker", 1, f"--sbatch-option=--partition={slurm}")  # fmt: skip
    array, last = (
        out.stdout.split("job array ")[1].split()[0],
        out.stdout.split("and job ")[1].split()[0],
    )
    db = f"sqlite:///{tmp_path}/storage/sl.db"
    victim = None
    deadline = time.monotonic() + 120
    study = optuna.load_study(study_name="sl", storage=db)
    running = optuna.trial.TrialState.RUNNING
    while victim is None and time.monotonic() < deadline:  # a trial with a saved epoch
        time.sleep(0.5)
        for t in study.get_trials(states=(running,)):
            if len(t.intermediate_values) >= 2 and "slurm_task" in t.user_attrs:
                victim = {"number": t.number, "params": t.params, "user_attrs": t.user_attrs}
                break
    assert victim is not None, ("no trial got going on the cluster", _logs(tmp_path))
    task = victim["user_attrs"]["slurm_task"]
    assert task.startswith(array + "_")
    subprocess.run(["scancel", task], check=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job_states(last) not in (["COMPLETED"], ["FAILED"]):
        time.sleep(1)
    assert job_states(last) == ["COMPLETED"], (job_states(last), _logs(tmp_path))
    assert "CANCELLED" in job_states(array)
    trials = trials_via_optuna_cli(tmp_path, "sl", db)
    counts = states(trials)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 4, counts  # the budget
    assert "RUNNING" not in counts
    stopped = next(t for t in trials if t["number"] == victim["number"])
    assert stopped["state"] == "FAIL" and stopped["user_attrs"]["fail_reason"].startswith(
        "interrupted"
    )
    retry = next(t for t in trials if t["user_attrs"].get("resumed_from", {}).get("trial")
                 == victim["number"])  # fmt: skip
    assert retry["user_attrs"]["resumed_from"]["epoch"] >= 1 and retry["params"] == victim["params"]
    assert retry["state"] == "COMPLETE"
    best = json.loads((tmp_path / "reports" / "sl" / "best.json").read_text())
    assert best["test"]["images"] == 1 and (tmp_path / "reports" / "sl" / "best.pt").is_file()


def _logs(folder) -> str:
    return "\n".join(
        p.read_text()[-1500:] for p in (folder / "storage" / "sl" / "slurm").glob("*.log")
    )
