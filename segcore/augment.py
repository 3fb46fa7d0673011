"""Augmentation: a batchgenerators pipeline built from one strength knob in [0, 1]."""

from __future__ import annotations

import math

from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import (
    GaussianBlurTransform,
    GaussianNoiseTransform,
)
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

# One knob, k = 2 * strength: probabilities are nnU-Net's times k (capped at 1), ranges widen
# linearly around 1 with k. Strength 0.5 (k = 1) is nnU-Net's 2-D default pipeline.
#
# | transform                 | strength 0 | strength 0.5 (nnU-Net 2-D) | strength 1             |
# |---------------------------|------------|----------------------------|------------------------|
# | crop supplied by loader   | P          | spatial_margin (~2 P)      | spatial_margin (~2.6 P)|
# | rotation                  | off        | p 0.2, angle -pi..pi       | p 0.4, angle -pi..pi   |
# | scale (>1 = zoom out)     | off        | p 0.2, (0.7, 1.4)          | p 0.4, (0.4, 1.8)      |
# | gaussian noise            | off        | p 0.1, variance (0, 0.1)   | p 0.2, variance (0, 0.2)|
# | gaussian blur             | off        | p 0.2, sigma (0.5, 1.0)    | p 0.4, sigma (0.5, 1.5)|
# | brightness (multiply)     | off        | p 0.15, (0.75, 1.25)       | p 0.3, (0.5, 1.5)      |
# | contrast                  | off        | p 0.15, (0.75, 1.25)       | p 0.3, (0.5, 1.5)      |
# | simulate low resolution   | off        | p 0.25, zoom (0.5, 1)      | p 0.5, zoom (0.25, 1)  |
# | gamma of inverted image   | off        | p 0.1, (0.7, 1.5)          | p 0.2, (0.4, 2.0)      |
# | gamma                     | off        | p 0.3, (0.7, 1.5)          | p 0.6, (0.4, 2.0)      |
# | mirror                    | off        | each axis p 0.5            | each axis p 0.5        |
#
# Below strength 0.5 the rotation range also narrows (k * pi), so weak settings stay gentle.
# Low-resolution zoom widens geometrically (0.5 ** k) because a linear 1 - 0.5 k hits 0 at k = 2.

# Extra pixels on each side of the crop so order-3 splines near the edge of the view are not
# pulled towards the constant (0) border.
_SPLINE_PAD = 3


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"aug_strength: must be in [0, 1], got {strength}")


def spatial_margin(strength: float, patch_size: int) -> int:
    """Side S of the square crop (S >= P) the loader supplies; SpatialTransform crops it to P."""
    _check_strength(strength)
    if strength == 0:
        return patch_size
    max_scale = 1 + 0.4 * (2 * strength)
    # batchgenerators multiplies the sampling grid by the scale, so the largest view is the
    # zoomed-out one turned by 45 degrees: offsets up to (P - 1) / 2 * sqrt(2) * max_scale.
    size = math.ceil((patch_size - 1) * math.sqrt(2) * max_scale) + 1 + 2 * _SPLINE_PAD
    # Same parity as P keeps the centre crop and the rotation centre on whole pixels.
    return size + (size - patch_size) % 2


def build_transforms(strength: float, patch_size: int) -> Compose | None:
    """Pipeline {'data': (B, C, S, S), 'seg': (B, 1, S, S)} -> (B, C, P, P), (B, 1, P, P)."""
    _check_strength(strength)
    if strength == 0:
        return None
    k = 2 * strength

    def p(p_nnunet: float) -> float:
        return min(1.0, p_nnunet * k)

    def around_one(below: float, above: float) -> tuple[float, float]:
        return (1 - below * k, 1 + above * k)

    angle = math.pi * min(1.0, k)
    gamma_range = around_one(0.3, 0.5)
    return Compose(
        [
            SpatialTransform(
                (patch_size, patch_size),
                do_elastic_deform=False,
                do_rotation=True,
                angle_x=(-angle, angle),
                p_rot_per_sample=p(0.2),
                do_scale=True,
                scale=around_one(0.3, 0.4),
                p_scale_per_sample=p(0.2),
                border_mode_data="constant",
                border_cval_data=0,
                order_data=3,
                border_mode_seg="constant",
                border_cval_seg=0,
                order_seg=0,
                # The loader already chose the position; this only centre-crops its larger crop.
                random_crop=False,
            ),
            GaussianNoiseTransform(noise_variance=(0, 0.1 * k), p_per_sample=p(0.1)),
            GaussianBlurTransform(
                (0.5, 0.5 + 0.5 * k),
                different_sigma_per_channel=True,
                p_per_sample=p(0.2),
                p_per_channel=0.5,
            ),
            BrightnessMultiplicativeTransform(around_one(0.25, 0.25), p_per_sample=p(0.15)),
            ContrastAugmentationTransform(around_one(0.25, 0.25), p_per_sample=p(0.15)),
            SimulateLowResolutionTransform(
                zoom_range=(0.5**k, 1),
                per_channel=True,
                p_per_channel=0.5,
                order_downsample=0,
                order_upsample=3,
                p_per_sample=p(0.25),
            ),
            GammaTransform(
                gamma_range,
                invert_image=True,
                per_channel=True,
                retain_stats=True,
                p_per_sample=p(0.1),
            ),
            GammaTransform(
                gamma_range,
                invert_image=False,
                per_channel=True,
                retain_stats=True,
                p_per_sample=p(0.3),
            ),
            MirrorTransform(axes=(0, 1)),
        ]
    )
