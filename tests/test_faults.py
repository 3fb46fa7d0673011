"""Faults, with real processes on real storage: killed and interrupted workers, eight workers on
one database while the dashboard reads it, diverging and out-of-memory trials, crashes in the
middle of a write, and a storage folder that cannot be written. The runs marked `storage` repeat
on PostgreSQL (see conftest.py)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import (
    ROOT,
    Dashboard,
    cli,
    env,
    start,
    states,
    storage_args,
    tiny_space,
    trials_via_optuna_cli,
)

from segcore.config import TrialConfig
from segcore.data import ZSCORE
from segcore.files import save_model, write_text
from segcore.labels import Labels
from segsearch.lifecycle import INTERRUPTED
from segsearch.space import load_space
from segsearch.study import create_study

pytestmark = pytest.mark.slow  # real processes: `pytest -m "not slow"` skips them


@pytest.fixture(scope="session")  # once per xdist worker, whatever the test order
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    cli(tmp, "data", "--out", "d", "--n", 6, "--height", 48, "--width", 32)
    (tmp / "slow.yaml").write_text(tiny_space(10, 30))
    # never pruned: a trial cannot end on its own in the moment the test interrupts it
    (tmp / "long.yaml").write_text(tiny_space(10, 30, pruner="none"))
    (tmp / "endless.yaml").write_text(tiny_space(500, 30, pruner="none"))  # killed, never done
    (tmp / "short.yaml").write_text(tiny_space(3, 2, 24))
    return tmp


def search_process(workdir, space, study, url, *extra, heartbeat="10,120"):
    return start(workdir, "search", "--space", space, "--study", study, "--data", "d",
                 *storage_args(url), "--quiet", "--no-rescore", *extra,
                 TRAIN_OPTUNA_HEARTBEAT=heartbeat)  # fmt: skip


def load(workdir, study, url):
    """The study once its creator has made it, else None (SQLite read-only until then, so a
    reader never races the creation of the tables)."""
    if url is None:
        db = workdir / "storage" / f"{study}.db"
        if not db.exists():
            return None
        url = f"sqlite:///file:{db}?mode=ro&uri=true"
    try:
        return optuna.load_study(study_name=study, storage=url)
    except Exception:  # noqa: BLE001 (no tables or no study yet)
        return None


def wait_running(workdir, study, url, enough, timeout=90):
    """Poll until `enough(running trials)` holds; returns those trials."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        s = load(workdir, study, url)
        running = s.get_trials(states=(optuna.trial.TrialState.RUNNING,)) if s else []
        if running and enough(running):
            return running
    raise AssertionError(f"study {study}: trials did not start")


