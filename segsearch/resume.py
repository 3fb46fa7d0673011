"""Trials that survive preemption: each epoch's resumable state, retries, and finding the state.

A running trial saves its state (weights, optimizer, schedule, random states, best so far,
history) after every epoch as `resume.pt` in the artifact store, listed on its page; only the
latest is kept. A trial that stops before its end gets a retry (segsearch.lifecycle.retry), and
the worker that takes the retry continues from the newest state of the retried trials. States
are deleted once no trial can resume from them.
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from segsearch.artifacts import attach, detach, fetch, listed
from segsearch.internals import trial_id

FILENAME = "resume.pt"


def lineage(trial: FrozenTrial) -> list[int]:
    """Numbers of the trials `trial` retries, oldest first (what optuna's retry records)."""
    return list(trial.system_attrs.get("retry_history", []))


def states(study: optuna.Study) -> dict[int, list[tuple[str, str]]]:
    """trial_id -> [(attribute key, artifact id)] of its saved states: one, or two where its
    worker was killed between saving an epoch and dropping the one before (detach removes the
    file before the listing, so the older may be gone)."""
    saved: dict[int, list[tuple[str, str]]] = {}
    for tid, key, m in listed(study):
        if m.get("filename") == FILENAME:
            saved.setdefault(tid, []).append((key, m["artifact_id"]))
    return saved


class Saver:
    """on_saved for train(): store each epoch's state for the trial, then drop the one before,
    so a reader always finds one whole state (a new id listed in one step, the old removed)."""

    def __init__(self, study: optuna.Study, trial_id: int, store) -> None:
        self.study, self.trial_id, self.store = study, trial_id, store
        self.current: tuple[str, str] | None = None

    def __call__(self, state: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / FILENAME
            torch.save(state, path)
            new = attach(self.study, self.trial_id, path, self.store, "application/octet-stream")
        if self.current is not None:
            detach(self.study, *self.current, self.store)
        self.current = new


def find_state(
    study: optuna.Study, trial: FrozenTrial, store
) -> tuple[dict, FrozenTrial] | tuple[None, None]:
    """The newest saved state of the trials `trial` retries, and the trial that saved it."""
    saved = states(study)
    trials = study.get_trials(deepcopy=False)
    for number in reversed(lineage(trial)):
        found = []
        for _, artifact_id in saved.get(trial_id(trials[number]), []):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / FILENAME
                try:
                    fetch(store, artifact_id, path)
                except ArtifactNotFound:  # dropped meanwhile
                    continue
                found.append(torch.load(path, map_location="cpu", weights_only=True))
        if found:  # else look further back
            return max(found, key=lambda state: state["epoch"]), trials[number]
    return None, None


GRACE = datetime.timedelta(minutes=10)  # a failed trial's retry is queued just after it fails


def drop_states(study: optuna.Study, store) -> None:
    """Delete the states no trial can resume from: kept are those of RUNNING trials, of failed
    trials that a WAITING or RUNNING retry descends from, and of trials failed in the last few
    minutes (whose retry another process may be queueing right now)."""
    saved = states(study)
    if not saved:
        return
    trials = study.get_trials(deepcopy=False)
    live = (TrialState.WAITING, TrialState.RUNNING)
    wanted = {t.number for t in trials if t.state in live}
    wanted |= {n for t in trials if t.state in live for n in lineage(t)}
    recent = datetime.datetime.now() - GRACE
    wanted |= {t.number for t in trials if t.state == TrialState.FAIL
               and t.datetime_complete is not None and t.datetime_complete > recent}  # fmt: skip
    for t in trials:
        if t.number not in wanted:
            for key, artifact_id in saved.get(trial_id(t), []):
                detach(study, key, artifact_id, store)
