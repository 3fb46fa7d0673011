from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.infer import predict_probs, tile_starts
from segcore.model import build_model

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


def test_matches_monai_sliding_window(model):
    from monai.inferers import sliding_window_inference

    # 96 x 64 with tile 32 and overlap 0.5: MONAI's offsets (0, 16, ...) equal ours
    image = np.random.RandomState(1).randn(96, 64, 1).astype(np.float32)
    assert tile_starts(96, 32, 0.5) == list(range(0, 65, 16))
    ours = predict_probs(model, image, tile=32, overlap=0.5, batch=7)
    x = torch.from_numpy(image.transpose(2, 0, 1))[None]
    with torch.no_grad():
        theirs = sliding_window_inference(
            x, (32, 32), 4, lambda t: torch.softmax(model(t), 1), overlap=0.5, mode="constant"
        )[0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_gaussian_tta_and_small_image(model):
    small = np.random.RandomState(2).randn(20, 12, 1).astype(np.float32)
    probs = predict_probs(model, small, tile=32, gaussian=True, tta=True)
    assert probs.shape == (3, 20, 12)
    assert torch.allclose(probs.sum(0), torch.ones(20, 12), atol=1e-5)


def test_tta_is_flip_equivariant(model):
    image = np.random.RandomState(3).randn(64, 64, 1).astype(np.float32)
    a = predict_probs(model, image, tile=32, tta=True)
    b = predict_probs(model, np.ascontiguousarray(image[::-1]), tile=32, tta=True)
    assert torch.allclose(a, b.flip(1), atol=1e-5)