def test_killed_worker_trial_is_retried_and_resumes_from_its_saved_epoch(workdir, storage):
    study = f"k-{'pg' if storage else 'sqlite'}"
    proc = search_process(workdir, "slow.yaml", study, storage, "--n-trials", 3, heartbeat="1,4")
    running = wait_running(
        workdir, study, storage,
        lambda ts: any("pid" in t.user_attrs and len(t.intermediate_values) >= 2 for t in ts),
    )  # fmt: skip
    victim = next(t for t in running if len(t.intermediate_values) >= 2)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "exited with status -9" in err
    assert not (workdir / "reports" / study).exists()  # --no-rescore: no rescoring or report
    trials = trials_via_optuna_cli(workdir, study, storage)
    by_number = {t["number"]: t for t in trials}
    assert by_number[victim.number]["state"] == "FAIL"
    retried = [t for t in trials if t["number"] > victim.number and t["params"] == victim.params]
    assert retried, "the failed trial was not retried"
    resumed = retried[0]["user_attrs"].get("resumed_from")  # it did not start from epoch 0
    assert resumed is not None, [(t["number"], t["state"], t["user_attrs"]) for t in retried]
    assert resumed["trial"] == victim.number and resumed["epoch"] >= 1, resumed
    assert retried[0]["state"] in ("COMPLETE", "PRUNED")
    counts = states(trials)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 3 and "RUNNING" not in counts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_workers_leaves_nothing_running_and_resumes(workdir, sig):
    """Ctrl-C (or SIGTERM) to `search`: every worker stops its trial after saving, nothing is
    left RUNNING; the same command again resumes those trials instead of sampling new ones
    (checked after SIGTERM, SLURM's preemption signal)."""
    study = f"i{int(sig)}"
    proc = search_process(workdir, "long.yaml", study, None, "--workers", 2, "--n-trials", 2)
    running = wait_running(
        workdir, study, None, lambda ts: len(ts) == 2 and all(t.intermediate_values for t in ts)
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
    assert reasons == {INTERRUPTED}, (trials, err)
    if sig == signal.SIGINT:  # the resume is the same after either signal: once is enough
        return
    stopped = {t["number"]: t["params"] for t in trials if t["state"] == "FAIL"}
    cli(workdir, "search", "--space", "long.yaml", "--study", study, "--data", "d", "--quiet",
        "--no-rescore")  # fmt: skip
    trials = trials_via_optuna_cli(workdir, study)
    counts = states(trials)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 2 and "RUNNING" not in counts
    done = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    for t in done:  # the interrupted trials, resumed: not new samples
        assert t["user_attrs"]["resumed_from"]["trial"] in stopped, t
        assert t["params"] == stopped[t["user_attrs"]["resumed_from"]["trial"]]


def test_killing_the_launcher_stops_its_workers(workdir):
    """SIGKILL to `search` (no chance to clean up): its workers get SIGTERM from the kernel
    and stop within seconds, leaving their trials failed with a retry, to resume later."""
    proc = search_process(workdir, "endless.yaml", "orphans", None, "--workers", 2, "--n-trials",
                          2)  # fmt: skip
    running = wait_running(workdir, "orphans", None,
                           lambda ts: len(ts) == 2 and all("pid" in t.user_attrs for t in ts))  # fmt: skip
    pids = {t.user_attrs["pid"] for t in running}
    proc.kill()
    proc.communicate(timeout=30)
    # seconds when the machine is idle; CI's 2 busy cores once took over 10 s (stop 16), so the
    # limit is 30 s: a worker that ignored its launcher's death would instead go on training,
    # RUNNING, which the state check below tells apart
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), "workers outlived their launcher by 30 s"
    trials = trials_via_optuna_cli(workdir, "orphans")
    assert states(trials).get("WAITING") == 2 and "RUNNING" not in states(trials), states(trials)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "Z" not in Path(f"/proc/{pid}/stat").read_text()


def test_timeout_stops_starting_trials_and_still_hands_over(workdir):
    """--timeout: no trial starts after it (running ones stop at an epoch's end: see
    tests/test_study_side.py), and the search still rescores and exports (the final fit is
    the same as without a time limit; --no-final keeps this test short)."""
    url = f"sqlite:///{workdir}/storage/late.db"  # two finished trials first, from one worker
    (workdir / "storage").mkdir(exist_ok=True)
    create_study("late", url, load_space(workdir / "short.yaml"), str(workdir / "d"), 2)
    cli(workdir, "worker", "--study", "late")
    out = cli(workdir, "search", "--space", "short.yaml", "--study", "late", "--data", "d",
              "--quiet", "--workers", 1, "--n-trials", 24, "--timeout", 1, "--no-final")  # fmt: skip
    trials = trials_via_optuna_cli(workdir, "late")
    assert len(trials) == 2 and "time limit reached: 2 of 24 trials" in out.stderr, out.stderr
    best = json.loads((workdir / "reports" / "late" / "best.json").read_text())
    assert best["trial"] in (0, 1) and "best config: reports/late/best.json" in out.stdout


def test_eight_workers_one_database_while_the_dashboard_reads(workdir, storage):
    """Eight workers (the slot lock's contention; 16 took 2 minutes a storage on 2 cores) share
    one database for 16 trials while a dashboard polls it ten times a second."""
    study = f"w8-{'pg' if storage else 'sqlite'}"
    url = storage or f"sqlite:///{workdir}/storage/{study}.db"
    (workdir / "storage").mkdir(exist_ok=True)
    # the study first, then the dashboard on it, then `search` resumes it: the dashboard reads
    # from before the first trial to after the last, however slow the machine
    create_study(study, url, load_space(workdir / "short.yaml"), str((workdir / "d").resolve()), 16)
    dash = Dashboard(workdir, study, storage)
    finished_seen = []  # finished trials in each read made while the search ran
    try:
        study_id = next(s["study_id"] for s in dash.get("/api/studies")["study_summaries"]
                        if s["study_name"] == study)  # fmt: skip
        proc = search_process(workdir, "short.yaml", study, storage, "--workers", 8)
        while proc.poll() is None:  # a reader polling 10 times a second, as a busy dashboard
            seen = dash.get(f"/api/studies/{study_id}?after=0")["trials"]
            finished_seen.append(sum(t["state"] in ("Complete", "Pruned") for t in seen))
            time.sleep(0.1)
    finally:
        code, log = dash.stop()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "exited with status" not in err, err[-3000:]
    assert code == 0 and finished_seen[0] == 0, (finished_seen[:3], log[-2000:])
    trials = trials_via_optuna_cli(workdir, study, storage)
    counts = states(trials)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 16 and "RUNNING" not in counts
    assert "FAIL" not in counts, counts  # 8 workers, yet not one trial started over the budget
    assert sorted(t["number"] for t in trials) == list(range(len(trials)))  # none lost
    assert len(list((workdir / "storage" / study).glob("worker-*.log"))) == 8
    pids = {t["user_attrs"]["pid"] for t in trials}
    assert len(pids) >= 4, pids  # many workers shared the database (a late one may find none)
    for t in optuna.load_study(study_name=study, storage=storage or f"sqlite:///{workdir}/storage/"
                               f"{study}.db").trials:  # fmt: skip
        assert len(t.intermediate_values) == t.user_attrs["epochs_run"] > 0, t  # every report


