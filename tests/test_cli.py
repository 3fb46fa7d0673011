"""The command line end to end, as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli
from PIL import Image

# real processes: `pytest -m "not slow"` skips them; one xdist worker runs the module, so
# its session fixture (a search or a trained model) is made once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cli")]

ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": 2, "base_width": 4, "max_width": 16, "patch_size": 32, "batch_size": 4,
        "epochs": 2, "steps_per_epoch": 3, "val_patches_per_image": 4, "aug_strength": 0.5}  # fmt: skip


def run(*args, ok=True, cwd=None):
    """`python train_optuna.py ARGS` started from scratch: the interpreter, every import."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_optuna.py"), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=300, check=False, cwd=cwd,
    )  # fmt: skip
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def forked(*args, ok=True, cwd=None):
    """The same in a process forked from the tests' server (helpers.py), for the commands after
    the model is made: the fresh interpreter is run by `data` and `train` above."""
    return cli(cwd or ROOT, *args, check=ok)


@pytest.fixture(scope="session")  # once per xdist worker, whatever the test order
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    run("data", "--out", tmp / "data", "--n", 5, "--height", 64, "--width", 48, "--seed", 3)
    (tmp / "cfg.json").write_text(json.dumps(TINY))
    out = run("train", "--config", tmp / "cfg.json", "--data", tmp / "data", "--out",
              tmp / "m.pt", "--quiet")  # fmt: skip
    assert "test mIoU" in out.stdout and "on 1 test images" in out.stdout
    return tmp


def test_data_train_evaluate_json(trained):
    out = forked("evaluate", "--model", trained / "m.pt", "--data", trained / "data", "--json")
    scores = json.loads(out.stdout)
    assert scores["images"] == 5
    assert scores["miou"] == pytest.approx(hand_miou(trained / "m.pt", trained / "data"), abs=1e-9)
    assert set(scores["per_class"]) == {"background", "line", "ellipse"}
    # the model's own test image, from the data folder it recorded (5 images: 3 / 1 / 1)
    held = json.loads(forked("evaluate", "--model", trained / "m.pt", "--json", "--split",
                          "test").stdout)  # fmt: skip
    payload = torch.load(trained / "m.pt", weights_only=True)
    assert held["images"] == 1 and held["split"] == "test"
    assert held["miou"] == payload["extra"]["test"]["miou"]  # what training measured, again


def hand_miou(model_path, folder) -> float:
    """mIoU over every pixel of the folder, counted here with numpy from the model's stitched
    predictions: an independent check of evaluate's figure, not a range."""
    from segcore.data import load_folder
    from segcore.files import load_model
    from segcore.infer import predict_probs, prepare

    model, meta = load_model(model_path, torch.device("cpu"))
    model = prepare(model, torch.device("cpu"))  # as evaluate does (tests/test_infer.py checks it)
    cfg, data = meta["config"], load_folder(folder).normalized(meta["normalization"])
    inter, union = np.zeros(3), np.zeros(3)
    for image, mask in zip(data.images, data.masks):
        pred = predict_probs(model, image, tile=cfg.tile, overlap=cfg.tile_overlap,
                             gaussian=cfg.gaussian, tta=cfg.tta).argmax(0).numpy()  # fmt: skip
        for k in range(3):
            inter[k] += np.sum((pred == k) & (mask == k))
            union[k] += np.sum((pred == k) | (mask == k))
    present = union > 0
    return float(np.mean(inter[present] / union[present]))


def test_model_file_loads_with_weights_only(trained):
    payload = torch.load(trained / "m.pt", weights_only=True)
    assert payload["classes"] == ["background", "line", "ellipse"]
    assert payload["config"]["depth"] == 2
    split = payload["extra"]["split"]
    assert [len(split[k]) for k in ("train", "validation", "test")] == [3, 1, 1]
    assert not set(split["test"]) & set(split["train"] + split["validation"])


def test_predict_writes_masks_in_palette_and_overlays(trained):
    forked("predict", "--model", trained / "m.pt", "--images", trained / "data", "--out",
        trained / "pred", "--quiet")  # fmt: skip
    for i in range(5):
        mask = np.array(Image.open(trained / "pred" / f"Img_{i}.png"))
        assert mask.shape == (64, 48, 3)
        colours = {tuple(c) for c in mask.reshape(-1, 3)}
        assert colours <= {(0, 0, 0), (255, 0, 0), (0, 255, 0)}
        overlay = np.array(Image.open(trained / "pred" / f"Img_{i}_overlay.png"))
        assert overlay.std() > 10  # a real picture, not blank
    # a plain folder of images (no masks) works too
    forked("predict", "--model", trained / "m.pt", "--images", trained / "data" / "images",
        "--out", trained / "pred2", "--quiet")  # fmt: skip
    assert len(list((trained / "pred2").glob("*_overlay.png"))) == 5


def test_train_accepts_best_config_file(trained):
    best = {"config": {**TINY, "epochs": 1}, "study": "s", "trial": 0}
    (trained / "best.json").write_text(json.dumps(best))
    forked("train", "--config", trained / "best.json", "--data", trained / "data", "--out",
        trained / "m2.pt", "--quiet")  # fmt: skip
    assert torch.load(trained / "m2.pt", weights_only=True)["config"]["epochs"] == 1


def _evil(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(path.parent / "pwned"),))

    torch.save({"format": Evil()}, path)  # a real torch archive that carries code


# The full table of bad inputs runs in-process in tests/test_bad_input.py; these few go through a
# real process, to show what a user sees there: one line, exit status 2, no traceback.
@pytest.mark.parametrize(
    "args,message",
    [
        (["evaluate", "--model", "{t}/evil.pt"], "evil.pt: not a safe model file"),
        (["train", "--config", "{t}/bad.json", "--out", "{t}/x.pt"], "field 'depth'"),
        (["data", "--out", "{t}/d3", "--bogus"], "unrecognized arguments: --bogus"),
        (["search", "--space", "{q}", "--study", "../up"], "no path separators or '..'"),
    ],
)
def test_errors_are_one_line_exit_2_and_write_nothing(trained, args, message):
    (trained / "bad.json").write_text(json.dumps({**TINY, "depth": 9}))
    _evil(trained / "evil.pt")
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    quick = ROOT / "search_spaces" / "quick.yaml"
    proc = forked(*[a.format(t=trained, q=quick) for a in args], ok=False, cwd=trained)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before
    assert not (trained / "pwned").exists()


def test_a_folder_without_labels_json_is_scored_with_the_models_classes(trained, tmp_path):
    """The test folder a microscopist brings often lacks labels.json: its colours are decoded
    with the model's mapping, so each class keeps its figure (sorted colours would swap line
    and ellipse here: red sorts after green)."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(trained / "data", bare)
    (bare / "labels.json").unlink()
    full = json.loads(forked("evaluate", "--model", trained / "m.pt", "--data", trained / "data",
                             "--json").stdout)  # fmt: skip
    again = json.loads(forked("evaluate", "--model", trained / "m.pt", "--data", bare,
                              "--json").stdout)  # fmt: skip
    assert again["per_class"] == full["per_class"] and again["miou"] == full["miou"]
    # a colour the model does not know is refused, naming the file and the colour
    mask = np.array(Image.open(bare / "masks" / "Mask_0.png"))
    mask[0, 0] = (7, 8, 9)
    Image.fromarray(mask).save(bare / "masks" / "Mask_0.png")
    proc = forked("evaluate", "--model", trained / "m.pt", "--data", bare, ok=False)
    assert proc.returncode == 2 and "Mask_0.png" in proc.stderr and "(7, 8, 9)" in proc.stderr


def test_predict_writes_tiff_class_indices_and_probabilities(trained):
    import tifffile

    forked("predict", "--model", trained / "m.pt", "--images", trained / "data", "--out",
           trained / "pred-tif", "--masks", "tiff", "--probabilities", "tiff", "--quiet")  # fmt: skip
    forked("predict", "--model", trained / "m.pt", "--images", trained / "data", "--out",
           trained / "pred-npy", "--probabilities", "npy", "--quiet")  # fmt: skip
    palette = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]  # background, line, ellipse
    for i in range(5):
        index = tifffile.imread(trained / "pred-tif" / f"Img_{i}.tif")
        probs = tifffile.imread(trained / "pred-tif" / f"Img_{i}_probs.tif")
        assert index.dtype == np.uint8 and index.shape == (64, 48)
        assert probs.dtype == np.float16 and probs.shape == (3, 64, 48)
        assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
        top2 = np.sort(probs, axis=0)[-2:]
        clear = top2[1] > top2[0]  # rounding to float16 keeps the order, but may make a tie
        assert clear.mean() > 0.9 and np.array_equal(probs.argmax(0)[clear], index[clear])
        colours = np.array(Image.open(trained / "pred-npy" / f"Img_{i}.png"))
        assert np.array_equal(colours, np.array(palette, np.uint8)[index])  # the same prediction
        assert np.array_equal(np.load(trained / "pred-npy" / f"Img_{i}_probs.npy"), probs)


def test_check_data_prints_the_fingerprint(trained):
    out = forked("check", "--data", trained / "data").stdout
    assert "5 images, 1 channel(s), uint8" in out
    assert "min 64x48, median 64x48, max 64x48" in out
    for name in ("background", "line", "ellipse"):
        assert f"class {name}: " in out
