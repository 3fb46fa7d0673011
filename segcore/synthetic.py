"""The synthetic data set: images of the same kind as `shapes`, drawn from a seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from segcore.data import Dataset, colorize
from segcore.errors import UserError
from segcore.labels import Labels

SYNTHETIC_CLASSES = ["background", "line", "ellipse"]
SYNTHETIC_PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


def ellipse_mask(yy, xx, cy: float, cx: float, a: float, b: float, theta: float) -> np.ndarray:
    """Pixels of the grid (yy, xx) inside an ellipse; clipped at the edges, never wrapped."""
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def synthetic_pair(rng: np.random.RandomState, height: int = 400, width: int = 200):
    """One grey image (H, W) uint8 and its labels (H, W) int64: ellipses, then lines over them.

    Fixes two bugs of the reference generator: the line count is drawn on its own (it reused the
    ellipse count), and ellipses are clipped at the image edge (they wrapped around it).
    """
    mean = rng.uniform(180, 225)
    noise = rng.normal(mean, 22, size=(height, width))
    bad = (noise < 153) | (noise > 254)
    while bad.any():  # truncated Gaussian: redraw out-of-range pixels
        noise[bad] = rng.normal(mean, 22, size=int(bad.sum()))
        bad = (noise < 153) | (noise > 254)
    image, labels = noise, np.zeros((height, width), np.int64)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)

    def box(top: float, bottom: float, left: float, right: float) -> tuple[slice, slice]:
        """The grid's rows and columns that can hold a shape within these bounds: each pixel is
        computed as on the whole grid, only the pixels surely outside are skipped."""
        rows = slice(max(0, int(np.floor(top)) - 1), max(0, int(np.ceil(bottom)) + 2))
        return rows, slice(max(0, int(np.floor(left)) - 1), max(0, int(np.ceil(right)) + 2))

    for _ in range(rng.randint(3, 13)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        a, b, theta = rng.uniform(4, 25), rng.uniform(4, 16), rng.uniform(0, np.pi)
        r = max(a, b)
        at = box(cy - r, cy + r, cx - r, cx + r)
        inside = ellipse_mask(yy[at], xx[at], cy, cx, a, b, theta)
        image[at][inside], labels[at][inside] = rng.randint(0, 180), 2
    for _ in range(rng.randint(2, 11)):
        y0, x0 = rng.uniform(0, height), rng.uniform(0, width)
        length, angle = rng.uniform(15, 220), rng.uniform(0, np.pi)
        y1, x1 = y0 + length * np.sin(angle), x0 + length * np.cos(angle)
        half = rng.uniform(0.7, 2.5)
        at = box(min(y0, y1) - half, max(y0, y1) + half, min(x0, x1) - half, max(x0, x1) + half)
        ys, xs = yy[at], xx[at]
        # distance from each pixel to the segment
        t = ((ys - y0) * (y1 - y0) + (xs - x0) * (x1 - x0)) / (length**2)
        t = np.clip(t, 0, 1)
        dist = np.hypot(ys - (y0 + t * (y1 - y0)), xs - (x0 + t * (x1 - x0)))
        on = dist <= half
        image[at][on], labels[at][on] = rng.randint(0, 140), 1
    return np.clip(np.round(image), 0, 255).astype(np.uint8), labels


def synthetic_arrays(n: int, seed: int, height: int = 400, width: int = 200):
    """n (image uint8 (H, W), labels (H, W)) pairs, fully determined by seed."""
    rng = np.random.RandomState(seed)
    return [synthetic_pair(rng, height, width) for _ in range(n)]


def synthetic_dataset(n: int = 100, seed: int = 0, height: int = 400, width: int = 200) -> Dataset:
    """The default data set when no --data is given: generated in memory from a fixed seed."""
    pairs = synthetic_arrays(n, seed, height, width)
    names = [f"Img_{i}" for i in range(n)]
    labels = Labels.plain(SYNTHETIC_CLASSES, SYNTHETIC_PALETTE)
    return Dataset([img[:, :, None] for img, _ in pairs], [m.astype(np.uint8) for _, m in pairs],
                   names, labels)  # fmt: skip


def write_synthetic(
    out: str | Path, n: int, seed: int, height: int = 400, width: int = 200
) -> None:
    """Write a synthetic data set in the folder format: RGB PNGs, colour masks, labels.json."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: folder exists and is not empty")
    pairs = synthetic_arrays(n, seed, height, width)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted earlier run left
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    for i, (img, labels) in enumerate(pairs):
        Image.fromarray(np.repeat(img[:, :, None], 3, axis=2)).save(tmp / "images" / f"Img_{i}.png")
        Image.fromarray(colorize(labels, SYNTHETIC_PALETTE)).save(tmp / "masks" / f"Mask_{i}.png")
    labels_json = {"classes": SYNTHETIC_CLASSES, "colors": [list(c) for c in SYNTHETIC_PALETTE]}
    (tmp / "labels.json").write_text(json.dumps(labels_json, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
