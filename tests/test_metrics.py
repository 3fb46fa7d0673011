from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from segcore.metrics import confusion_matrix, iou_per_class, mean_iou


def test_hand_computed_table():
    truth = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = confusion_matrix(pred, truth, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert np.allclose(iou_per_class(cm), [1 / 3, 2 / 3, 1 / 2])
    assert math.isclose(mean_iou(cm), (1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_class_absent_from_truth_and_prediction_is_left_out():
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    cm = confusion_matrix(pred, truth, 4)
    iou = iou_per_class(cm)
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    assert math.isclose(mean_iou(cm), (1 / 2 + 2 / 3) / 2)


def test_class_only_predicted_counts_as_zero():
    truth = np.array([0, 0, 0, 0])
    pred = np.array([0, 0, 0, 2])
    iou = iou_per_class(confusion_matrix(pred, truth, 3))
    assert iou[2] == 0 and np.isnan(iou[1])
    assert math.isclose(mean_iou(confusion_matrix(pred, truth, 3)), (3 / 4 + 0) / 2)


def test_accumulates_over_all_pixels_not_per_image_mean():
    a = confusion_matrix(np.array([1, 1]), np.array([1, 1]), 2)  # perfect, class 1 only
    b = confusion_matrix(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), 2)
    total = a + b
    # class 0: tp 3, fp 0, fn 1 -> 3/4; class 1: tp 2, fp 1 -> 2/3
    assert math.isclose(mean_iou(total), (3 / 4 + 2 / 3) / 2)
    assert not math.isclose(mean_iou(total), (mean_iou(a) + mean_iou(b)) / 2)


def test_no_pixels_of_any_class_is_nan_and_mismatched_sizes_are_refused():
    """An empty confusion matrix has no IoU (nan, not 0 or an error); a prediction and a truth
    of different sizes are refused, naming both pixel counts."""
    assert math.isnan(mean_iou(np.zeros((3, 3), np.int64)))
    with pytest.raises(ValueError, match="^prediction has 4 pixels, truth 6$"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)


def test_bootstrap_interval_of_images_and_of_a_paired_margin():
    from segcore.metrics import bootstrap_miou

    a = np.array([[90, 10], [5, 95]])
    b = np.array([[50, 50], [40, 60]])
    # the same image twice: every resample is that image, the interval is its mIoU
    assert bootstrap_miou([a, a]) == pytest.approx((mean_iou(a), mean_iou(a)))
    # two images: resamples are aa, ab, ba, bb (a quarter each), so the 95 % interval spans
    # from both-bad to both-good
    low, high = bootstrap_miou([a, b])
    assert (low, high) == pytest.approx((mean_iou(2 * b), mean_iou(2 * a)))
    # a margin against the model itself is exactly 0; a model better on every image has a
    # margin interval above 0; better on one image and worse on the other: 0 is inside
    assert bootstrap_miou([a, b], baseline=[a, b]) == (0.0, 0.0)
    assert bootstrap_miou([a, a], baseline=[b, b])[0] > 0
    low, high = bootstrap_miou([a, b], baseline=[b, a])
    assert low < 0 < high


def test_bootstrap_intervals_are_reproducible_and_seeded():
    """The report's intervals are the same on every run (seed 0 unless given)."""
    from segcore.metrics import bootstrap_miou

    rng = np.random.default_rng(5)
    cms = rng.integers(0, 100, (12, 3, 3))
    once = bootstrap_miou(cms, resamples=200)
    assert bootstrap_miou(cms, resamples=200) == once == bootstrap_miou(cms, None, 200, 0)
    assert bootstrap_miou(cms, None, 200, 1) != once


def test_read_only_labels_are_counted_without_a_warning_in_the_log():
    # the decoded-image cache is memory-mapped read-only; torch warns once per process about
    # wrapping such an array, a line that used to land in every search log
    truth = np.array([[0, 1], [2, 2]])
    truth.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = confusion_matrix(truth.copy(), truth, 3)
    assert cm.trace() == 4 and not truth.flags.writeable
