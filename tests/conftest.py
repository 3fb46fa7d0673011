"""The PostgreSQL server for the runs that repeat on it: $TRAIN_OPTUNA_TEST_POSTGRES names a role
that may create databases (.ci/postgres starts Debian's server and prints such a URL). Each test
session gets a database of its own, dropped at the end. Without the variable those runs are
skipped, except under CI, where that is an error."""

from __future__ import annotations

import os
import uuid

import pytest

BASE = os.environ.get("TRAIN_OPTUNA_TEST_POSTGRES")


def _admin(url: str):
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
    return psycopg.connect(plain, autocommit=True, connect_timeout=10)


@pytest.fixture
def fp32(monkeypatch):
    """Models compute in float32 (segcore.device.precision_for), for tests of exact numerics:
    on a CPU with native bf16 they would otherwise run under bf16 autocast."""
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "fp32")


@pytest.fixture(scope="session")
def postgres_url():
    if not BASE:
        if os.environ.get("CI"):
            pytest.fail("CI: TRAIN_OPTUNA_TEST_POSTGRES is not set (.ci/run sets it)")
        pytest.skip("TRAIN_OPTUNA_TEST_POSTGRES not set: run .ci/postgres and export its URL")
    name = f"test_{uuid.uuid4().hex[:12]}"
    with _admin(BASE) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    yield BASE.rsplit("/", 1)[0] + "/" + name
    with _admin(BASE) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request):
    """None for the default SQLite file under storage/, or the session's PostgreSQL URL."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` (pyproject.toml) sends the tests of one `xdist_group` to one worker, so
    that a module's session fixture (a search) runs once. pytest-xdist 3.8 marks the group by
    appending it to `item._nodeid`, which pytest 9.2 no longer reads (pytest-xdist issue #1386;
    seen here: both workers ran test_search.py's search), so each worker sets the suffix on the
    id pytest does read. Without xdist, or where xdist's own renaming works, this does nothing."""
    # the slow tests first, the many short ones last: those fill the gaps at the end, where a
    # long search left for last would keep one worker busy while the other waits
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if not hasattr(config, "workerinput") or not hasattr(items[0] if items else None, "_id"):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark and not item.nodeid.endswith("@" + mark.args[0]):
            item._id = coerce_node_id(f"{item.nodeid}@{mark.args[0]}")
