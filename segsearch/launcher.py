"""Launching and supervising worker processes: GPU pinning, threads, logs, restarts, Ctrl-C.

A worker is `train_optuna.py worker`, forked from a fork server that the search starts once and
that has already imported what a worker needs: torch, the compiler stack every torch.optim step
loads, batchgenerators with scipy, optuna. That import is about 9 s of CPU on 2 cores, which
every worker (and every restarted one) paid before; now each search pays it once. The fork
server never touches CUDA, so the forked workers start CUDA afresh on the GPU they are given.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.metadata
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess

import numpy as np
import optuna
from optuna.trial import TrialState

from segcore.device import usable_cpus
from segcore.errors import UserError
from segsearch import ENTRY
from segsearch.artifacts import study_folder
from segsearch.internals import close_forkserver_alive_fd
from segsearch.lifecycle import PREEMPTED, retry
from segsearch.storage import STORAGE_ENV, open_storage
from segsearch.study import budget, budget_met, counts, finished
from segsearch.worker import DEADLINE_ENV, GAVE_UP, GIVE_UP_AFTER

MAX_RESTARTS = 3  # per worker slot: a worker that keeps dying is a bug, not bad luck
POLL_S = 1.0  # how often the launcher looks at its workers and prints progress
STOP_GRACE_S = 25  # Ctrl-C: how long workers get to stop their trials before they are killed
# what a worker imports, also lazily: torch.optim the compiler stack, the training loop
# batchgenerators and scipy, optuna's database storage alembic and SQLAlchemy (missing: skipped)
PRELOAD = ["segsearch.worker", "segcore.train", "torch._dynamo", "optuna.storages._rdb.models",
           "alembic.command", "alembic.migration", "alembic.script", "sqlalchemy.orm",
           "sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.postgresql", "psycopg"]  # fmt: skip


def device_kind(gpus: list[int]) -> str:
    """The device workers run on: "cuda" (each pinned to its GPU) with GPUs, else "cpu"."""
    return "cuda" if gpus else "cpu"


def parse_gpus(spec: str) -> list[int]:
    """'none' -> [], 'auto' or 'all' -> every visible GPU (none on a machine without one),
    '0,2' -> those (each must exist)."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "none":
        return []
    if spec in ("auto", "all"):
        return list(range(available))
    try:
        gpus = [int(g) for g in spec.split(",")]
    except ValueError:
        raise UserError(f"--gpus {spec!r}: use auto, none, all or a list like 0,1") from None
    for g in gpus:
        if not 0 <= g < available:
            raise UserError(f"--gpus: GPU {g} does not exist (this machine has {available})")
    return gpus


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_ENV = "TRAIN_OPTUNA_LAUNCHER"  # the launcher's pid, set only for the workers it starts


def die_with_launcher() -> None:
    """In a worker the launcher started: ask the kernel for SIGTERM when the launcher dies,
    however it dies (SIGKILL, a crash), and exit at once if it is already gone. SIGTERM stops the
    trial, which is retried and resumes. A worker started by hand has no launcher and is not
    affected. Linux only; elsewhere such workers outlive their launcher."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    # our parent is the fork server, which exits when the launcher does; if the launcher is
    # already gone, that may have happened before the prctl, and no signal will come
    try:
        os.kill(int(parent), 0)
    except ProcessLookupError:
        sys.exit(1)


def check_installed() -> None:
    """The fork server imports segcore and segsearch as installed: refuse before anything is
    created when they are not (`search` checks first, the fork server again)."""
    try:
        importlib.metadata.distribution("train-optuna")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("train_optuna is not installed in this Python: run `pip install -e .` in "
                        "the repository (README, set-up) before starting workers") from None  # fmt: skip


def fork_server(preload: list[str] = PRELOAD) -> multiprocessing.context.BaseContext:
    """The context whose processes are forked from a server that has imported `preload`
    (started on the first call; the tests start theirs with more). The server does not see the
    launcher's sys.path: it imports segcore and segsearch as installed (`pip install -e .`)."""
    check_installed()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    multiprocessing.forkserver.ensure_running()
    return context


