"""The worker loop: take a trial slot (budget check and ask, under the lock), train, tell; repeat.

One place takes and releases the slot lock (take_slot), one place turns training's end into a
trial state (run_trial), and the loop alone handles interrupts, the time limit and giving up on
a space where nothing trains. A trial stopped before its end is retried and resumes from its
last saved epoch (segcore.resume). The training loop itself knows nothing of optuna.
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
from dataclasses import dataclass
from typing import NamedTuple

import optuna
import torch
from optuna.trial import TrialState

from segcore.artifacts import open_store
from segcore.checkpoints import drop_checkpoints, store_checkpoint, would_be_top
from segcore.data import Splits
from segcore.device import pick_device
from segcore.errors import DivergedError, is_out_of_memory
from segcore.resume import Saver, drop_states, find_state, retry
from segcore.space import Space, suggest
from segcore.storage import SlotLock, open_storage
from segcore.study import budget, counts, load_study, study_splits

log = logging.getLogger(__name__)

GIVE_UP_AFTER = 10  # trials of one worker failing in a row (diverged, out of memory)
GAVE_UP = 3  # the worker's exit status then; the launcher does not restart it
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); a retry resumes it"
TIME_LIMIT = "stopped at the time limit; a retry resumes it"
SLOTS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DONE, WAIT, LATE = "done", "wait", "late"  # take_slot's answers other than a trial
# study.ask warns that heartbeats are meant for study.optimize: `heartbeat` below records them
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")


class Interrupts:
    """SIGINT/SIGTERM in a worker: interrupt the trial being trained, so that it ends FAIL with a
    reason; between trials only note the request, so optuna's own bookkeeping is never cut."""

    def __init__(self) -> None:
        self.requested = False
        self.in_training = False

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True
        if self.in_training:
            self.in_training = False  # one interrupt per trial
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The block where a signal interrupts at once (KeyboardInterrupt)."""
        self.in_training = True
        try:
            if self.requested:
                raise KeyboardInterrupt
            yield
        finally:
            self.in_training = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block inside training that a signal does not cut (saving a state): the interrupt
        comes right after it."""
        was, self.in_training = self.in_training, False
        try:
            yield
        finally:
            self.in_training = was
        if was and self.requested:
            self.in_training = False
            raise KeyboardInterrupt


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


@dataclass
class Context:
    """What every trial of a worker shares."""

    study: optuna.Study
    space: Space
    splits: Splits
    store: object
    interrupts: Interrupts
    device: torch.device
    deadline: float | None = None  # time.time() after which trials stop at an epoch's end


class Outcome(NamedTuple):
    state: TrialState
    value: float | None = None
    retry: bool = False  # stopped before its end: queue a retry that resumes it


class TimeUp(Exception):
    """The worker's time limit passed: stop at this epoch's end (its state is saved)."""


def run_trial(trial: optuna.Trial, ctx: Context) -> Outcome:
    """Train the trial's configuration on the training images (from the saved state of the
    trial it retries, if any), reporting validation patch mIoU each epoch for pruning and saving
    a resumable state; keep its checkpoint while it can be in the top K. The test images are
    never touched. Failures that are the trial's own (divergence, out of memory) end FAIL with a
    `fail_reason`; an interrupt or the time limit ends it FAIL to be retried; anything else is a
    bug and raises."""
    from segcore.train import train  # imported here: batchgenerators and scipy take a second

    study, train_set, val_set = ctx.study, ctx.splits.train, ctx.splits.val
    if ctx.device.type == "cuda":  # give back what an earlier trial's OOM left cached
        torch.cuda.empty_cache()
    cfg = suggest(trial, ctx.space)
    trial.set_user_attr("config", cfg.to_dict())
    frozen = study.get_trials(deepcopy=False)[trial.number]
    state, since = find_state(study, frozen, ctx.store)
    if state is not None:
        trial.set_user_attr("resumed_from", {"trial": since.number, "epoch": state["epoch"]})
        for h in state["history"]:  # epochs saved but not reported before the stop
            if h["epoch"] not in frozen.intermediate_values:
                trial.report(h["patch_miou"], h["epoch"])
        log.info("trial %d resumes trial %d after epoch %d", trial.number, since.number,
                 state["epoch"] + 1)  # fmt: skip

    def on_epoch(epoch: int, miou: float) -> None:
        trial.report(miou, epoch)
        trial.set_user_attr("epochs_run", epoch + 1)
        if trial.should_prune():
            raise optuna.TrialPruned
        if ctx.deadline is not None and time.time() >= ctx.deadline and epoch + 1 < cfg.epochs:
            raise TimeUp

    saver = Saver(study, trial._trial_id, ctx.store)

    def on_saved(state: dict) -> None:
        with ctx.interrupts.deferred():  # a state is written whole, or not at all
            saver(state)

    try:
        with ctx.interrupts.training():
            result = train(cfg, train_set, val_set, on_epoch=on_epoch, device=ctx.device,
                           progress=False, resume=state, on_saved=on_saved)  # fmt: skip
    except optuna.TrialPruned:
        return Outcome(TrialState.PRUNED)
    except DivergedError as e:
        return _failed(trial, f"diverged: {e}")
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return _failed(trial, f"out of memory: {reason}")
    except KeyboardInterrupt:
        return _failed(trial, INTERRUPTED, retry=True)
    except TimeUp:
        return _failed(trial, TIME_LIMIT, retry=True)
    trial.set_user_attr("best_epoch", result.best_epoch)
    if would_be_top(study, ctx.space.top_k, result.best_patch_miou, trial.number):
        extra = {
            "study": study.study_name,
            "trial": trial.number,
            "split": ctx.splits.names(),
            "data": study.user_attrs.get("data"),
            "patch_miou": result.best_patch_miou,
        }
        store_checkpoint(study, trial._trial_id, result.state_dict, cfg, train_set, extra,
                         ctx.store)  # fmt: skip
    return Outcome(TrialState.COMPLETE, result.best_patch_miou)


def _failed(trial: optuna.Trial, reason: str, retry: bool = False) -> Outcome:
    trial.set_user_attr("fail_reason", reason)
    return Outcome(TrialState.FAIL, retry=retry)


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
    if os.environ.get("TRAIN_OPTUNA_DEADLINE"):  # a search's worker: the search's deadline
        deadline = float(os.environ["TRAIN_OPTUNA_DEADLINE"])
    ctx = Context(study, space, study_splits(study, space), open_store(name), interrupts,
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
        tell(ctx.study, trial, outcome or _failed(trial, "error (see the worker's log)"))
    drop_checkpoints(ctx.study, ctx.space.top_k, ctx.store)
    drop_states(ctx.study, ctx.store)
    return outcome
