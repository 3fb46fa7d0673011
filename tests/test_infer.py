from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segcore.data import Dataset, Normalization
from segcore.infer import predict_probs, tile_starts
from segcore.labels import Labels
from segcore.model import build_model

UNCHANGED = Normalization("percentile", (0.0,), (1.0,))  # (x - 0) / (1 - 0): the images as given

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("unet", 1, 3, depth=2, base_width=4, max_width=16).eval()
    return m


@pytest.mark.parametrize(
    "length,tile,overlap",
    [(400, 64, 0.5), (200, 64, 0.5), (64, 64, 0.5), (100, 32, 0.25), (97, 16, 0.75), (20, 32, 0.5)],
)
def test_tile_starts_cover_evenly(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if length >= tile:
        assert starts[-1] == length - tile
    gaps = np.diff(starts)
    assert all(g <= tile * (1 - overlap) + 1e-9 for g in gaps)  # overlap at least as asked
    if len(gaps):
        assert gaps.max() - gaps.min() <= 1  # evenly spaced


def test_every_pixel_covered_and_probabilities_sum_to_one(model):
    image = np.random.RandomState(0).randn(70, 45, 1).astype(np.float32)
    probs = predict_probs(model, image, tile=32, overlap=0.5)
    assert probs.shape == (3, 70, 45)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(0), torch.ones(70, 45), atol=1e-5)


@pytest.mark.usefixtures("fp32")
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_matches_monai_sliding_window(model, mode):
    """MONAI's sliding_window_inference is an independent stitcher: with the same tile offsets
    (96 x 64, tile 32, overlap 0.5: 0, 16, ...) both give the same probabilities, with uniform
    and with Gaussian tile weights (sigma = tile / 8)."""
    from monai.inferers import sliding_window_inference

    image = np.random.RandomState(1).randn(96, 64, 1).astype(np.float32)
    assert tile_starts(96, 32, 0.5) == list(range(0, 65, 16))
    ours = predict_probs(model, image, tile=32, overlap=0.5, batch=7, gaussian=mode == "gaussian")
    x = torch.from_numpy(image.transpose(2, 0, 1))[None]
    with torch.no_grad():
        theirs = sliding_window_inference(
            x, (32, 32), 4, lambda t: torch.softmax(model(t), 1), overlap=0.5, mode=mode,
            sigma_scale=0.125,
        )[0]  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.usefixtures("fp32")
def test_prepared_model_gives_the_plain_models_outputs():
    """Batch norm folded into the convolutions, in the inference layout: within 1e-4 of the
    plain model in eval mode, with batch norm statistics far from the identity."""
    from segcore.infer import prepare

    torch.manual_seed(4)
    plain = build_model("unet", 1, 3, depth=3, base_width=8, max_width=32)
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.3, 3)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    plain.eval()
    ready = prepare(plain, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ready.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())  # a copy
    image = np.random.RandomState(5).randn(80, 72, 1).astype(np.float32)
    for kwargs in ({}, {"gaussian": True, "tta": True}):
        a = predict_probs(plain, image, tile=32, **kwargs)
        b = predict_probs(ready, image, tile=32, **kwargs)
        assert (a - b).abs().max() < 1e-4


def test_gaussian_tta_and_small_image(model):
    small = np.random.RandomState(2).randn(20, 12, 1).astype(np.float32)
    probs = predict_probs(model, small, tile=32, gaussian=True, tta=True)
    assert probs.shape == (3, 20, 12)
    assert torch.allclose(probs.sum(0), torch.ones(20, 12), atol=1e-5)


@pytest.mark.usefixtures("fp32")
def test_tta_is_flip_equivariant(model):
    image = np.random.RandomState(3).randn(64, 64, 1).astype(np.float32)
    a = predict_probs(model, image, tile=32, tta=True)
    b = predict_probs(model, np.ascontiguousarray(image[::-1]), tile=32, tta=True)
    assert torch.allclose(a, b.flip(1), atol=1e-5)


