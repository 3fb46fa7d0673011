"""Search-space files: YAML -> validated Space -> optuna suggestions -> TrialConfig.

A space file has three sections: `search` (config field -> Optuna's short distribution form),
`fixed` (config field -> value) and `study` (budget, sampler, pruner, rescoring). It is checked
completely when loaded, so no trial is wasted on a mistake in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from segcore.config import TrialConfig, coerce
from segcore.errors import UserError
from segsearch.distributions import check_dist, grid, number
from segsearch.samplers import build_pruner, build_sampler
from segsearch.space_sections import (
    TOP_K,
    check_constraints,
    check_ensemble,
    check_promote,
    check_study,
    check_warm_start,
)

CONFIG_FIELDS = {f.name for f in fields(TrialConfig)}
# One value for every trial of a study: the split and the validation patch set, so that trials
# are compared on the same images and pixels; and what only `train` / the final fit use.
PER_STUDY = ("seed", "val_fraction", "test_fraction", "val_patch_size", "val_patches_per_image",
             "train_on")  # fmt: skip
SECTIONS = ("search", "fixed", "study", "final", "promote", "constraints")


@dataclass(frozen=True)
class Space:
    """A validated search space; `raw` is the parsed YAML, stored with the study."""

    search: dict[str, dict[str, Any]]
    fixed: dict[str, Any]  # with val_patch_size set: the largest patch size, unless given
    final: dict[str, Any] = field(default_factory=dict)  # the final fit's overrides
    promote: dict[str, Any] = field(default_factory=dict)  # the finalists', over `final`'s
    constraints: dict[str, float] = field(default_factory=dict)  # limit -> bound (LIMITS)
    n_trials: int = 12
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    top_k: int = TOP_K
    # trial 0: True for the CPU recipe's values (segsearch.study.warm_start_params), or a mapping
    # of searched fields to values (`--space auto` writes its planned centre there)
    warm_start: bool | dict[str, Any] = False
    # the promotion stage (segsearch.promote): how many rescored trials are trained at the final
    # budget before the winner is chosen; 0: the winner is chosen at the trial budget
    finalists: int = 0
    # final.ensemble: best.pt averages the best N finalists' models (segsearch.final); 1: the winner
    ensemble: int = 1
    timeout: float | None = None  # seconds of trials a search runs at most (--timeout)
    raw: dict[str, Any] = field(default_factory=dict)
    source: str = "space"


def load_space(path: str | Path) -> Space:
    """Read and validate a space file; errors name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: search space file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__})") from None
    try:
        raw = yaml.safe_load(text)
        _no_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise UserError(f"{path}: not valid YAML{line}{problem}") from None
    return parse_space(raw, str(path))


def _no_duplicate_keys(node: yaml.Node | None) -> None:
    """YAML lets a repeated key silently replace the first; in a space file that is a mistake.
    (Checked on the composed nodes, which construct no objects.)"""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise yaml.MarkedYAMLError(
                        problem=f"key '{key.value}' repeated", problem_mark=key.start_mark
                    )
                seen.add(key.value)
            _no_duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item)


