"""The sampler and the pruner of a study, built from its space's `study` section.

Optuna keeps neither in the database, so every worker rebuilds both from the space stored with
the study; their arguments are checked here when the space loads, not later in a worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna

from segcore.config import TrialConfig
from segcore.errors import UserError

if TYPE_CHECKING:
    from segsearch.space import Space

SAMPLERS = {"tpe", "random", "qmc"}
PRUNERS = {"asha", "median", "hyperband", "none"}


def build_sampler(space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    """The space's sampler; its seed comes from the worker (--seed), never from the file, except
    for QMC: its workers share one low-discrepancy sequence (optuna hands out the points in
    order through the storage) only with one seed, the study's (`seed` of the space)."""
    name, args = space.sampler["name"], space.sampler.get("args", {})
    if "seed" in args:
        raise UserError(f"{space.source}: study.sampler.args.seed: not here; use --seed")
    if name == "qmc":
        seed = space.fixed.get("seed", TrialConfig.seed)
    make = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "qmc": optuna.samplers.QMCSampler,
    }[name]
    if name == "tpe" and space.constraints:  # TPE learns where the limits are broken
        args = {**args, "constraints_func": _constraints_func(space.constraints)}
    try:
        return make(seed=seed, **args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{space.source}: study.sampler.args: {e}") from None


def _constraints_func(constraints: dict[str, float]):
    from segcore.costs import constraint_values

    def func(trial: optuna.trial.FrozenTrial) -> list[float]:
        costs = {k: trial.user_attrs.get(k) for k in ("params", "gflop_per_patch", "infer_ms")}
        return constraint_values(costs if None not in costs.values() else None, constraints)

    return func


def build_pruner(space: Space) -> optuna.pruners.BasePruner:
    name, args = space.pruner["name"], space.pruner.get("args", {})
    # optuna checks these only once it prunes, in a worker: a factor of 1 divides by log(1)
    factor, least = args.get("reduction_factor", 2), args.get("min_resource", 1)
    if name in ("asha", "hyperband") and not (type(factor) is int and factor >= 2):
        raise UserError(
            f"{space.source}: study.pruner.args.reduction_factor: an integer of at least 2"
        )
    if name in ("asha", "hyperband") and not (least == "auto" or type(least) is int and least >= 1):
        raise UserError(f"{space.source}: study.pruner.args.min_resource: 'auto' or at least 1")
    epochs = space.fixed.get("epochs", TrialConfig.epochs)
    try:
        if name == "asha":
            return HalvingWithRetries(**{"min_resource": 1, **args})
        if name == "median":
            return optuna.pruners.MedianPruner(**args)
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(
                **{"min_resource": 1, "max_resource": epochs, **args}
            )
        return optuna.pruners.NopPruner(**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{space.source}: study.pruner.args: {e}") from None


class HalvingWithRetries(optuna.pruners.SuccessiveHalvingPruner):
    """ASHA that counts a retried trial's rungs once. A retry carries its original's completed
    rungs (segsearch.lifecycle.retry), so that it goes on from the rung it had reached; optuna's
    rung competitors are every trial holding a rung's value, which would count the stopped
    original beside its retry, once more for each stop. Here the pruner sees the study without
    the trials that were retried. (Hyperband's brackets read the storage directly: there a
    retried trial's rungs still count once per stop.)"""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return super().prune(_WithoutRetried(study), trial)


class _WithoutRetried:
    """The study as the pruner sees it: every attribute the study's, its trials less retried ones."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states=None) -> list[optuna.trial.FrozenTrial]:
        every = self._study.get_trials(deepcopy=deepcopy)  # one read serves both
        retried = {n for t in every for n in t.system_attrs.get("retry_history", [])}
        return [t for t in every
                if t.number not in retried and (states is None or t.state in states)]  # fmt: skip