def test_evaluate_scores_with_the_configs_stitching(model):
    """Full-image scoring (rescoring, the final fit, `evaluate`) stitches as the config says:
    its tile size, overlap, Gaussian weights and TTA reach predict_probs, and its mIoU and
    per-class IoU are those of the argmax of exactly those probabilities (counted here)."""
    from segcore.config import TrialConfig
    from segcore.infer import evaluate, prepare

    rng = np.random.RandomState(3)
    images = [rng.randn(48, 40, 1).astype(np.float32) for _ in range(2)]
    masks = [rng.randint(0, 3, (48, 40)) for _ in range(2)]
    labels = Labels.plain(["bg", "line", "ellipse"], [(0, 0, 0)] * 3)
    data = Dataset(images, masks, ["a", "b"], labels, norm=UNCHANGED)
    cfg = TrialConfig(patch_size=32, tile_size=16, tile_overlap=0.25, gaussian=True, tta=True)
    seen = {}
    out = evaluate(model, data, cfg, on_image=lambda i, p: seen.__setitem__(i, p))
    ready = prepare(model, torch.device("cpu"))
    inter, union = np.zeros(3), np.zeros(3)
    for i, (image, mask) in enumerate(zip(images, masks)):
        expected = predict_probs(ready, image, tile=16, overlap=0.25, gaussian=True, tta=True)
        assert torch.allclose(seen[i], expected, atol=1e-6), i  # same stitching settings
        for other in ({"gaussian": False}, {"tta": False}, {"overlap": 0.5}, {"tile": 32}):
            settings = {"tile": 16, "overlap": 0.25, "gaussian": True, "tta": True, **other}
            assert not torch.allclose(seen[i], predict_probs(ready, image, **settings)), other
        pred = expected.argmax(0).numpy()
        for c in range(3):
            inter[c] += ((pred == c) & (mask == c)).sum()
            union[c] += ((pred == c) | (mask == c)).sum()
        # each image's confusion matrix (rows truth, columns prediction), for the bootstrap
        counted = [[int(((mask == t) & (pred == q)).sum()) for q in range(3)] for t in range(3)]
        assert out["confusion"][i] == counted
    iou = inter / union
    assert out["images"] == 2 and out["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    assert out["per_class"] == pytest.approx(dict(zip(["bg", "line", "ellipse"], iou)))
    out = evaluate(model, Dataset([], [], [], labels, norm=UNCHANGED), cfg)  # no image: no score
    assert out["images"] == 0 and out["confusion"] == [] and np.isnan(out["miou"])
    assert out["per_class"] == {"bg": None, "line": None, "ellipse": None}


def test_tile_starts_with_a_step_under_two_pixels():
    assert tile_starts(10, 2, 0.5) == list(range(9))  # step 1: every pixel a start
    assert tile_starts(6, 3, 0.5) == [0, 2, 3]  # step 1.5: three tiles, rounded offsets


def test_gaussian_weights_match_the_formula():
    from segcore.infer import gaussian_weights

    w = gaussian_weights(8)
    x = (np.arange(8) - 3.5) / (8 * 0.125)
    g = np.exp(-0.5 * x**2)
    assert w.dtype == torch.float32 and w.shape == (8, 8)
    assert np.allclose(w.numpy(), np.maximum(np.outer(g, g), 1e-3), atol=1e-7)
    assert float(gaussian_weights(64).min()) == pytest.approx(1e-3)  # the floor at the corners


def test_prepare_folds_every_conv_batch_norm_pair_and_lays_out_for_the_device():
    from segcore.infer import prepare

    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d, torch.nn.BatchNorm2d
    # a convolution not followed by batch norm stays; the pair at the end is folded
    seq = torch.nn.Sequential(conv(2, 4, 3), torch.nn.ReLU(), conv(4, 4, 3), norm(4))
    seq[3].running_mean.uniform_(-1, 1)
    x = torch.randn(1, 2, 9, 9)
    ready = prepare(seq, torch.device("cpu"))
    assert not any(isinstance(m, norm) for m in ready.modules())
    assert torch.allclose(ready(x), seq.eval()(x), atol=1e-5)
    assert ready[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = prepare(seq, torch.device("cpu"), layout=torch.contiguous_format)
    assert plain[0].weight.is_contiguous() and not plain[0].weight.is_contiguous(
        memory_format=torch.channels_last
    )
    # moved to the device asked for (the meta device stands in for a GPU here)
    assert prepare(seq, torch.device("meta"))[2].weight.device.type == "meta"


def test_layout_of_reads_the_first_weight_whose_layout_shows():
    from segcore.infer import layout_of

    def convs(*shapes):
        return torch.nn.Sequential(*[torch.nn.Conv2d(i, o, k) for i, o, k in shapes])

    assert layout_of(convs((3, 4, 3))) == torch.contiguous_format
    assert layout_of(convs((3, 4, 3)).to(memory_format=torch.channels_last)) == torch.channels_last
    # one input channel or a 1x1 kernel: both layouts have the same strides, so look further on
    lone = convs((1, 4, 3), (4, 4, 1), (4, 4, 3))
    assert layout_of(lone) == torch.contiguous_format
    lone[2].to(memory_format=torch.channels_last)
    assert layout_of(lone) == torch.channels_last
    assert layout_of(torch.nn.Linear(3, 3)) == torch.contiguous_format  # no 4-D weight
    for shape in ((2, 4, 3), (3, 4, (3, 1)), (3, 4, (1, 2))):  # the smallest that show it
        assert layout_of(convs(shape).to(memory_format=torch.channels_last)) == torch.channels_last


def test_tile_batch_budgets():
    from segcore.infer import tile_batch

    m = build_model("unet", 1, 3, depth=2, base_width=16, max_width=32)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device name needs no GPU
    assert tile_batch(m, 64, cpu) == 45  # 3e6 // (64 * 64 * 16)
    assert tile_batch(m, 64, cuda) == 3051  # 2e8 // (64 * 64 * 16)
    assert tile_batch(m, 1024, cpu) == 1  # at least one tile


def test_evaluate_reports_progress_and_null_for_an_absent_class(model, capsys):
    from segcore.config import TrialConfig
    from segcore.infer import evaluate

    rng = np.random.RandomState(1)
    images = [rng.randn(24, 24, 1).astype(np.float32) for _ in range(3)]
    masks = [np.zeros((24, 24), np.int64) for _ in range(3)]
    classes = ["bg", "line", "ellipse", "never"]  # 4 classes; the model predicts 3
    model4 = build_model("unet", 1, 4, depth=1, base_width=4, max_width=8).eval()
    with torch.no_grad():
        last = [m for m in model4.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.bias[3] = -100.0  # class 3 never predicted, never in a mask
    data = Dataset(images, masks, ["a", "b", "c"], Labels.plain(classes, [(0, 0, 0)] * 4),
                   norm=UNCHANGED)  # fmt: skip
    out = evaluate(model4, data, TrialConfig(patch_size=32, depth=1, tile_size=16), progress=True)
    assert out["per_class"]["never"] is None and out["images"] == 3
    assert "score: 3/3 images (100%)" in capsys.readouterr().err
    evaluate(model4, data, TrialConfig(patch_size=32, depth=1, tile_size=16))
    assert capsys.readouterr().err == ""  # quiet unless asked


def test_precision_is_bf16_where_the_cpu_has_it_and_the_variable_overrides_it(monkeypatch):
    from segcore import device as dev
    from segcore.errors import UserError

    cpu = torch.device("cpu")
    monkeypatch.delenv("TRAIN_OPTUNA_PRECISION", raising=False)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(dev, "cpu_has_bf16", lambda native=native: native)
        assert dev.precision_for(cpu) == expected
        assert isinstance(dev.autocast_for(cpu), torch.autocast) == (expected == "bf16")
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "bf16")
    assert dev.precision_for(cpu) == "bf16"
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "fp32")
    assert dev.precision_for(cpu) == "fp32" and not isinstance(
        dev.autocast_for(cpu), torch.autocast
    )
    with dev.computing_in("bf16"):  # the benchmarks' switch: set inside, as before after
        assert dev.precision_for(cpu) == "bf16"
    assert dev.precision_for(cpu) == "fp32"
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "fp16")
    with pytest.raises(UserError, match=r"TRAIN_OPTUNA_PRECISION=fp16: only on a CUDA device"):
        dev.pick_device("cpu")