def parse_space(raw: Any, source: str) -> Space:
    """Validate a parsed space (dict) completely; `source` names it in errors."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: must be a mapping with a 'search' section")
    for key in raw:
        if key not in SECTIONS:
            raise UserError(f"{source}: unknown section '{key}' (use {', '.join(SECTIONS)})")
    search, fixed = raw.get("search"), raw.get("fixed") or {}
    final, promote = raw.get("final") or {}, raw.get("promote") or {}
    if not isinstance(search, dict) or not search:
        raise UserError(f"{source}: 'search' must map config fields to distributions")
    for section, values in (("fixed", fixed), ("final", final), ("promote", promote)):
        if not isinstance(values, dict):
            raise UserError(f"{source}: '{section}' must map config fields to values")
    final = dict(final)
    ensemble = number(final.pop("ensemble", 1), f"{source}: final.ensemble", "int")
    for name in list(search) + list(fixed) + list(final) + list(promote):
        if name not in CONFIG_FIELDS:
            raise UserError(f"{source}: unknown config field '{name}'")
    for name in PER_STUDY:
        if name in search:
            raise UserError(f"{source}: '{name}' cannot be searched: one value for every trial")
    for section, values in (("final", final), ("promote", promote)):
        for name in values:
            if name in search or (name in PER_STUDY and (name, section) != ("train_on", "final")):
                raise UserError(
                    f"{source}: {section}.{name}: the "
                    f"{'final fit' if section == 'final' else 'promotion stage'} keeps the "
                    f"{'winner' if name in search else 'study'}'s value; set other fields there"
                )
    both = sorted(set(search) & set(fixed))
    if both:
        raise UserError(f"{source}: field '{both[0]}' is both searched and fixed")
    dists = {name: check_dist(spec, f"{source}: search.{name}") for name, spec in search.items()}
    study = check_study(raw.get("study") or {}, source)
    fixed = {"val_patch_size": _largest_patch(dists, fixed), **fixed}
    limits = check_constraints(raw.get("constraints") or {}, source)
    if isinstance(study.get("warm_start"), dict):
        check_warm_start(study["warm_start"], dists, source)
    check_ensemble(ensemble, study, {**fixed, **final}, promote, search, source)
    check_promote(promote, {**fixed, **final}, source)
    space = Space(dists, fixed, final, dict(promote), limits, raw=raw, source=source,
                  ensemble=ensemble, **study)  # fmt: skip
    _check_configs(space)
    build_sampler(space, 0)  # optuna checks their arguments now, not in a worker
    build_pruner(space)
    return space


def fit_depth(depth: int, patch_size: int) -> int:
    """The deepest depth <= `depth` that the patch supports (divisible, bottom at least 2x2)."""
    while depth > 1 and (patch_size % 2**depth or patch_size < 2 * 2**depth):
        depth -= 1
    return depth


def largest_patch(space: Space) -> int:
    """The largest patch side a trial of the space can train on."""
    return int(_largest_patch(space.search, space.fixed))


def _largest_patch(search: dict[str, dict[str, Any]], fixed: dict[str, Any]) -> Any:
    """The default validation patch side: the largest patch size a trial can have."""
    if "patch_size" in search:
        return max(grid(search["patch_size"]), default=0)
    return fixed.get("patch_size", TrialConfig.patch_size)


def _check_configs(space: Space) -> None:
    """Value types, then: every patch size fits some depth; the validation patch fits every
    depth a trial can have; the corners are valid configs, also after the final and promotion
    overrides."""
    types = {f.name: f.type for f in fields(TrialConfig)}
    for name, spec in space.search.items():
        for value in grid(spec):
            coerce(value, types[name], f"{space.source}: search.{name}: config field '{name}'")
    sections = (("fixed", space.fixed), ("final", space.final), ("promote", space.promote))
    for section, values in sections:
        for name, value in values.items():
            coerce(value, types[name], f"{space.source}: {section}: config field '{name}'")
    patches = grid(space.search["patch_size"]) if "patch_size" in space.search else None
    depths = grid(space.search["depth"]) if "depth" in space.search else None
    patches = patches or [space.fixed.get("patch_size", TrialConfig.patch_size)]
    depths = depths or [space.fixed.get("depth", TrialConfig.depth)]
    for p in patches:
        if not any(p % 2**d == 0 and p >= 2 * 2**d for d in depths):
            raise UserError(
                f"{space.source}: patch_size {p!r}: no depth in {depths} divides it "
                f"(a patch must be a multiple of 2**depth and at least twice it)"
            )
    deepest = max(fit_depth(d, p) for d in depths for p in patches)
    if space.fixed["val_patch_size"] % 2**deepest:
        raise UserError(
            f"{space.source}: val_patch_size {space.fixed['val_patch_size']}: must be a multiple "
            f"of 2**{deepest} = {2**deepest}, as trials of depth {deepest} score on it"
        )
    for corner in (0, -1):
        params = {name: grid(spec)[corner] for name, spec in space.search.items()}
        cfg = final_config(config_from(params, space), space)
        TrialConfig.from_dict({**cfg.to_dict(), **space.promote}, f"{space.source}: promote")


def config_from(params: dict[str, Any], space: Space) -> TrialConfig:
    """TrialConfig of sampled params plus fixed fields; depth fitted to the patch size."""
    values = {**space.fixed, **params}
    if "patch_size" in values or "depth" in values:
        depth = values.get("depth", TrialConfig.depth)
        patch = values.get("patch_size", TrialConfig.patch_size)
        if 1 <= depth <= 6:  # out-of-range depths are left for TrialConfig to reject
            values["depth"] = fit_depth(depth, patch)
    return TrialConfig.from_dict(values, space.source)


def final_config(cfg: TrialConfig, space: Space) -> TrialConfig:
    """A trial's config with the space's `final:` overrides: what the final fit trains."""
    return TrialConfig.from_dict({**cfg.to_dict(), **space.final}, f"{space.source}: final")


def suggest(trial: Any, space: Space) -> TrialConfig:
    """Sample every searched field from an optuna trial (or FixedTrial) into a TrialConfig.

    The patch-size / depth constraint is met by construction: the sampled depth is lowered to
    the deepest one the sampled patch size supports, so no trial is wasted on an invalid pair.
    """
    params = {}
    for name, spec in space.search.items():
        if spec["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(
                name, spec["low"], spec["high"], step=spec["step"], log=spec["log"]
            )
        else:
            params[name] = trial.suggest_float(
                name, spec["low"], spec["high"], step=spec["step"], log=spec["log"]
            )
    return config_from(params, space)
