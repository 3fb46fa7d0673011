"""The study side: storage, sampler and pruner from the space, the objective, rescoring, export.

The search space travels in the study's user attributes, so every worker (on any machine)
rebuilds the same sampler and pruner from the database alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from segcore.config import TrialConfig
from segcore.data import Dataset, dataset_from, split
from segcore.errors import DivergedError, OutOfMemory, UserError, is_out_of_memory
from segcore.files import load_model, save_model, write_text
from segcore.infer import evaluate
from segcore.pictures import prediction_panel
from segcore.space import Space, build_pruner, build_sampler, parse_space, suggest

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Heartbeat: a killed worker's trial is failed (and retried) once it is silent this long. The
# grace period is far above any SQLite or network stall, or live trials would be failed.
# Tests shorten both through TRAIN_OPTUNA_HEARTBEAT="interval,grace" (seconds).
HEARTBEAT_S, GRACE_S = (
    int(v) for v in os.environ.get("TRAIN_OPTUNA_HEARTBEAT", "10,120").split(",")
)
DASHBOARD_PREFIX = "dashboard:artifacts:"  # optuna-dashboard lists these as the trial's artifacts
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
SLOTS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def check_name(name: str) -> str:
    """A study name is a plain file name, so nothing lands outside storage/ and reports/."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise UserError(
            f"--study {name!r}: use letters, digits, '_', '-' and '.', no path separators or '..'"
        )
    return name


def mask_url(url: str) -> str:
    """The storage URL with any password replaced by ***, for logs and errors: in the user part
    (up to the host's @, which is the last @ before the path, so an unescaped @ in a password
    hides all of it) and in a `password=` query parameter."""
    head, sep, rest = url.partition("://")
    if sep:
        netloc, slash, tail = rest.partition("/")
        if "@" in netloc:
            user, host = netloc.rsplit("@", 1)
            if ":" in user:
                user = user.split(":", 1)[0] + ":***"
            netloc = f"{user}@{host}"
        url = f"{head}{sep}{netloc}{slash}{tail}"
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", url)


STORAGE_ENV = "TRAIN_OPTUNA_STORAGE"  # the URL, so a password never shows on a command line
# Connections each process may hold on a database server: the trial's and the heartbeat
# thread's, plus overflow for the dashboard's requests. N workers need 4 N + a few (README).
POOL_SIZE, POOL_OVERFLOW = 2, 2


def default_url(name: str) -> str:
    return f"sqlite:///storage/{name}.db"


def storage_url(name: str, url: str | None) -> str:
    """--storage, else $TRAIN_OPTUNA_STORAGE, else the study's SQLite file under storage/."""
    return url or os.environ.get(STORAGE_ENV) or default_url(name)


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL; None for any other storage."""
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def check_sqlite_file(path: Path, url: str) -> None:
    """Refuse an existing file that is not an SQLite database, or holds another program's tables,
    before optuna would add its own tables to it (read-only look; nothing is written)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as e:
        raise UserError(f"--storage {url}: not an SQLite database ({e})") from None
    if tables and "studies" not in tables:
        raise UserError(f"--storage {url}: an SQLite database without Optuna's tables")


