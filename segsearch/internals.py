"""What we use of other libraries that they do not make public, in one place, each checked
against the version pinned in requirements.txt; tests/test_layout.py fails loudly when one goes.

- optuna 5.0.0: a trial's storage id (`Trial._trial_id`, `FrozenTrial._trial_id`) and a
  study's storage and id (`Study._storage`, `Study._study_id`). Public API has no way to read or
  write a study's system attributes, where optuna-dashboard 0.21 lists a trial's files
  (segsearch.artifacts), nor to name a trial to the storage's heartbeat.
- optuna 5.0.0's SuccessiveHalvingPruner.prune reads the rungs' competitors through
  `study.get_trials` and writes a trial's rung through `study._storage`: the view that
  segsearch.samplers.HalvingWithRetries hands it relies on both (tests/test_study_side.py's
  retry-rung test fails if that changes).
- Python 3.11's multiprocessing: the fork server's alive pipe
  (`multiprocessing.forkserver._forkserver._forkserver_alive_fd`), closed in each forked worker
  so that the server exits with the launcher (segsearch.launcher).
"""

from __future__ import annotations

import multiprocessing.forkserver
import os

import optuna
from optuna.trial import FrozenTrial


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in the storage (not its number within the study)."""
    return trial._trial_id


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def close_forkserver_alive_fd() -> None:
    """In a process forked from the fork server: close the launcher's end of the pipe whose
    closing stops the server (inherited by every child)."""
    server = multiprocessing.forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
