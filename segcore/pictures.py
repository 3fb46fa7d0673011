"""Pictures people look at: the prediction panel (image, truth, prediction, class probabilities)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segcore.files import atomic_write


def prediction_panel(
    path: str | Path,
    image: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    palette: list[tuple[int, int, int]],
    truth: np.ndarray | None = None,
    title: str = "",
) -> None:
    """Write a PNG: input, truth (if known), prediction, then one probability map per class.

    image (H, W, C) float (any scale), probs (K, H, W) in [0, 1], truth (H, W) labels or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = np.asarray(palette, dtype=np.uint8)
    shown = image[:, :, 0] if image.shape[2] == 1 else image[:, :, :3]
    shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-6)
    panels = [("image", shown, "gray")]
    if truth is not None:
        panels.append(("truth", colours[truth], None))
    panels.append(("prediction", colours[probs.argmax(0)], None))
    panels += [(f"p({name})", p, "magma") for name, p in zip(classes, probs)]
    h, w = image.shape[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels) * w / max(h, w) + 0.5, 2.6))
    for ax, (name, data, cmap) in zip(np.atleast_1d(axes), panels):
        ax.imshow(data, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
