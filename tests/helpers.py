"""Shared by the end-to-end tests: a tiny search space, the CLI in a real process, and the
independent `optuna` command line to read a study back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def cli(cwd, *args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "train_optuna.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, env=env(), timeout=240,
                          check=False)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def storage_args(url: str | None) -> list[str]:
    """`--storage URL` for PostgreSQL runs; nothing for the default SQLite file."""
    return ["--storage", url] if url else []


def trials_via_optuna_cli(cwd, study, url=None):
    out = subprocess.run(
        [OPTUNA, "trials", "--study-name", study, "--storage",
         url or "sqlite:///storage/" + study + ".db", "-f", "json"],
        cwd=cwd, capture_output=True, text=True, check=True, env=env(),
    )  # fmt: skip
    return json.loads(out.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dashboard:
    """`train_optuna.py dashboard` in a real process, and JSON reads from its API."""

    def __init__(self, cwd, study, storage=None):
        self.port = free_port()
        # a file, not a pipe: the access log of hundreds of requests would fill a pipe and block
        self.log = cwd / f"dashboard-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "train_optuna.py"), "dashboard", "--study", study,
                 "--port", str(self.port), *storage_args(storage)],
                cwd=cwd, env=env(), stdout=log, stderr=log,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/api/studies", timeout=2).read()
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                time.sleep(0.3)
        raise AssertionError("dashboard did not start")

    def get(self, path):
        return json.loads(urllib.request.urlopen(self.url + path, timeout=30).read())

    def stop(self):
        self.proc.send_signal(2)
        self.proc.wait(timeout=30)
        return self.proc.returncode, self.log.read_text()


def states(trials) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t["state"]] = out.get(t["state"], 0) + 1
    return out
