"""The artifact store of a study, and the one adapter that lists files on trials' pages.

Why an adapter: optuna's public `upload_artifact` lists a file in the trial's own system
attributes, which freeze when the trial finishes and cannot drop an entry again. Our files need
both: a checkpoint that falls out of the top K is deleted and must leave the trial's page, and
rescoring adds pictures to trials long finished. optuna-dashboard (0.21) also lists the files
named in the study's system attributes under `dashboard:artifacts:<trial_id>:<artifact_id>`, and
its own delete button clears them there; this module is the only code that reads or writes those
keys. Reading a file back goes through optuna's public `download_artifact`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
import tempfile
import uuid
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from segsearch.internals import study_id, study_storage

PREFIX = "dashboard:artifacts:"  # optuna-dashboard lists these as the trial's artifacts


FOLDER = "folder"  # the study user attribute that records the study's folder


def folder_for(name: str, url: str, given: str | None = None) -> Path:
    """Where a new study's files go (artifacts, the decode cache, the workers' logs): `given`
    (--artifacts), else beside its SQLite file (DIR/NAME.db -> DIR/NAME), else storage/NAME in
    the working folder (with PostgreSQL on many machines, give a shared folder). Absolute: the
    study records it, and every worker, `score`, `final`, `report` and `dashboard` use it
    wherever they are started."""
    from segsearch.storage import sqlite_path

    if given:
        return Path(given).absolute()
    db = sqlite_path(url)
    return ((db.parent if db is not None else Path("storage")) / name).absolute()


def study_folder(study: optuna.Study) -> Path:
    """The folder the study records (studies made before it was recorded: storage/NAME)."""
    recorded = study.user_attrs.get(FOLDER)
    return Path(recorded) if recorded else Path("storage") / study.study_name


def store_dir(study: optuna.Study) -> Path:
    return study_folder(study) / "artifacts"


def open_store(study: optuna.Study) -> FileSystemArtifactStore:
    """The study's artifact store, FOLDER/artifacts (created: optuna does not)."""
    store_dir(study).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(store_dir(study)))


def listed(study: optuna.Study) -> list[tuple[int, str, dict]]:
    """(trial_id, attribute key, meta) of every file listed on a trial's page."""
    out = []
    for key, value in study_storage(study).get_study_system_attrs(study_id(study)).items():
        if key.startswith(PREFIX) and value not in (None, "null"):
            meta = json.loads(value)
            if meta:
                out.append((int(key[len(PREFIX) :].split(":")[0]), key, meta))
    return out


def attach(study: optuna.Study, trial_id: int, path: Path, store, mimetype: str) -> tuple[str, str]:
    """Put a file in the store and list it on the trial's page (running or finished); returns
    (attribute key, artifact id), what detach takes."""
    artifact_id = str(uuid.uuid4())  # the dashboard serves only ids of hex digits and dashes
    with open(path, "rb") as f:
        store.write(artifact_id, f)
    meta = {"artifact_id": artifact_id, "filename": path.name, "mimetype": mimetype,
            "encoding": None}  # fmt: skip
    key = f"{PREFIX}{trial_id}:{artifact_id}"
    study_storage(study).set_study_system_attr(study_id(study), key, json.dumps(meta))
    return key, artifact_id


def detach(study: optuna.Study, key: str, artifact_id: str, store) -> None:
    """Delete a listed file and take it off its trial's page."""
    with contextlib.suppress(ArtifactNotFound):  # another process removed it first
        store.remove(artifact_id)
    study_storage(study).set_study_system_attr(study_id(study), key, json.dumps(None))


def fetch(store, artifact_id: str, path: Path) -> None:
    """Copy an artifact to `path` (which must not exist); ArtifactNotFound if it is gone."""
    download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(path))


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
