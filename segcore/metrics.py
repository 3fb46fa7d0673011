"""Confusion matrix, per-class IoU and mIoU, accumulated over every pixel of a set."""

from __future__ import annotations

import numpy as np
import torch


def _flat(labels) -> torch.Tensor:
    """A label array or tensor as a flat int64 tensor; a read-only array (the memory-mapped image
    cache) is copied first, since torch warns on wrapping one and the warning lands in search logs."""
    if isinstance(labels, np.ndarray) and not labels.flags.writeable:
        labels = labels.copy()
    return torch.as_tensor(labels).reshape(-1).long()


def confusion_matrix(pred, truth, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = truth, columns = prediction, of two label arrays of one shape."""
    pred = _flat(pred)
    truth = _flat(truth).to(pred.device)  # the prediction's device
    if pred.shape != truth.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, truth {truth.numel()}")
    counts = torch.bincount(truth * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy()


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN for a class absent from both truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes present in truth or prediction (Keras MeanIoU semantics)."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")


BOOTSTRAP = 2000  # resamples: the 2.5 and 97.5 % quantiles move by under 0.0005 mIoU past this


def bootstrap_miou(
    per_image: np.ndarray, baseline: np.ndarray | None = None, resamples: int = BOOTSTRAP,
    seed: int = 0,
) -> tuple[float, float]:  # fmt: skip
    """95 % interval of the mIoU of a set of images, resampling whole images with replacement:
    `per_image` (N, K, K) holds each image's confusion matrix. With `baseline` (the same images'
    matrices for another model) the interval is of the difference mIoU - mIoU(baseline), both
    computed on the same resampled images (paired): a margin whose interval holds 0 is within
    what another draw of validation images could reverse."""
    cms = np.asarray(per_image, np.int64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(cms), size=(resamples, len(cms)))
    values = np.array([mean_iou(cms[p].sum(0)) for p in picks])
    if baseline is not None:
        base = np.asarray(baseline, np.int64)
        values -= np.array([mean_iou(base[p].sum(0)) for p in picks])
    low, high = np.nanquantile(values, [0.025, 0.975])
    return float(low), float(high)
