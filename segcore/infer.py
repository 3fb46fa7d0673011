"""Stitched (sliding-window) inference of whole images of any size, full-image scoring, and the
model prepared once for both."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segcore.device import autocast_for, memory_format_for
from segcore.metrics import confusion_matrix, iou_per_class, mean_iou


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Evenly spaced tile offsets covering [0, length): neighbours overlap by at least `overlap`."""
    if length <= tile:
        return [0]
    step = tile * (1 - overlap)
    count = math.ceil((length - tile) / max(step, 1)) + 1
    spacing = (length - tile) / (count - 1)
    return [round(i * spacing) for i in range(count)]


def gaussian_weights(tile: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """(tile, tile) weights peaking at the centre: a Gaussian of sigma = tile / 8 along each
    axis, floored at 1e-3 so that a tile's border still counts where no other tile reaches (the
    definition MONAI's sliding_window_inference uses for mode="gaussian": the tests check that
    both stitch alike)."""
    x = torch.arange(tile, dtype=torch.float32) - (tile - 1) / 2
    g = torch.exp(-0.5 * (x / (tile * sigma_scale)) ** 2)
    return (g[:, None] * g[None, :]).clamp_min(1e-3)


def prepare(
    model: torch.nn.Module, device: torch.device, layout: torch.memory_format | None = None
) -> torch.nn.Module:
    """A copy of `model` ready for inference on `device`: eval mode, every convolution followed
    by batch norm folded into one convolution (outputs within 1e-4 of the plain model), in the
    memory layout that is faster there (segcore.device; `layout` overrides, for benchmarks).
    Rescoring, the final fit's scoring, `evaluate`, `predict`, the cost measurement and
    bench/infer.py all go through it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Sequential):
            for i in range(len(module) - 1):
                conv, norm = module[i], module[i + 1]
                if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                    module[i], module[i + 1] = fuse_conv_bn_eval(conv, norm), torch.nn.Identity()
    return model.to(device, memory_format=layout or memory_format_for(device))


class Ensemble(torch.nn.Module):
    """Several models of the same classes whose stitched probabilities are averaged (a model
    file with members: segcore.files); each member tiles an image with its own config."""

    def __init__(self, models: Sequence[torch.nn.Module], configs: Sequence) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(models)
        self.configs = list(configs)


def stitched(model: torch.nn.Module, images: Sequence[np.ndarray], cfg) -> Iterator[torch.Tensor]:
    """Probabilities (K, H, W) of each image in turn, with the model prepared once (prepare):
    the one loop of rescoring, the final fit's scoring, `evaluate` and `predict`. An Ensemble
    averages its members' probabilities, each stitched with its own config (not `cfg`).
    torch.compile is not used: on the project's CPU (AVX-512 with bf16) the compiled prepared
    model measured 1.00-1.05x the eager one after 10-23 s of compiling, which would pay only
    after thousands of images (docs/benchmarks.md, bench/infer.py --compiled)."""
    device = next(model.parameters()).device
    pairs = zip(model.members, model.configs) if isinstance(model, Ensemble) else [(model, cfg)]
    ready = [(prepare(m, device), c) for m, c in pairs]
    for image in images:
        probs = [predict_probs(m, image, tile=c.tile, overlap=c.tile_overlap, gaussian=c.gaussian,
                               tta=c.tta) for m, c in ready]  # fmt: skip
        yield probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)


def layout_of(model: torch.nn.Module) -> torch.memory_format:
    """The memory layout of a model's 4-D weights, which its inputs should share."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            if p.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
            return torch.contiguous_format
    return torch.contiguous_format


def tile_batch(model: torch.nn.Module, tile: int, device: torch.device) -> int:
    """Tiles per forward pass: all of an image's tiles on a GPU; on the CPU a batch whose first
    feature map holds about 3 M values (45 tiles of 64 at width 16, 11 at width 64): with the
    channels_last model bench/infer.py found 38-72 tiles best at width 16 and 9-16 at width 64
    (with the plain layout larger batches fell out of cache, and 1 M was best)."""
    budget = 2e8 if device.type == "cuda" else 3e6
    return max(1, int(budget // (tile * tile * model.widths[0])))


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    tile: int,
    overlap: float = 0.5,
    gaussian: bool = False,
    tta: bool = False,
    batch: int | None = None,
) -> torch.Tensor:
    """Softmax probabilities (K, H, W) float32 of one (H, W, C) image, stitched from tiles.

    Tiles go through the model in batches of `batch` (default: tile_batch); overlapping
    probabilities are averaged (constant or Gaussian weights); flip TTA averages 4 views.
    Images smaller than a tile are zero-padded (zero is the mean after z-scoring).
    """
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))).to(device)
    h, w = x.shape[1:]
    pad_h, pad_w = max(0, tile - h), max(0, tile - w)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    H, W = x.shape[1:]
    batch = batch or tile_batch(model, tile, device)
    boxes = [(y, x0) for y in tile_starts(H, tile, overlap) for x0 in tile_starts(W, tile, overlap)]
    weight = (
        gaussian_weights(tile).to(device) if gaussian else torch.ones(tile, tile, device=device)
    )
    out, norm = None, torch.zeros(H, W, device=device)
    memory_format = layout_of(model)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        tiles = torch.stack([x[:, y : y + tile, x0 : x0 + tile] for y, x0 in chunk])
        tiles = tiles.contiguous(memory_format=memory_format)
        probs = _tile_probs(model, tiles, tta, device)
        if out is None:
            out = torch.zeros(probs.shape[1], H, W, device=device)
        for (y, x0), p in zip(chunk, probs):
            out[:, y : y + tile, x0 : x0 + tile] += p * weight
            norm[y : y + tile, x0 : x0 + tile] += weight
    return (out / norm)[:, :h, :w]


def _tile_probs(model, tiles: torch.Tensor, tta: bool, device: torch.device) -> torch.Tensor:
    """Softmax of a batch of tiles (float32), averaged over flips when tta is on."""
    flips = [(), (2,), (3,), (2, 3)] if tta else [()]
    total = None
    with autocast_for(device):
        for dims in flips:
            view = tiles.flip(dims) if dims else tiles
            p = torch.softmax(model(view).float(), dim=1)
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
    return total / len(flips)


def evaluate(model: torch.nn.Module, dataset, cfg, progress: bool = False, on_image=None) -> dict:
    """Full-image stitched mIoU and per-class IoU over every pixel of a labelled data set, and
    each image's confusion matrix ("confusion", for bootstrap intervals: metrics.bootstrap_miou).
    `on_image(index, probs)`, if given, sees each image's class probabilities (C, H, W)."""
    from segcore.progress import progress as shown

    k = len(dataset.classes)
    per_image = []
    pairs = enumerate(zip(stitched(model, dataset.images, cfg), dataset.masks))
    for i, (probs, mask) in shown(pairs, len(dataset.images), "score", "images", progress):
        per_image.append(confusion_matrix(probs.argmax(0), mask, k))
        if on_image is not None:
            on_image(i, probs)
    cm = np.sum(per_image, axis=0) if per_image else np.zeros((k, k), np.int64)
    iou = iou_per_class(cm)
    return {
        "miou": mean_iou(cm),
        "per_class": {
            name: (None if np.isnan(v) else float(v)) for name, v in zip(dataset.classes, iou)
        },
        "images": len(dataset.images),
        "confusion": [c.tolist() for c in per_image],
    }
