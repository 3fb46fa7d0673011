"""The search service on top of segcore: spaces, studies and storage, the worker loop and its
launcher, trials, rescoring, promotion, the final fit, notes, reports and SLURM."""

from __future__ import annotations

from pathlib import Path

# The command line the workers, promotion and SLURM jobs run: the module installed beside the
# two packages (site-packages, or the checkout with `pip install -e .`).
ENTRY = Path(__file__).resolve().parents[1] / "train_optuna.py"
