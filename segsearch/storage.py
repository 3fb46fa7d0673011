"""Study storage: URLs and their checks, opening SQLite or PostgreSQL, and the trial-slot lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from segcore.errors import UserError

log = logging.getLogger(__name__)

STORAGE_ENV = "TRAIN_OPTUNA_STORAGE"  # the URL, so a password never shows on a command line
# Heartbeat: a killed worker's trial is failed (and retried) once it is silent this long. The
# grace period is far above any SQLite or network stall, or live trials would be failed.
# Tests shorten both through TRAIN_OPTUNA_HEARTBEAT="interval,grace" (seconds).
HEARTBEAT_S, GRACE_S = (
    int(v) for v in os.environ.get("TRAIN_OPTUNA_HEARTBEAT", "10,120").split(",")
)
# Connections each process may hold on a database server: the trial's and the heartbeat
# thread's, plus overflow for the dashboard's requests. N workers need 4 N + a few (README).
POOL_SIZE, POOL_OVERFLOW = 2, 2
# What two processes creating the same new database's tables at once see (then a retry works).
SCHEMA_RACES = ("already exists", "unique constraint", "duplicate key", "database is locked")
# opening a new database while another process creates its tables (or switches SQLite to WAL,
# which SQLite may refuse at once, without waiting out its busy timeout): tries, 0.5 to 2 s apart,
# about 15 s in all; 5 tries (5 s) once ran out on CI's 2 loaded cores
RACE_TRIES = 10


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


def check_url(url: str) -> tuple[str, dict[str, Any]]:
    """(URL for SQLAlchemy, engine arguments) after checking the URL; reads, writes nothing."""
    path = sqlite_path(url)
    if path is not None:
        if str(path) == ":memory:" or not str(path):
            raise UserError(f"--storage {url}: workers are processes and need a file to share")
        check_sqlite_file(path, url)
        if not path.parent.is_dir():
            raise UserError(f"--storage {url}: folder {path.parent} does not exist")
        return url, {"connect_args": {"timeout": 60}}
    if re.match(r"(postgresql|postgres)(\+psycopg)?://", url):
        if url.split("://", 1)[1].split("/", 1)[0].count("@") > 1:  # the driver would show a part
            raise UserError(
                f"--storage {mask_url(url)}: an '@' in the password must be written %40"
            )
        url = re.sub(r"^(postgresql|postgres)(\+psycopg)?://", "postgresql+psycopg://", url)
        return url, {
            "pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW, "pool_pre_ping": True,
            "pool_recycle": 3600, "connect_args": {"connect_timeout": 10},
        }  # fmt: skip
    raise UserError(
        f"--storage {mask_url(url)}: use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB"
    )


_SCHEMA_CHECKED: set[str] = set()  # URLs whose schema version this process has checked


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeat and retry of stale trials: SQLite in WAL mode, or PostgreSQL
    through psycopg 3 (pg8000 breaks past 32767 trials) with a small pool per process. Optuna
    checks the schema's version against its own on the first open in a process; later opens of
    the same URL skip that (it reads alembic's migration scripts from disk each time)."""
    url, kwargs = check_url(url)
    path = sqlite_path(url)
    for attempt in range(RACE_TRIES):
        try:
            if path is not None:  # WAL lets readers (dashboard, launcher) work while workers write
                with sqlite3.connect(path, timeout=60) as con:
                    con.execute("PRAGMA journal_mode=WAL")
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                skip_compatibility_check=url in _SCHEMA_CHECKED,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                # a killed worker's trial is retried as a crash (segsearch.lifecycle's one
                # policy); the retry resumes from its saved state (segsearch.resume)
                heartbeat_stale_trial_callback=retry_crashed,
            )
            _SCHEMA_CHECKED.add(url)
            return storage
        except Exception as e:  # noqa: BLE001 (drivers raise many types for a bad URL or server)
            text = str(e)
            if attempt < RACE_TRIES - 1 and any(race in text.lower() for race in SCHEMA_RACES):
                time.sleep(min(0.5 * (attempt + 1), 2.0))  # another process is creating the tables
                continue
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            reason = lines[0][:200] if lines else type(e).__name__
            raise UserError(
                f"--storage {mask_url(url)}: cannot open ({mask_url(reason)})"
            ) from None
    raise AssertionError("unreachable")


class SlotLock:
    """Makes "is a trial slot free?" and the ask that takes it one step for all the workers of a
    study, so that N workers never start more trials than the budget has left: flock on the
    SQLite file's folder (every worker is on this machine; the database file itself is left
    alone, as closing any handle on it drops SQLite's own locks), or a PostgreSQL advisory lock
    (workers on many machines). Held for milliseconds. A worker that cannot get it within
    WAIT_S (a holder's machine vanished and the server has not yet noticed; a folder without
    flock) goes on without it, and is told so, to check the budget again after its ask."""

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

    def _acquire(self) -> bool:
        deadline = time.monotonic() + self.WAIT_S
        try:
            while not self._try():
                if time.monotonic() > deadline:
                    log.warning("no trial-slot lock in %.0f s; going on without it", self.WAIT_S)
                    return False
                time.sleep(0.05)
            return True
        except Exception as e:  # noqa: BLE001 (a folder without flock, e.g. some NFS; a dropped
            # connection): the lock only makes the budget exact, so go on without it
            log.warning("no trial-slot lock (%s); going on without it", e)
            self._release()
            return False

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the handle drops the flock
            self._fd = None
        if self._con is not None:
            with contextlib.suppress(Exception):  # a dropped connection has dropped the lock too
                self._con.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (self._key,))
            self._con.close()
            self._con = None

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """Hold the lock for the block; yields whether it was had (False: went on without)."""
        try:
            yield self._acquire()
        finally:
            self._release()


def retry_crashed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """The heartbeat's callback for a trial whose worker went silent: retried as a crash, by
    the one retry policy (segsearch.lifecycle, which builds on this module)."""
    from segsearch.lifecycle import CRASHED, retry

    retry(study, trial, CRASHED)
