"""The worker loop: take a trial slot (budget check and ask, under the lock), train, tell; repeat.

One place takes and releases the slot lock (take_slot), one runs a taken trial to its outcome
(work: segcore.trial does the training), one tells it (tell: with a retry when it was stopped),
and the loop alone handles interrupts, the time limit and giving up on a space where nothing
trains. The training loop itself knows nothing of optuna.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator

import optuna
from optuna.trial import TrialState

from segcore.artifacts import open_store
from segcore.checkpoints import drop_checkpoints
from segcore.device import pick_device
from segcore.resume import drop_states, retry
from segcore.storage import SlotLock, open_storage
from segcore.study import budget, counts, load_study, study_splits
from segcore.trial import Context, Interrupts, Outcome, failed, run_trial

log = logging.getLogger(__name__)

GIVE_UP_AFTER = 10  # trials of one worker failing in a row (diverged, out of memory)
GAVE_UP = 3  # the worker's exit status then; the launcher does not restart it
SLOTS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DONE, WAIT, LATE = "done", "wait", "late"  # take_slot's answers other than a trial
DEADLINE_ENV = "TRAIN_OPTUNA_DEADLINE"  # a search's deadline (time.time()), for its workers
# study.ask warns that heartbeats are meant for study.optimize: `heartbeat` below records them
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while the block runs (study.optimize does
    this itself; ask and tell do not), so a killed worker's trial is failed and retried."""
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a stalled database: the next beat retries
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def take_slot(study: optuna.Study, lock: SlotLock, deadline: float | None = None):
    """Under the slot lock: DONE when the budget is met, LATE past the deadline, WAIT while
    running trials hold every free slot (one may fail and be retried), else a new RUNNING trial
    (a WAITING one, such as a retry, first)."""
    with lock.held() as held:
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAIL, and retried
        c = counts(study)
        done = c["complete"] + c["pruned"]
        if done >= budget(study):
            return DONE
        if deadline is not None and time.time() >= deadline:
            return LATE
        if done + c["running"] >= budget(study):
            return WAIT
        trial = study.ask()
    if not held:  # without the lock another worker may have taken the last slot meanwhile
        earlier = study.get_trials(deepcopy=False, states=SLOTS)
        if sum(t.number < trial.number for t in earlier) >= budget(study):
            trial.set_user_attr("fail_reason", "over budget: another worker took the last slot")
            study.tell(trial, state=TrialState.FAIL)
            return WAIT
    return trial


def tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
    """Finish the trial, and queue its retry if it was stopped; one the heartbeat failed
    meanwhile (a storage stall) stays FAIL, and the heartbeat has queued its retry."""
    frozen = study.tell(trial, outcome.value, state=outcome.state, skip_if_finished=True)
    if frozen.state != outcome.state:
        log.warning("trial %d was failed meanwhile (heartbeat); going on", trial.number)
    elif outcome.retry:
        retry(study, frozen)
    value = "" if outcome.value is None else f" with patch mIoU {outcome.value:.4f}"
    reason = frozen.user_attrs.get("fail_reason", "") if frozen.state == TrialState.FAIL else ""
    log.info("trial %d %s%s %s", trial.number, frozen.state.name.lower(), value, reason)


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
            time.sleep(2)
            continue
        outcome = work(trial, ctx, storage, seed)
        failed_in_a_row = failed_in_a_row + 1 if outcome.state == TrialState.FAIL else 0
    return 130


def work(trial: optuna.Trial, ctx: Context, storage, seed: int | None) -> Outcome:
    """One taken trial from start to tell: who runs it, its heartbeat, training, the outcome;
    then the checkpoints and states nothing needs any more are dropped."""
    who = {"pid": os.getpid(), "host": socket.gethostname(), "sampler_seed": seed}
    if "SLURM_JOB_ID" in os.environ:  # which array task ran it, for scancel and the logs
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
        who["slurm_task"] = f"{job}_{task}" if task is not None else job
    for key, value in who.items():
        trial.set_user_attr(key, value)
    outcome = None
    try:
        with heartbeat(storage, trial._trial_id):
            outcome = run_trial(trial, ctx)
    finally:  # a bug in training still leaves the trial FAIL, not RUNNING
        tell(ctx.study, trial, outcome or failed(trial, "error (see the worker's log)"))
    drop_checkpoints(ctx.study, ctx.space.top_k, ctx.store)
    drop_states(ctx.study, ctx.store)
    return outcome
