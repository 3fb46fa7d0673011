from __future__ import annotations

import math

import numpy as np
import pytest
from batchgenerators.transforms.color_transforms import GammaTransform
from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from segcore.augment import build_transforms, spatial_margin


def _find(compose, cls):
    return [t for t in compose.transforms if isinstance(t, cls)]


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_rejects_strength_outside_unit_interval(strength):
    with pytest.raises(ValueError, match="aug_strength"):
        build_transforms(strength, 32)
    with pytest.raises(ValueError, match="aug_strength"):
        spatial_margin(strength, 32)


def test_strength_zero_is_no_augmentation():
    assert build_transforms(0.0, 32) is None
    assert spatial_margin(0.0, 32) == 32
    assert spatial_margin(0.0, 33) == 33


def test_half_strength_is_nnunet_2d_default():
    compose = build_transforms(0.5, 48)
    (spatial,) = _find(compose, SpatialTransform)
    assert spatial.patch_size == (48, 48)
    assert not spatial.do_elastic_deform
    assert spatial.angle_x == pytest.approx((-math.pi, math.pi))
    assert spatial.p_rot_per_sample == pytest.approx(0.2)
    assert spatial.scale == pytest.approx((0.7, 1.4))
    assert spatial.p_scale_per_sample == pytest.approx(0.2)
    assert (spatial.order_data, spatial.order_seg) == (3, 0)
    assert spatial.border_mode_data == "constant"
    assert not spatial.random_crop
    (noise,) = _find(compose, GaussianNoiseTransform)
    assert noise.noise_variance == pytest.approx((0, 0.1))
    assert noise.p_per_sample == pytest.approx(0.1)
    inverted, plain = _find(compose, GammaTransform)
    assert inverted.invert_image and not plain.invert_image
    assert plain.gamma_range == pytest.approx((0.7, 1.5))
    assert (inverted.p_per_sample, plain.p_per_sample) == pytest.approx((0.1, 0.3))
    assert plain.retain_stats
    (mirror,) = _find(compose, MirrorTransform)
    assert tuple(mirror.axes) == (0, 1)


def test_full_strength_doubles_probabilities_and_widens_ranges():
    compose = build_transforms(1.0, 48)
    (spatial,) = _find(compose, SpatialTransform)
    assert spatial.p_rot_per_sample == pytest.approx(0.4)
    assert spatial.scale == pytest.approx((0.4, 1.8))
    (noise,) = _find(compose, GaussianNoiseTransform)
    assert noise.noise_variance == pytest.approx((0, 0.2))


@pytest.mark.parametrize("patch_size", [32, 33])
def test_margin_grows_with_strength_and_keeps_parity(patch_size):
    sizes = [spatial_margin(s, patch_size) for s in (0.0, 0.25, 0.5, 1.0)]
    assert sizes == sorted(sizes)
    assert all((s - patch_size) % 2 == 0 for s in sizes)
    assert sizes[-1] >= patch_size * math.sqrt(2) * 1.8


@pytest.mark.parametrize(
    "patch_size,strength,size",
    # ceil((P - 1) * sqrt(2) * (1 + 0.8 * strength)) + 1 + 2 * 3, rounded up to P's parity;
    # e.g. P 64, strength 0.5: ceil(63 * 1.4142 * 1.4) = 125, + 7 = 132, even like 64.
    [(64, 0.5, 132), (64, 1.0, 168), (32, 0.5, 70), (32, 0.25, 60), (33, 0.5, 71), (33, 1.0, 89)],
)
def test_margin_is_the_largest_rotated_scaled_view_and_no_more(patch_size, strength, size):
    assert spatial_margin(strength, patch_size) == size  # larger wastes loading and memory


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_margin_keeps_every_rotated_scaled_view_inside_the_crop(strength):
    patch = 32
    spatial = _find(build_transforms(strength, patch), SpatialTransform)[0]
    # Force every sample to rotate and scale: any sample leaving the crop would pull in zeros.
    spatial.p_rot_per_sample = spatial.p_scale_per_sample = 1.0
    size = spatial_margin(strength, patch)
    np.random.seed(0)
    out = spatial(
        data=np.ones((64, 1, size, size), np.float32), seg=np.ones((64, 1, size, size), np.float32)
    )
    assert out["data"].shape == (64, 1, patch, patch)
    np.testing.assert_allclose(out["data"], 1.0, atol=1e-3)
    assert (out["seg"] == 1).all()


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_labels_stay_whole(strength):
    patch = 16
    size = spatial_margin(strength, patch)
    rng = np.random.RandomState(0)
    seg = rng.randint(0, 3, size=(8, 1, size, size)).astype(np.float32)
    data = rng.randn(8, 2, size, size).astype(np.float32)
    np.random.seed(1)
    out = build_transforms(strength, patch)(data=data, seg=seg)
    assert out["data"].shape == (8, 2, patch, patch)
    assert set(np.unique(out["seg"])) <= {0.0, 1.0, 2.0}


