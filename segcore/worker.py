"""The worker loop: take a trial slot (budget check and ask, under the lock), train, tell; repeat.

One place takes and releases the slot lock (take_slot), one place turns training's end into a
trial state (run_trial), and the loop alone handles interrupts and gives up on a space where
nothing trains. The training loop itself knows nothing of optuna.
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
from typing import NamedTuple

import optuna
import torch
from optuna.trial import TrialState

from segcore.artifacts import open_store
from segcore.checkpoints import drop_checkpoints, store_checkpoint, would_be_top
from segcore.data import Splits
from segcore.device import pick_device
from segcore.errors import DivergedError, is_out_of_memory
from segcore.space import Space, suggest
from segcore.storage import SlotLock, open_storage
from segcore.study import budget, counts, load_study, study_splits

log = logging.getLogger(__name__)

GIVE_UP_AFTER = 10  # trials of one worker failing in a row (diverged, out of memory)
GAVE_UP = 3  # the worker's exit status then; the launcher does not restart it
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"
SLOTS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DONE, WAIT = "done", "wait"  # take_slot's answers other than a trial
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


def take_slot(study: optuna.Study, lock: SlotLock) -> optuna.Trial | str:
    """Under the slot lock: DONE when the budget is met, WAIT while running trials hold every
    free slot (one may fail and be retried), else a new RUNNING trial (a WAITING one first)."""
    with lock.held() as held:
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAIL, and retried
        c = counts(study)
        done = c["complete"] + c["pruned"]
        if done >= budget(study):
            return DONE
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


class Outcome(NamedTuple):
    state: TrialState
    value: float | None = None


def run_trial(
    study: optuna.Study, trial: optuna.Trial, space: Space, splits: Splits, store,
    interrupts: Interrupts, device: torch.device,
) -> Outcome:  # fmt: skip
    """Train the trial's configuration on the training images, reporting validation patch mIoU
    each epoch for pruning; keep its checkpoint while it can be in the top K. The test images
    are never touched. Failures that are the trial's own (divergence, out of memory, an
    interrupt) end FAIL with a `fail_reason`; anything else is a bug and raises."""
    from segcore.train import train  # imported here: batchgenerators and scipy take a second

    train_set, val_set = splits.train, splits.val
    if device.type == "cuda":  # give back what an earlier trial's OOM left cached
        torch.cuda.empty_cache()
    cfg = suggest(trial, space)
    trial.set_user_attr("config", cfg.to_dict())

    def on_epoch(epoch: int, miou: float) -> None:
        trial.report(miou, epoch)
        trial.set_user_attr("epochs_run", epoch + 1)
        if trial.should_prune():
            raise optuna.TrialPruned

    try:
        with interrupts.training():
            result = train(cfg, train_set, val_set, on_epoch=on_epoch, device=device,
                           progress=False)  # fmt: skip
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
        return _failed(trial, INTERRUPTED)
    trial.set_user_attr("best_epoch", result.best_epoch)
    if would_be_top(study, space.top_k, result.best_patch_miou, trial.number):
        extra = {
            "study": study.study_name,
            "trial": trial.number,
            "split": splits.names(),
            "data": study.user_attrs.get("data"),
            "patch_miou": result.best_patch_miou,
        }
        store_checkpoint(study, trial._trial_id, result.state_dict, cfg, train_set, extra, store)
    return Outcome(TrialState.COMPLETE, result.best_patch_miou)


def _failed(trial: optuna.Trial, reason: str) -> Outcome:
    trial.set_user_attr("fail_reason", reason)
    return Outcome(TrialState.FAIL)


def tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
    """Finish the trial; one the heartbeat failed meanwhile (a storage stall) stays FAIL."""
    frozen = study.tell(trial, outcome.value, state=outcome.state, skip_if_finished=True)
    if frozen.state != outcome.state:
        log.warning("trial %d was failed meanwhile (heartbeat); going on", trial.number)
    value = "" if outcome.value is None else f" with patch mIoU {outcome.value:.4f}"
    reason = frozen.user_attrs.get("fail_reason", "") if frozen.state == TrialState.FAIL else ""
    log.info("trial %d %s%s %s", trial.number, frozen.state.name.lower(), value, reason)


def run_worker(name: str, url: str, seed: int | None, device: str | None = None) -> int:
    """Run trials until the study-wide budget of COMPLETE + PRUNED trials is met. Exit status
    0 then, 130 when interrupted, GAVE_UP when GIVE_UP_AFTER trials in a row have failed."""
    storage = open_storage(url)
    study, space = load_study(name, storage, seed)
    splits = study_splits(study, space)
    store = open_store(name)
    dev = pick_device(device)
    interrupts = Interrupts()
    signal.signal(signal.SIGINT, interrupts)
    signal.signal(signal.SIGTERM, interrupts)
    lock = SlotLock(storage, url, name)
    failed_in_a_row = 0
    while not interrupts.requested:
        if failed_in_a_row >= GIVE_UP_AFTER:  # bad data or a space that cannot train: stop
            log.error("%d trials in a row failed; giving up (see their fail_reason)", GIVE_UP_AFTER)
            return GAVE_UP
        trial = take_slot(study, lock)
        if trial is DONE:
            return 0
        if trial is WAIT:
            time.sleep(2)
            continue
        for key, value in (("pid", os.getpid()), ("host", socket.gethostname()),
                           ("sampler_seed", seed)):  # fmt: skip
            trial.set_user_attr(key, value)
        outcome = None
        try:
            with heartbeat(storage, trial._trial_id):
                outcome = run_trial(study, trial, space, splits, store, interrupts, dev)
        finally:  # a bug in training still leaves the trial FAIL, not RUNNING
            tell(study, trial, outcome or _failed(trial, "error (see the worker's log)"))
        failed_in_a_row = failed_in_a_row + 1 if outcome.state == TrialState.FAIL else 0
        drop_checkpoints(study, space.top_k, store)
    return 130
