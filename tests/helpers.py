"""Shared by the end-to-end tests: a tiny search space, the CLI in a real process, and the
independent `optuna` command line to read a study back.

Each command runs in a process of its own, forked from a server that has imported torch,
batchgenerators, optuna, matplotlib and optuna-dashboard once per test session: the way the
launcher starts its workers (segsearch.launcher), and ~3-9 s of CPU less per command than starting
Python again. The process is real (its own pid, signals, exit status, session, working folder
and environment); test_cli.py's model and the workers of test_slurm.py and the out-of-memory
test start the interpreter from scratch, so that path is run as well.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from segsearch.launcher import PRELOAD, fork_server, run_command

ROOT = Path(__file__).resolve().parents[1]
OPTUNA = str(Path(sys.executable).with_name("optuna"))
SPACE = """
search:
  patch_size: {type: categorical, choices: [16, 32]}
  depth: {type: int, low: 1, high: 2}
  lr: {type: float, low: 1.0e-4, high: 0.3, log: true}
  aug_strength: {type: float, low: 0.0, high: 1.0}
fixed: {epochs: EPOCHS, steps_per_epoch: STEPS, batch_size: 2, base_width: 4, max_width: 8,
        val_patches_per_image: 2}
study:
  n_trials: TRIALS
  sampler: {name: random}
  pruner: PRUNER
  top_k: 2
"""


ASHA = "{name: asha, args: {min_resource: 1, reduction_factor: 2}}"


def tiny_space(epochs: int, steps: int, trials: int = 8, pruner: str = ASHA) -> str:
    """A space of depth-1/2, width-4 models on 16/32 patches: trials of a second or two."""
    return (
        SPACE.replace("EPOCHS", str(epochs))
        .replace("STEPS", str(steps))
        .replace("TRIALS", str(trials))
        .replace("PRUNER", pruner)
    )


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


# and what the other commands import: the report's plots, the dashboard, the optuna CLI
TEST_PRELOAD = [*PRELOAD, "segsearch.report", "segsearch.final", "segsearch.rescore",
                "matplotlib.pyplot", "optuna_dashboard", "optuna.cli"]  # fmt: skip
_server = None


class Process:
    """`python SCRIPT ARGS` in a forked process (segsearch.launcher.run_command): the part of
    subprocess.Popen the tests use, with stdout and stderr in files, read as text."""

    def __init__(self, script, args, cwd, environ):
        global _server
        if _server is None:  # one thread for torch in the server too, as OMP_NUM_THREADS=1 says
            os.environ["OMP_NUM_THREADS"] = "1"
            _server = fork_server(TEST_PRELOAD)
        self.folder = Path(tempfile.mkdtemp(prefix="proc-"))
        self.out, self.err = self.folder / "out", self.folder / "err"
        argv = [str(script), *map(str, args)]
        self.proc = _server.Process(
            target=run_command, args=(argv, environ, str(self.out), str(self.err), str(cwd))
        )
        self.proc.start()
        self.pid = self.proc.pid
        self.args = argv

    @property
    def returncode(self):
        return self.proc.exitcode

    def poll(self):
        return self.proc.exitcode

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def kill(self):
        self.proc.kill()

    def wait(self, timeout=None):
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.proc.exitcode

    def communicate(self, timeout=None):
        self.wait(timeout)
        out, err = self.out.read_text(), self.err.read_text()
        shutil.rmtree(self.folder)
        return out, err


def start(cwd, *args, **extra_env) -> Process:
    """`train_optuna.py ARGS` started in `cwd`, not waited for."""
    return Process(ROOT / "train_optuna.py", args, cwd, env(**extra_env))


def cli(cwd, *args, check=True):
    proc = start(cwd, *args)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def storage_args(url: str | None) -> list[str]:
    """`--storage URL` for PostgreSQL runs; nothing for the default SQLite file."""
    return ["--storage", url] if url else []


def trials_via_optuna_cli(cwd, study, url=None):
    proc = Process(OPTUNA, ["trials", "--study-name", study, "--storage",
                            url or "sqlite:///storage/" + study + ".db", "-f", "json"],
                   cwd, env())  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dashboard:
    """`train_optuna.py dashboard` in a real process, and JSON reads from its API."""

    def __init__(self, cwd, study, storage=None):
        self.port = free_port()
        # output to files (Process), not pipes: the access log of hundreds of requests would fill
        # a pipe and block
        self.proc = Process(ROOT / "train_optuna.py", ["dashboard", "--study", study, "--port",
                            self.port, *storage_args(storage)], cwd, env())  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/api/studies", timeout=2).read()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.err.read_text()
                time.sleep(0.3)
        raise AssertionError("dashboard did not start")

    def get(self, path):
        return json.loads(urllib.request.urlopen(self.url + path, timeout=30).read())

    def stop(self):
        self.proc.send_signal(2)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out + err


def states(trials) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t["state"]] = out.get(t["state"], 0) + 1
    return out
