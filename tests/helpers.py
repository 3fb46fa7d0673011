"""Shared by the end-to-end tests: a tiny search space, the CLI in a real process, and the
independent `optuna` command line to read a study back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def trials_via_optuna_cli(cwd, study):
    out = subprocess.run(
        [OPTUNA, "trials", "--study-name", study, "--storage", "sqlite:///storage/" + study + ".db",
         "-f", "json"], cwd=cwd, capture_output=True, text=True, check=True, env=env(),
    )  # fmt: skip
    return json.loads(out.stdout)


def states(trials) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t["state"]] = out.get(t["state"], 0) + 1
    return out
