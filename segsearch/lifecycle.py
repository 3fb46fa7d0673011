"""One trial's life, top to bottom: ask for a slot, resume, train and save its state each epoch,
fail or retry, tell. `work` runs it; segsearch.worker loops over it.

1. **Ask** (`take_slot`): under the slot lock, stale trials failed (and retried), the budget
   checked, a WAITING trial (a retry, an enqueued one) taken before a new one.
2. **Resume** (`run_trial`): a retry continues from the newest saved state of the trials it
   retries (segsearch.resume), re-reporting epochs saved but not reported.
3. **Train and save**: segcore.train with a callback that reports each epoch for pruning and
   saves a resumable state; the model's costs and the space's limits are checked first.
4. **Fail or retry** (`retry`): one policy for every stop. A *preemption* (Ctrl-C, SIGTERM, a
   scheduler's time limit, the search's deadline, the launcher stopping) and a *crash* (the
   heartbeat found the worker silent: `kill -9`, a lost machine) are counted apart along the
   trial's retries, each against its own cap; the retry keeps the parameters, user attributes,
   reported values and completed pruner rungs, and the pruner counts a retried trial's rungs
   once (segsearch.samplers).
5. **Tell**: the outcome, unless the trial was finished behind the worker's back (a storage
   stall long enough for the heartbeat to fail it): then it stays FAIL, its crash retry is
   queued, and the worker goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from segcore.budget import budgeted
from segcore.costs import measure, violations
from segcore.data import ZSCORE
from segcore.device import precision_for
from segcore.errors import DivergedError, is_out_of_memory
from segcore.split import Splits
from segsearch.artifacts import record_curves
from segsearch.checkpoints import WARM_START, drop_checkpoints, store_checkpoint, would_be_top
from segsearch.internals import trial_id
from segsearch.interrupts import Interrupts
from segsearch.resume import Saver, drop_states, find_state, lineage
from segsearch.space import Space, suggest
from segsearch.storage import SlotLock
from segsearch.study import budget, budget_met, counts, finished

log = logging.getLogger(__name__)

SLOTS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DONE, WAIT, LATE = "done", "wait", "late"  # take_slot's answers other than a trial
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); a retry resumes it"
TIME_LIMIT = "stopped at the time limit; a retry resumes it"
PREEMPTED, CRASHED = "preempted", "crashed"  # the two kinds of stop, counted apart
# A preemption was asked for (a busy cluster may preempt one trial many times); a trial whose
# worker keeps dying is more likely a bug than bad luck.
CAPS = {PREEMPTED: 20, CRASHED: 3}
KINDS = "retry_kinds"  # system attribute: the kind of each stop in retry_history, in order
# study.ask warns that heartbeats are meant for study.optimize: `heartbeat` below records them
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")


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
    retry: bool = False  # preempted before its end: queue a retry that resumes it
    elsewhere: bool = False  # finished behind the worker's back (the heartbeat failed it)


class TimeUp(Exception):
    """The worker's time limit passed: stop at this epoch's end (its state is saved)."""


def work(trial: optuna.Trial, ctx: Context, storage, seed: int | None) -> Outcome:
    """A taken trial's whole life after the ask: who runs it, its heartbeat, training, the
    outcome told; then the checkpoints and states nothing needs any more are dropped."""
    who = {"pid": os.getpid(), "host": socket.gethostname(), "sampler_seed": seed}
    if "SLURM_JOB_ID" in os.environ:  # which array task ran it, for scancel and the logs
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
        who["slurm_task"] = f"{job}_{task}" if task is not None else job
    outcome = None
    try:
        for key, value in who.items():
            trial.set_user_attr(key, value)
        with heartbeat(storage, trial_id(trial)):
            outcome = run_trial(trial, ctx)
    except UpdateFinishedTrialError:  # failed behind our back: tell() below says so
        outcome = Outcome(TrialState.FAIL, elsewhere=True)
    finally:  # a bug in training still leaves the trial FAIL, not RUNNING
        tell(ctx.study, trial, outcome or failed(trial, "error (see the worker's log)"))
    drop_checkpoints(ctx.study, ctx.space.top_k, ctx.store)
    drop_states(ctx.study, ctx.store)
    return outcome


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, tid: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while the block runs (study.optimize does
    this itself; ask and tell do not), so a killed worker's trial is failed and retried."""
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a stalled database: the next beat retries
                storage.record_heartbeat(tid)
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
    """1. Ask. Under the slot lock: DONE when the budget is met, LATE past the deadline, WAIT
    while running trials hold every free slot (one may fail and be retried), else a new RUNNING
    trial (a WAITING one, such as a retry, first)."""
    with lock.held() as held:
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAIL, and retried
        c = counts(study)
        if budget_met(study, c):
            return DONE
        if deadline is not None and time.time() >= deadline:
            return LATE
        if finished(study, c) + c["running"] >= budget(study):
            return WAIT
        trial = study.ask()
    if not held:  # without the lock another worker may have taken the last slot meanwhile
        earlier = study.get_trials(deepcopy=False, states=SLOTS)
        if sum(t.number < trial.number for t in earlier) >= budget(study):
            trial.set_user_attr("fail_reason", "over budget: another worker took the last slot")
            study.tell(trial, state=TrialState.FAIL)
            return WAIT
    return trial


