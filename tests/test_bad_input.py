"""Bad input, table-driven: each case is one line naming the file or option, exit status 2, no
traceback, and nothing created or changed on disk.

The cases run the CLI's `main` in this process (its exit code is what `sys.exit` gets) so that
thirty of them cost seconds; tests/test_cli.py runs a few of the same through a real process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcore.config import TrialConfig
from segcore.data import ZSCORE
from segcore.files import save_model
from segcore.labels import Labels
from segcore.model import build_model
from segcore.synthetic import write_synthetic
from train_optuna import main

TINY_SPACE = """
search:
  patch_size: {type: categorical, choices: [16, 32]}
  lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
fixed: {depth: 2, epochs: 1, steps_per_epoch: 1, batch_size: 2, base_width: 4}
study: {n_trials: 2, sampler: {name: random}, pruner: {name: none}}
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def make_base(tmp: Path) -> None:
    """A valid data folder, space, config and model; each case breaks one thing."""
    write_synthetic(tmp / "good", 4, 0, 48, 32)
    (tmp / "space.yaml").write_text(TINY_SPACE)
    cfg = TrialConfig(depth=2, base_width=4, patch_size=32)
    (tmp / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    model = build_model(cfg.arch, 1, 3, cfg.depth, cfg.base_width, cfg.max_width)
    save_model(tmp / "m.pt", model.state_dict(), cfg, in_channels=1,
               labels=Labels.plain(["a", "b", "c"], [(0, 0, 0), (255, 0, 0), (0, 255, 0)]),
               norm=ZSCORE)  # fmt: skip
    torch.save({"format": Evil()}, tmp / "evil.pt")  # a real torch archive that carries code


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """make_base once; each case gets a copy (a model and images written 83 times took ~2 s)."""
    folder = tmp_path_factory.mktemp("base")
    make_base(folder)
    return folder


def data_copy(tmp: Path, name: str) -> Path:
    """A copy of the good data folder, to break."""
    return Path(shutil.copytree(tmp / "good", tmp / name))


def first(folder: Path) -> Path:
    return min(folder.iterdir())


def no_mask(tmp):
    first(data_copy(tmp, "bad") / "masks").unlink()


def wrong_size(tmp):
    mask = first(data_copy(tmp, "bad") / "masks")
    Image.new("RGB", (20, 20)).save(mask)


def unknown_colour(tmp):
    mask = first(data_copy(tmp, "bad") / "masks")
    pixels = np.array(Image.open(mask).convert("RGB"))
    pixels[3, 5] = (1, 2, 3)
    Image.fromarray(pixels).save(mask)


def corrupt_png(tmp):
    first(data_copy(tmp, "bad") / "images").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def non_image(tmp):
    (data_copy(tmp, "bad") / "images" / "notes.txt").write_text("hello")


def empty_folder(tmp):
    (tmp / "bad").mkdir()


def infinite_pixel(tmp):
    image = first(data_copy(tmp, "bad") / "images")
    pixels = np.array(Image.open(image).convert("L"), np.float32)
    pixels[0, 0] = np.inf
    np.save(image.with_suffix(".npy"), pixels)
    image.unlink()


def grey_16bit_masks(tmp):
    """Grey label masks, no labels.json, one pixel at 65535 (65536 classes)."""
    bad = data_copy(tmp, "bad")
    (bad / "labels.json").unlink()
    for i, mask in enumerate(sorted((bad / "masks").iterdir())):
        labels = np.zeros(np.array(Image.open(mask)).shape[:2], np.uint16)
        labels[0, 0] = 65535 if i == 0 else 1
        np.save(mask.with_suffix(".npy"), labels)
        mask.unlink()


def labels_folder(tmp):
    bad = data_copy(tmp, "bad")
    (bad / "labels.json").unlink()
    (bad / "labels.json").mkdir()


def labels_broken_link(tmp):
    bad = data_copy(tmp, "bad")
    (bad / "labels.json").unlink()
    (bad / "labels.json").symlink_to(bad / "nowhere.json")


def labels_bool_colour(tmp):
    bad = data_copy(tmp, "bad")
    labels = json.loads((bad / "labels.json").read_text())
    labels["colors"][1] = [True, 0, 0]
    (bad / "labels.json").write_text(json.dumps(labels))


def one_image(tmp):
    bad = data_copy(tmp, "bad")
    for folder in ("images", "masks"):
        for path in sorted((bad / folder).iterdir())[1:]:
            path.unlink()


def mixed_channels(tmp):
    (tmp / "mixed").mkdir()
    Image.new("L", (32, 32), 10).save(tmp / "mixed" / "a.png")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp / "mixed" / "b.png")