def artifact_dir(name: str) -> Path:
    return Path("storage") / name / "artifacts"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeat and retry of stale trials: SQLite in WAL mode, or PostgreSQL
    through psycopg 3 (pg8000 breaks past 32767 trials) with a small pool per process."""
    kwargs: dict[str, Any]
    path = sqlite_path(url)
    if path is not None:
        if str(path) == ":memory:" or not str(path):
            raise UserError(f"--storage {url}: workers are processes and need a file to share")
        check_sqlite_file(path, url)
        if not path.parent.is_dir():
            raise UserError(f"--storage {url}: folder {path.parent} does not exist")
        try:  # WAL lets readers (dashboard, launcher) work while workers write
            with sqlite3.connect(path, timeout=60) as con:
                con.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            raise UserError(f"--storage {url}: cannot open ({e})") from None
        kwargs = {"connect_args": {"timeout": 60}}
    elif re.match(r"(postgresql|postgres)(\+psycopg)?://", url):
        if url.split("://", 1)[1].split("/", 1)[0].count("@") > 1:  # the driver would show a part
            raise UserError(
                f"--storage {mask_url(url)}: an '@' in the password must be written %40"
            )
        url = re.sub(r"^(postgresql|postgres)(\+psycopg)?://", "postgresql+psycopg://", url)
        kwargs = {
            "pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW, "pool_pre_ping": True,
            "pool_recycle": 3600, "connect_args": {"connect_timeout": 10},
        }  # fmt: skip
    else:
        raise UserError(
            f"--storage {mask_url(url)}: use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB"
        )
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=3
                ),
            )
        except Exception as e:  # noqa: BLE001 (drivers raise many types for a bad URL or server)
            text = str(e)
            if attempt < 4 and any(race in text.lower() for race in SCHEMA_RACES):
                time.sleep(0.5 * (attempt + 1))  # another process is creating the tables
                continue
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            reason = lines[0][:200] if lines else type(e).__name__
            raise UserError(
                f"--storage {mask_url(url)}: cannot open ({mask_url(reason)})"
            ) from None
    raise AssertionError("unreachable")


# What two processes creating the same new database's tables at once see (then a retry works).
SCHEMA_RACES = ("already exists", "unique constraint", "duplicate key", "database is locked")


def create_study(name: str, url: str, space: Space, data: str | None, n_trials: int | None):
    """Create the study, or resume it (same space only); returns (study, space). Two searches
    started at once on a new study take turns (the slot lock), so one creates and one resumes."""
    storage = open_storage(url)
    lock = SlotLock(storage, url, name)
    lock.acquire()
    try:
        return _create_or_resume(name, storage, space, data, n_trials)
    finally:
        lock.release()


def _create_or_resume(name, storage, space: Space, data: str | None, n_trials: int | None):
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
        if data != study.user_attrs.get("data"):
            raise UserError(
                f"--data: study {name!r} was created with --data {study.user_attrs.get('data')}"
            )
    else:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize",
            sampler=build_sampler(space, None), pruner=build_pruner(space), load_if_exists=True,
        )  # fmt: skip
        study.set_user_attr("space", space.raw)
        study.set_user_attr("space_file", space.source)
        study.set_user_attr("data", data)
        study.set_user_attr("n_trials", space.n_trials)
        if space.warm_start:  # the reference recipe, once, before any worker starts
            study.enqueue_trial(warm_start_params(space), skip_if_exists=True)
        stored = space
    if n_trials is not None:
        study.set_user_attr("n_trials", n_trials)
    return study, stored


def warm_start_params(space: Space) -> dict[str, Any]:
    """The reference recipe's values for the searched fields, where the space allows them."""
    reference = {"patch_size": 64, "depth": 4, "lr": 0.05, "aug_strength": 0.5, "base_width": 16}
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


def load_study(name: str, storage, seed: int | None):
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


def study_data(study: optuna.Study, space: Space) -> tuple[Dataset, Dataset]:
    """(train, validation) split of the study's data, the same for every trial and worker."""
    return split_data(dataset_from(study.user_attrs.get("data")), space)


def split_data(dataset: Dataset, space: Space) -> tuple[Dataset, Dataset]:
    """(train, validation) split by the space's seed and val_fraction."""
    cfg = TrialConfig.from_dict(
        {k: v for k, v in space.fixed.items() if k in ("seed", "val_fraction")}
    )
    train_idx, val_idx = split(len(dataset.images), cfg.val_fraction, cfg.seed)
    return dataset.subset(train_idx), dataset.subset(val_idx)


def budget(study: optuna.Study) -> int:
    return int(study.user_attrs["n_trials"])


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    out = {s.name.lower(): 0 for s in TrialState}
    for t in trials:
        out[t.state.name.lower()] += 1
    return out


# --- checkpoints in the artifact store -----------------------------------------------------------


def trial_artifacts(study: optuna.Study) -> list[tuple[int, str, dict]]:
    """(trial_id, attribute key, meta) of every live artifact attached to a trial."""
    out = []
    for key, value in study._storage.get_study_system_attrs(study._study_id).items():
        if key.startswith(DASHBOARD_PREFIX) and value not in (None, "null"):
            meta = json.loads(value)
            if meta:
                out.append((int(key[len(DASHBOARD_PREFIX) :].split(":")[0]), key, meta))
    return out


def _checkpoint_metas(study: optuna.Study) -> dict[int, tuple[str, str]]:
    """trial_id -> (attribute key, artifact id) of each live checkpoint."""
    return {
        trial_id: (key, meta["artifact_id"])
        for trial_id, key, meta in trial_artifacts(study)
        if meta.get("filename") == "checkpoint.pt"
    }


