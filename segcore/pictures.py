"""Pictures people look at: prediction panels (image, truth, prediction, where it is wrong, class
probabilities), every trial's training curves, and the accuracy/speed trade-off of a study."""

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
    image, truth = np.asarray(image), None if truth is None else np.asarray(truth)
    shown = image[:, :, 0] if image.shape[2] == 1 else image[:, :, :3]
    shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-6)
    panels = [("image", shown, "gray")]
    prediction = probs.argmax(0)
    if truth is not None:
        panels.append(("truth", colours[truth], None))
    panels.append(("prediction", colours[prediction], None))
    if truth is not None:
        errors = error_map(shown, prediction, truth)
        share = (prediction != truth).mean()
        panels.append((f"errors ({share:.1%} of pixels)", errors, None))
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


def write_prediction(
    out: Path, name: str, probs: np.ndarray, palette: list[tuple[int, int, int]], masks: str,
    probabilities: str,
) -> None:  # fmt: skip
    """What predict writes for one image (probs (K, H, W)): NAME.png in the palette's colours or
    NAME.tif class indices (uint8, uint16 past 256 classes), and with `probabilities` "tiff" or
    "npy" the class probabilities as float16 NAME_probs.tif / NAME_probs.npy; atomically."""
    from PIL import Image

    from segcore.data import colorize

    labels = probs.argmax(0)
    if masks == "png":
        mask = Image.fromarray(colorize(labels, palette))
        atomic_write(out / f"{name}.png", lambda tmp: mask.save(tmp, format="png"))
    else:
        index = labels.astype(np.uint8 if len(probs) <= 256 else np.uint16)
        _write_tiff(out / f"{name}.tif", index, "YX")
    half = probs.astype(np.float16)
    if probabilities == "tiff":
        _write_tiff(out / f"{name}_probs.tif", half, "CYX")
    elif probabilities == "npy":

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # np.save given a path would add ".npy" to it
                np.save(f, half)

        atomic_write(out / f"{name}_probs.npy", save)


def _write_tiff(path: Path, array: np.ndarray, axes: str) -> None:
    import tifffile

    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, array, metadata={"axes": axes},
                                                    compression="zlib"))  # fmt: skip


def error_map(shown: np.ndarray, prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1]: the image faded to grey, pixels predicted wrong in red."""
    grey = shown if shown.ndim == 2 else shown.mean(-1)
    errors = np.repeat((0.35 + 0.4 * grey)[..., None], 3, axis=-1)
    errors[prediction != truth] = (1.0, 0.0, 0.0)
    return errors


def _figure(width: float, height: float, columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, columns, figsize=(width, height))


def curves_plot(path: str | Path, trials: list[dict]) -> None:
    """Loss, learning rate and seconds per epoch of every trial; `trials` holds dicts with
    number, state and history (the trial's per-epoch records)."""
    plt, fig, axes = _figure(13, 3.8, 3)
    keys = [("loss", "training loss"), ("lr", "learning rate"), ("seconds", "seconds per epoch")]
    for t in trials:
        epochs = [h["epoch"] + 1 for h in t["history"]]
        style = {"lw": 1.2} if t["state"] == "COMPLETE" else {"lw": 0.8, "alpha": 0.45}
        for ax, (key, _) in zip(axes, keys):
            ax.plot(epochs, [h[key] for h in t["history"]], **style)
    for ax, (key, label) in zip(axes, keys):
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
    axes[0].set_yscale("log")
    fig.suptitle("Every trial's curves (complete: solid, pruned or failed: faint)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (ms, mIoU) no other point beats on both: faster and at least as accurate."""
    front, best = [], float("-inf")
    for ms, miou in sorted(points, key=lambda p: (p[0], -p[1])):
        if miou > best:
            front.append((ms, miou))
            best = miou
    return front


def tradeoff_plot(path: str | Path, trials: list[dict], limit_ms: float | None,
                  winner: int | None) -> None:  # fmt: skip
    """Validation patch mIoU against stitched inference ms per image for every measured trial:
    trained ones as dots, those over the space's limits (pruned untrained) as crosses on the
    floor, the feasible front as a line, the limit and the winner marked."""
    plt, fig, ax = _figure(7.5, 4.5)
    trained = [t for t in trials if t["value"] is not None and t["feasible"]]
    over = [t for t in trials if not t["feasible"]]
    floor = min([t["value"] for t in trained], default=0.0)
    ax.scatter([t["infer_ms"] for t in trained], [t["value"] for t in trained], s=22,
               c=["tab:blue" if t["state"] == "COMPLETE" else "tab:gray" for t in trained],
               label="trials (grey: pruned, at their last epoch)")  # fmt: skip
    if over:
        ax.scatter([t["infer_ms"] for t in over], [floor] * len(over), marker="x", c="tab:red",
                   label="over the limits (pruned untrained)")  # fmt: skip
    front = pareto_front([(t["infer_ms"], t["value"]) for t in trained if t["state"] == "COMPLETE"])
    if front:
        # rings on the steps: a front of one trial shows too
        ax.step(*zip(*front), where="post", c="tab:green", marker="o", mfc="none", ms=9,
                label="feasible front")  # fmt: skip
    if limit_ms is not None:
        ax.axvline(limit_ms, c="tab:red", ls="--", lw=1, label=f"max_infer_ms {limit_ms:g}")
    for t in trained:
        if t["number"] == winner:
            ax.scatter([t["infer_ms"]], [t["value"]], marker="*", s=220, c="gold",
                       edgecolors="k", zorder=5, label=f"winner (trial {winner})")  # fmt: skip
    ax.set_xlabel("stitched inference, ms per validation image")
    ax.set_ylabel("validation patch mIoU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