def foreign_sqlite(tmp):
    import sqlite3

    with sqlite3.connect(tmp / "other.db") as con:
        con.execute("CREATE TABLE notes (text TEXT)")


def damaged_model(tmp):
    """A real model file whose config says depth 3 while its weights are depth 2."""
    cfg = TrialConfig(depth=2, base_width=4, patch_size=32)
    model = build_model(cfg.arch, 1, 3, cfg.depth, cfg.base_width, cfg.max_width)
    save_model(tmp / "damaged.pt", model.state_dict(), TrialConfig(depth=3, base_width=4,
               patch_size=32), in_channels=1,
               labels=Labels.plain(["a", "b", "c"], [(0, 0, 0), (255, 0, 0), (0, 255, 0)]),
               norm=ZSCORE)  # fmt: skip


def other_labels(tmp):
    bad = data_copy(tmp, "bad")
    labels = json.loads((bad / "labels.json").read_text())
    labels["classes"] = ["a", "b", "c"]
    (bad / "labels.json").write_text(json.dumps(labels))


def space(text):
    return lambda tmp: (tmp / "bad.yaml").write_text(text)


def truncated_model(tmp):
    data = (tmp / "m.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])


def depth_9(tmp):
    (tmp / "bad.json").write_text(json.dumps({"depth": 9}))


def a_study(tmp):
    """A study `x` in storage/x.db, created from space.yaml, no trial run."""
    from segsearch.space import load_space
    from segsearch.study import create_study

    (tmp / "storage").mkdir()
    create_study("x", f"sqlite:///{tmp}/storage/x.db", load_space(tmp / "space.yaml"), None, None)
    with contextlib.closing(sqlite3.connect(tmp / "storage" / "x.db")) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # all in x.db: later opens change nothing


def another_space(tmp):
    a_study(tmp)
    (tmp / "other.yaml").write_text(TINY_SPACE.replace("n_trials: 2", "n_trials: 3"))


SEARCH = ["search", "--space", "space.yaml", "--study", "x"]
GOOD_DATA = ["--data", "good"]
PG = "postgresql+psycopg://someone:hunter2@127.0.0.1:{port}/db"
SEED_ARGS = "sampler: {name: random}"

# fmt: off
CASES = [
    # data folders
    ("data-missing", None, [*SEARCH, "--data", "nope"], "nope: data folder not found"),
    ("data-empty", empty_folder, [*SEARCH, "--data", "bad"], "images: folder not found"),
    ("image-without-mask", no_mask, [*SEARCH, "--data", "bad"], "no mask with the same name"),
    ("mask-size", wrong_size, [*SEARCH, "--data", "bad"], "size 20x20 differs from its image"),
    ("mask-colour", unknown_colour, [*SEARCH, "--data", "bad"], "(1, 2, 3) at (5, 3) is not a"),
    ("corrupt-png", corrupt_png, [*SEARCH, "--data", "bad"], "cannot read as an image"),
    ("non-image", non_image, [*SEARCH, "--data", "bad"], "notes.txt: not an image file"),
    ("evaluate-bad-data", no_mask, ["evaluate", "--model", "m.pt", "--data", "bad"],
     "no mask with the same name"),
    ("infinite-pixel", infinite_pixel, [*SEARCH, "--data", "bad"],
     "Img_0.npy: has NaN or infinite pixel values"),
    ("grey-16bit-mask", grey_16bit_masks, [*SEARCH, "--data", "bad"],
     "mask values 0, 1, 65535 are not class indices 0..K-1"),
    ("labels-folder", labels_folder, [*SEARCH, "--data", "bad"], "labels.json: cannot read"),
    ("labels-broken-link", labels_broken_link, [*SEARCH, "--data", "bad"],
     "labels.json: cannot read"),
    ("labels-bool-colour", labels_bool_colour, [*SEARCH, "--data", "bad"],
     "'colors' must hold one [r, g, b]"),
    ("one-image", one_image, [*SEARCH, "--data", "bad"], "need 3; add images or give --test-data DIR"),
    ("predict-mixed-channels", mixed_channels, ["predict", "--model", "m.pt", "--images",
     "mixed", "--out", "p"], "b.png: has 3 channel(s), a.png has 1; every image"),
    # search spaces
    ("yaml-duplicate-key", space(TINY_SPACE.replace("fixed:", "  lr: {type: float, low: 0.1, "
     "high: 0.2}\nfixed:")), ["check", "--space", "bad.yaml"], "key 'lr' repeated"),
    ("sampler-seed", space(TINY_SPACE.replace(SEED_ARGS, "sampler: {name: random, args: {seed: "
     "3}}")), [*SEARCH[:2], "bad.yaml", "--study", "x"], "study.sampler.args.seed: not here"),
    ("pruner-args-none", space(TINY_SPACE.replace("pruner: {name: none}", "pruner: {name: none, "
     "args: {x: 1}}")), [*SEARCH[:2], "bad.yaml", "--study", "x"], "study.pruner.args"),
    ("hyperband-factor-1", space(TINY_SPACE.replace("pruner: {name: none}", "pruner: {name: "
     "hyperband, args: {reduction_factor: 1}}")), ["check", "--space", "bad.yaml"],
     "reduction_factor: an integer of at least 2"),
    ("yaml-syntax", space("search: [unclosed\n"), ["check", "--space", "bad.yaml"],
     "bad.yaml: not valid YAML at line 2"),
    ("unknown-section", space(TINY_SPACE + "bogus: 1\n"), ["check", "--space", "bad.yaml"],
     "bad.yaml: unknown section 'bogus'"),
    ("unknown-field", space(TINY_SPACE.replace("lr:", "lrate:")), [*SEARCH[:2], "bad.yaml",
     "--study", "x"], "bad.yaml: unknown config field 'lrate'"),
    ("low-above-high", space(TINY_SPACE.replace("low: 1.0e-3, high: 0.1", "low: 0.5, high: 0.1")),
     ["check", "--space", "bad.yaml"], "search.lr: low (0.5) must not exceed high (0.1)"),
    ("empty-choices", space(TINY_SPACE.replace("[16, 32]", "[]")), ["check", "--space", "bad.yaml"],
     "search.patch_size.choices: must be a non-empty list"),
    ("patch-no-depth",
     space(TINY_SPACE.replace("[16, 32]", "[24]").replace("depth: 2", "depth: 4")),
     ["check", "--space", "bad.yaml"], "patch_size 24: no depth in [4] divides it"),
    ("space-is-folder", None, ["check", "--space", "good"], "good: cannot read"),
    ("space-missing", None, ["check", "--space", "none.yaml"], "none.yaml: search space file not"),
    # storage
    ("postgres-unreachable", None, [*SEARCH, *GOOD_DATA, "--storage", PG],
     "--storage postgresql+psycopg://someone:***@127.0.0.1:"),
    ("sqlite-missing-folder", None, [*SEARCH, "--storage", "sqlite:///nowhere/s.db"],
     "folder nowhere does not exist"),
    ("storage-unknown-kind", None, [*SEARCH, "--storage", "mysql://u:pw@h/db"],
     "use sqlite:///FILE or postgresql+psycopg://"),
    ("storage-pg8000", None, [*SEARCH, "--storage", "postgresql+pg8000://u@h/db"],
     "use sqlite:///FILE or postgresql+psycopg://"),
    ("score-no-study", None, ["score", "--study", "nope"], "storage/nope.db not found"),
    ("sqlite-file-missing", None, ["report", "--study", "x", "--storage", "sqlite:///none.db"],
     "--storage sqlite:///none.db: file not found"),
    ("study-not-in-storage", a_study, ["export", "--study", "y", "--storage",
     "sqlite:///storage/x.db"], "--study 'y': no such study in this storage"),
    ("resume-other-space", another_space, ["search", "--space", "other.yaml", "--study", "x"],
     "study 'x' was created with another search space"),
    ("sqlite-memory", None, [*SEARCH, "--storage", "sqlite:///:memory:"],
     "need a file to share"),
    ("sqlite-foreign", foreign_sqlite, ["report", "--study", "x", "--storage",
     "sqlite:///other.db"], "an SQLite database without Optuna's tables"),
    ("sqlite-foreign-search", foreign_sqlite, [*SEARCH, "--storage", "sqlite:///other.db"],
     "an SQLite database without Optuna's tables"),
    ("sqlite-not-a-database", None, ["score", "--study", "x", "--storage", "sqlite:///space.yaml"],
     "not an SQLite database"),
    ("password-no-user", None, [*SEARCH, *GOOD_DATA, "--storage",
     "postgresql://:hunter2@127.0.0.1:{port}/db"], "postgresql+psycopg://:***@127.0.0.1:"),
    ("password-with-at", None, [*SEARCH, *GOOD_DATA, "--storage",
     "postgresql://bob:hunter2@x@127.0.0.1:{port}/db"], "an '@' in the password must be"),
    ("password-in-query", None, [*SEARCH, *GOOD_DATA, "--storage",
     "postgresql://bob@127.0.0.1:{port}/db?password=hunter2"], "?password=***"),
    # study names
    ("name-separator", None, ["search", "--space", "space.yaml", "--study", "a/b"],
     "--study 'a/b': use letters"),
    ("name-dotdot", None, ["report", "--study", ".."], "no path separators or '..'"),
    ("name-up", None, ["dashboard", "--study", "../../etc"], "no path separators or '..'"),
    ("name-absolute", None, ["export", "--study", "/tmp/x"], "no path separators or '..'"),
    # model files
    ("model-missing", None, ["evaluate", "--model", "none.pt"], "none.pt: model file not found"),
    ("model-not-model", None, ["evaluate", "--model", "cfg.json"], "cfg.json: not a model file"),
    ("model-pickle-code", None, ["predict", "--model", "evil.pt", "--images", "good", "--out",
     "p"], "evil.pt: not a safe model file, refused to load"),
    ("model-truncated", truncated_model, ["evaluate", "--model", "cut.pt"], "cut.pt: not a model"),
    ("model-damaged", damaged_model, ["evaluate", "--model", "damaged.pt"],
     "damaged.pt: damaged model file (RuntimeError"),
    # options
    ("gpus-7", None, [*SEARCH, "--gpus", "7"], "--gpus: GPU 7 does not exist"),
    ("gpus-word", None, [*SEARCH, "--gpus", "first"],
     "--gpus 'first': use auto, none, all or a list"),
    ("device-cuda-no-gpu", None, [*SEARCH, "--device", "cuda"],
     "--device cuda: no CUDA device is visible on this machine"),
    ("device-cuda-gpus-none", None, [*SEARCH, "--device", "cuda", "--gpus", "none"],
     "--device cuda: no CUDA device is visible"),
    ("workers-0", None, [*SEARCH, "--workers", "0"], "--workers: from 1 to 64"),
    ("workers-1000", None, [*SEARCH, "--workers", "1000"], "--workers: from 1 to 64"),
    ("seed-negative", None, ["data", "--out", "d", "--seed", "-1"],
     "argument --seed: must be an integer from 0 to 4294967295"),
    ("worker-seed-huge", a_study, ["worker", "--study", "x", "--seed", "5000000000"],
     "argument --seed: must be an integer"),
    ("data-out-is-file", None, ["data", "--out", "space.yaml"], "--out space.yaml: is a file"),
    ("config-is-folder", None, ["train", "--config", "good", "--out", "x.pt"],
     "good: cannot read"),
    ("train-out-under-file", None, ["train", "--config", "cfg.json", "--out", "space.yaml/x.pt"],
     "space.yaml is not a folder"),
    ("train-out-is-folder", None, ["train", "--config", "cfg.json", "--out", "good"],
     "--out good: is a folder; give a file"),
    ("predict-out-under-file", None, ["predict", "--model", "m.pt", "--images", "good", "--out",
     "space.yaml/p"], "space.yaml is not a folder"),
    ("export-out-is-folder", a_study, ["export", "--study", "x", "--out", "good"],
     "--out good: is a folder"),
    ("storage-empty-file", lambda tmp: (tmp / "empty.db").touch(), ["export", "--study", "x",
     "--storage", "sqlite:///empty.db"], "--storage sqlite:///empty.db: an empty file"),
    ("n-trials-0", None, [*SEARCH, "--n-trials", "0"], "--n-trials: must be at least 1"),
    ("workers-word", None, [*SEARCH, "--workers", "two"], "--workers: invalid int value"),
    ("required", None, ["train"], "the following arguments are required: --config, --out"),
    ("unknown-option", None, ["data", "--out", "d3", "--bogus"], "unrecognized arguments"),
    ("config-depth-9", depth_9, ["train", "--config", "bad.json", "--out", "x.pt"], "'depth'"),
    ("data-out-not-empty", None, ["data", "--out", "good"], "good: folder exists and is not"),
    ("top-k-0", None, ["score", "--study", "x", "--top-k", "0"], "--top-k: must be at least 1"),
    ("dashboard-host", a_study, ["dashboard", "--study", "x", "--host", "999.1.1.1"],
     "--host 999.1.1.1: cannot listen there"),
    ("device-word", None, ["evaluate", "--model", "m.pt", "--device", "tpu"],
     "--device 'tpu': use auto, cpu, cuda or cuda:N"),
    ("device-no-cuda", None, ["train", "--config", "cfg.json", "--out", "x.pt", "--device",
     "cuda"], "--device cuda: no CUDA device is visible"),
    ("timeout-negative", None, [*SEARCH, "--timeout", "-5"], "--timeout: seconds, at least 0"),
    ("slurm-workers-0", None, ["slurm", "--space", "space.yaml", "--study", "x", "--workers",
     "0"], "--workers: array tasks, from 1 to 10000"),
    ("final-no-scores", a_study, ["final", "--study", "x"], "no full-image scores yet"),
    ("export-model-no-scores", a_study, ["export", "--study", "x", "--model", "w.pt"],
     "no full-image scores yet"),
    ("test-data-other-classes", other_labels, [*SEARCH, *GOOD_DATA, "--test-data", "bad"],
     ("bad/labels.json: class 'a' is not one of the classes trained on (background, line, "
     "ellipse)")),
    ("space-final-searched", space(TINY_SPACE.replace("study:", "final: {lr: 0.1}\nstudy:")),
     ["check", "--space", "bad.yaml"], "final.lr: the final fit keeps the winner's value"),
    ("space-searched-split", space(TINY_SPACE.replace("search:\n", "search:\n  test_fraction: "
     "{type: float, low: 0.1, high: 0.3}\n")), ["check", "--space", "bad.yaml"],
     "'test_fraction' cannot be searched"),
    ("space-timeout", space(TINY_SPACE.replace("study: {", "study: {timeout: -1, ")),
     ["check", "--space", "bad.yaml"], "study.timeout: seconds, at least 0"),
    ("port-range", None, ["dashboard", "--study", "x", "--port", "70000"], "--port 70000: must"),
]
# fmt: on


@pytest.mark.parametrize("setup,argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, base, setup, argv,
                                         message):  # fmt: skip
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    if setup:
        setup(tmp_path)
    capsys.readouterr()  # what setting up printed is not the command's output
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    argv = [a.format(port=closed_port()) for a in argv]
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err and "hunter2" not in err + out
    assert snapshot(tmp_path) == before  # nothing created, removed or rewritten
    assert not (tmp_path / "pwned").exists()


def snapshot(root: Path) -> dict[str, tuple[int, int] | str]:
    """Every file's size and modification time, every folder's name; SQLite's scratch files
    (-wal, -shm) left out: a reader opening a database may create or remove them, which also
    touches the folder's time, without changing the database."""
    return {
        str(p.relative_to(root)): "folder" if p.is_dir() and not p.is_symlink()
        else (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in root.rglob("*") if not p.name.endswith(("-wal", "-shm"))
    }  # fmt: skip


def test_search_without_the_package_installed_refuses_before_creating_anything(
    tmp_path, monkeypatch, capsys
):
    """The workers' fork server imports the installed packages: in a Python where the project
    is not installed (`pip install -e .` skipped), search says so in one line and creates no
    study, folder or file."""
    import importlib.metadata

    real = importlib.metadata.distribution

    def distribution(name: str):
        if name == "train-optuna":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    (tmp_path / "space.yaml").write_text(TINY_SPACE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert main(["search", "--space", "space.yaml", "--study", "s", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not installed in this Python: run `pip install -e .`" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