def store_artifact(study, trial, path: Path, store, mimetype: str) -> str:
    """Put a file in the artifact store, listed on the trial's page by optuna-dashboard.

    The listing lives in the study's system attributes under the dashboard's per-trial key
    (not the trial's own, which freeze when it finishes), so rescoring can attach pictures to
    finished trials and a checkpoint that drops out of the top K can be unlisted.
    """
    artifact_id = str(uuid.uuid4())  # the dashboard serves only ids of hex digits and dashes
    with open(path, "rb") as f:
        store.write(artifact_id, f)
    meta = {"artifact_id": artifact_id, "filename": path.name, "mimetype": mimetype,
            "encoding": None}  # fmt: skip
    key = f"{DASHBOARD_PREFIX}{trial._trial_id}:{artifact_id}"
    study._storage.set_study_system_attr(study._study_id, key, json.dumps(meta))
    return artifact_id


def remove_artifact(study, key: str, artifact_id: str, store) -> None:
    with contextlib.suppress(ArtifactNotFound):  # another process removed it first
        store.remove(artifact_id)
    study._storage.set_study_system_attr(study._study_id, key, json.dumps(None))


def top_trials(study: optuna.Study, k: int, trials=None) -> list[optuna.trial.FrozenTrial]:
    """The K best COMPLETE trials (ties: the earlier first), of `trials` if given."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return sorted(done, key=lambda t: (-t.value, t.number))[:k]


def drop_checkpoints(study: optuna.Study, top_k: int, store: FileSystemArtifactStore) -> None:
    """Delete checkpoints of trials that can no longer be in the top K (disk stays bounded).
    The checkpoints are listed first and the trials read once after: a trial stores its
    checkpoint while RUNNING, so each listed one is seen RUNNING (kept) or finished (judged);
    two reads of the trials could miss one turning from RUNNING to COMPLETE between them."""
    metas = _checkpoint_metas(study)
    trials = study.get_trials(deepcopy=False)
    keep = {t._trial_id for t in top_trials(study, top_k, trials)}
    keep |= {t._trial_id for t in trials if t.state == TrialState.RUNNING}
    for trial_id, (key, artifact_id) in metas.items():
        if trial_id not in keep:
            remove_artifact(study, key, artifact_id, store)


# --- the objective -------------------------------------------------------------------------------


class OverBudget(Exception):
    """Another worker took the last trial slot between this worker's check and its ask (only
    when the SlotLock could not be had)."""


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


def make_objective(
    study, space: Space, data: tuple[Dataset, Dataset], store, interrupts, slot: SlotLock
):
    from segcore.train import train  # imported here: batchgenerators and scipy take a second

    train_set, val_set = data

    def objective(trial: optuna.Trial) -> float:
        slot.release()  # this trial is RUNNING now, so other workers count it
        if torch.cuda.is_available():  # give back what an earlier trial's OOM left cached
            torch.cuda.empty_cache()
        earlier = [
            t for t in study.get_trials(deepcopy=False, states=SLOTS) if t.number < trial.number
        ]
        if len(earlier) >= budget(study):
            trial.set_user_attr("fail_reason", "over budget: another worker took the last slot")
            raise OverBudget
        cfg = suggest(trial, space)
        trial.set_user_attr("config", cfg.to_dict())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())

        def on_epoch(epoch: int, miou: float) -> None:
            trial.report(miou, epoch)
            trial.set_user_attr("epochs_run", epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned

        try:
            interrupts.in_training = True
            if interrupts.requested:
                raise KeyboardInterrupt
            result = train(cfg, train_set, val_set, on_epoch=on_epoch, progress=False)
        except DivergedError as e:
            trial.set_user_attr("fail_reason", f"diverged: {e}")
            raise
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            trial.set_user_attr("fail_reason", f"out of memory: {reason}")
            raise OutOfMemory(reason) from None  # drop the frames that hold the memory
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
            raise
        finally:
            interrupts.in_training = False
        trial.set_user_attr("best_epoch", result.best_epoch)
        top = top_trials(study, space.top_k)
        rank = (-result.best_patch_miou, trial.number)  # top_trials' order, ties included
        if len(top) < space.top_k or rank < (-top[-1].value, top[-1].number):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "checkpoint.pt"
                save_model(path, result.state_dict, cfg, in_channels=train_set.channels,
                           classes=train_set.classes, palette=train_set.palette,
                           extra={"study": study.study_name, "trial": trial.number,
                                  "val_names": val_set.names,
                                  "patch_miou": result.best_patch_miou})  # fmt: skip
                store_artifact(study, trial, path, store, "application/octet-stream")
        return result.best_patch_miou

    return objective


class SlotLock:
    """Makes "is a trial slot free?" and the ask that takes it one step for all the workers of a
    study, so that N workers never start more trials than the budget has left: flock on the
    SQLite file's folder (every worker is on this machine; the database file itself is left
    alone, as closing any handle on it drops SQLite's own locks), or a PostgreSQL advisory lock
    (workers on many machines). Held for milliseconds; a worker that cannot get it within
    WAIT_S (a holder's machine vanished and the server has not yet noticed) goes on without it,
    and the objective's own over-budget check still stops an extra trial."""

    WAIT_S = 30.0

    def __init__(self, storage: optuna.storages.RDBStorage, url: str, name: str) -> None:
        self._path, self._engine = sqlite_path(url), storage.engine
        digest = hashlib.sha256(f"train_optuna:{name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self._fd: int | None = None
        self._con = None

    def _try(self) -> bool:
        if self._path is not None:
            self._fd = os.open(self._path.parent, os.O_RDONLY)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                os.close(self._fd)
                self._fd = None
                return False
        self._con = self._engine.connect()
        got = self._con.exec_driver_sql("SELECT pg_try_advisory_lock(%s)", (self._key,)).scalar()
        if not got:
            self._con.close()
            self._con = None
        return bool(got)

    def acquire(self) -> None:
        deadline = time.monotonic() + self.WAIT_S
        try:
            while not self._try():
                if time.monotonic() > deadline:
                    log.warning("no trial-slot lock in %.0f s; going on without it", self.WAIT_S)
                    return
                time.sleep(0.05)
        except Exception as e:  # noqa: BLE001 (a folder without flock, e.g. some NFS; a dropped
            # connection): the lock only makes the budget exact, so go on without it
            log.warning("no trial-slot lock (%s); going on without it", e)
            self.release()

    def release(self) -> None:
        """Idempotent: the objective releases it once its trial is RUNNING, the worker again."""
        if self._fd is not None:
            os.close(self._fd)  # closing the handle drops the flock
            self._fd = None
        if self._con is not None:
            with contextlib.suppress(Exception):  # a dropped connection has dropped the lock too
                self._con.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (self._key,))
            self._con.close()
            self._con = None


GIVE_UP_AFTER = 10  # trials of one worker failing in a row (diverged, out of memory)
GAVE_UP = 3  # the worker's exit status then; the launcher does not restart it


def run_worker(name: str, url: str, seed: int | None) -> int:
    """Run trials until the study-wide budget of COMPLETE + PRUNED trials is met; exit status
    GAVE_UP when GIVE_UP_AFTER of its trials in a row have failed."""
    storage = open_storage(url)
    study, space = load_study(name, storage, seed)
    data = study_data(study, space)
    store_dir = artifact_dir(name)
    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    interrupts = Interrupts()
    signal.signal(signal.SIGINT, interrupts)
    signal.signal(signal.SIGTERM, interrupts)
    slot = SlotLock(storage, url, name)
    objective = make_objective(study, space, data, store, interrupts, slot)
    catch = (DivergedError, OutOfMemory, OverBudget)
    failed_in_a_row = 0

    def note(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal failed_in_a_row
        failed_in_a_row = failed_in_a_row + 1 if trial.state == TrialState.FAIL else 0

    while True:
        if failed_in_a_row >= GIVE_UP_AFTER:  # bad data or a space that cannot train: stop
            log.error("%d trials in a row failed; giving up (see their fail_reason)", GIVE_UP_AFTER)
            return GAVE_UP
        if interrupts.requested:
            return 130
        slot.acquire()
        try:
            states = counts(study)
            if states["complete"] + states["pruned"] >= budget(study):
                return 0
            if states["complete"] + states["pruned"] + states["running"] >= budget(study):
                # every slot is taken by a running trial: wait, in case one fails and is retried
                # (WAITING trials, retried or enqueued, are work to pick up, not taken slots)
                optuna.storages.fail_stale_trials(study)
                slot.release()
                time.sleep(2)
                continue
            # the objective releases the lock
            study.optimize(objective, n_trials=1, catch=catch, callbacks=[note])
        except KeyboardInterrupt:  # the trial is FAIL with its reason; stop here
            return 130
        except ValueError as e:  # "Cannot tell a FAIL trial": failed by heartbeat meanwhile
            if "Cannot tell" not in str(e):
                raise
            log.warning("%s (the heartbeat failed it meanwhile); going on", e)
        finally:
            slot.release()
        drop_checkpoints(study, space.top_k, store)


# --- rescoring and export ------------------------------------------------------------------------


def reports_dir(name: str) -> Path:
    return Path("reports") / name


def score(
    name: str, url: str, top_k: int | None = None, progress: bool = True, panels: bool = True
) -> dict:
    """Stitched full-image mIoU of the top-K trials on the validation images (and their
    prediction pictures, unless `panels` is false)."""
    study, space = load_study(name, open_storage(url), seed=None)
    k = top_k or space.top_k
    store = FileSystemArtifactStore(str(artifact_dir(name)))
    metas = _checkpoint_metas(study)
    top = [t for t in top_trials(study, k) if t._trial_id in metas]
    if not top:
        raise UserError(f"--study {name!r}: no completed trial with a checkpoint to score yet")
    _, val_set = study_data(study, space)
    keep = {f"trial-{t.number}-" for t in top}
    for old in (reports_dir(name) / "panels").glob("trial-*.png"):  # trials no longer rescored
        if not any(old.name.startswith(k) for k in keep):
            old.unlink()
    scores = {}
    shown: dict[int, np.ndarray] = {}  # the panel images' probabilities, kept from scoring

    def remember(i: int, probs: torch.Tensor) -> None:
        if panels and i < PANEL_IMAGES:
            shown[i] = probs.cpu().numpy()

    for t in top:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.pt"
            try:
                with store.open_reader(metas[t._trial_id][1]) as src:
                    path.write_bytes(src.read())
            except ArtifactNotFound:
                raise UserError(
                    f"--study {name}: trial {t.number}'s checkpoint is not in {artifact_dir(name)}"
                    f" (on many machines, that folder must be shared)"
                ) from None
            model, payload = load_model(path)
        shown.clear()
        result = evaluate(model, val_set, payload["config"], progress=progress, on_image=remember)
        scores[str(t.number)] = {"patch_miou": t.value, **result}
        if panels:
            attach_panels(study, t, shown, payload, val_set, result["miou"], store)
    study.set_user_attr("full_image_scores", scores)
    write_text(reports_dir(name) / "scores.json", json.dumps(scores, indent=2) + "\n")
    return scores


PANEL_IMAGES = 3  # prediction pictures per rescored trial


def attach_panels(
    study, trial, probs: dict[int, np.ndarray], payload, val_set: Dataset, miou: float, store
) -> None:
    """Prediction panels of the first validation images (`probs`: index -> class probabilities):
    trial artifacts and reports/NAME/panels/."""
    for trial_id, key, meta in trial_artifacts(study):  # rescoring replaces the old pictures
        if trial_id == trial._trial_id and meta.get("filename", "").startswith("prediction-"):
            remove_artifact(study, key, meta["artifact_id"], store)
    panels = reports_dir(study.study_name) / "panels"
    names = ", ".join(payload["classes"])
    for i in sorted(probs):
        image, name = val_set.images[i], val_set.names[i]
        title = f"trial {trial.number}: full-image mIoU {miou:.4f} ({names}) - {name}"
        path = panels / f"trial-{trial.number}-{name}.png"
        prediction_panel(path, image, probs[i], payload["classes"], payload["palette"],
                         val_set.masks[i], title=title)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            upload = Path(tmp) / f"prediction-{name}.png"
            upload.write_bytes(path.read_bytes())
            store_artifact(study, trial, upload, store, "image/png")


def export(name: str, url: str, out: str | Path | None = None) -> Path:
    """Write best.json for the trial with the best full-image mIoU."""
    study, _ = load_study(name, open_storage(url), seed=None)
    scores = study.user_attrs.get("full_image_scores")
    if not scores:
        raise UserError(f"--study {name!r}: no full-image scores yet; run `score --study {name}`")
    number, best = max(scores.items(), key=lambda kv: (kv[1]["miou"], -int(kv[0])))
    trial = study.trials[int(number)]
    payload = {
        "config": trial.user_attrs["config"],
        "study": name,
        "trial": trial.number,
        "patch_miou": best["patch_miou"],
        "full_image_miou": best["miou"],
        "per_class": best["per_class"],
        "params": trial.params,
        "versions": {"torch": torch.__version__, "optuna": optuna.__version__},
    }
    path = Path(out) if out else reports_dir(name) / "best.json"
    write_text(path, json.dumps(payload, indent=2) + "\n")
    return path
