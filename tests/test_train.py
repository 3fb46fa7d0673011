from __future__ import annotations

import copy
import logging
import re

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


def test_seeding_covers_python_numpy_and_torch():
    import random

    import numpy as np

    from segcore.train import seed_everything

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first
    seed_everything(4)
    assert all(a != b for a, b in zip(draws(), first))


def test_lr_schedules_exactly():
    assert [lr_factor("step", s, 9) for s in (0, 3, 4, 8)] == [1.0, 1.0, 0.1, 0.1]  # 9 // 2 = 4
    assert lr_factor("poly", 5, 10) == pytest.approx(0.5**0.9)
    assert lr_factor("poly", 0, 10) == 1.0 and lr_factor("other", 5, 10) == 1.0


def test_optimizers_are_built_as_the_config_says():
    from segcore.train import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(TrialConfig(lr=0.02, weight_decay=1e-4), params)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["lr"] == 0.02 and sgd.defaults["momentum"] == 0.9
    assert sgd.defaults["weight_decay"] == 1e-4
    adamw = make_optimizer(TrialConfig(optimizer="adamw", lr=3e-4, weight_decay=0.05), params)
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["lr"] == 3e-4 and adamw.defaults["weight_decay"] == 0.05


def test_the_loss_is_cross_entropy_plus_soft_dice_over_the_batch():
    """Dice: per class over the whole batch, (2 I + 1e-5) / (sum p + sum onehot + 1e-5), mean
    over classes, 1 minus it added to the cross-entropy."""
    import numpy as np

    from segcore.train import seg_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=gen)
    target = torch.randint(0, 3, (2, 4, 5), generator=gen)
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert seg_loss(logits, target, "ce") == ce
    p = logits.softmax(1).numpy()
    onehot = np.stack([(target.numpy() == c) for c in range(3)], 1).astype(np.float32)
    inter, denom = (p * onehot).sum((0, 2, 3)), p.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
    assert float(seg_loss(logits, target, "ce+dice")) == pytest.approx(float(ce) + 1 - dice)
    absent = target.clamp(max=1)  # the last class in no pixel: still three classes of Dice
    onehot = np.stack([(absent.numpy() == c) for c in range(3)], 1).astype(np.float32)
    inter, denom = (p * onehot).sum((0, 2, 3)), p.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
    ce = torch.nn.functional.cross_entropy(logits, absent)
    assert float(seg_loss(logits, absent, "ce+dice")) == pytest.approx(float(ce) + 1 - dice)


def test_a_step_returns_the_loss_it_took_and_moves_the_weights():
    from segcore.device import autocast_for, grad_scaler
    from segcore.train import make_optimizer, seg_loss, train_step

    torch.manual_seed(0)
    model = build_model("unet", 1, 3, 1, 4, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16))
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast_for(cpu):  # the step's precision (bf16 where the CPU has it)
        expected = float(seg_loss(model(x), y, "ce+dice"))
    optimizer = make_optimizer(TrialConfig(lr=0.1), model.parameters())
    loss = train_step(model, optimizer, grad_scaler(cpu), (x, y), "ce+dice", cpu)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_defaults_a_bar_zscore_the_width_cap_and_the_schedule(data, capsys):
    """train() shows progress unless told not to; normalises with z-scores unless the config
    says percentile; caps widths at max_width; steps the learning rate as the schedule says."""
    from segcore.data import ZSCORE

    cfg = TrialConfig(**{**TINY, "max_width": 8}, epochs=2, schedule="step", lr=0.05)
    result = train(cfg, *data)
    err = capsys.readouterr().err
    assert "train: 8/8 steps (100%)" in err
    lines = [line for line in err.splitlines() if line.startswith("epoch")]
    pattern = r"epoch {}/2: loss \d\.\d{{4}}, validation patch mIoU 0\.\d{{4}}, \d+\.\d s"
    assert len(lines) == 2
    assert all(re.fullmatch(pattern.format(e), line) for e, line in zip((1, 2), lines))
    assert all(float(line.split(", ")[-1][:-2]) < 60 for line in lines)  # this epoch's seconds
    assert all(0 <= h["seconds"] < 60 for h in result.history)
    assert result.norm == ZSCORE
    assert max(t.shape[0] for t in result.state_dict.values() if t.ndim == 4) == 8
    assert [h["lr"] for h in result.history] == [0.05 * 0.1, 0.05 * 0.1]  # 4 < 8 // 2 is false


