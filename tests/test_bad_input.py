"""Bad input, table-driven: each case is one line naming the file or option, exit status 2, no
traceback, and nothing created or changed on disk.

The cases run the CLI's `main` in this process (its exit code is what `sys.exit` gets) so that
thirty of them cost seconds; tests/test_cli.py runs a few of the same through a real process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcore.config import TrialConfig
from segcore.data import write_synthetic
from segcore.files import save_model
from segcore.model import build_model
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
               classes=["a", "b", "c"], palette=[(0, 0, 0), (255, 0, 0), (0, 255, 0)])  # fmt: skip
    torch.save({"format": Evil()}, tmp / "evil.pt")  # a real torch archive that carries code


def data_copy(tmp: Path, name: str) -> Path:
    """A copy of the good data folder, to break."""
    out = tmp / name
    write_synthetic(out, 4, 0, 48, 32)
    return out


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


def space(text):
    return lambda tmp: (tmp / "bad.yaml").write_text(text)


def truncated_model(tmp):
    data = (tmp / "m.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])


def depth_9(tmp):
    (tmp / "bad.json").write_text(json.dumps({"depth": 9}))


def a_study(tmp):
    """A study `x` in storage/x.db, created from space.yaml, no trial run."""
    from segcore.space import load_space
    from segcore.study import create_study

    (tmp / "storage").mkdir()
    create_study("x", f"sqlite:///{tmp}/storage/x.db", load_space(tmp / "space.yaml"), None, None)


def another_space(tmp):
    a_study(tmp)
    (tmp / "other.yaml").write_text(TINY_SPACE.replace("n_trials: 2", "n_trials: 3"))


SEARCH = ["search", "--space", "space.yaml", "--study", "x"]
GOOD_DATA = ["--data", "good"]
PG = "postgresql+psycopg://someone:hunter2@127.0.0.1:{port}/db"

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
    # search spaces
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
    # options
    ("gpus-7", None, [*SEARCH, "--gpus", "7"], "--gpus: GPU 7 does not exist"),
    ("gpus-word", None, [*SEARCH, "--gpus", "first"], "--gpus 'first': use none, all or a list"),
    ("workers-0", None, [*SEARCH, "--workers", "0"], "--workers: must be at least 1"),
    ("n-trials-0", None, [*SEARCH, "--n-trials", "0"], "--n-trials: must be at least 1"),
    ("workers-word", None, [*SEARCH, "--workers", "two"], "--workers: invalid int value"),
    ("required", None, ["train"], "the following arguments are required: --config, --out"),
    ("unknown-option", None, ["data", "--out", "d3", "--bogus"], "unrecognized arguments"),
    ("config-depth-9", depth_9, ["train", "--config", "bad.json", "--out", "x.pt"], "'depth'"),
    ("data-out-not-empty", None, ["data", "--out", "good"], "good: folder exists and is not"),
    ("top-k-0", None, ["score", "--study", "x", "--top-k", "0"], "--top-k: must be at least 1"),
    ("dashboard-host", a_study, ["dashboard", "--study", "x", "--host", "999.1.1.1"],
     "--host 999.1.1.1: cannot listen there"),
    ("port-range", None, ["dashboard", "--study", "x", "--port", "70000"], "--port 70000: must"),
]
# fmt: on


@pytest.mark.parametrize("setup,argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, setup, argv, message):
    make_base(tmp_path)
    if setup:
        setup(tmp_path)
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


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}  # fmt: skip