def run_trial(trial: optuna.Trial, ctx: Context) -> Outcome:
    """2-3. Resume, train, save. The trial's configuration trained on the training images (from
    the saved state of the trial it retries, if any), reporting validation patch mIoU each epoch
    for pruning and saving a resumable state; its costs and curves recorded; its checkpoint kept
    while it can be in the top K. The test images are never touched. Failures that are the
    trial's own (divergence, out of memory) end it FAIL with a `fail_reason`; a model over the
    space's limits is pruned before it trains; anything else is a bug and raises."""
    from segcore.train import train  # imported here: batchgenerators and scipy take a second

    study, train_set, val_set = ctx.study, ctx.splits.train, ctx.splits.val
    if ctx.device.type == "cuda":  # give back what an earlier trial's OOM left cached
        torch.cuda.empty_cache()
    cfg = suggest(trial, ctx.space)
    trial.set_user_attr("config", cfg.to_dict())
    gpu = f" ({torch.cuda.get_device_name(ctx.device)})" if ctx.device.type == "cuda" else ""
    where = {"device": f"{ctx.device}{gpu}", "precision": precision_for(ctx.device),
             "threads": torch.get_num_threads()}  # fmt: skip
    for key, value in where.items():  # what it ran with, on its dashboard page
        trial.set_user_attr(key, value)
    image = val_set.normalized(ZSCORE).images[0]  # its values do not change what it costs
    costs = measure(cfg, train_set.channels, len(train_set.classes), image, ctx.device)
    for key, value in costs.items():
        trial.set_user_attr(key, value)
    broken = violations(costs, ctx.space.constraints)
    if broken:  # pruned before it trains, and says why
        trial.set_user_attr("pruned_reason", "over the space's limits: " + "; ".join(broken))
        return Outcome(TrialState.PRUNED)
    frozen = study.get_trials(deepcopy=False)[trial.number]
    state, since = find_state(study, frozen, ctx.store)
    if state is not None:
        trial.set_user_attr("resumed_from", {"trial": since.number, "epoch": state["epoch"]})
        for h in state["history"]:  # epochs saved but not reported before the stop
            if h["epoch"] not in frozen.intermediate_values:
                trial.report(h["patch_miou"], h["epoch"])
        log.info("trial %d resumes trial %d after epoch %d", trial.number, since.number,
                 state["epoch"] + 1)  # fmt: skip
    ran = since.user_attrs.get("config") if state is not None else None

    def on_epoch(epoch: int, miou: float) -> None:
        trial.report(miou, epoch)
        trial.set_user_attr("epochs_run", epoch + 1)
        if trial.should_prune():
            raise optuna.TrialPruned
        if ctx.deadline is not None and time.time() >= ctx.deadline and epoch + 1 < cfg.epochs:
            raise TimeUp

    saver = Saver(study, trial_id(trial), ctx.store)
    history: list[dict] = state["history"] if state is not None else []
    finished_elsewhere = False

    def on_saved(saved: dict) -> None:
        with ctx.interrupts.deferred():  # a state is written whole, or not at all
            saver(saved)
        history[:] = saved["history"]

    try:
        with ctx.interrupts.training():
            asked, (cfg, step) = cfg, budgeted(cfg, train_set, ctx.device, ran)
            with ctx.interrupts.deferred():  # written whole, or not at all
                if cfg != asked:  # a budget in seconds, as steps (measured now, or as it ran)
                    trial.set_user_attr("config", cfg.to_dict())
                if step is not None:
                    trial.set_user_attr("step_seconds", step)
            result = train(cfg, train_set, val_set, on_epoch=on_epoch, device=ctx.device,
                           progress=False, resume=state, on_saved=on_saved)  # fmt: skip
    except optuna.TrialPruned:
        return Outcome(TrialState.PRUNED)
    except DivergedError as e:
        return failed(trial, f"diverged: {e}")
    except UpdateFinishedTrialError:  # nothing more may be written to it (work tells)
        finished_elsewhere = True
        raise
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return failed(trial, f"out of memory: {reason}")
    except KeyboardInterrupt:
        return failed(trial, INTERRUPTED, retry=True)
    except TimeUp:
        return failed(trial, TIME_LIMIT, retry=True)
    finally:
        if not finished_elsewhere:
            record_curves(trial, history, ctx.store)
    trial.set_user_attr("best_epoch", result.best_epoch)
    top = would_be_top(study, ctx.space.top_k, result.best_patch_miou, trial.number)
    if top or trial.user_attrs.get(WARM_START):  # the warm start is always rescored
        extra = {
            "study": study.study_name,
            "trial": trial.number,
            "split": ctx.splits.names(),
            "data": study.user_attrs.get("data"),
            "patch_miou": result.best_patch_miou,
        }
        store_checkpoint(study, trial_id(trial), result.state_dict, cfg, train_set, result.norm,
                         extra, ctx.store)  # fmt: skip
    return Outcome(TrialState.COMPLETE, result.best_patch_miou)


