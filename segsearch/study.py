"""Studies: create, resume and load one (with the space stored in it), its data split, its budget.

The search space travels in the study's user attributes, so every worker (on any machine)
rebuilds the same sampler and pruner from the database alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from segcore.config import TrialConfig
from segcore.data import dataset_from, load_folder
from segcore.errors import UserError
from segcore.labels import Labels
from segcore.split import Splits, check_test_data, split_dataset
from segsearch.artifacts import FOLDER, folder_for, study_folder
from segsearch.checkpoints import WARM_START
from segsearch.samplers import build_pruner, build_sampler
from segsearch.space import Space, parse_space
from segsearch.storage import SlotLock, open_storage

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what the budget counts


def check_name(name: str) -> str:
    """A study name is a plain file name, so nothing lands outside storage/ and reports/."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise UserError(
            f"--study {name!r}: use letters, digits, '_', '-' and '.', no path separators or '..'"
        )
    return name


def reports_dir(name: str) -> Path:
    return Path("reports") / name


def cache_dir(folder: Path) -> Path:
    """The decode cache (segcore.cache) in a study's folder: decoded images and masks every
    worker maps."""
    return folder / "cache"


def create_study(
    name: str, url: str, space: Space, data: str | None, n_trials: int | None,
    test_data: str | None = None, splits: Splits | None = None, folder: Path | None = None,
) -> tuple[optuna.Study, Space]:  # fmt: skip
    """Create the study, or resume it (same space, data and classes only); returns (study,
    space). The study records its data folders, its split (image names per part), the class
    mapping every worker decodes masks with, and the data's fingerprint. Two searches started
    at once on a new study take turns (the slot lock), so one creates and one resumes."""
    storage = open_storage(url)
    sources = {"data": data, "test_data": test_data}
    with SlotLock(storage, url, name).held():
        study, stored = _create_or_resume(name, storage, space, sources, n_trials)
        if folder is not None and FOLDER not in study.user_attrs:
            study.set_user_attr(FOLDER, str(folder))
        if splits is not None:
            labels = splits.train.labels.to_dict()
            if study.user_attrs.get("labels", labels) != labels:
                raise UserError(f"--data {data}: its classes are not those study {name!r} was "
                                f"created with ({study.user_attrs['labels']['classes']})")  # fmt: skip
            for key, value in (("split", splits.names()), ("labels", labels)):
                if key not in study.user_attrs:
                    study.set_user_attr(key, value)
    return study, stored


def _create_or_resume(name, storage, space: Space, sources: dict, n_trials: int | None):
    exists = name in optuna.get_all_study_names(storage=storage)
    if exists:  # a creation cut short (Ctrl-C) before the space was stored: finish it
        bare = optuna.load_study(study_name=name, storage=storage)
        exists = "space" in bare.user_attrs or bool(bare.get_trials(deepcopy=False))
    if exists:
        study, stored = load_study(name, storage, seed=None)
        if stored.raw != space.raw:
            raise UserError(
                f"--space {space.source}: study {name!r} was created with another search space; "
                f"use a new --study name"
            )
        for key, value in sources.items():
            if value != study.user_attrs.get(key):
                option = "--" + key.replace("_", "-")
                raise UserError(
                    f"{option}: study {name!r} was created with {option} "
                    f"{study.user_attrs.get(key)}"
                )
    else:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize",
            sampler=build_sampler(space, None), pruner=build_pruner(space), load_if_exists=True,
        )  # fmt: skip
        study.set_user_attr("space", space.raw)
        study.set_user_attr("space_file", space.source)
        for key, value in sources.items():
            study.set_user_attr(key, value)
        study.set_user_attr("n_trials", space.n_trials)
        first = {}  # the recipe or the given values, once, before any worker starts
        if space.warm_start:
            given = space.warm_start if isinstance(space.warm_start, dict) else None
            first = given or warm_start_params(space)
            study.enqueue_trial(first, {WARM_START: True}, skip_if_exists=True)
        for params in coverage_params(space, first):
            study.enqueue_trial(params, skip_if_exists=True)
        stored = space
    if n_trials is not None:
        study.set_user_attr("n_trials", n_trials)
    return study, stored


def coverage_params(space: Space, first: dict[str, Any]) -> list[dict[str, Any]]:
    """TPE's start-up trials (random ones, before it models anything), made to cover every choice
    of every categorical parameter: partial parameters for the trials after the warm start
    (`first`'s values), each taking a choice not yet tried of each parameter, the sampler the
    rest; no more than the start-up trials hold. A random start-up of a few trials can miss a
    choice: on `shapes` the run of the quick space that sampled no 32-pixel patch handed over
    +0.0024 test mIoU over the recipe, the two that did +0.0079 and +0.0052; with this, three
    runs +0.0071 to +0.0078 (docs/benchmarks.md). The random sampler is random by choice, and
    QMC spreads its points itself."""
    if space.sampler["name"] != "tpe":
        return []
    startup = space.sampler.get("args", {}).get("n_startup_trials", 10)  # optuna's default
    left = {name: [c for c in spec["choices"] if not (name in first and c == first[name])]
            for name, spec in space.search.items() if spec["type"] == "categorical"}  # fmt: skip
    count = min(max(map(len, left.values()), default=0), startup - (1 if first else 0))
    return [  # the j-th parameter's choices shifted by j: no two always together
        {name: c[(i + j) % len(c)] for j, (name, c) in enumerate(left.items()) if i < len(c)}
        for i in range(count)
    ]


