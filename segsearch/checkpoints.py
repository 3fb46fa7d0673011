"""Trial checkpoints in the artifact store: store, find, load, and keep only the top K."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from segcore.config import TrialConfig
from segcore.data import Dataset, Normalization
from segcore.errors import UserError
from segcore.files import load_model, save_model
from segsearch.artifacts import attach, detach, fetch, listed, store_dir
from segsearch.internals import trial_id

FILENAME = "checkpoint.pt"
WARM_START = "warm_start"  # user attribute of the enqueued recipe trial (segsearch.study)


def checkpoints(study: optuna.Study) -> dict[int, tuple[str, str]]:
    """trial_id -> (attribute key, artifact id) of each live checkpoint."""
    return {
        trial_id: (key, meta["artifact_id"])
        for trial_id, key, meta in listed(study)
        if meta.get("filename") == FILENAME
    }


def top_trials(study: optuna.Study, k: int, trials: list | None = None) -> list[FrozenTrial]:
    """The K best COMPLETE trials (ties: the earlier first), of `trials` if given."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return sorted(done, key=lambda t: (-t.value, t.number))[:k]


def kept_trials(study: optuna.Study, k: int, trials: list | None = None) -> list[FrozenTrial]:
    """top_trials, then the warm-start trial (the recipe) if it completed outside them. Its
    checkpoint is kept and it is rescored with them, so that the winner is chosen against it on
    validation full-image mIoU: the search does not hand over a configuration that validation
    says is worse than the recipe it started from."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    top = top_trials(study, k, trials)
    numbers = {t.number for t in top}
    warm = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(WARM_START)]
    return top + [t for t in warm if t.number not in numbers]


def would_be_top(study: optuna.Study, k: int, value: float, number: int) -> bool:
    """Whether a trial finishing now with `value` enters the top K (top_trials' order)."""
    top = top_trials(study, k)
    return len(top) < k or (-value, number) < (-top[-1].value, top[-1].number)


def store_checkpoint(
    study: optuna.Study, trial_id: int, state: dict[str, torch.Tensor], cfg: TrialConfig,
    train_set: Dataset, norm: Normalization, extra: dict[str, Any], store,
) -> str:  # fmt: skip
    """Save the weights as a model file and list it on the trial's page; returns its id."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / FILENAME
        save_model(path, state, cfg, in_channels=train_set.channels, labels=train_set.labels,
                   norm=norm, extra=extra)  # fmt: skip
        return attach(study, trial_id, path, store, "application/octet-stream")[1]


def load_checkpoint(study: optuna.Study, trial: FrozenTrial, store, device: torch.device):
    """(model in eval mode on `device`, model-file payload) of a trial's checkpoint."""
    found = checkpoints(study).get(trial_id(trial))
    name = study.study_name
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / FILENAME
        try:
            if found is None:
                raise ArtifactNotFound(f"trial {trial.number}")
            fetch(store, found[1], path)
        except ArtifactNotFound:
            raise UserError(
                f"--study {name}: trial {trial.number}'s checkpoint is not in {store_dir(study)}"
                f" (on many machines, that folder must be shared)"
            ) from None
        return load_model(path, device)


def drop_checkpoints(study: optuna.Study, top_k: int, store) -> None:
    """Delete checkpoints of trials that can no longer be in the top K or the warm start
    (kept_trials), so disk use stays bounded.
    The checkpoints are listed first and the trials read once after: a trial stores its
    checkpoint while RUNNING, so each listed one is seen RUNNING (kept) or finished (judged);
    two reads of the trials could miss one turning from RUNNING to COMPLETE between them."""
    found = checkpoints(study)
    trials = study.get_trials(deepcopy=False)
    keep = {trial_id(t) for t in kept_trials(study, top_k, trials)}
    keep |= {trial_id(t) for t in trials if t.state == TrialState.RUNNING}
    for tid, (key, artifact_id) in found.items():
        if tid not in keep:
            detach(study, key, artifact_id, store)
