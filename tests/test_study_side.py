"""The study side in-process, fast: slot taking, one trial's run and tell, checkpoint keeping,
rescoring and export, the slot lock, warm start with TPE. Real optuna trials on a temporary
SQLite file; tiny models on tiny images, so each test takes well under a second or two."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from segcore.device import precision_for
from segcore.errors import UserError
from segcore.synthetic import write_synthetic
from segsearch.artifacts import listed, open_store
from segsearch.checkpoints import (
    checkpoints,
    drop_checkpoints,
    kept_trials,
    load_checkpoint,
    top_trials,
    would_be_top,
)
from segsearch.final import export, final_fit
from segsearch.interrupts import Interrupts
from segsearch.lifecycle import DONE, INTERRUPTED, WAIT, Context, take_slot, tell, work
from segsearch.rescore import score
from segsearch.space import parse_space
from segsearch.storage import POOL_SIZE, SlotLock, check_url, open_storage
from segsearch.study import (
    coverage_params,
    create_study,
    load_splits,
    study_splits,
    warm_start_params,
)

torch.set_num_threads(1)
CPU = torch.device("cpu")

SPACE = {
    "search": {
        "patch_size": {"type": "categorical", "choices": [16, 32]},
        "lr": {"type": "float", "low": 1.0e-3, "high": 0.3, "log": True},
    },
    "fixed": {"depth": 1, "epochs": 2, "steps_per_epoch": 2, "batch_size": 2, "base_width": 4,
              "max_width": 8, "val_patches_per_image": 2, "aug_strength": 0.0},
    "study": {"n_trials": 3, "sampler": {"name": "random"}, "pruner": {"name": "none"},
              "top_k": 2},
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def empty_database(tmp_path_factory):
    """An SQLite file with optuna's tables and no study, which each Run copies: a copy opens in
    ~0.06 s, where making the tables (and stamping alembic's revision) takes ~0.2 s."""
    Run.template = tmp_path_factory.mktemp("template") / "empty.db"
    open_storage(f"sqlite:///{Run.template}").engine.dispose()


class Run:
    """A created study on a temporary SQLite file, with its data, store and space."""

    template: Path  # empty_database

    def __init__(self, tmp_path, monkeypatch, raw=None, pruner=None):
        monkeypatch.chdir(tmp_path)
        write_synthetic(tmp_path / "d", 5, 0, 48, 32)
        (tmp_path / "storage").mkdir()
        shutil.copy(Run.template, tmp_path / "storage" / "s.db")
        self.url = f"sqlite:///{tmp_path}/storage/s.db"
        self.space = parse_space(raw or SPACE, "space.yaml")
        data = str(tmp_path / "d")
        splits = load_splits(data, None, self.space)
        self.study, _ = create_study("s", self.url, self.space, data, None, None, splits)
        if pruner is not None:  # the same study, seen through another pruner
            self.study = optuna.load_study(study_name="s", storage=self.url, pruner=pruner)
        self.data = study_splits(self.study, self.space)
        self.store = open_store(self.study)
        self.storage = open_storage(self.url)
        self.lock = SlotLock(self.storage, self.url, "s")

    def trial(self, interrupts=None, deadline=None, **params):
        """Take a slot (with `params` enqueued first) and run the trial; returns (trial, outcome)."""
        if params:
            self.study.enqueue_trial(params)
        trial = take_slot(self.study, self.lock)
        assert not isinstance(trial, str), trial
        ctx = Context(self.study, self.space, self.data, self.store, interrupts or Interrupts(),
                      CPU, deadline)  # fmt: skip
        outcome = work(trial, ctx, self.storage, seed=7)
        return self.study.trials[trial.number], outcome


GOOD = {"patch_size": 16, "lr": 0.05}


def test_a_trial_completes_with_its_best_patch_miou_and_a_checkpoint(
    tmp_path, monkeypatch, capsys, caplog
):
    run = Run(tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO, logger="segsearch.lifecycle"):
        trial, outcome = run.trial(**GOOD)
    said = [r.getMessage() for r in caplog.records if r.name == "segsearch.lifecycle"]
    assert said == [f"trial 0 complete with patch mIoU {trial.value:.4f} "]  # no heartbeat note
    assert "train:" not in capsys.readouterr().err  # a worker's log gets lines, not a bar
    assert trial.state == TrialState.COMPLETE and trial.value == outcome.value
    assert trial.value == max(trial.intermediate_values.values())
    assert sorted(trial.intermediate_values) == [0, 1] and trial.user_attrs["epochs_run"] == 2
    assert trial.user_attrs["config"]["patch_size"] == 16 and trial.user_attrs["sampler_seed"] == 7
    assert trial.user_attrs["pid"] == os.getpid() and "slurm_task" not in trial.user_attrs
    assert trial.user_attrs["host"] == socket.gethostname()
    assert (
        trial.user_attrs["precision"] == precision_for(CPU) and trial.user_attrs["device"] == "cpu"
    )
    assert trial.user_attrs["threads"] == torch.get_num_threads()
    assert set(checkpoints(run.study)) == {trial._trial_id}
    _, payload = load_checkpoint(run.study, trial, run.store, CPU)
    assert payload["extra"]["patch_miou"] == trial.value and payload["config"].patch_size == 16
    assert payload["extra"]["study"] == "s" and payload["extra"]["trial"] == trial.number
    assert payload["extra"]["split"] == run.data.names()
    assert payload["extra"]["data"] == run.study.user_attrs["data"] == str(tmp_path / "d")
    best = max(trial.intermediate_values, key=trial.intermediate_values.get)
    assert trial.user_attrs["best_epoch"] == best


def test_pruned_diverged_and_interrupted_trials(tmp_path, monkeypatch, caplog):
    always = optuna.pruners.ThresholdPruner(lower=2.0)  # every mIoU is below 2: prune at once
    run = Run(tmp_path, monkeypatch, pruner=always)
    trial, _ = run.trial(**GOOD)
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    caplog.clear()  # only this trial's lines
    with caplog.at_level(logging.INFO, logger="segsearch.lifecycle"):
        trial, _ = run.trial(patch_size=16, lr=1.0e30)
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("diverged: loss became")
    said = [r.getMessage() for r in caplog.records if r.name == "segsearch.lifecycle"]
    assert said == [f"trial 1 fail {trial.user_attrs['fail_reason']}"]  # no value, the reason
    interrupts = Interrupts()
    interrupts.requested = True  # a signal came between trials: the next one stops at once
    trial, outcome = run.trial(interrupts, **GOOD)
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == INTERRUPTED
    assert outcome.retry  # a preemption: retried
    assert not checkpoints(run.study)  # none of them completed


def test_take_slot_counts_the_budget_and_running_trials(tmp_path, monkeypatch):
    run = Run(tmp_path, monkeypatch)  # budget 3
    first = take_slot(run.study, run.lock)
    second = take_slot(run.study, run.lock)
    third = take_slot(run.study, run.lock)
    assert [t.number for t in (first, second, third)] == [0, 1, 2]
    assert take_slot(run.study, run.lock) is WAIT  # every slot is held by a running trial
    run.study.tell(first, state=TrialState.FAIL)  # a failed trial frees its slot
    fourth = take_slot(run.study, run.lock)
    assert fourth.number == 3
    for t in (second, third, fourth):
        run.study.tell(t, 0.5)
    assert take_slot(run.study, run.lock) is DONE
    run.study.set_user_attr("n_trials", 4)  # --n-trials raises the budget
    run.study.enqueue_trial(GOOD)
    waiting = take_slot(run.study, run.lock)  # an enqueued (or retried) trial is picked first
    assert run.study.trials[waiting.number].system_attrs["fixed_params"] == GOOD


def test_tell_after_the_heartbeat_failed_the_trial_goes_on(tmp_path, monkeypatch, caplog):
    run = Run(tmp_path, monkeypatch)
    trial = take_slot(run.study, run.lock)
    run.study.tell(trial, state=TrialState.FAIL)  # what fail_stale_trials does to a silent one
    from segsearch.lifecycle import Outcome

    with caplog.at_level(logging.WARNING, logger="segsearch.lifecycle"):
        tell(run.study, trial, Outcome(TrialState.COMPLETE, 0.9))
    assert run.study.trials[0].state == TrialState.FAIL and "failed meanwhile" in caplog.text


def test_slot_lock_excludes_a_second_holder(tmp_path, monkeypatch, caplog):
    run = Run(tmp_path, monkeypatch)
    other = SlotLock(open_storage(run.url), run.url, "s")
    other.WAIT_S = 0.2
    with run.lock.held() as held:
        assert held
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="segsearch.storage"), other.held() as got:
            assert not got  # waited, then went on without it
        assert time.monotonic() - start >= 0.2
    said = [r.getMessage() for r in caplog.records if r.name == "segsearch.storage"]
    assert said == ["no trial-slot lock in 0 s; going on without it"]
    with other.held() as got:
        assert got
    caplog.clear()
    (tmp_path / "gone").mkdir()
    lock = SlotLock(run.storage, f"sqlite:///{tmp_path}/gone/s.db", "s")
    with lock.held() as got:
        assert got
    (tmp_path / "gone").rmdir()  # a folder that cannot be opened any more: no flock there
    with caplog.at_level(logging.WARNING, logger="segsearch.storage"), lock.held() as got:
        assert not got
    said = [r.getMessage() for r in caplog.records if r.name == "segsearch.storage"]
    assert len(said) == 1 and said[0].startswith("no trial-slot lock ([Errno 2] ")