def test_precision_per_gpu_bf16_from_compute_capability_8_else_fp16_with_a_scaler(monkeypatch):
    """The capability is faked here (no GPU in the tests); the GPU check runs it for real."""
    from segcore import device as dev

    cuda = torch.device("cuda")
    monkeypatch.delenv("TRAIN_OPTUNA_PRECISION", raising=False)
    for major, expected, dtype in ((7, "fp16", torch.float16), (8, "bf16", torch.bfloat16),
                                   (9, "bf16", torch.bfloat16)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, m=major: (m, 0))
        assert dev.precision_for(cuda) == expected
        assert dev.autocast_for(cuda).fast_dtype == dtype
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "fp32")
    assert dev.precision_for(cuda) == "fp32"
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "fp16")  # on request, even where bf16 runs
    assert dev.precision_for(cuda) == "fp16"
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "fp32")
    assert not dev.grad_scaler(torch.device("cpu")).is_enabled()


def test_a_bad_precision_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from train_optuna import main

    config = Path(__file__).resolve().parents[1] / "configs" / "cpu-shapes.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "half")
    assert main(["train", "--config", str(config), "--out", "x.pt"]) == 2
    assert capsys.readouterr().err == (
        "error: TRAIN_OPTUNA_PRECISION='half': use auto, bf16, fp16 or fp32\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_bf16_stitching_stays_close_to_float32(model, monkeypatch):
    """Under bf16 autocast the probabilities move by bf16 rounding, not more: the labels of
    nearly every pixel stay the same."""
    image = np.random.RandomState(9).randn(96, 80, 1).astype(np.float32)
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "fp32")
    a = predict_probs(model, image, tile=32, gaussian=True, tta=True)
    monkeypatch.setenv("TRAIN_OPTUNA_PRECISION", "bf16")
    b = predict_probs(model, image, tile=32, gaussian=True, tta=True)
    assert 0 < (a - b).abs().max() < 0.05
    assert (a.argmax(0) == b.argmax(0)).float().mean() > 0.98


