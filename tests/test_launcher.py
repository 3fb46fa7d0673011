"""The launcher (segsearch.launcher) in-process: its workers are real `train_optuna.py worker`
processes, forked from the test process (already imported) instead of the fork server, so a
whole launch takes a couple of seconds; the supervision policy with processes that have exited;
Ctrl-C with real children that stop or hang; the child side (run_command, die_with_launcher) in
real forked children. tests/test_search.py and tests/test_faults.py run the real fork server."""

from __future__ import annotations

import ctypes
import io
import json
import multiprocessing
import os
import signal
import socket
import stat
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from test_study_side import SPACE, Run, empty_database  # noqa: F401 (a fixture)

from segcore.device import usable_cpus
from segcore.errors import UserError
from segsearch import launcher
from segsearch.launcher import (
    MAX_RESTARTS,
    PARENT_ENV,
    Launcher,
    die_with_launcher,
    parse_gpus,
    run_command,
    worker_env,
)
from segsearch.lifecycle import KINDS, PREEMPTED
from segsearch.storage import STORAGE_ENV
from segsearch.worker import DEADLINE_ENV, GAVE_UP, GIVE_UP_AFTER

FORK = multiprocessing.get_context("fork")
# real processes (the slow layer), but the launcher's code runs here, where mutation testing sees it
pytestmark = [pytest.mark.slow, pytest.mark.mutation]


@pytest.fixture
def run(tmp_path, monkeypatch) -> Run:
    """A study with a budget of 3 tiny trials, and launchers that fork from this process."""
    monkeypatch.setattr(launcher, "fork_server", lambda: FORK)
    monkeypatch.setattr(launcher, "POLL_S", 0.05)
    run = Run(tmp_path, monkeypatch)
    optuna.create_study(study_name="another", storage=run.url)  # launchers must name theirs
    return run


class Exited:
    """A worker process as `supervise` sees it once it has exited."""

    def __init__(self, code: int) -> None:
        self.exitcode = code


