"""The rules of a space file's sections other than `search`: `study`, `constraints`, a warm start
given as values, the ensemble and the promotion stage. Each raises a UserError naming the file
and the key; segsearch.space.parse_space calls them in order."""

from __future__ import annotations

from typing import Any

from segcore.config import TrialConfig
from segcore.errors import UserError
from segsearch.distributions import number
from segsearch.samplers import PRUNERS, SAMPLERS

TOP_K = 3  # trials rescored on whole images unless study.top_k says otherwise
STUDY_KEYS = {
    "n_trials",
    "metric",
    "sampler",
    "pruner",
    "top_k",
    "warm_start",
    "timeout",
    "finalists",
}
LIMITS = ("max_params", "max_gflop_per_patch", "max_infer_ms")  # segcore.costs measures them


def check_warm_start(values: dict, dists: dict[str, dict[str, Any]], source: str) -> None:
    """A warm start given as values: one for every searched field, inside its distribution."""
    for name in sorted(set(values) | set(dists)):
        where = f"{source}: study.warm_start.{name}"
        if name not in dists:
            raise UserError(f"{where}: not a searched field")
        if name not in values:
            raise UserError(f"{where}: missing (give every searched field a value)")
        if not _samples(dists[name], values[name]):
            raise UserError(f"{where}: {values[name]!r} is not a value the search samples")


def _samples(spec: dict[str, Any], value: Any) -> bool:
    """Whether a distribution (checked spec) can sample `value`: a choice, or a number of the
    right kind inside the range and on its step grid."""
    if spec["type"] == "categorical":
        return value in spec["choices"]
    kind = int if spec["type"] == "int" else (int, float)
    if not isinstance(value, kind) or isinstance(value, bool):
        return False
    if not spec["low"] <= value <= spec["high"]:
        return False
    step = spec.get("step") or (1 if spec["type"] == "int" else None)
    if step is None:
        return True
    return abs((value - spec["low"]) / step - round((value - spec["low"]) / step)) < 1e-9


def check_ensemble(
    ensemble: int, study: dict, final: dict, promote: dict, search: dict, source: str
) -> None:
    """final.ensemble N averages the best N finalists' own models: they must exist (N
    finalists among the rescored trials), be what the final fit hands over (the final config on
    the training images) and take their input alike (normalization not searched). `final`: the
    final fit's fields over the fixed ones."""
    if ensemble < 1:
        raise UserError(f"{source}: final.ensemble: 1 (the winner alone) or more finalists")
    if ensemble == 1:
        return
    for key, default in (("finalists", 0), ("top_k", TOP_K)):
        if study.get(key, default) < ensemble:
            raise UserError(f"{source}: final.ensemble: {ensemble} models need study.{key}: "
                            f"{ensemble} or more (it is {study.get(key, default)})")  # fmt: skip
    if "normalization" in search:
        raise UserError(f"{source}: final.ensemble: its models must take the same input; do not "
                        f"search normalization")  # fmt: skip
    if final.get("train_on", TrialConfig.train_on) != "train":
        raise UserError(f"{source}: final.ensemble: the members are the finalists' own models, "
                        f"trained on the training images; set final.train_on: train")  # fmt: skip
    if promote:
        raise UserError(f"{source}: final.ensemble: the members are the finalists' own models, "
                        f"which must be trained at the final budget; remove 'promote'")  # fmt: skip


def check_promote(promote: dict, final: dict, source: str) -> None:
    """A promote: section that shortens a budget given in seconds must say the seconds: epochs
    alone would spread the same seconds over fewer, longer epochs."""
    budget = {"epochs", "steps_per_epoch"} & set(promote)
    if final.get("seconds") and budget and "seconds" not in promote:
        raise UserError(f"{source}: promote.{min(budget)}: the final budget is in seconds "
                        f"({final['seconds']}); set promote.seconds")  # fmt: skip


def check_constraints(constraints: Any, source: str) -> dict[str, float]:
    """`constraints`: limits on what a trial's model costs, each a positive number."""
    if not isinstance(constraints, dict):
        raise UserError(f"{source}: 'constraints' must map limits to numbers")
    out = {}
    for key, value in constraints.items():
        if key not in LIMITS:
            raise UserError(f"{source}: constraints.{key}: use {', '.join(LIMITS)}")
        out[key] = number(value, f"{source}: constraints.{key}", "float")
        if out[key] <= 0:
            raise UserError(f"{source}: constraints.{key}: must be above 0")
    return out


def check_study(study: Any, source: str) -> dict[str, Any]:
    if not isinstance(study, dict):
        raise UserError(f"{source}: 'study' must be a mapping")
    extra = sorted(set(study) - STUDY_KEYS)
    if extra:
        raise UserError(f"{source}: unknown key 'study.{extra[0]}'")
    out: dict[str, Any] = {}
    for key, kind, least, rule in (
        ("n_trials", "int", 1, "must be at least 1"),
        ("top_k", "int", 1, "must be at least 1"),
        ("finalists", "int", 0, "0 (no promotion stage) or more"),
        ("timeout", "float", 0, "seconds, at least 0"),
    ):
        if key in study:
            out[key] = number(study[key], f"{source}: study.{key}", kind)
            if out[key] < least:
                raise UserError(f"{source}: study.{key}: {rule}")
    if study.get("metric", "patch_miou") != "patch_miou":
        raise UserError(f"{source}: study.metric: only patch_miou is supported")
    if "warm_start" in study:
        if not isinstance(study["warm_start"], (bool, dict)):
            raise UserError(f"{source}: study.warm_start: true, false or a mapping of searched "
                            f"fields to values")  # fmt: skip
        out["warm_start"] = study["warm_start"]
    for key, names in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if key in study:
            spec = study[key]
            spec = {"name": spec} if isinstance(spec, str) else spec
            if not isinstance(spec, dict) or spec.get("name") not in names:
                raise UserError(
                    f"{source}: study.{key}.name: must be one of {', '.join(sorted(names))}"
                )
            args = spec.get("args", {})
            if not isinstance(args, dict) or set(spec) - {"name", "args"}:
                raise UserError(f"{source}: study.{key}: only 'name' and 'args' (a mapping)")
            out[key] = {"name": spec["name"], "args": dict(args)}
    return out
