"""A data set's fingerprint before anything trains (`check --data`, and recorded in a study):
image sizes, channels, dtypes, intensity percentiles per channel, classes with their pixel
fractions and object sizes (connected components per class), and warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segcore.data import PERCENTILE_SAMPLE, Dataset
from segcore.labels import instance_like

RARE_CLASS = 0.01  # a class under this share of the pixels is worth a warning


def fingerprint(dataset: Dataset, largest_patch: int | None = None) -> dict[str, Any]:
    """What the data set holds (plain values, JSON-ready); `largest_patch`: the space's largest
    patch side, to list images smaller than it."""
    sizes = np.array([r.shape[:2] for r in dataset.raw])
    dtypes = sorted({str(r.dtype) for r in dataset.raw})
    out: dict[str, Any] = {
        "images": len(dataset.raw),
        "size_min": [int(v) for v in sizes.min(0)],
        "size_median": [int(v) for v in np.median(sizes, 0)],
        "size_max": [int(v) for v in sizes.max(0)],
        "channels": dataset.channels,
        "dtypes": dtypes,
        "intensity": _intensity(dataset),
        "masks": _mask_kind(dataset),
        "classes": _classes(dataset) if dataset.masks is not None else [],
    }
    warnings = []
    if len(dtypes) > 1:
        warnings.append(f"images mix {' and '.join(dtypes)}: percentile normalisation treats "
                        f"their values alike")  # fmt: skip
    for c in out["classes"]:
        if c["fraction"] < RARE_CLASS:
            warnings.append(f"class '{c['name']}' is {c['fraction']:.2%} of the pixels (under "
                            f"{RARE_CLASS:.0%}): loss ce+dice and fg_fraction help it")  # fmt: skip
    if dataset.masks is not None and dataset.labels.instances is None and len(dataset.classes) > 3:
        why = instance_like([(Path(n), m) for n, m in zip(dataset.names, dataset.masks)])
        if why:
            warnings.append(f"masks look like instance ids ({why}); if they are, declare "
                            f"\"instances\" in labels.json")  # fmt: skip
    if largest_patch:
        small = [n for n, s in zip(dataset.names, sizes) if min(s) < largest_patch]
        out["smaller_than_patch"] = small
        if small:
            warnings.append(f"{len(small)} image(s) smaller than the space's largest patch "
                            f"({largest_patch}): zero-padded, e.g. {small[0]}")  # fmt: skip
    out["warnings"] = warnings
    return out


def _intensity(dataset: Dataset) -> list[dict[str, float]]:
    total = sum(r.shape[0] * r.shape[1] for r in dataset.raw)
    step = max(1, int(np.sqrt(total / PERCENTILE_SAMPLE)))
    sample = np.concatenate(
        [np.asarray(r[::step, ::step]).reshape(-1, r.shape[2]) for r in dataset.raw]
    ).astype(np.float64)
    points = [0, 1, 50, 99, 99.8, 100]
    values = np.percentile(sample, points, axis=0)
    return [{f"p{p:g}": float(v) for p, v in zip(points, values[:, c])}
            for c in range(sample.shape[1])]  # fmt: skip


def _mask_kind(dataset: Dataset) -> str:
    labels = dataset.labels
    if labels.instances is not None:
        return f"instance ids, converted to {', '.join(labels.classes)}"
    return labels.known()


def _classes(dataset: Dataset) -> list[dict[str, Any]]:
    """Each class: share of all pixels, objects (8-connected pieces) and their sizes in pixels
    (median area; median, 95th percentile and largest bounding-box side)."""
    from scipy import ndimage

    k = len(dataset.classes)
    pixels = np.zeros(k, np.int64)
    areas: list[list[int]] = [[] for _ in range(k)]
    sides: list[list[int]] = [[] for _ in range(k)]
    eight = np.ones((3, 3), bool)
    for mask in dataset.masks:
        mask = np.asarray(mask)
        pixels += np.bincount(mask.ravel(), minlength=k)[:k]
        for c in range(1, k):
            pieces, n = ndimage.label(mask == c, structure=eight)
            if n:
                areas[c] += np.bincount(pieces.ravel())[1:].tolist()
                sides[c] += [max(s.stop - s.start for s in box)
                             for box in ndimage.find_objects(pieces)]  # fmt: skip
    out = []
    for c, name in enumerate(dataset.classes):
        row = {"name": name, "fraction": float(pixels[c] / max(pixels.sum(), 1))}
        if c and areas[c]:
            row.update(objects=len(areas[c]), median_area=float(np.median(areas[c])),
                       median_side=float(np.median(sides[c])),
                       p95_side=float(np.percentile(sides[c], 95)),
                       max_side=int(max(sides[c])))  # fmt: skip
        out.append(row)
    return out


def describe(fp: dict[str, Any], where: str) -> str:
    """The fingerprint as lines a person reads (check --data)."""
    size = lambda s: f"{s[0]}x{s[1]}"
    head = (f"{where}: {fp['images']} images, {fp['channels']} channel(s), "
            f"{', '.join(fp['dtypes'])}; size (HxW) min {size(fp['size_min'])}, median "
            f"{size(fp['size_median'])}, max {size(fp['size_max'])}")  # fmt: skip
    lines = [head]
    for c, p in enumerate(fp["intensity"]):
        lines.append(f"  channel {c}: " + ", ".join(f"{k} {v:.4g}" for k, v in p.items()))
    lines.append(f"  masks: {fp['masks']}")
    for row in fp["classes"]:
        objects = ""
        if "objects" in row:
            objects = (f"; {row['objects']} objects, median area {row['median_area']:.0f} px, "
                       f"side median {row['median_side']:.0f} / 95 % {row.get('p95_side', 0):.0f} / max "
                       f"{row['max_side']} px")  # fmt: skip
        lines.append(f"  class {row['name']}: {row['fraction']:.2%} of pixels{objects}")
    lines += [f"warning: {w}" for w in fp["warnings"]]
    return "\n".join(lines)
