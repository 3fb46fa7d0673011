"""One trial, from its configuration to its outcome: what its model costs (and the space's limits),
training (resumed if it is a retry), its curves, its checkpoint; interrupts while it trains.

Failures that are the trial's own (divergence, out of memory) end it FAIL with a `fail_reason`;
an interrupt or the time limit ends it FAIL to be retried (segcore.resume); a model over the
space's limits is pruned before it trains; anything else is a bug and raises.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import optuna
import torch
from optuna.trial import TrialState

from segcore.budget import budgeted
from segcore.checkpoints import WARM_START, store_checkpoint, would_be_top
from segcore.costs import measure, violations
from segcore.data import ZSCORE
from segcore.device import precision_for
from segcore.errors import DivergedError, is_out_of_memory
from segcore.resume import Saver, find_state
from segcore.space import Space, suggest
from segcore.split import Splits

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); a retry resumes it"
TIME_LIMIT = "stopped at the time limit; a retry resumes it"


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
    a resumable state; record its costs and curves; keep its checkpoint while it can be in the
    top K. The test images are never touched."""
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

    saver = Saver(study, trial._trial_id, ctx.store)
    history: list[dict] = state["history"] if state is not None else []

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
        store_checkpoint(study, trial._trial_id, result.state_dict, cfg, train_set, result.norm,
                         extra, ctx.store)  # fmt: skip
    return Outcome(TrialState.COMPLETE, result.best_patch_miou)


def failed(trial: optuna.Trial, reason: str, retry: bool = False) -> Outcome:
    trial.set_user_attr("fail_reason", reason)
    return Outcome(TrialState.FAIL, retry=retry)


def record_curves(trial: optuna.Trial, history: list[dict], store) -> None:
    """The trial's per-epoch loss, learning rate, seconds and validation patch mIoU: in its user
    attributes (the report plots them) and as curves.csv on its dashboard page (shown as a
    table), through optuna's public upload_artifact: the trial is still RUNNING, and the file
    is never removed."""
    if not history:
        return
    trial.set_user_attr("history", history)
    trial.set_user_attr("seconds_per_epoch", statistics.median(h["seconds"] for h in history))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "curves.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", "loss", "lr", "seconds", "patch_miou"])
            writer.writeheader()
            writer.writerows({**h, "epoch": h["epoch"] + 1} for h in history)
        optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path),
                                         study_or_trial=trial, mimetype="text/csv")  # fmt: skip