def run_command(argv: list[str], env: dict[str, str], out: str, err: str | None = None,
                cwd: str | None = None) -> None:  # fmt: skip
    """In a forked process: what `subprocess.Popen([python, *argv], env=env, stdout=out,
    stderr=err or out, cwd=cwd, start_new_session=True)` would run, without starting Python
    again. `argv[0]` is a Python script (train_optuna.py)."""
    gc.freeze()  # what the server imported: collections skip it instead of walking it
    os.setsid()  # a terminal's Ctrl-C reaches only the launcher, which forwards one SIGINT
    # multiprocessing hands each child the launcher's end of the pipe whose closing stops the
    # server; closed here, the server exits with the launcher, and the kernel then sends the
    # workers SIGTERM (die_with_launcher), however the launcher died
    close_forkserver_alive_fd()
    for target, path in ((1, out), (2, err or out)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    if cwd is not None:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")  # ends in sys.exit(status)


def worker_env(index: int, gpus: list[int], threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = str(gpus[index % len(gpus)]) if gpus else ""
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRAIN_OPTUNA_THREADS"):
        env[key] = str(threads)
    return env


class Launcher:
    """Starts N workers on one study and keeps them going until the budget is met."""

    def __init__(self, name: str, url: str, n_workers: int, gpus: list[int], quiet: bool,
                 seed: int = 0, timeout: float | None = None):  # fmt: skip
        self.name, self.url, self.quiet, self.seed = name, url, quiet, seed
        # the wall-clock budget: no trial starts after it; running ones stop at an epoch's end
        self.deadline = None if timeout is None else time.time() + timeout
        self.gpus = gpus
        self.threads = max(1, usable_cpus() // n_workers)
        self.study = optuna.load_study(study_name=name, storage=open_storage(url))
        self.log_dir = study_folder(self.study)
        self.procs: list[BaseProcess | None] = [None] * n_workers
        self.restarts = [0] * n_workers
        self.printed = float("-inf")
        self.gave_up = False
        self.context = fork_server()

    def start(self, i: int) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(ENTRY), "worker", "--study", self.name, "--seed", str(self.worker_seed(i)),
                "--device", device_kind(self.gpus)]  # fmt: skip
        env = worker_env(i, self.gpus, self.threads)
        if self.deadline is not None:  # the search's own, not counted from the worker's start
            env[DEADLINE_ENV] = repr(self.deadline)
        env[STORAGE_ENV] = self.url  # not on the command line, where `ps` shows a password
        env[PARENT_ENV] = str(os.getpid())  # die_with_launcher
        log = str((self.log_dir / f"worker-{i}.log").resolve())
        self.procs[i] = self.context.Process(target=run_command, args=(argv, env, log))
        self.procs[i].start()

    def worker_seed(self, i: int) -> int:
        """A sampler seed not used before in this study: from the launcher's seed, the worker's
        index, its restarts and the number of trials so far, so a resumed search (or a restarted
        worker) does not repeat the random and start-up trials of the first run."""
        n_trials = len(self.study.get_trials(deepcopy=False))
        entropy = [self.seed, i, self.restarts[i], n_trials]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def run(self) -> int:
        started = time.monotonic()
        for i in range(len(self.procs)):
            self.start(i)
        try:
            while any(p is not None for p in self.procs):
                self.supervise()
                self.progress(started)
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.stop()
            self.progress(started, final=True)
            print("stopped: run the same command again to resume", file=sys.stderr)
            return 130
        except BaseException:  # a bug here: no worker may outlive the launcher's exit
            self.stop()
            raise
        self.progress(started, final=True)
        c = counts(self.study)
        if not budget_met(self.study, c) and self.gave_up:
            failed = self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            reason = failed[-1].user_attrs.get("fail_reason", "no reason recorded")
            raise UserError(
                f"--study {self.name}: stopped, {GIVE_UP_AFTER} trials in a row failed in a "
                f"worker (last: {reason}); check the data and the space"
            )
        if self.deadline is not None and time.time() >= self.deadline:
            if not budget_met(self.study, c):
                print(f"time limit reached: {finished(self.study, c)} of "
                      f"{budget(self.study)} trials; stopped ones resume when the search is run "
                      f"again", file=sys.stderr)  # fmt: skip
            return 0
        if not budget_met(self.study, c):
            raise UserError(
                f"--study {self.name}: every worker stopped before the budget was met; "
                f"see {self.log_dir}/worker-*.log"
            )
        return 0

    def supervise(self) -> None:
        for i, p in enumerate(self.procs):
            if p is None or p.exitcode is None:
                continue
            self.procs[i] = None
            if p.exitcode == 0:
                continue
            if p.exitcode == GAVE_UP:  # restarting would fail the same way
                self.gave_up = True
                continue
            log = self.log_dir / f"worker-{i}.log"
            print(f"\nworker {i} exited with status {p.exitcode} (see {log})", file=sys.stderr)
            if not budget_met(self.study) and self.restarts[i] < MAX_RESTARTS:
                self.restarts[i] += 1
                print(f"restarting worker {i}", file=sys.stderr)
                self.start(i)

    def stop(self) -> None:
        """Ctrl-C: interrupt every worker (each fails its trial), kill any that hang."""
        live = [p for p in self.procs if p is not None and p.exitcode is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in live:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join()
        # a killed worker cannot fail its own trial: fail what this machine's killed workers
        # still hold RUNNING (by host and pid: other machines' trials are theirs) and retry it
        host, pids = socket.gethostname(), {p.pid for p in live}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("host") == host and t.user_attrs.get("pid") in pids:
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                retry(self.study, self.study.get_trials(deepcopy=False)[t.number], PREEMPTED)

    def progress(self, started: float, final: bool = False) -> None:
        if self.quiet and not final:
            return
        c = counts(self.study)
        try:
            best = f"{self.study.best_value:.4f}"
        except ValueError:
            best = "-"
        line = (
            f"trials {finished(self.study, c)}/{budget(self.study)}: {c['complete']} complete, "
            f"{c['pruned']} pruned, {c['fail']} failed, {c['running']} running; best validation "
            f"patch mIoU "
            f"{best}; {time.monotonic() - started:.0f} s"
        )
        tty = sys.stderr.isatty()
        if final or tty or time.monotonic() - self.printed >= 30:  # a log file gets a line a 30 s
            self.printed = time.monotonic()
            print(
                ("\r" if tty else "") + line, end="\n" if final or not tty else "", file=sys.stderr
            )
