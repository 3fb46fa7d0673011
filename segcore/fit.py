"""Train one configuration, score it on whole images and save the model file: what `train` does."""

from __future__ import annotations

from pathlib import Path

import torch

from segcore.config import TrialConfig
from segcore.data import Dataset, split
from segcore.files import save_model
from segcore.infer import evaluate
from segcore.model import build_model
from segcore.train import train


def fit(
    cfg: TrialConfig, dataset: Dataset, out: str | Path, *, data_name: str,
    device: torch.device, progress: bool = True,
) -> dict:  # fmt: skip
    """Train `cfg` on its split of `dataset`, score the held-out images on whole images with
    stitched inference, and write the model file `out`; returns what it recorded there."""
    train_idx, val_idx = split(len(dataset.images), cfg.val_fraction, cfg.seed)
    train_set, val_set = dataset.subset(train_idx), dataset.subset(val_idx)
    result = train(cfg, train_set, val_set, device=device, progress=progress)
    model = build_model(cfg.arch, dataset.channels, len(dataset.classes), cfg.depth,
                        cfg.base_width, cfg.max_width)  # fmt: skip
    model.load_state_dict(result.state_dict)
    scores = evaluate(model.to(device), val_set, cfg, progress=progress)
    extra = {
        "data": data_name,
        "val_names": val_set.names,
        "train_images": len(train_idx),
        "best_epoch": result.best_epoch,
        "patch_miou": result.best_patch_miou,
        "full_image_miou": scores["miou"],
        "history": result.history,
    }
    save_model(out, result.state_dict, cfg, in_channels=dataset.channels,
               classes=dataset.classes, palette=dataset.palette, extra=extra)  # fmt: skip
    return extra