def test_without_validation_images_the_last_epoch_is_kept(data):
    cfg = TrialConfig(**TINY, epochs=2)
    seen = []
    result = train(cfg, data[0], None, on_epoch=lambda e, m: seen.append(e), progress=False)
    assert result.best_epoch == 1 and result.best_patch_miou is None and seen == []
    assert [h["patch_miou"] for h in result.history] == [None, None]


def test_resuming_a_finished_training_returns_its_best(data, capsys):
    """A state saved after the last epoch: nothing left to train, the best so far returned as
    it was saved, and the bar starts where the state left off."""
    states = []
    cfg = TrialConfig(**TINY, epochs=2, normalization="percentile")
    whole = train(cfg, *data, on_saved=states.append, progress=False)
    resumed = train(cfg, *data, resume=states[-1])
    assert resumed.best_epoch == whole.best_epoch and resumed.norm == whole.norm
    assert resumed.best_patch_miou == whole.best_patch_miou and resumed.history == whole.history
    assert all(torch.equal(whole.state_dict[k], v) for k, v in resumed.state_dict.items())
    assert "train:" not in capsys.readouterr().err  # 8 of 8 steps done before: no new line


def test_a_resume_without_the_stream_state_draws_a_fresh_reproducible_stream(data, monkeypatch):
    """Augmentation processes cannot replay their stream: a resume of such a state (batches
    None) draws a new one, seeded from the trial's seed and the epoch (not the first epoch's
    batches again), the same on every resume."""
    import segcore.train

    seeds = []
    plain = segcore.train.train_batches

    def recorded(*args, **kwargs):
        seeds.append(kwargs["seed"])
        assert kwargs["processes"] == 3  # the config's augmentation processes
        return plain(*args, **{**kwargs, "processes": 0})

    monkeypatch.setattr(segcore.train, "train_batches", recorded)
    states = []
    cfg = TrialConfig(**TINY, epochs=2, seed=5, aug_processes=3)
    train(cfg, *data, on_saved=states.append, progress=False)
    state = {**states[0], "batches": None}
    a = train(cfg, *data, resume=copy.deepcopy(state), progress=False)  # as read from its file
    b = train(cfg, *data, resume=copy.deepcopy(state), progress=False)
    assert seeds[0] == 5 and seeds[1] == seeds[2] != 5 and isinstance(seeds[1], int)
    assert all(torch.equal(a.state_dict[k], v) for k, v in b.state_dict.items())


def test_the_configured_loss_is_trained_and_each_epoch_is_logged_without_a_bar(data, caplog):
    one_step = {**TINY, "steps_per_epoch": 1}
    with caplog.at_level(logging.INFO, logger="segcore.train"):
        ce = train(TrialConfig(**one_step, epochs=1, loss="ce"), data[0], None, progress=False)
    (said,) = [r.getMessage() for r in caplog.records if r.name == "segcore.train"]
    assert re.fullmatch(r"epoch 1/1: loss \d\.\d{4}, \d+\.\d s", said)  # no mIoU: no images
    dice = train(TrialConfig(**one_step, epochs=1, loss="ce+dice"), data[0], None, progress=False)
    assert dice.history[0]["loss"] > ce.history[0]["loss"]  # the same first batch, plus 1 - Dice


def test_a_resumed_bar_starts_where_the_state_left_off(data, capsys):
    states = []
    cfg = TrialConfig(**TINY, epochs=2)
    train(cfg, *data, on_saved=states.append, progress=False)
    train(cfg, *data, resume=copy.deepcopy(states[0]))
    assert "train: 8/8 steps (100%)" in capsys.readouterr().err  # 4 done before, 4 now