def failed(trial: optuna.Trial, reason: str, retry: bool = False) -> Outcome:
    trial.set_user_attr("fail_reason", reason)
    return Outcome(TrialState.FAIL, retry=retry)


def tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
    """5. Tell. Finish the trial, and queue its retry if it was preempted; one the heartbeat
    failed meanwhile (a storage stall) stays FAIL, and the heartbeat has queued its retry."""
    frozen = study.tell(trial, outcome.value, state=outcome.state, skip_if_finished=True)
    if frozen.state != outcome.state or outcome.elsewhere:
        log.warning("trial %d was failed meanwhile (heartbeat); going on", trial.number)
    elif outcome.retry:
        retry(study, frozen, PREEMPTED)
    value = "" if outcome.value is None else f" with patch mIoU {outcome.value:.4f}"
    reason = frozen.user_attrs.get("fail_reason", "") if frozen.state == TrialState.FAIL else ""
    log.info("trial %d %s%s %s", trial.number, frozen.state.name.lower(), value, reason)


def retry(study: optuna.Study, trial: FrozenTrial, kind: str) -> bool:
    """4. Fail or retry: queue a WAITING copy of a stopped trial (its parameters, user
    attributes, reported values and completed rungs, not its files), unless its lineage has met
    the cap of this kind of stop. Returns whether a retry was queued."""
    kinds = [*trial.system_attrs.get(KINDS, []), kind]
    if kinds.count(kind) > CAPS[kind]:
        log.warning("trial %d: not retried, %s %d times (the cap)", trial.number, kind, CAPS[kind])
        return False
    # not the files upload_artifact listed on its page ("artifacts:" keys, optuna 5.0)
    kept = {k: v for k, v in trial.system_attrs.items() if not k.startswith("artifacts:")}
    system = {"failed_trial": trial.number, **kept,
              "retry_history": [*lineage(trial), trial.number], KINDS: kinds}  # fmt: skip
    study.add_trial(
        optuna.create_trial(state=TrialState.WAITING, params=trial.params,
                            distributions=trial.distributions, user_attrs=trial.user_attrs,
                            system_attrs=system, intermediate_values=trial.intermediate_values)
    )  # fmt: skip
    return True


def retry_crashed(study: optuna.Study, trial: FrozenTrial) -> None:
    """The storage's heartbeat callback: a trial whose worker went silent is a crash."""
    retry(study, trial, CRASHED)