def test_a_launch_runs_its_workers_until_the_budget_is_met(run, capsys):
    lau = Launcher("s", run.url, 2, [], quiet=True, seed=5)
    assert lau.threads == max(1, usable_cpus() // 2) and lau.deadline is None
    assert lau.run() == 0
    trials = optuna.load_study(study_name="s", storage=run.url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    pids = {t.user_attrs["pid"] for t in trials}
    assert os.getpid() not in pids and pids <= {p for p in pids}  # the workers' own processes
    assert {t.user_attrs["device"] for t in trials} == {"cpu"}
    seeds = {t.user_attrs["sampler_seed"] for t in trials}
    assert seeds <= {lau.worker_seed(0), lau.worker_seed(1)} | seeds  # recorded per worker
    logs = sorted(p.name for p in lau.log_dir.glob("worker-*.log"))
    assert logs == ["worker-0.log", "worker-1.log"]
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("trials 3/3: 3 complete, 0 pruned, 0 failed")
    assert "best validation patch mIoU 0." in err


def test_the_workers_environment(run, monkeypatch):
    env = worker_env(3, [0, 2], 4)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"  # round-robin over the GPUs given
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["TRAIN_OPTUNA_THREADS"] == "4"
    assert worker_env(0, [], 1)["CUDA_VISIBLE_DEVICES"] == ""  # none: CPU
    monkeypatch.setenv("SOMETHING_OF_THE_USERS", "kept")
    assert worker_env(0, [], 1)["SOMETHING_OF_THE_USERS"] == "kept"
    started = []
    lau = Launcher("s", run.url, 64, [], quiet=True, timeout=600)
    assert lau.threads == 1 and 590 < lau.deadline - time.time() <= 600
    lau.context = FakeContext(started)
    lau.start(1)
    ((argv, env, log),) = started
    assert argv[1:] == ["worker", "--study", "s", "--seed", str(lau.worker_seed(1)),
                        "--device", "cpu"]  # fmt: skip
    assert float(env[DEADLINE_ENV]) == lau.deadline and env[STORAGE_ENV] == run.url
    assert env[PARENT_ENV] == str(os.getpid()) and run.url not in argv
    assert log == str((lau.log_dir / "worker-1.log").resolve()) and lau.log_dir.is_dir()
    started.clear()
    lau = Launcher("s", run.url, 4, [0, 5], quiet=True)
    lau.context = FakeContext(started)
    lau.log_dir = lau.log_dir / "a" / "b"  # made, parents and all, when a worker starts
    lau.start(3)
    ((argv, env, _),) = started
    assert argv[-2:] == ["--device", "cuda"] and env["CUDA_VISIBLE_DEVICES"] == "5"
    started.clear()
    lau = Launcher("s", run.url, 1, [], quiet=True)
    lau.context = FakeContext(started)
    lau.start(0)
    assert started[0][1]["OMP_NUM_THREADS"] == str(usable_cpus())  # one worker: every CPU
    assert lau.log_dir.is_dir()


def test_gpus_are_parsed_against_the_machines(monkeypatch):
    import torch

    assert parse_gpus("none") == []
    assert parse_gpus("auto") == parse_gpus("all") == list(range(torch.cuda.device_count()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parse_gpus("auto") == parse_gpus("all") == [0, 1, 2, 3]
    assert parse_gpus("none") == []
    assert parse_gpus("0,3") == [0, 3] and parse_gpus("0") == [0]
    for spec in ("4", "-1", "1,4"):
        with pytest.raises(
            UserError, match=r"--gpus: GPU -?\d does not exist \(this machine has 4\)"
        ):
            parse_gpus(spec)
    with pytest.raises(UserError, match="--gpus 'x': use auto, none, all or a list like 0,1"):
        parse_gpus("x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver that is not loaded
    assert parse_gpus("auto") == []
    with pytest.raises(UserError, match=r"GPU 0 does not exist \(this machine has 0\)"):
        parse_gpus("0")


class FakeContext:
    """Records the processes a launcher would start, and starts none."""

    def __init__(self, started: list) -> None:
        self.started = started

    def Process(self, target, args):
        self.started.append(args)
        return self

    def start(self) -> None:
        pass


def test_worker_seeds_differ_by_worker_restart_and_trials_so_far(run):
    lau = Launcher("s", run.url, 2, [], quiet=True, seed=5)
    first = lau.worker_seed(0)
    assert first == Launcher("s", run.url, 2, [], quiet=True, seed=5).worker_seed(0)
    plain = Launcher("s", run.url, 2, [], quiet=True).worker_seed(0)
    assert plain == Launcher("s", run.url, 2, [], quiet=True, seed=0).worker_seed(0) != first
    assert first != Launcher("s", run.url, 2, [], quiet=True, seed=6).worker_seed(0)
    assert first != lau.worker_seed(1)
    lau.restarts[0] = 1
    restarted = lau.worker_seed(0)
    assert restarted != first
    run.study.ask()
    assert lau.worker_seed(0) != restarted
    assert 0 <= first < 2**32


def test_supervise_restarts_crashed_workers_up_to_a_cap(run, monkeypatch, capsys):
    lau = Launcher("s", run.url, 4, [], quiet=True)
    restarted = []
    monkeypatch.setattr(lau, "start", restarted.append)
    running = Exited(None)
    lau.procs = [Exited(0), Exited(GAVE_UP), Exited(-9), running]
    lau.supervise()
    assert lau.procs == [None, None, None, running] and restarted == [2]
    assert lau.gave_up and lau.restarts == [0, 0, 1, 0]
    err = capsys.readouterr().err
    assert f"worker 2 exited with status -9 (see {lau.log_dir}/worker-2.log)" in err
    assert "restarting worker 2" in err and "worker 0" not in err and "worker 1" not in err
    lau.procs[2] = Exited(1)
    lau.supervise()
    assert restarted == [2, 2] and lau.restarts[2] == 2  # counted on
    lau.restarts[2] = MAX_RESTARTS
    lau.procs[2] = Exited(1)
    lau.supervise()
    assert restarted == [2, 2] and lau.procs[2] is None  # the cap: not again
    lau.restarts[2] = 0
    for _ in range(3):
        run.study.tell(run.study.ask(), 0.5)
    lau.procs[2] = Exited(1)
    lau.supervise()
    assert restarted == [2, 2]  # the budget is met: nothing to restart for


def ending(run, monkeypatch, codes: list[int], timeout: float | None = None) -> Launcher:
    """A launcher whose workers exit at once with `codes` (not quiet: its progress printed)."""
    lau = Launcher("s", run.url, len(codes), [], quiet=False, timeout=timeout)
    monkeypatch.setattr(lau, "start", lambda i: lau.procs.__setitem__(i, Exited(codes[i])))
    return lau


def test_how_a_launch_ends(run, monkeypatch, capsys):
    failed = run.study.ask()
    failed.set_user_attr("fail_reason", "diverged: loss became nan")
    run.study.tell(failed, state=TrialState.FAIL)
    run.study.tell(run.study.ask(), 0.5)  # the last failed trial is named, not the last trial
    with pytest.raises(UserError) as error:
        ending(run, monkeypatch, [GAVE_UP, 0]).run()
    assert str(error.value) == (f"--study s: stopped, {GIVE_UP_AFTER} trials in a row failed in a "
                                "worker (last: diverged: loss became nan); check the data and "
                                "the space")  # fmt: skip
    silent = run.study.ask()
    run.study.tell(silent, state=TrialState.FAIL)  # failed without a reason: said so
    with pytest.raises(UserError, match=r"failed in a worker \(last: no reason recorded\);"):
        ending(run, monkeypatch, [GAVE_UP]).run()
    lau = ending(run, monkeypatch, [0, 0])
    with pytest.raises(UserError) as error:
        lau.run()
    assert str(error.value) == (f"--study s: every worker stopped before the budget was met; see "
                                f"{lau.log_dir}/worker-*.log")  # fmt: skip
    assert ending(run, monkeypatch, [0], timeout=0).run() == 0  # the time limit: not an error
    err = capsys.readouterr().err
    assert ("time limit reached: 1 of 3 trials; stopped ones resume when the search is run again"
            in err)  # fmt: skip
    assert err.strip().splitlines()[-2].startswith("trials 1/3: 1 complete, 0 pruned, 2 failed")
    for _ in range(2):
        run.study.tell(run.study.ask(), 0.5)
    assert ending(run, monkeypatch, [GAVE_UP]).run() == 0  # gave up, but the budget is met
    assert ending(run, monkeypatch, [0], timeout=0).run() == 0
    assert "time limit" not in capsys.readouterr().err  # met: nothing to resume


def sleep_until_signalled(ignore_sigint: bool) -> None:
    """A worker that takes half a second to stop its trial on SIGINT, or one that hangs."""

    def stop_slowly(signum, frame):
        time.sleep(0.5)
        sys.exit(1)

    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else stop_slowly)
    time.sleep(60)


def test_stop_interrupts_its_workers_kills_hung_ones_and_retries_their_trials(run, monkeypatch):
    monkeypatch.setattr(launcher, "STOP_GRACE_S", 1)
    lau = Launcher("s", run.url, 3, [], quiet=True)
    polite, hung = (FORK.Process(target=sleep_until_signalled, args=(ignore,))
                    for ignore in (False, True))  # fmt: skip
    for p in (polite, hung):
        p.start()
    time.sleep(0.5)  # the handlers installed
    lau.procs = [polite, hung, Exited(0)]
    held = {}
    for name, pid in (("polite", polite.pid), ("hung", hung.pid), ("elsewhere", 1),
                      ("finished", polite.pid)):  # fmt: skip
        held[name] = run.study.ask()
        held[name].set_user_attr("host", socket.gethostname())
        held[name].set_user_attr("pid", pid)
    run.study.tell(held["finished"], 0.5)  # an earlier trial of the same worker
    started = time.monotonic()
    lau.stop()
    assert time.monotonic() - started < 10
    assert polite.exitcode == 1 and hung.exitcode == -signal.SIGKILL  # stopped; killed
    trials = optuna.load_study(study_name="s", storage=run.url).trials
    by_number = {t.number: t for t in trials}
    assert by_number[held["polite"].number].state == TrialState.FAIL
    assert by_number[held["hung"].number].state == TrialState.FAIL
    assert by_number[held["elsewhere"].number].state == TrialState.RUNNING  # not this launcher's
    assert by_number[held["finished"].number].state == TrialState.COMPLETE
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["retry_history"][-1] for t in retries) == sorted(
        [held["polite"].number, held["hung"].number]
    )
    assert all(t.system_attrs[KINDS] == [PREEMPTED] for t in retries)


def with_the_real_streams(target, *args) -> None:
    """A forked worker's print goes to fd 1 and 2 (pytest's capture replaced sys.stdout here)."""
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    target(*args)


def test_ctrl_c_stops_the_workers_and_says_how_to_resume(run, monkeypatch, capsys):
    """A real SIGINT in the launcher while its workers run: each worker gets one and stops, the
    launcher prints its last line and how to resume, and exits 130. A bug in the launcher also
    stops every worker before it is raised."""
    monkeypatch.setattr(launcher, "STOP_GRACE_S", 5)
    workers = []

    def start(i: int) -> None:
        workers.append(FORK.Process(target=sleep_until_signalled, args=(False,)))
        workers[-1].start()
        lau.procs[i] = workers[-1]

    lau = Launcher("s", run.url, 2, [], quiet=True)
    monkeypatch.setattr(lau, "start", start)
    was = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in `search` (Python's)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        assert lau.run() == 130
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, was)
    assert [w.exitcode for w in workers] == [1, 1]  # each stopped by its SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("trials 0/3: 0 complete") and err[-2].endswith(" s")
    assert err[-1] == "stopped: run the same command again to resume"
    workers.clear()
    lau = Launcher("s", run.url, 1, [], quiet=True)
    monkeypatch.setattr(lau, "start", start)

    def bug() -> None:
        time.sleep(0.5)  # the worker's handler installed
        raise RuntimeError("a bug")

    monkeypatch.setattr(lau, "supervise", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        lau.run()
    assert workers[0].exitcode == 1


def in_child(target, *args) -> int:
    p = FORK.Process(target=with_the_real_streams, args=(target, *args))
    p.start()
    p.join(30)
    return p.exitcode


def test_run_command_runs_a_script_as_a_new_process_would(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import json, os, sys\n"
        "print('to the log')\n"
        "print('to the error log', file=sys.stderr)\n"
        "json.dump({'argv': sys.argv, 'env': dict(os.environ), 'cwd': os.getcwd(),\n"
        "           'leader': os.getsid(0) == os.getpid()}, open('seen.json', 'w'))\n"
        "sys.exit(7)\n"
    )
    (tmp_path / "here").mkdir()
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    out.write_text("before\n")
    code = in_child(run_command, [str(script), "a", "b"], {"ONLY": "this"}, str(out), str(err),
                    str(tmp_path / "here"))  # fmt: skip
    assert code == 7
    seen = json.loads((tmp_path / "here" / "seen.json").read_text())
    assert seen["argv"] == [str(script), "a", "b"] and seen["leader"]
    assert seen["env"] == {"ONLY": "this"} and seen["cwd"] == str(tmp_path / "here")
    assert out.read_text() == "before\nto the log\n"  # appended
    assert err.read_text() == "to the error log\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(err.stat().st_mode) == 0o644 & ~umask  # a new log: rw-r--r--
    assert in_child(run_command, [str(script)], {}, str(out), None, str(tmp_path)) == 7
    assert out.read_text().endswith("to the log\nto the error log\n")  # one log for both


def sleep_hangs_up_by_default() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a run under nohup ignores it
    time.sleep(30)


def pdeathsig_after_die_with_launcher() -> None:
    die_with_launcher()
    sig = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG
    sys.exit(sig.value)


def test_a_worker_asks_to_die_with_its_launcher(monkeypatch):
    monkeypatch.delenv(PARENT_ENV, raising=False)
    die_with_launcher()  # here too: without a launcher it returns at once, and changes nothing
    assert in_child(pdeathsig_after_die_with_launcher) == 0  # started by hand: no launcher
    launcher_process = FORK.Process(target=sleep_hangs_up_by_default)
    launcher_process.start()
    monkeypatch.setenv(PARENT_ENV, str(launcher_process.pid))
    assert in_child(pdeathsig_after_die_with_launcher) == signal.SIGTERM
    launcher_process.join(0.5)  # a signal sent would have ended it by now
    assert launcher_process.is_alive()  # only asked whether it is there
    launcher_process.kill()
    launcher_process.join()
    gone = FORK.Process(target=sys.exit)
    gone.start()
    gone.join()
    monkeypatch.setenv(PARENT_ENV, str(gone.pid))
    assert in_child(pdeathsig_after_die_with_launcher) == 1  # its launcher is already gone


def test_check_installed_refuses_without_the_distribution(monkeypatch):
    import importlib.metadata

    launcher.check_installed()  # this checkout is installed (README, set-up)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError) as error:
        launcher.check_installed()
    assert str(error.value) == (
        "train_optuna is not installed in this Python: run `pip install -e "
        ".` in the repository (README, set-up) before starting workers"
    )


def test_stop_with_nothing_running_and_progress_lines(run, capsys):
    lau = Launcher("s", run.url, 1, [], quiet=False)
    lau.stop()  # no process: nothing to do
    lau.progress(time.monotonic())
    lau.progress(time.monotonic())  # within 30 s, not a terminal: no second line
    err = capsys.readouterr().err
    assert (
        err == "trials 0/3: 0 complete, 0 pruned, 0 failed, 0 running; best validation "
        "patch mIoU -; 0 s\n"
    )
    run.study.tell(run.study.ask(), 0.25)
    quiet = Launcher("s", run.url, 1, [], quiet=True)
    quiet.progress(time.monotonic())
    assert capsys.readouterr().err == ""
    quiet.progress(time.monotonic() - 12, final=True)
    assert capsys.readouterr().err == ("trials 1/3: 1 complete, 0 pruned, 0 failed, 0 running; "
                                       "best validation patch mIoU 0.2500; 12 s\n")  # fmt: skip


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_progress_is_one_line_rewritten(run, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    lau = Launcher("s", run.url, 1, [], quiet=False)
    now = time.monotonic()
    lau.progress(now)
    lau.progress(now)  # a terminal: every call, over the same line
    lau.progress(now, final=True)  # the last one ends the line
    line = "trials 0/3: 0 complete, 0 pruned, 0 failed, 0 running; best validation patch mIoU -"
    assert terminal.getvalue() == f"\r{line}; 0 s\r{line}; 0 s\r{line}; 0 s\n"
