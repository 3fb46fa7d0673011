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