def warm_start_params(space: Space) -> dict[str, Any]:
    """The CPU recipe's values (configs/cpu-shapes.json) for the searched fields, where the space
    allows them: it is always rescored (and a finalist), so the search cannot hand over less by
    validation; with the recipe's fixed fields and final budget (in epochs), a winning warm start
    is retrained into exactly the recipe's model."""
    reference = {"patch_size": 64, "depth": 4, "lr": 0.05, "aug_strength": 0.25, "base_width": 16}
    params = {}
    for name, value in reference.items():
        spec = space.search.get(name)
        if spec is None:
            continue
        if spec["type"] == "categorical":
            value = value if value in spec["choices"] else spec["choices"][0]
        else:
            value = min(max(value, spec["low"]), spec["high"])
        params[name] = value
    return params


def study_exists(name: str, url: str) -> bool:
    """Whether the storage at `url` holds a study of this name (an SQLite file that does not
    exist yet is not created to find out)."""
    from segsearch.storage import sqlite_path

    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return False
    return name in optuna.get_all_study_names(storage=open_storage(url))


def folder_of(name: str, url: str, given: str | None = None) -> Path:
    """The folder of study `name`: the one it records, else (a new study) folder_for's; a
    --artifacts folder other than the recorded one is an error."""
    if study_exists(name, url):
        recorded = optuna.load_study(study_name=name, storage=open_storage(url)).user_attrs
        if recorded.get(FOLDER):
            if given and Path(given).absolute() != Path(recorded[FOLDER]):
                raise UserError(f"--artifacts {given}: study {name!r} keeps its files in "
                                f"{recorded[FOLDER]}")  # fmt: skip
            return Path(recorded[FOLDER])
    return folder_for(name, url, given)


def load_study(name: str, storage, seed: int | None) -> tuple[optuna.Study, Space]:
    """Load a study and the space stored with it; sampler and pruner rebuilt from the space."""
    try:
        bare = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"--study {name!r}: no such study in this storage") from None
    if "space" not in bare.user_attrs:
        raise UserError(f"--study {name!r}: not created by train_optuna (no search space stored)")
    space = parse_space(bare.user_attrs["space"], f"study {name}")
    study = optuna.load_study(
        study_name=name, storage=storage, sampler=build_sampler(space, seed),
        pruner=build_pruner(space),
    )  # fmt: skip
    return study, space


def open_study(name: str, url: str, seed: int | None = None) -> tuple[optuna.Study, Space]:
    """load_study on the storage at `url`."""
    return load_study(name, open_storage(url), seed)


SPLIT_FIELDS = ("seed", "val_fraction", "test_fraction")


def load_splits(
    data: str | None, test_data: str | None, space: Space, labels: Labels | None = None,
    cache: Path | None = None,
) -> Splits:  # fmt: skip
    """The data folder (default: synthetic) split by the space's seed and fractions, every file
    checked, masks decoded with `labels` when given (a study's); the test images come from
    `test_data` when given, decoded with the data's classes. `cache`: the decode cache."""
    cfg = TrialConfig.from_dict({k: v for k, v in space.fixed.items() if k in SPLIT_FIELDS})
    dataset = dataset_from(data, labels, cache)
    test = None
    if test_data is not None:
        test = load_folder(test_data, dataset.labels, cache)
        check_test_data(dataset, test)
    return split_dataset(dataset, cfg, test)


def study_splits(study: optuna.Study, space: Space) -> Splits:
    """The study's split, the same for every trial and worker. Trials and rescoring use its
    train and validation images; only the final fit reads its test images."""
    recorded = study.user_attrs.get("labels")
    labels = Labels.from_dict(recorded, f"study {study.study_name}") if recorded else None
    splits = load_splits(study.user_attrs.get("data"), study.user_attrs.get("test_data"), space,
                         labels, cache_dir(study_folder(study)))  # fmt: skip
    split = study.user_attrs.get("split")
    if split is not None and split != splits.names():
        folder = study.user_attrs.get("data") or "the synthetic data"
        raise UserError(
            f"--data {folder}: its images are not those study {study.study_name!r} was created "
            f"with (the split would differ, and test images could have been chosen with)"
        )
    return splits


def budget(study: optuna.Study) -> int:
    return int(study.user_attrs["n_trials"])


def finished(study: optuna.Study, c: dict[str, int] | None = None) -> int:
    """Trials that count against the budget: COMPLETE and PRUNED (of `c`, counts(), if given)."""
    c = counts(study) if c is None else c
    return c["complete"] + c["pruned"]


def budget_met(study: optuna.Study, c: dict[str, int] | None = None) -> bool:
    """The one budget rule, for the workers (take_slot) and the launcher alike."""
    return finished(study, c) >= budget(study)


def counts(study: optuna.Study, trials: list | None = None) -> dict[str, int]:
    """Trials per state (lower-case state names), of `trials` if given."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    out = {s.name.lower(): 0 for s in TrialState}
    for t in trials:
        out[t.state.name.lower()] += 1
    return out