FAULTS = """
search:
  lr: {type: float, low: 1.0e-3, high: 1.0e+30, log: true}
  patch_size: {type: categorical, choices: [16, 512]}
  batch_size: {type: categorical, choices: [2, 4096]}
fixed: {depth: 1, epochs: 2, steps_per_epoch: 2, base_width: 4, max_width: 8,
        val_patches_per_image: 2}
study: {n_trials: 2, sampler: {name: random}, pruner: {name: none}, top_k: 1}
"""


def test_divergence_and_out_of_memory_fail_only_their_trial(workdir):
    (workdir / "faults.yaml").write_text(FAULTS)
    url = f"sqlite:///{workdir}/storage/oom.db"
    (workdir / "storage").mkdir(exist_ok=True)
    study, _ = create_study("oom", url, load_space(workdir / "faults.yaml"),
                            str(workdir / "d"), None)  # fmt: skip
    good = {"lr": 0.01, "patch_size": 16, "batch_size": 2}
    study.enqueue_trial({**good, "lr": 1.0e30})  # the loss turns NaN
    study.enqueue_trial({**good, "patch_size": 512, "batch_size": 4096})  # 4 GiB a batch
    study.enqueue_trial(good)
    study.enqueue_trial(good)

    def limit_memory():  # a real out-of-memory, without a GPU: 3 GiB of address space
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_optuna.py"), "worker", "--study", "oom", "--storage",
         url], cwd=workdir, env=env(MALLOC_ARENA_MAX="2"), preexec_fn=limit_memory,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = {t["number"]: t for t in trials_via_optuna_cli(workdir, "oom", url)}
    assert trials[0]["state"] == "FAIL"
    assert trials[0]["user_attrs"]["fail_reason"].startswith("diverged"), trials[0]
    assert trials[1]["state"] == "FAIL"
    assert trials[1]["user_attrs"]["fail_reason"].startswith("out of memory"), trials[1]
    assert trials[2]["state"] == trials[3]["state"] == "COMPLETE"  # the worker went on
    assert len({t["user_attrs"]["pid"] for t in trials.values()}) == 1


def test_a_search_whose_every_trial_fails_stops_with_the_reason(workdir):
    """A space that always diverges: the worker gives up after GIVE_UP_AFTER failures in a row
    (not retried forever, not restarted), and `search` says why in one line, exit status 2."""
    (workdir / "diverge.yaml").write_text(
        tiny_space(1, 4, 2, pruner="{name: none}").replace("high: 0.3", "high: 1.0e+30")
        .replace("low: 1.0e-4", "low: 1.0e+20")
    )  # fmt: skip
    proc = search_process(workdir, "diverge.yaml", "diverge", None, "--workers", 1)
    _, err = proc.communicate(timeout=180)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert last.startswith("error: --study diverge: stopped, 10 trials in a row failed"), err
    assert "(last: diverged:" in last, last
    trials = trials_via_optuna_cli(workdir, "diverge")
    assert states(trials) == {"FAIL": 10}, states(trials)  # one worker, no restarts
    assert "restarting" not in err


