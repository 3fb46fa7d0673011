"""Train one configuration for use, score it on the test images, save the model file.

What `train` does and what the search's final fit does: trials only choose; this makes the
model that is handed over, and its test mIoU is measured on images nothing chose from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segcore.config import TrialConfig
from segcore.device import precision_for
from segcore.files import save_model
from segcore.infer import evaluate
from segcore.model import build_model
from segcore.split import Splits
from segcore.train import train


def fit(
    cfg: TrialConfig, splits: Splits, out: str | Path, *, sources: dict[str, Any],
    device: torch.device, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Train `cfg` on its training images (with cfg.train_on "train+val", the validation images
    too, keeping the last epoch; else the epoch of best validation patch mIoU), score the test
    images with stitched inference, write the model file `out`; returns what it recorded there
    (`sources`: where the images came from, recorded as they are)."""
    if cfg.train_on == "train+val":
        result = train(cfg, splits.train.join(splits.val), None, device=device, progress=progress)
    else:
        result = train(cfg, splits.train, splits.val, device=device, progress=progress)
    model = build_model(cfg.arch, splits.train.channels, len(splits.train.classes), cfg.depth,
                        cfg.base_width, cfg.max_width)  # fmt: skip
    model.load_state_dict(result.state_dict)
    test = evaluate(model.to(device), splits.test.normalized(result.norm), cfg, progress=progress)
    extra = {
        **sources,
        "split": splits.names(),
        "train_on": cfg.train_on,
        "kept_epoch": result.best_epoch,
        "validation_patch_miou": result.best_patch_miou,
        "test": test,
        "history": result.history,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "precision": precision_for(device),
    }
    save_model(out, result.state_dict, cfg, in_channels=splits.train.channels,
               labels=splits.train.labels, norm=result.norm, extra=extra)  # fmt: skip
    return extra
