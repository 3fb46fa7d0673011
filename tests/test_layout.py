"""The two packages' rule (issue 25): segcore is the segmentation library and never imports
optuna, the search service (segsearch) or the command line; segsearch builds on segcore. Read
from the sources, nested imports included, so the failure names the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 330  # "no module over about 300 lines": one concern a module, read at once


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


@pytest.mark.parametrize("path", modules("segcore"), ids=lambda p: p.name)
def test_segcore_knows_nothing_of_the_search(path):
    banned = ("optuna", "segsearch", "train_optuna", "optuna_dashboard")
    wrong = [f"{path.name}:{line} imports {name}" for line, name in imports(path)
             if name.split(".")[0] in banned]  # fmt: skip
    assert not wrong, wrong


@pytest.mark.parametrize("path", modules("segsearch"), ids=lambda p: p.name)
def test_segsearch_uses_segcore_and_not_the_command_line(path):
    wrong = [f"{path.name}:{line} imports {name}" for line, name in imports(path)
             if name.split(".")[0] == "train_optuna"]  # fmt: skip
    assert not wrong, wrong


@pytest.mark.parametrize("path", [*modules("segcore"), *modules("segsearch")],
                         ids=lambda p: f"{p.parent.name}/{p.name}")  # fmt: skip
def test_no_module_over_about_300_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_rule_test_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from optuna.trial import TrialState\n    import segsearch.study\n"
    )
    assert imports(bad) == [(2, "optuna.trial"), (3, "segsearch.study")]


def test_the_private_attributes_we_use_are_still_there():
    """segsearch.internals names each one with the version it was checked against: an upgrade
    that removes one fails here, not in a worker."""
    import importlib
    import multiprocessing.forkserver

    import optuna

    from segsearch.internals import study_id, study_storage, trial_id
    from segsearch.launcher import PRELOAD

    study = optuna.create_study()
    trial = study.ask()
    study.tell(trial, 0.5)
    frozen = study.trials[0]
    assert trial_id(trial) == trial_id(frozen) == frozen._trial_id
    assert study_storage(study).get_study_system_attrs(study_id(study)) == {}
    assert hasattr(multiprocessing.forkserver._forkserver, "_forkserver_alive_fd")
    for module in PRELOAD:  # the fork server skips a missing one silently: slower workers
        importlib.import_module(module)