@pytest.mark.slow
@pytest.mark.mutation
def test_slot_lock_on_postgresql_is_an_advisory_lock_per_study(postgres_url):
    """Workers on many machines share the lock through PostgreSQL: one holder per study, another
    study's lock free meanwhile, released at the end of the block."""
    first, second, other = (
        SlotLock(open_storage(postgres_url), postgres_url, name) for name in ("s", "s", "t")
    )  # three processes, each its own pool
    assert first._engine.pool.size() == POOL_SIZE  # a small pool per process
    second.WAIT_S = 0.2
    with first.held() as held:
        assert held
        with second.held() as got:
            assert not got and second._con is None  # waited, then went on without it
        with other.held() as got:
            assert got
    with second.held() as got:
        assert got
    with first.held() as held:  # its connection dropped while held: so is the lock, quietly
        assert held
        first._con.invalidate()
    with second.held() as got:
        assert got


def test_an_existing_sqlite_file_is_only_read_before_optuna_writes_to_it_and_gets_wal(tmp_path):
    def url(name: str) -> str:
        return f"sqlite:///{tmp_path / name}"

    (tmp_path / "empty.db").write_bytes(b"")  # an empty file is an empty database
    assert check_url(url("empty.db")) == (url("empty.db"), {"connect_args": {"timeout": 60}})
    (tmp_path / "notes.db").write_text("my notes\n" * 20)
    with pytest.raises(UserError) as e:
        check_url(url("notes.db"))
    assert (
        str(e.value)
        == f"--storage {url('notes.db')}: not an SQLite database (file is not a database)"
    )
    with contextlib.closing(sqlite3.connect(tmp_path / "other.db")) as con:
        con.execute("CREATE TABLE t (x)")
    before = (tmp_path / "other.db").read_bytes()
    with pytest.raises(UserError, match="an SQLite database without Optuna's tables"):
        check_url(url("other.db"))
    assert (tmp_path / "other.db").read_bytes() == before
    open_storage(url("new.db"))
    with contextlib.closing(sqlite3.connect(tmp_path / "new.db")) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # readers while writing
    assert check_url(url("new.db"))[0] == url("new.db")  # optuna's own: taken


def test_postgresql_urls_are_checked_and_given_a_small_pool():
    pool = {"pool_size": 2, "max_overflow": 2, "pool_pre_ping": True, "pool_recycle": 3600,
            "connect_args": {"connect_timeout": 10}}  # fmt: skip
    assert check_url("postgres://u@h/db") == ("postgresql+psycopg://u@h/db", pool)
    for url in ("postgresql://user@host/db?application_name=a://b@c@d",
                "postgresql://user@host/db?application_name=b@c/d"):  # fmt: skip
        assert check_url(url)[0] == url.replace("postgresql://", "postgresql+psycopg://")
    with pytest.raises(UserError) as e:  # only an '@' before the host is the password's
        check_url("postgresql://user:p@ss@host/db")
    assert str(e.value).endswith(": an '@' in the password must be written %40")


def test_open_storage_retries_only_a_schema_race_and_says_in_one_line_what_failed(
    tmp_path, monkeypatch
):
    import segsearch.storage

    slept = []
    monkeypatch.setattr(segsearch.storage.time, "sleep", slept.append)
    with pytest.raises(UserError) as e:  # nothing listens there: said at once
        open_storage("postgresql://u:secret@127.0.0.1:1/db")
    said = str(e.value)
    assert said.startswith("--storage postgresql+psycopg://u:***@127.0.0.1:1/db: cannot open (")
    assert "\n" not in said and "secret" not in said and slept == []
    url = f"sqlite:///{tmp_path}/s.db"
    plain, errors = optuna.storages.RDBStorage, []

    def failing(*args, **kwargs):
        if errors:
            raise errors.pop(0)
        return plain(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", failing)
    race = RuntimeError("(sqlite3.OperationalError) table studies already exists\n[SQL: x]")
    errors[:] = [race] * 5  # another process is creating the tables: tried again
    open_storage(url)
    assert slept == [0.5, 1.0, 1.5, 2.0, 2.0]
    slept.clear()
    errors[:] = [RuntimeError("database is locked " + "x" * 300 + "\nmore")] * 10  # for good
    with pytest.raises(UserError) as e:
        open_storage(url)
    assert str(e.value) == f"--storage {url}: cannot open (database is locked {'x' * 181})"
    assert len(slept) == 9
    errors[:] = [RuntimeError()]  # no message: its type
    with pytest.raises(UserError, match=r": cannot open \(RuntimeError\)$"):
        open_storage(url)


def test_a_database_of_another_optuna_schema_is_refused_on_its_first_open(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    optuna.storages.RDBStorage(url)
    with contextlib.closing(sqlite3.connect(tmp_path / "old.db")) as con, con:
        con.execute("UPDATE alembic_version SET version_num = 'v0.9.0.a'")
    with pytest.raises(UserError, match="is no longer compatible with the table schema"):
        open_storage(url)


def test_the_postgresql_lock_key_is_one_signed_64_bit_number_per_study(tmp_path, monkeypatch):
    """pg_try_advisory_lock takes a bigint: the key of a study's name is the same in every
    worker on every machine (not Python's salted hash), fits a bigint, and differs by study."""
    run = Run(tmp_path, monkeypatch)
    url = "postgresql://user@host/db"
    keys = [SlotLock(run.storage, url, f"study-{i}")._key for i in range(32)]
    assert all(-(2**63) <= k < 2**63 for k in keys) and len(set(keys)) == 32
    assert any(k < 0 for k in keys) and any(k > 0 for k in keys)  # the whole signed range
    assert SlotLock(run.storage, url, "s")._key == -2651867005668100709


def test_without_the_slot_lock_a_trial_over_the_budget_is_failed_at_once(tmp_path, monkeypatch):
    """A worker that could not get the slot lock asks anyway, then counts the trials before its
    own that hold slots: when another worker took the last slot between its count and its ask,
    its trial ends FAIL with the reason and it waits. Under the lock that race cannot happen,
    and the trial is taken as asked."""
    run = Run(tmp_path, monkeypatch)  # budget 3
    run.study.tell(run.study.ask(), 0.5)  # 0
    run.study.tell(run.study.ask(), state=TrialState.FAIL)  # 1: holds no slot
    other = optuna.load_study(study_name="s", storage=run.url)
    plain_ask = run.study.ask

    def another_worker_first(*args, **kwargs):
        other.ask()  # a slot taken between this worker's count and its ask
        return plain_ask(*args, **kwargs)

    monkeypatch.setattr(run.study, "ask", another_worker_first)
    stuck = SlotLock(open_storage(run.url), run.url, "s")
    stuck.WAIT_S = 0.1
    with run.lock.held():  # another worker holds the lock throughout
        fits = take_slot(run.study, stuck)  # 2 is the other's; before 3: slots 0 and 2, of 3
        assert not isinstance(fits, str) and fits.number == 3
        run.study.tell(fits, 0.5)
        run.study.tell(2, state=TrialState.FAIL)
        assert take_slot(run.study, stuck) == WAIT  # 4 the other's; before 5: 0, 3, 4
    over = run.study.trials[5]
    assert over.state == TrialState.FAIL
    assert over.user_attrs["fail_reason"] == "over budget: another worker took the last slot"
    run.study.tell(4, state=TrialState.FAIL)
    taken = take_slot(run.study, run.lock)  # under the lock: no count after the ask
    assert not isinstance(taken, str) and taken.number == 7


def finished(study, values):
    """COMPLETE trials with these values, added directly (no training)."""
    dist = optuna.distributions.FloatDistribution(0, 1)
    for v in values:
        study.add_trial(optuna.trial.create_trial(params={"x": v}, distributions={"x": dist},
                                                  value=v))  # fmt: skip
    return study.get_trials(deepcopy=False)


def test_top_trials_order_ties_and_would_be_top(tmp_path, monkeypatch):
    run = Run(tmp_path, monkeypatch)
    finished(run.study, [0.5, 0.9, 0.7, 0.9])
    assert [t.number for t in top_trials(run.study, 3)] == [1, 3, 2]  # ties: the earlier first
    assert would_be_top(run.study, 3, 0.71, 10) and not would_be_top(run.study, 3, 0.7, 10)
    assert would_be_top(run.study, 5, 0.1, 10)  # fewer than K so far
    finished(run.study, [0.1, 0.1, 0.8])  # trials 4, 5, 6
    assert [t.number for t in top_trials(run.study, 3)] == [1, 3, 6]
    # a tie with the last of the top K (trial 6): an earlier number enters, a later one not
    assert would_be_top(run.study, 3, 0.8, 4) and not would_be_top(run.study, 3, 0.8, 7)
    first_two = run.study.get_trials()[:2]  # `trials` given: only those are ranked
    assert [t.number for t in top_trials(run.study, 3, first_two)] == [1, 0]


def test_drop_checkpoints_reads_the_trials_once(tmp_path, monkeypatch):
    """Its docstring's guarantee: one read of the trials, after the checkpoints are listed."""
    run = Run(tmp_path, monkeypatch)
    run.trial(**GOOD)
    reads = []
    original = run.study.get_trials
    monkeypatch.setattr(run.study, "get_trials", lambda **kw: reads.append(kw) or original(**kw))
    drop_checkpoints(run.study, 2, run.store)
    assert len(reads) == 1 and len(checkpoints(run.study)) == 1


def test_drop_checkpoints_keeps_the_top_k_and_running_trials(tmp_path, monkeypatch):
    run = Run(tmp_path, monkeypatch)  # top_k 2
    for lr in (0.05, 0.1, 0.2):
        run.trial(patch_size=16, lr=lr)
    run.study.set_user_attr("n_trials", 4)
    running = take_slot(run.study, run.lock)
    from segsearch.checkpoints import store_checkpoint

    done = [t for t in run.study.trials if t.state == TrialState.COMPLETE]
    model, payload = load_checkpoint(run.study, done[0], run.store, CPU)
    on_meta, _ = load_checkpoint(run.study, done[0], run.store, torch.device("meta"))
    assert next(on_meta.parameters()).device.type == "meta"  # the device asked for (a GPU's)
    store_checkpoint(run.study, running._trial_id, model.state_dict(), payload["config"],
                     run.data.train, payload["normalization"], {}, run.store)  # fmt: skip
    drop_checkpoints(run.study, 2, run.store)
    keep = {t._trial_id for t in top_trials(run.study, 2)} | {running._trial_id}
    assert set(checkpoints(run.study)) == keep
    metas = [meta for _, _, meta in listed(run.study) if meta.get("filename") == "checkpoint.pt"]
    assert {m["mimetype"] for m in metas} == {"application/octet-stream"}  # the dashboard's link
    files = {p.name for p in (tmp_path / "storage" / "s" / "artifacts").iterdir()}
    curves = {
        m.artifact_id
        for t in run.study.trials
        for m in optuna.artifacts.get_all_artifact_meta(t, storage=run.study._storage)
    }
    assert files - curves == {artifact for _, artifact in checkpoints(run.study).values()}
    lost = next(t for t in done if t._trial_id not in keep)
    with pytest.raises(UserError, match=f"trial {lost.number}'s checkpoint is not in"):
        load_checkpoint(run.study, lost, run.store, CPU)


def test_score_and_export_pick_the_best_full_image_trial(tmp_path, monkeypatch):
    run = Run(tmp_path, monkeypatch)
    for lr in (0.05, 0.2):
        run.trial(patch_size=16, lr=lr)
    scores = score("s", run.url, progress=False)
    assert set(scores) == {"0", "1"}
    for number, s in scores.items():
        assert s["patch_miou"] == run.study.trials[int(number)].value and s["images"] == 1
    assert run.study.user_attrs["full_image_scores"] == json.loads(
        (tmp_path / "reports" / "s" / "scores.json").read_text()
    )
    pictures = [m for _, _, m in listed(run.study) if m["filename"].startswith("prediction-")]
    assert len(pictures) == 2  # one validation image per rescored trial
    best = json.loads(export("s", run.url).read_text())
    assert scores["0"]["miou"] != scores["1"]["miou"]  # no tie: the rule for ties is tested apart
    winner = "0" if scores["0"]["miou"] > scores["1"]["miou"] else "1"
    assert best["trial"] == int(winner)
    assert best["validation"]["full_image_miou"] == scores[winner]["miou"]
    assert best["config"] == run.study.trials[int(winner)].user_attrs["config"]  # no final: {}
    assert best["test"] is None and best["model"] is None  # no final fit yet
    score("s", run.url, progress=False)  # rescoring replaces the pictures, not adds to them
    assert len([m for _, _, m in listed(run.study) if m["filename"].startswith("pred")]) == 2


def test_warm_start_is_the_first_trial_and_tpe_samples_after_it(tmp_path, monkeypatch):
    raw = json.loads(json.dumps(SPACE))
    raw["search"]["depth"] = {"type": "int", "low": 1, "high": 2}
    raw["fixed"].pop("depth")
    raw["study"].update({"sampler": {"name": "tpe", "args": {"n_startup_trials": 1}},
                         "warm_start": True, "n_trials": 3})  # fmt: skip
    run = Run(tmp_path, monkeypatch, raw=raw)
    expected = warm_start_params(run.space)
    assert expected == {"patch_size": 16, "depth": 2, "lr": 0.05}  # 64 not offered; 4 clamped
    first, _ = run.trial()
    assert first.params == expected
    for _ in range(2):
        t, _ = run.trial()
        assert t.state == TrialState.COMPLETE and set(t.params) == set(expected)
    assert take_slot(run.study, run.lock) is DONE


def test_tpe_start_up_trials_try_every_categorical_choice(tmp_path, monkeypatch):
    """After the warm start (patch 16, width 2), the start-up trials take the choices not yet
    tried (patch 32 and width 8, then width 4: each parameter's choices shifted by its place, so
    that no two always come together), the sampler the rest; never more of them than the
    start-up holds, and none for the random sampler."""
    raw = json.loads(json.dumps(SPACE))
    raw["search"]["base_width"] = {"type": "categorical", "choices": [2, 4, 8]}
    raw["fixed"].pop("base_width")
    raw["study"].update({"sampler": {"name": "tpe", "args": {"n_startup_trials": 4}},
                         "warm_start": True, "n_trials": 4})  # fmt: skip
    run = Run(tmp_path, monkeypatch, raw=raw)
    assert coverage_params(run.space, {"patch_size": 16, "lr": 0.05, "base_width": 2}) == [
        {"patch_size": 32, "base_width": 8},
        {"base_width": 4},
    ]
    warm, _ = run.trial()
    assert warm.params["patch_size"] == 16 and warm.params["base_width"] == 2  # 16 not offered
    tried = [run.trial()[0].params for _ in range(2)]
    assert [(t["patch_size"], t["base_width"]) for t in tried] == [
        (32, 8),
        (tried[1]["patch_size"], 4),
    ]
    assert set(tried[1]) == {"patch_size", "lr", "base_width"}  # the sampler's patch and lr
    raw["study"]["sampler"]["args"]["n_startup_trials"] = 2  # room for one after the warm start
    assert coverage_params(parse_space(raw, "s.yaml"), warm.params) == [
        {"patch_size": 32, "base_width": 8}
    ]
    raw["study"]["sampler"] = {"name": "random"}
    assert coverage_params(parse_space(raw, "s.yaml"), warm.params) == []


def test_the_warm_start_is_kept_and_rescored_outside_the_top_k(tmp_path, monkeypatch):
    """The recipe's trial keeps its checkpoint and is rescored even when its patch mIoU is not
    in the top K, so that the winner is chosen against it on validation full-image mIoU."""
    raw = json.loads(json.dumps(SPACE))
    raw["study"].update({"warm_start": True, "top_k": 1})
    run = Run(tmp_path, monkeypatch, raw=raw)
    finished(run.study, [0.999])  # trial 1, no checkpoint: the top 1 by patch mIoU
    warm, _ = run.trial()  # trial 0, the enqueued recipe
    assert warm.number == 0 and warm.user_attrs["warm_start"] and warm.value < 0.999
    assert [t.number for t in top_trials(run.study, 1)] == [1]
    assert [t.number for t in kept_trials(run.study, 1)] == [1, 0]
    drop_checkpoints(run.study, 1, run.store)
    assert set(checkpoints(run.study)) == {warm._trial_id}
    assert set(score("s", run.url, progress=False, panels=False)) == {"0"}
    other, _ = run.trial(patch_size=16, lr=0.1)  # neither top nor warm start: no checkpoint
    assert other.user_attrs.get("warm_start") is None
    assert set(checkpoints(run.study)) == {warm._trial_id}
    finished(run.study, [0.0])  # the warm start inside the top 2: listed once
    assert [t.number for t in kept_trials(run.study, 2)] == [1, 0]


def test_test_images_are_read_only_by_the_final_fit(tmp_path, monkeypatch):
    """Every image that reaches training or stitched scoring is recorded: trials and rescoring
    see only training and validation images; the final fit scores the test images, once."""
    import segcore.fit
    import segcore.train
    import segsearch.rescore

    seen: list[tuple[str, set[str]]] = []

    def spy(where, function, *positions):
        def wrapped(*args, **kwargs):
            for i in positions:  # the Dataset arguments
                if args[i] is not None:
                    seen.append((where, set(args[i].names)))
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(segcore.train, "train", spy("trial", segcore.train.train, 1, 2))
    monkeypatch.setattr(segcore.fit, "train", spy("final-train", segcore.fit.train, 1, 2))
    monkeypatch.setattr(
        segsearch.rescore, "evaluate", spy("rescore", segsearch.rescore.evaluate, 1)
    )
    monkeypatch.setattr(segcore.fit, "evaluate", spy("final", segcore.fit.evaluate, 1))
    run = Run(tmp_path, monkeypatch)
    test = set(run.study.user_attrs["split"]["test"])
    assert test and test == set(run.data.test.names)
    for lr in (0.05, 0.2):
        run.trial(patch_size=16, lr=lr)
    score("s", run.url, progress=False)
    assert seen and all(not names & test for _, names in seen), seen  # trials and rescoring
    seen.clear()
    final_fit("s", run.url, device=CPU, progress=False)
    assert [where for where, names in seen if names & test] == ["final"]
    assert [names for where, names in seen if where == "final"] == [test]


def test_final_fit_and_export_model(tmp_path, monkeypatch):
    from segcore.files import load_model
    from segcore.infer import predict_probs

    raw = json.loads(json.dumps(SPACE))
    raw["final"] = {"epochs": 3, "train_on": "train+val"}
    run = Run(tmp_path, monkeypatch, raw=raw)
    run.trial(patch_size=16, lr=0.05)
    score("s", run.url, progress=False, panels=False)
    import segcore.fit

    trained_on = []
    train = segcore.fit.train
    monkeypatch.setattr(segcore.fit, "train", lambda c, t, *a, **k: (
        trained_on.append(set(t.names)), train(c, t, *a, **k))[1])  # fmt: skip
    done = final_fit("s", run.url, device=CPU, progress=False)
    assert trained_on == [set(run.data.train.names) | set(run.data.val.names)]
    assert done["train_on"] == "train+val" and done["kept_epoch"] == 2  # the last of 3 epochs
    assert done["validation_patch_miou"] is None  # nothing held out to choose with
    assert len(done["history"]) == 3 and done["test"]["images"] == 1
    best = json.loads((tmp_path / "reports" / "s" / "best.json").read_text())
    assert best["test"] == done["test"] and best["config"]["epochs"] == 3
    assert best["threads"] == torch.get_num_threads() and best["model"] == "reports/s/best.pt"
    assert best["precision"] == done["precision"] == precision_for(CPU)
    model, payload = load_model(tmp_path / "reports" / "s" / "best.pt", CPU)
    assert payload["extra"]["split"] == run.study.user_attrs["split"]
    # export --model: the winner trial's own checkpoint, the same predictions
    export("s", run.url, model=tmp_path / "winner.pt")
    exported, _ = load_model(tmp_path / "winner.pt", CPU)
    trial = run.study.trials[best["trial"]]
    original, _ = load_checkpoint(run.study, trial, run.store, CPU)
    image = run.data.test.normalized(payload["normalization"]).images[0]
    a = predict_probs(exported, image, tile=16, gaussian=True, tta=True)
    b = predict_probs(original, image, tile=16, gaussian=True, tta=True)
    assert torch.equal(a, b) and not torch.equal(a, predict_probs(model, image, tile=16))


def test_one_validation_patch_size_for_every_trial(tmp_path, monkeypatch):
    run = Run(tmp_path, monkeypatch)  # patch sizes 16 and 32
    assert run.space.fixed["val_patch_size"] == 32
    small, _ = run.trial(patch_size=16, lr=0.05)
    large, _ = run.trial(patch_size=32, lr=0.05)
    for t in (small, large):
        assert t.user_attrs["config"]["val_patch_size"] == 32
    # the small trial's checkpoint scores its reported value on the 32-pixel patch set
    from segcore.patches import validation_patches
    from segcore.train import patch_miou

    model, payload = load_checkpoint(run.study, small, run.store, CPU)
    val = run.data.val.normalized(payload["normalization"])
    vx, vy = validation_patches(val.images, val.masks, patch_size=32, per_image=2, seed=0)
    again = patch_miou(model, torch.from_numpy(vx), torch.from_numpy(vy), 3)
    assert again == pytest.approx(small.value, abs=1e-9)


def test_an_interrupted_final_fit_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    """Ctrl-C during the final fit (or a killed finishing job): the next run goes on from the
    epoch state beside best.pt and ends exactly as a fit never stopped."""
    import segcore.fit

    raw = json.loads(json.dumps(SPACE))
    raw["final"] = {"epochs": 3, "train_on": "train"}
    run = Run(tmp_path, monkeypatch, raw=raw)
    run.trial(**GOOD)
    score("s", run.url, progress=False, panels=False)
    train = segcore.fit.train

    def stopped_after_epoch_0(*args, on_saved, **kwargs):
        def save(state):
            on_saved(state)
            if state["epoch"] == 0:
                raise KeyboardInterrupt

        return train(*args, on_saved=save, **kwargs)

    monkeypatch.setattr(segcore.fit, "train", stopped_after_epoch_0)
    with pytest.raises(KeyboardInterrupt):
        final_fit("s", run.url, device=CPU, progress=False)
    reports = tmp_path / "reports" / "s"
    assert (reports / "best.state.pt").is_file() and not (reports / "best.pt").exists()
    monkeypatch.setattr(segcore.fit, "train", train)
    resumed = final_fit("s", run.url, device=CPU, progress=False)
    assert not (reports / "best.state.pt").exists()
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    again = final_fit("s", run.url, device=CPU, progress=False)  # from scratch: no state left
    assert [h["patch_miou"] for h in again["history"]] == [
        h["patch_miou"] for h in resumed["history"]
    ]
    assert again["test"]["miou"] == resumed["test"]["miou"]


def test_a_worker_killed_while_dropping_its_older_state_resumes_from_the_newer(
    tmp_path, monkeypatch
):
    """Killed inside detach, after the older state's file is removed but while it is still
    listed: the retry finds the newer state, not nothing (seen once on CI's PostgreSQL)."""
    from segsearch.resume import Saver, find_state, states

    run = Run(tmp_path, monkeypatch)
    run.study.set_user_attr("n_trials", 2)
    stopped, _ = run.trial(deadline=0.0, **GOOD)
    [(_, older)] = states(run.study)[stopped._trial_id]
    waiting = run.study.get_trials(states=(TrialState.WAITING,))[0]
    state, _ = find_state(run.study, waiting, run.store)
    Saver(run.study, stopped._trial_id, run.store)({**state, "epoch": 1})  # the newer, listed
    both, _ = find_state(run.study, waiting, run.store)  # killed before the older was dropped
    assert both["epoch"] == 1  # the newer of the two
    (newer,) = {a for _, a in states(run.study)[stopped._trial_id]} - {older}
    files = tmp_path / "storage" / "s" / "artifacts"
    (files / newer).rename(tmp_path / "aside")  # the newer's file gone (listed in either order)
    only, _ = find_state(run.study, waiting, run.store)
    assert only["epoch"] == 0  # the one still there
    (tmp_path / "aside").rename(files / newer)
    run.store.remove(older)  # the kill: the older file is gone, its listing stays
    assert len(states(run.study)[stopped._trial_id]) == 2
    again, since = find_state(run.study, waiting, run.store)
    assert again["epoch"] == 1 and since.number == stopped.number


def test_a_stopped_trial_is_retried_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    """The time limit stops a trial after its first epoch: it ends FAIL with a retry queued,
    the retry continues from the saved state, and ends exactly as a trial never stopped."""
    import datetime

    import segsearch.resume
    from segsearch.resume import drop_states, states

    raw = json.loads(json.dumps(SPACE))
    raw["fixed"]["epochs"] = 3
    run = Run(tmp_path, monkeypatch, raw=raw)
    run.study.set_user_attr("n_trials", 2)
    stopped, outcome = run.trial(deadline=0.0, **GOOD)  # deadline long past: stop after epoch 0
    assert stopped.state == TrialState.FAIL and outcome.retry
    assert stopped.user_attrs["fail_reason"].startswith("stopped at the time limit")
    assert list(stopped.intermediate_values) == [0]
    assert set(states(run.study)) == {stopped._trial_id}  # kept: its retry is WAITING
    resumed, _ = run.trial()  # takes the retry (WAITING first)
    assert resumed.params == stopped.params and resumed.state == TrialState.COMPLETE
    assert resumed.user_attrs["resumed_from"] == {"trial": stopped.number, "epoch": 0}
    assert sorted(resumed.intermediate_values) == [0, 1, 2]  # one curve for the pruner
    assert set(states(run.study)) == {stopped._trial_id}  # kept a while: it failed just now
    monkeypatch.setattr(segsearch.resume, "GRACE", datetime.timedelta(0))
    drop_states(run.study, run.store)
    assert not states(run.study)  # nothing can resume from them any more
    never, _ = run.trial(**GOOD)
    assert never.intermediate_values == resumed.intermediate_values  # exactly the same training
    assert never.value == resumed.value


def test_costs_curves_and_notes_are_recorded(tmp_path, monkeypatch):
    """Every trial records what its model costs and its per-epoch curves (user attributes and
    a curves.csv artifact); export writes notes for the study and every rescored trial."""
    from optuna_dashboard._note import get_note_from_system_attrs  # how the dashboard reads them

    run = Run(tmp_path, monkeypatch)
    for lr in (0.05, 0.2):
        run.trial(patch_size=16, lr=lr)
    for t in run.study.trials:
        assert t.user_attrs["params"] > 0 and t.user_attrs["gflop_per_patch"] > 0
        assert t.user_attrs["infer_ms"] > 0 and t.user_attrs["infer_device"] == "cpu"
        assert [h["epoch"] for h in t.user_attrs["history"]] == [0, 1]
        assert t.user_attrs["seconds_per_epoch"] > 0
        (meta,) = optuna.artifacts.get_all_artifact_meta(t, storage=run.study._storage)
        assert meta.filename == "curves.csv" and meta.mimetype == "text/csv"
        text = (tmp_path / "storage" / "s" / "artifacts" / meta.artifact_id).read_text()
        assert text.splitlines()[0] == "epoch,loss,lr,seconds,patch_miou"
        assert len(text.splitlines()) == 3 and text.splitlines()[2].startswith("2,")
    score("s", run.url, progress=False, panels=False)
    best = json.loads(export("s", run.url).read_text())
    attrs = run.study._storage.get_study_system_attrs(run.study._study_id)
    study_note = get_note_from_system_attrs(attrs, None)["body"]
    assert f"the winner is trial {best['trial']}" in study_note
    assert "validation full-image mIoU" in study_note and "final --study s" in study_note
    winner = run.study.trials[best["trial"]]
    note = get_note_from_system_attrs(attrs, winner._trial_id)["body"]
    miou = best["validation"]["full_image_miou"]
    assert f"Validation full-image mIoU **{miou:.4f}**" in note and "(this decided" in note
    assert "| background | line | ellipse |" in note
    assert run.study.user_attrs["winner"] == f"trial {best['trial']}"
    assert f"rescored trial {best['trial']}" in run.study.user_attrs


def test_a_model_over_the_limits_is_pruned_before_it_trains(tmp_path, monkeypatch):
    raw = json.loads(json.dumps(SPACE))
    raw["search"]["base_width"] = {"type": "categorical", "choices": [2, 8]}
    raw["fixed"].pop("base_width")
    raw["study"]["sampler"] = {"name": "tpe", "args": {"n_startup_trials": 0}}  # no start-up
    raw["constraints"] = {"max_params": 500, "max_gflop_per_patch": 0.0005}  # width 2 fits both
    run = Run(tmp_path, monkeypatch, raw=raw)
    assert run.study.sampler._constraints_func is not None  # TPE learns where the limit is
    big, _ = run.trial(patch_size=16, lr=0.05, base_width=8)
    assert big.state == TrialState.PRUNED and not big.intermediate_values
    assert big.user_attrs["pruned_reason"] == (  # width 8 breaks both, said in one line
        "over the space's limits: params 3907 above max_params 500; "
        "gflop_per_patch 0.001409 above max_gflop_per_patch 0.0005"
    )
    small, _ = run.trial(patch_size=16, lr=0.05, base_width=2)
    assert small.state == TrialState.COMPLETE and small.user_attrs["params"] <= 500
    assert all(v > 0 for v in big.system_attrs["constraints"])
    assert all(v <= 0 for v in small.system_attrs["constraints"])


def test_progress_lines_without_a_terminal_and_a_bar_on_one():
    import io

    from segcore.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, expect_bar in ((io.StringIO(), False), (Terminal(), True)):
        shown = Progress(4, "train", "steps", stream=stream)
        for _ in range(4):
            shown.update()
        shown.write("epoch 1/1: done")
        shown.close()
        text = stream.getvalue()
        assert ("\r" in text) == expect_bar, text
        assert "epoch 1/1: done\n" in text
        if expect_bar:  # tqdm's bar, drawn to the end and cleared
            assert "| 4/4 [" in text and text.endswith("\r")
        else:  # one plain line at the end, for a log file
            assert text.startswith("train: 4/4 steps (100%), ")


def test_error_map_and_pareto_front():
    import numpy as np

    from segcore.pictures import error_map, pareto_front

    shown = np.full((2, 3), 0.5)
    truth = np.array([[0, 1, 2], [0, 0, 0]])
    prediction = np.array([[0, 1, 1], [2, 0, 0]])
    errors = error_map(shown, prediction, truth)
    assert errors.shape == (2, 3, 3)
    red = (errors == (1.0, 0.0, 0.0)).all(-1)
    assert red.tolist() == [[False, False, True], [True, False, False]]
    points = [(10, 0.90), (5, 0.80), (20, 0.95), (12, 0.85), (5, 0.70), (30, 0.94)]
    assert pareto_front(points) == [(5, 0.80), (10, 0.90), (20, 0.95)]


def test_a_study_keeps_its_files_beside_its_sqlite_file_wherever_its_commands_start(
    tmp_path, monkeypatch
):
    """The folder is recorded when the study is created: beside DIR/NAME.db (DIR/NAME), or
    --artifacts; a command started in another folder finds the same store and cache."""
    from segsearch.artifacts import FOLDER, folder_for, store_dir
    from segsearch.study import cache_dir, folder_of

    run = Run(tmp_path, monkeypatch)
    assert run.study.user_attrs.get(FOLDER) is None  # created here without a folder: storage/s
    other = tmp_path / "elsewhere" / "db"
    url = f"sqlite:///{other}/t.db"
    assert folder_for("t", url) == other / "t"
    assert folder_for("t", "postgresql+psycopg://u@h/db", str(tmp_path / "shared")) == (
        tmp_path / "shared"
    )
    assert folder_of("t", url) == other / "t"  # a new study: beside its file
    other.mkdir(parents=True)
    shutil.copy(Run.template, other / "t.db")
    splits = load_splits(str(tmp_path / "d"), None, run.space)
    study, _ = create_study("t", url, run.space, str(tmp_path / "d"), None, None, splits,
                            folder_for("t", url))  # fmt: skip
    monkeypatch.chdir(tmp_path / "elsewhere")  # another working folder: the recorded one
    assert folder_of("t", url) == other / "t" and store_dir(study) == other / "t" / "artifacts"
    assert study_splits(study, run.space) is not None and cache_dir(other / "t").is_dir()
    with pytest.raises(UserError, match=r"--artifacts x: study 't' keeps its files in"):
        folder_of("t", url, "x")


def test_a_trial_failed_behind_the_workers_back_ends_cleanly_and_the_worker_goes_on(
    tmp_path, monkeypatch, caplog
):
    """A storage stall long enough for the heartbeat to go stale: another worker's
    fail_stale_trials fails the trial and queues its retry as a crash, the training worker's
    next `trial.report` raises optuna's UpdateFinishedTrialError, and the trial ends there
    without a write to it; the worker then takes the next trial (the retry, resuming)."""
    import threading
    import time

    import segsearch.storage
    from segsearch.lifecycle import CRASHED, KINDS

    raw = json.loads(json.dumps(SPACE))
    raw["fixed"]["epochs"] = 200  # minutes of training: the stale heartbeat must end it early
    raw["fixed"]["steps_per_epoch"] = 100
    run = Run(tmp_path, monkeypatch, raw=raw)
    monkeypatch.setattr(segsearch.storage, "HEARTBEAT_S", 60)  # one beat at the start, then silence
    monkeypatch.setattr(segsearch.storage, "GRACE_S", 1)
    silent = open_storage(run.url)
    other = optuna.load_study(study_name="s", storage=open_storage(run.url))
    run.study.enqueue_trial(GOOD)
    trial = take_slot(run.study, run.lock)

    def another_worker() -> None:  # once the trial has reported and its heartbeat is stale
        while not run.study.trials[trial.number].intermediate_values:
            time.sleep(0.05)
        while run.study.trials[trial.number].state == TrialState.RUNNING:
            time.sleep(0.5)
            optuna.storages.fail_stale_trials(other)

    thread = threading.Thread(target=another_worker)
    thread.start()
    ctx = Context(run.study, run.space, run.data, run.store, Interrupts(), CPU)
    with caplog.at_level(logging.WARNING, logger="segsearch.lifecycle"):
        outcome = work(trial, ctx, silent, seed=7)
    thread.join()
    assert outcome.state == TrialState.FAIL and outcome.elsewhere
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"trial {trial.number} was failed meanwhile (heartbeat); going on" in said
    failed_trial = run.study.trials[trial.number]
    assert failed_trial.state == TrialState.FAIL
    assert 0 < len(failed_trial.intermediate_values) < 200
    (waiting,) = run.study.get_trials(states=(TrialState.WAITING,))
    assert waiting.system_attrs["retry_history"] == [trial.number]
    assert waiting.system_attrs[KINDS] == [CRASHED]
    resumed, outcome = run.trial(deadline=0.0)  # the worker goes on: it takes the retry
    assert resumed.number == waiting.number and resumed.user_attrs["resumed_from"]["trial"] == 0
    assert resumed.state == TrialState.FAIL and outcome.retry  # the time limit, one epoch on


def test_preemptions_and_crashes_are_counted_apart_each_with_its_cap(tmp_path, monkeypatch):
    """Three preemptions do not use up the crash retries (optuna's own callback counted both
    against one max_retry=3), and each kind stops being retried at its own cap."""
    from segsearch.lifecycle import CAPS, CRASHED, KINDS, PREEMPTED, retry

    run = Run(tmp_path, monkeypatch)
    run.study.set_user_attr("n_trials", 100)
    monkeypatch.setitem(CAPS, PREEMPTED, 4)
    first = take_slot(run.study, run.lock)
    run.study.tell(first, state=TrialState.FAIL)
    stopped = run.study.trials[first.number]

    def stop_again(kind: str) -> bool:
        nonlocal stopped
        if not retry(run.study, stopped, kind):
            return False
        again = take_slot(run.study, run.lock)
        run.study.tell(again, state=TrialState.FAIL)
        stopped = run.study.trials[again.number]
        return True

    assert all(stop_again(PREEMPTED) for _ in range(3))
    assert all(stop_again(CRASHED) for _ in range(CAPS[CRASHED]))  # crashes: their own count
    assert not stop_again(CRASHED)  # the fourth crash is not retried
    assert stop_again(PREEMPTED)  # the fourth preemption is (cap 4)
    assert not stop_again(PREEMPTED)
    kinds = stopped.system_attrs[KINDS]
    assert kinds == [PREEMPTED] * 3 + [CRASHED] * 3 + [PREEMPTED]
    assert stopped.system_attrs["retry_history"] == list(range(stopped.number))
    assert stopped.params == first.params
    assert not run.study.get_trials(states=(TrialState.WAITING,))


def test_a_retry_does_not_count_its_trials_rungs_twice(tmp_path, monkeypatch):
    """ASHA, reduction factor 3: of 6 values at rung 0 the best 2 go on, of 7 also the best 2.
    Four trials at 0.1, one at 0.9 stopped and retried (both hold its 0.9), then one at 0.5:
    second of 6 it goes on; counted twice, the 0.9 would fill both places and prune it."""
    from segsearch.lifecycle import PREEMPTED, retry
    from segsearch.samplers import HalvingWithRetries

    run = Run(tmp_path, monkeypatch)
    run.study.set_user_attr("n_trials", 20)

    def reach_rung_0(study, value):
        trial = take_slot(study, run.lock)
        trial.report(value, 1)
        return trial, trial.should_prune()

    def halving(pruner):
        return optuna.load_study(study_name="s", storage=run.url, pruner=pruner)

    study = halving(HalvingWithRetries(min_resource=1, reduction_factor=3))
    for _ in range(4):
        low, _ = reach_rung_0(study, 0.1)
        study.tell(low, state=TrialState.PRUNED)
    high, _ = reach_rung_0(study, 0.9)
    study.tell(high, state=TrialState.FAIL)  # preempted
    retry(study, study.trials[high.number], PREEMPTED)
    again = take_slot(study, run.lock)
    assert study.trials[again.number].system_attrs["completed_rung_0"] == 0.9  # carried over
    _, pruned = reach_rung_0(study, 0.5)
    assert not pruned
    plain = halving(optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    _, pruned = reach_rung_0(plain, 0.5)  # the same trials, counted by optuna alone
    assert pruned


def test_a_slurm_array_task_is_recorded_on_its_trials(tmp_path, monkeypatch):
    run = Run(tmp_path, monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    trial, _ = run.trial(**GOOD)
    assert trial.user_attrs["slurm_task"] == "1234"  # a plain job
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    trial, _ = run.trial(**GOOD)
    assert trial.user_attrs["slurm_task"] == "1200_7"  # an array's task


def test_a_retry_copies_its_trial_and_names_the_first_of_its_lineage(tmp_path, monkeypatch, caplog):
    """What a retry carries (parameters, user attributes, reported values, optuna's
    `failed_trial`: the first trial of the lineage, as optuna's RetryFailedTrialCallback does),
    the heartbeat's callback retrying as a crash, and the warning at the cap."""
    from optuna.storages import RetryFailedTrialCallback

    from segsearch.lifecycle import CAPS, CRASHED, KINDS, retry_crashed

    run = Run(tmp_path, monkeypatch)
    run.study.set_user_attr("n_trials", 100)
    first = take_slot(run.study, run.lock)
    first.set_user_attr("config", {"patch_size": 16})
    first.report(0.25, 0)
    run.study.tell(first, state=TrialState.FAIL)
    lineage = [first.number]
    for _ in range(CAPS[CRASHED]):
        retry_crashed(run.study, run.study.trials[lineage[-1]])  # as fail_stale_trials calls it
        (waiting,) = run.study.get_trials(states=(TrialState.WAITING,))
        assert waiting.params == first.params and waiting.intermediate_values == {0: 0.25}
        assert waiting.user_attrs["config"] == {"patch_size": 16}
        assert RetryFailedTrialCallback.retried_trial_number(waiting) == first.number
        assert waiting.system_attrs["retry_history"] == lineage
        again = take_slot(run.study, run.lock)
        assert again.number == waiting.number
        run.study.tell(again, state=TrialState.FAIL)
        lineage.append(again.number)
    assert run.study.trials[lineage[-1]].system_attrs[KINDS] == [CRASHED] * CAPS[CRASHED]
    with caplog.at_level(logging.WARNING, logger="segsearch.lifecycle"):
        retry_crashed(run.study, run.study.trials[lineage[-1]])
    assert not run.study.get_trials(states=(TrialState.WAITING,))
    said = [r.getMessage() for r in caplog.records if r.name == "segsearch.lifecycle"]
    assert said == [f"trial {lineage[-1]}: not retried, {CRASHED} {CAPS[CRASHED]} times (the cap)"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bob:hunter2@db:5432/optuna", "postgresql://bob:***@db:5432/optuna"),
        ("postgresql://bob:p@ss@db/optuna", "postgresql://bob:***@db/optuna"),  # @ unescaped
        ("postgresql://bob:a:b@db/optuna", "postgresql://bob:***@db/optuna"),
        ("postgresql://bob@db/optuna?sslmode=require&Password=x&a=b",
         "postgresql://bob@db/optuna?sslmode=require&Password=***&a=b"),
        ("postgresql://bob:pw@db/optuna?options=http://x", "postgresql://bob:***@db/optuna?options=http://x"),
        ("postgresql://db:5432/optuna?application_name=me@lab/x",
         "postgresql://db:5432/optuna?application_name=me@lab/x"),  # an @ after the path
        ("sqlite:///storage/s.db", "sqlite:///storage/s.db"),
    ],
)  # fmt: skip
def test_a_storage_url_is_shown_without_its_password(url, shown):
    from segsearch.storage import mask_url

    assert mask_url(url) == shown


def test_each_epoch_replaces_the_saved_state_and_a_retry_looks_back_past_trials_without_one(
    tmp_path, monkeypatch
):
    from segsearch.lifecycle import PREEMPTED, retry
    from segsearch.resume import FILENAME, Saver, find_state, states

    run = Run(tmp_path, monkeypatch)
    run.study.set_user_attr("n_trials", 100)
    first = take_slot(run.study, run.lock)
    saver = Saver(run.study, first._trial_id, run.store)
    for epoch in range(3):
        saver({"epoch": epoch, "weights": torch.full((2,), float(epoch))})
    assert len(states(run.study)[first._trial_id]) == 1  # each epoch's replaces the one before
    metas = [m for _, _, m in listed(run.study) if m.get("filename") == FILENAME]
    assert [m["mimetype"] for m in metas] == ["application/octet-stream"]
    stopped = first
    for _ in range(2):  # stopped, and its retry stopped again before saving anything
        run.study.tell(stopped, state=TrialState.FAIL)
        retry(run.study, run.study.trials[stopped.number], PREEMPTED)
        stopped = take_slot(run.study, run.lock)
    state, source = find_state(run.study, run.study.trials[stopped.number], run.store)
    assert state["epoch"] == 2 and torch.equal(state["weights"], torch.full((2,), 2.0))
    assert source.number == first.number
    fresh = take_slot(run.study, run.lock)
    assert find_state(run.study, run.study.trials[fresh.number], run.store) == (None, None)
    with pytest.raises(UserError) as error:  # no checkpoint: said with the study and the folder
        load_checkpoint(run.study, run.study.trials[fresh.number], run.store, CPU)
    assert str(error.value).startswith(f"--study s: trial {fresh.number}'s checkpoint is not in ")


def test_a_bug_in_a_trial_fails_it_with_a_reason_and_is_raised(tmp_path, monkeypatch):
    """Anything but the trial's own failures is a bug: the trial ends FAIL saying where to look,
    and the error reaches the worker (which stops), and the checkpoints are still pruned to the
    top K."""
    import segsearch.lifecycle

    run = Run(tmp_path, monkeypatch)  # top_k 2
    for lr in (0.05, 0.1, 0.2):
        run.trial(patch_size=16, lr=lr)
    assert len(checkpoints(run.study)) == 2  # each trial's end drops what cannot be top K

    def bug(trial, ctx):
        raise RuntimeError("a bug")

    monkeypatch.setattr(segsearch.lifecycle, "run_trial", bug)
    run.study.set_user_attr("n_trials", 4)
    trial = take_slot(run.study, run.lock)
    ctx = Context(run.study, run.space, run.data, run.store, Interrupts(), CPU)
    with pytest.raises(RuntimeError, match="a bug"):
        work(trial, ctx, run.storage, seed=7)
    failed = run.study.trials[trial.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == "error (see the worker's log)"


def test_a_resumed_trial_reports_what_was_saved_unreported_and_keeps_its_measured_steps(
    tmp_path, monkeypatch, caplog
):
    """A worker killed between saving an epoch and reporting it: the retry reports that epoch
    from the saved state. A budget in seconds became steps when the trial first ran; its retry
    goes on with those steps instead of measuring again."""
    from segsearch.lifecycle import PREEMPTED, retry

    raw = json.loads(json.dumps(SPACE))
    raw["fixed"]["epochs"] = 3
    raw["fixed"]["seconds"] = 0.3
    run = Run(tmp_path, monkeypatch, raw=raw)
    run.study.set_user_attr("n_trials", 10)
    stopped, _ = run.trial(deadline=0.0, **GOOD)  # saved and reported epoch 0, then stopped
    steps = stopped.user_attrs["config"]["steps_per_epoch"]
    assert stopped.user_attrs["step_seconds"] > 0 and stopped.user_attrs["config"]["seconds"] == 0
    killed = take_slot(run.study, run.lock)  # its retry, killed before it saved anything
    run.study.tell(killed, state=TrialState.FAIL)
    unreported = run.study.trials[killed.number]
    unreported.intermediate_values = {}  # as if epoch 0 had been saved but never reported
    assert retry(run.study, unreported, PREEMPTED)
    with caplog.at_level(logging.INFO, logger="segsearch.lifecycle"):
        resumed, _ = run.trial()
    assert resumed.system_attrs["retry_history"][-1] == killed.number
    assert resumed.state == TrialState.COMPLETE and sorted(resumed.intermediate_values) == [0, 1, 2]
    said = [r.getMessage() for r in caplog.records if r.name == "segsearch.lifecycle"]
    assert f"trial {resumed.number} resumes trial {stopped.number} after epoch 1" in said
    assert resumed.user_attrs["step_seconds"] == stopped.user_attrs["step_seconds"]  # not again
    assert resumed.user_attrs["config"]["steps_per_epoch"] == steps


def test_the_last_epoch_past_the_time_limit_completes_the_trial(tmp_path, monkeypatch):
    raw = json.loads(json.dumps(SPACE))
    raw["fixed"]["epochs"] = 1
    run = Run(tmp_path, monkeypatch, raw=raw)
    trial, outcome = run.trial(deadline=0.0, **GOOD)  # nothing left to stop: it is done
    assert trial.state == TrialState.COMPLETE and not outcome.retry


def test_out_of_memory_fails_the_trial_with_its_first_line_and_other_errors_are_bugs(
    tmp_path, monkeypatch
):
    import segcore.train

    run = Run(tmp_path, monkeypatch)
    run.study.set_user_attr("n_trials", 10)
    errors = iter([
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB\nmore"),
        MemoryError(),
        RuntimeError("x" * 300 + " can't allocate memory"),
    ])  # fmt: skip

    def short_of_memory(*args, **kwargs):
        raise next(errors)

    monkeypatch.setattr(segcore.train, "train", short_of_memory)
    reasons = []
    for _ in range(3):
        trial, outcome = run.trial(**GOOD)
        assert trial.state == TrialState.FAIL and not outcome.retry
        reasons.append(trial.user_attrs["fail_reason"])
    assert reasons == [
        "out of memory: DefaultCPUAllocator: can't allocate memory: you tried 9 GB",
        "out of memory: MemoryError",
        "out of memory: " + ("x" * 300 + " can't allocate memory")[:200],
    ]

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(segcore.train, "train", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run.trial(**GOOD)


def test_a_retry_trains_on_from_the_saved_state(tmp_path, monkeypatch):
    import segcore.train

    raw = json.loads(json.dumps(SPACE))
    raw["fixed"]["epochs"] = 3
    run = Run(tmp_path, monkeypatch, raw=raw)
    run.study.set_user_attr("n_trials", 2)
    stopped, _ = run.trial(deadline=0.0, **GOOD)
    assert stopped.state == TrialState.FAIL  # after epoch 0, its state saved
    plain, resumed_from = segcore.train.train, []

    def recorded(*args, **kwargs):
        resumed_from.append(kwargs["resume"]["epoch"] if kwargs["resume"] else None)
        assert kwargs["device"] == CPU and kwargs["progress"] is False
        return plain(*args, **kwargs)

    monkeypatch.setattr(segcore.train, "train", recorded)
    resumed, _ = run.trial()
    assert resumed.state == TrialState.COMPLETE and resumed_from == [0]


def test_a_retry_stopped_before_its_first_save_keeps_the_curves_it_resumed_with(
    tmp_path, monkeypatch
):
    """Ctrl-C during the retry's first epoch: its curves are those of the state it resumed
    from (epoch 0 of the stopped trial), not none."""
    import segcore.train

    raw = json.loads(json.dumps(SPACE))
    raw["fixed"]["epochs"] = 3
    run = Run(tmp_path, monkeypatch, raw=raw)
    run.study.set_user_attr("n_trials", 2)
    stopped, _ = run.trial(deadline=0.0, **GOOD)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(segcore.train, "train", interrupted)
    again, outcome = run.trial()
    assert again.state == TrialState.FAIL and outcome.retry
    assert again.user_attrs["resumed_from"] == {"trial": stopped.number, "epoch": 0}
    assert [h["epoch"] for h in again.user_attrs["history"]] == [0]
    metas = optuna.artifacts.get_all_artifact_meta(again, storage=run.study._storage)
    (curves,) = [m for m in metas if m.filename == "curves.csv"]  # on its own page too
    text = (tmp_path / "storage" / "s" / "artifacts" / curves.artifact_id).read_text()
    assert [line.split(",")[0] for line in text.splitlines()] == ["epoch", "1"]


def test_drop_states_keeps_what_a_running_or_waiting_trial_can_resume_from(tmp_path, monkeypatch):
    import datetime

    import segsearch.resume
    from segsearch.lifecycle import PREEMPTED, retry
    from segsearch.resume import Saver, drop_states, states

    monkeypatch.setattr(segsearch.resume, "GRACE", datetime.timedelta(0))  # no recent failures
    run = Run(tmp_path, monkeypatch)
    run.study.set_user_attr("n_trials", 100)

    def with_a_state():
        trial = take_slot(run.study, run.lock)
        Saver(run.study, trial._trial_id, run.store)({"epoch": 0})
        return trial

    running = with_a_state()
    gone = with_a_state()
    run.study.tell(gone, state=TrialState.FAIL)  # not retried: nothing resumes from it
    stopped = with_a_state()
    run.study.tell(stopped, state=TrialState.FAIL)
    retry(run.study, run.study.trials[stopped.number], PREEMPTED)  # its retry waits
    drop_states(run.study, run.store)
    assert set(states(run.study)) == {running._trial_id, stopped._trial_id}
