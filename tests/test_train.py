from __future__ import annotations

import pytest
import torch

from segcore.config import TrialConfig
from segcore.errors import DivergedError
from segcore.model import build_model
from segcore.patches import validation_patches
from segcore.synthetic import synthetic_dataset
from segcore.train import lr_factor, patch_miou, train

torch.set_num_threads(1)

TINY = {"depth": 2, "base_width": 4, "max_width": 16, "patch_size": 32, "batch_size": 4,
        "steps_per_epoch": 4}  # fmt: skip


@pytest.fixture(scope="module")
def data():
    ds = synthetic_dataset(5, seed=0, height=64, width=48)
    return ds.subset([0, 1, 2, 3]), ds.subset([4])


def test_on_epoch_history_and_best_weights(data):
    cfg = TrialConfig(**TINY, epochs=3, lr=0.05, aug_strength=0.5)
    seen = []
    result = train(cfg, *data, on_epoch=lambda e, m: seen.append((e, m)), progress=False)
    assert [e for e, _ in seen] == [0, 1, 2]
    assert len({m for _, m in seen}) > 1  # a real measurement each epoch, not a constant
    assert [h["patch_miou"] for h in result.history] == [m for _, m in seen]
    assert result.best_patch_miou == max(m for _, m in seen)
    assert seen[result.best_epoch][1] == result.best_patch_miou
    # the kept weights are the best epoch's: they score that epoch's patch mIoU again
    model = build_model("unet", 1, 3, 2, 4, 16)
    model.load_state_dict(result.state_dict)
    val = data[1].normalized(result.norm)
    vx, vy = validation_patches(val.images, val.masks, patch_size=32, per_image=8, seed=0)
    again = patch_miou(model, torch.from_numpy(vx), torch.from_numpy(vy), 3)
    assert again == pytest.approx(result.best_patch_miou, abs=1e-9)


def test_same_seed_same_training(data):
    cfg = TrialConfig(**TINY, epochs=1, aug_strength=0.5, seed=3)
    a = train(cfg, *data, progress=False)
    b = train(cfg, *data, progress=False)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_callback_exception_stops_training(data):
    class Stop(Exception):
        pass

    def prune(epoch, miou):
        if epoch == 1:
            raise Stop

    cfg = TrialConfig(**TINY, epochs=5)
    with pytest.raises(Stop):
        train(cfg, *data, on_epoch=prune, progress=False)


def test_divergence_raises(data):
    cfg = TrialConfig(**TINY, epochs=2, lr=1e8, aug_strength=0)
    with pytest.raises(DivergedError, match="loss became nan"):
        train(cfg, *data, progress=False)


def test_adamw_and_dice_and_unet3plus_train(data):
    cfg = TrialConfig(**TINY, epochs=1, optimizer="adamw", lr=1e-3, loss="ce+dice",
                      arch="unet3plus", schedule="poly")  # fmt: skip
    result = train(cfg, *data, progress=False)
    assert result.best_epoch == 0 and result.history[0]["loss"] > 0


def test_lr_schedules():
    assert [lr_factor("step", s, 10) for s in (0, 4, 5, 9)] == [1, 1, 0.1, 0.1]
    assert lr_factor("poly", 0, 10) == 1 and lr_factor("poly", 9, 10) < 0.2
    assert lr_factor("constant", 9, 10) == 1


def test_resumed_training_ends_with_the_same_weights(data, tmp_path):
    """Stopped after epoch 1 and resumed from the saved state (through a file, as a worker
    does), training ends exactly where an uninterrupted run ends (CPU, in-process batches)."""

    class Stop(Exception):
        pass

    cfg = TrialConfig(**TINY, epochs=4, lr=0.05, aug_strength=0.5, schedule="poly")
    whole = train(cfg, *data, progress=False)
    saved = tmp_path / "resume.pt"

    def save(state):
        torch.save(state, saved)

    def stop_after_1(epoch, miou):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, *data, on_epoch=stop_after_1, on_saved=save, progress=False)
    state = torch.load(saved, weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    resumed = train(cfg, *data, resume=state, progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert [h["patch_miou"] for h in resumed.history] == [h["patch_miou"] for h in whole.history]
    assert resumed.best_epoch == whole.best_epoch
    for name, tensor in whole.state_dict.items():
        assert torch.equal(tensor, resumed.state_dict[name]), name


def test_a_percentile_fit_records_its_normalisation_in_the_model(data, tmp_path):
    """normalization: percentile is fitted on the training images, and the model file carries
    the fitted low/high that evaluate and predict apply."""
    import numpy as np

    from segcore.data import normalization_for
    from segcore.files import load_model, save_model

    cfg = TrialConfig(**TINY, epochs=1, aug_strength=0.0, normalization="percentile")
    result = train(cfg, *data, progress=False)
    assert result.norm == normalization_for("percentile", data[0])
    assert result.norm.mode == "percentile" and result.norm.low[0] < result.norm.high[0]
    save_model(tmp_path / "m.pt", result.state_dict, cfg, in_channels=1, labels=data[0].labels,
               norm=result.norm)  # fmt: skip
    _, meta = load_model(tmp_path / "m.pt", torch.device("cpu"))
    assert meta["normalization"] == result.norm
    image = data[1].normalized(meta["normalization"]).images[0]
    raw = np.asarray(data[1].raw[0], np.float32)
    expected = (raw - result.norm.low[0]) / (result.norm.high[0] - result.norm.low[0])
    assert np.allclose(np.asarray(image), expected, atol=1e-6)