def test_an_ensemble_model_file_averages_its_members_each_stitched_with_its_own_config(tmp_path):
    """A model file with members loads as an Ensemble; its probabilities are the mean of each
    member's, stitched with that member's tile size and TTA (not the first one's)."""
    from segcore.config import TrialConfig
    from segcore.files import load_model, save_model
    from segcore.infer import Ensemble, prepare, stitched

    labels = Labels.plain(["bg", "a", "b"], [(0, 0, 0), (255, 0, 0), (0, 255, 0)])
    first = TrialConfig(patch_size=32, depth=2, base_width=8, tta=False)
    second = TrialConfig(patch_size=16, depth=1, base_width=4, tta=True)
    torch.manual_seed(0)
    nets = [build_model(c.arch, 1, 3, c.depth, c.base_width, c.max_width) for c in (first, second)]
    save_model(tmp_path / "e.pt", nets[0].state_dict(), first, in_channels=1, labels=labels,
               norm=UNCHANGED, members=[(nets[1].state_dict(), second)])  # fmt: skip
    loaded, payload = load_model(tmp_path / "e.pt", torch.device("cpu"))
    assert isinstance(loaded, Ensemble) and payload["config"] == first
    image = np.random.RandomState(1).randn(40, 56, 1).astype(np.float32)
    (probs,) = stitched(loaded, [image], first)
    each = [predict_probs(prepare(n, torch.device("cpu")), image, tile=c.tile, tta=c.tta,
                          overlap=c.tile_overlap, gaussian=c.gaussian)
            for n, c in zip(nets, (first, second))]  # fmt: skip
    assert torch.allclose(probs, (each[0] + each[1]) / 2, atol=1e-5)
    assert not torch.allclose(probs, each[0], atol=1e-3)
    save_model(tmp_path / "one.pt", nets[0].state_dict(), first, in_channels=1, labels=labels,
               norm=UNCHANGED)  # fmt: skip
    single, _ = load_model(tmp_path / "one.pt", torch.device("cpu"))
    assert not isinstance(single, Ensemble)