_FIXED = {  # what every strength above 0 sets, by transform (the table in segcore/augment.py)
    "SpatialTransform": {"do_elastic_deform": False, "do_rotation": True, "do_scale": True,
                         "border_mode_data": "constant", "border_cval_data": 0, "order_data": 3,
                         "border_mode_seg": "constant", "border_cval_seg": 0, "order_seg": 0,
                         "random_crop": False},
    "GaussianBlurTransform": {"different_sigma_per_channel": True, "p_per_channel": 0.5},
    "SimulateLowResolutionTransform": {"per_channel": True, "p_per_channel": 0.5,
                                       "order_downsample": 0, "order_upsample": 3},
    "GammaTransform": {"per_channel": True, "retain_stats": True},
    "MirrorTransform": {"axes": (0, 1)},
}  # fmt: skip
_BY_STRENGTH = {  # strength -> the pipeline's ranges and probabilities, in order, by hand
    0.25: [  # k = 0.5: half of nnU-Net's probabilities, ranges half as wide, rotation +-pi/2
        {"p_rot_per_sample": 0.1, "angle_x": (-math.pi / 2, math.pi / 2),
         "p_scale_per_sample": 0.1, "scale": (0.85, 1.2)},
        {"noise_variance": (0, 0.05), "p_per_sample": 0.05},
        {"blur_sigma": (0.5, 0.75), "p_per_sample": 0.1},
        {"multiplier_range": (0.875, 1.125), "p_per_sample": 0.075},
        {"contrast_range": (0.875, 1.125), "p_per_sample": 0.075},
        {"zoom_range": (0.5**0.5, 1), "p_per_sample": 0.125},
        {"gamma_range": (0.85, 1.25), "invert_image": True, "p_per_sample": 0.05},
        {"gamma_range": (0.85, 1.25), "invert_image": False, "p_per_sample": 0.15},
        {},
    ],
    1.0: [  # k = 2: twice nnU-Net's probabilities, ranges twice as wide, rotation +-pi
        {"p_rot_per_sample": 0.4, "angle_x": (-math.pi, math.pi), "p_scale_per_sample": 0.4,
         "scale": (0.4, 1.8)},
        {"noise_variance": (0, 0.2), "p_per_sample": 0.2},
        {"blur_sigma": (0.5, 1.5), "p_per_sample": 0.4},
        {"multiplier_range": (0.5, 1.5), "p_per_sample": 0.3},
        {"contrast_range": (0.5, 1.5), "p_per_sample": 0.3},
        {"zoom_range": (0.25, 1), "p_per_sample": 0.5},
        {"gamma_range": (0.4, 2.0), "invert_image": True, "p_per_sample": 0.2},
        {"gamma_range": (0.4, 2.0), "invert_image": False, "p_per_sample": 0.6},
        {},
    ],
}  # fmt: skip


@pytest.mark.parametrize("strength", sorted(_BY_STRENGTH))
def test_every_transform_setting_follows_the_table(strength):
    compose = build_transforms(strength, 40)
    for transform, rows in zip(compose.transforms, _BY_STRENGTH[strength], strict=True):
        name = type(transform).__name__
        for key, value in {**_FIXED.get(name, {}), **rows}.items():
            got = getattr(transform, key)
            assert got == pytest.approx(value) and type(got) is type(value), (name, key, got)
