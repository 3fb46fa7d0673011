"""The worker loop: take a slot, run the trial's life (segsearch.lifecycle), repeat, until the
budget is met, the time limit passes, a signal comes, or trials keep failing. The loop alone
handles interrupts between trials, the time limit and giving up on a space where nothing trains.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from optuna.trial import TrialState

from segcore.device import pick_device
from segsearch.artifacts import open_store
from segsearch.interrupts import Interrupts
from segsearch.lifecycle import DONE, LATE, WAIT, Context, take_slot, work
from segsearch.storage import SlotLock, open_storage
from segsearch.study import load_study, study_splits

log = logging.getLogger(__name__)

GIVE_UP_AFTER = 10  # trials of one worker failing in a row (diverged, out of memory)
GAVE_UP = 3  # the worker's exit status then; the launcher does not restart it
WAIT_S = 2.0  # between looks for a free slot while running trials hold every one
DEADLINE_ENV = "TRAIN_OPTUNA_DEADLINE"  # a search's deadline (time.time()), for its workers


def run_worker(
    name: str, url: str, seed: int | None, device: str | None = None,
    timeout: float | None = None,
) -> int:  # fmt: skip
    """Run trials until the study-wide budget of COMPLETE + PRUNED trials is met, or `timeout`
    seconds have passed. Exit status 0 then, 130 when interrupted, GAVE_UP when GIVE_UP_AFTER
    trials in a row have failed."""
    storage = open_storage(url)
    study, space = load_study(name, storage, seed)
    interrupts = Interrupts()
    deadline = None if timeout is None else time.time() + timeout
    if os.environ.get(DEADLINE_ENV):  # a search's worker: the search's deadline, not its own
        deadline = float(os.environ[DEADLINE_ENV])
    ctx = Context(study, space, study_splits(study, space), open_store(study), interrupts,
                  pick_device(device), deadline)  # fmt: skip
    signal.signal(signal.SIGINT, interrupts)
    signal.signal(signal.SIGTERM, interrupts)
    lock = SlotLock(storage, url, name)
    failed_in_a_row = 0
    while not interrupts.requested:
        if failed_in_a_row >= GIVE_UP_AFTER:  # bad data or a space that cannot train: stop
            log.error("%d trials in a row failed; giving up (see their fail_reason)", GIVE_UP_AFTER)
            return GAVE_UP
        trial = take_slot(study, lock, deadline)
        if trial is DONE:
            return 0
        if trial is LATE:
            log.info("time limit reached: no new trial")
            return 0
        if trial is WAIT:
            time.sleep(WAIT_S)
            continue
        outcome = work(trial, ctx, storage, seed)
        failed_in_a_row = failed_in_a_row + 1 if outcome.state == TrialState.FAIL else 0
    return 130