def test_two_searches_started_at_once_share_one_new_study(workdir):
    """Two `search` commands on the same new study at the same moment: one creates it, the
    other joins it; both finish, and the budget is met exactly."""
    procs = [search_process(workdir, "short.yaml", "twin", None, "--workers", 1, "--n-trials", 4)
             for _ in range(2)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0 and "error" not in err, err[-3000:]
    counts = states(trials_via_optuna_cli(workdir, "twin"))
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 4 and len(counts) <= 2, counts


def test_a_study_whose_creation_was_cut_short_is_finished_not_refused(tmp_path):
    """Ctrl-C between optuna's create_study and storing the space leaves a bare study; the same
    search then completes its creation instead of calling it someone else's."""
    (tmp_path / "s.yaml").write_text(tiny_space(1, 1, 2))
    url = f"sqlite:///{tmp_path}/bare.db"
    optuna.create_study(study_name="bare", storage=url)  # what the cut-short creation left
    study, space = create_study("bare", url, load_space(tmp_path / "s.yaml"), None, None)
    assert study.user_attrs["space"] == space.raw and study.user_attrs["n_trials"] == 2


def test_data_after_an_interrupted_data_starts_afresh(tmp_path, monkeypatch):
    """`data` writes into OUT.partial and renames it; what an interrupted run left there is
    not mixed into the next one."""
    from train_optuna import main

    (tmp_path / "d.partial" / "images").mkdir(parents=True)
    (tmp_path / "d.partial" / "images" / "Img_7.png").write_bytes(b"left by a killed run")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "--out", "d", "--n", "2", "--height", "32", "--width", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "d" / "images").iterdir()) == [
        "Img_0.png",
        "Img_1.png",
    ]
    assert not (tmp_path / "d.partial").exists()


def _crash_while_writing(path: Path, what: str) -> subprocess.CompletedProcess:
    """A real process that is SIGKILLed in the middle of writing `path`."""
    code = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from segcore.config import TrialConfig
from segcore.data import ZSCORE
from segcore.files import save_model, write_text
from segcore.labels import Labels


class Crash(str):  # killed part-way through being written out
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

if {what!r} == "model":
    save_model({str(path)!r}, {{"w": torch.zeros(1000, 1000)}}, TrialConfig(), in_channels=1,
               labels=Labels.plain(["a", "b"], [(0, 0, 0), (9, 9, 9)]), norm=ZSCORE,
               extra={{"x": Crash("y")}})
else:
    import pathlib
    def half(self, text, *a, **k):  # write half, then die
        with open(self, "w") as f:
            f.write(text[: len(text) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    pathlib.Path.write_text = half
    write_text({str(path)!r}, "new " * 1000)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("what", ["model", "best.json"])
def test_crash_while_writing_leaves_the_previous_file(tmp_path, what):
    path = tmp_path / ("checkpoint.pt" if what == "model" else "best.json")
    if what == "model":
        save_model(path, {}, TrialConfig(), in_channels=1,
                   labels=Labels.plain(["a", "b"], [(0, 0, 0), (9, 9, 9)]), norm=ZSCORE)  # fmt: skip
    else:
        write_text(path, json.dumps({"old": True}))
    before = path.read_bytes()
    proc = _crash_while_writing(path, what)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == before  # the previous file, whole
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(n.startswith(f".{path.name}.") and n.endswith(".tmp") for n in leftovers)


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: by mode for a normal user; root ignores modes, so for
    root a kernel folder (sysfs refuses new files even to root)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return Path("/sys/kernel")


def test_unwritable_storage_is_refused_up_front(workdir, tmp_path):
    folder = unwritable_folder(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "storage").symlink_to(folder)  # storage/ holds logs and checkpoints
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = cli(run, "search", "--space", workdir / "short.yaml", "--study", "s", "--data",
               workdir / "d", check=False)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: storage folder: cannot write in {run / 'storage'} (")
    db = f"sqlite:///{folder}/s.db"  # the SQLite file's folder is checked too
    proc = cli(tmp_path, "search", "--space", workdir / "short.yaml", "--study", "s", "--storage",
               db, check=False)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --storage: cannot write in {folder} ("), lines
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created


GPU_QUERIES = """
import importlib, torch
asked = []
def record(name):
    return lambda *args, **kwargs: asked.append(name)
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device"):
    setattr(torch.cuda, name, record(name))
if hasattr(torch._C, "_cuda_getDeviceCount"):
    torch._C._cuda_getDeviceCount = record("_cuda_getDeviceCount")
from segsearch.launcher import PRELOAD
for module in PRELOAD:
    importlib.import_module(module)
print(asked)
"""


def test_the_fork_server_asks_nothing_of_the_gpu():
    """Workers are forked from a server that imported segsearch.launcher.PRELOAD. A process that has
    started CUDA cannot hand it to forked children, and each worker starts its own on the GPU it
    is given (CUDA_VISIBLE_DEVICES): so those imports may not ask torch about GPUs at all."""
    proc = subprocess.run([sys.executable, "-c", GPU_QUERIES], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout
