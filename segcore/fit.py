"""Train one configuration for use, score it on the test images, save the model file.

What `train` does and what the search's final fit does: trials only choose; this makes the
model that is handed over, and its test mIoU is measured on images nothing chose from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segcore.budget import budgeted
from segcore.config import TrialConfig
from segcore.device import precision_for
from segcore.errors import UserError
from segcore.files import atomic_write, save_model
from segcore.infer import evaluate
from segcore.model import build_model
from segcore.split import Splits
from segcore.train import train


def fit(
    cfg: TrialConfig, splits: Splits, out: str | Path, *, sources: dict[str, Any],
    device: torch.device, progress: bool = True, scored: str = "test",
    state: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train `cfg` on its training images (with cfg.train_on "train+val", the validation images
    too, keeping the last epoch; else the epoch of best validation patch mIoU), score the
    `scored` images ("test", or "validation" for the promotion stage) with stitched inference,
    write the model file `out`; returns what it recorded there (`sources`: where the images came
    from, recorded as they are). With `state`, each epoch's training state is saved there
    (atomically) and a fit stopped before its end resumes from it; it is removed once `out` is
    written."""
    saved = resume_from(state, cfg)
    trained_on = splits.train.join(splits.val) if cfg.train_on == "train+val" else splits.train
    asked, (cfg, step) = cfg, budgeted(cfg, trained_on, device, saved and saved.pop("ran", None))
    step = step if step is not None else (saved or {}).pop("step_seconds", None)
    on_saved = None
    if state is not None:

        def on_saved(s: dict) -> None:
            record = {"config": asked.to_dict(), "ran": cfg.to_dict(), "step_seconds": step, **s}
            atomic_write(state, lambda tmp: torch.save(record, tmp))

    run = {"device": device, "progress": progress, "resume": saved, "on_saved": on_saved}
    val = None if cfg.train_on == "train+val" else splits.val
    result = train(cfg, trained_on, val, **run)
    model = build_model(cfg.arch, splits.train.channels, len(splits.train.classes), cfg.depth,
                        cfg.base_width, cfg.max_width)  # fmt: skip
    model.load_state_dict(result.state_dict)
    images = splits.test if scored == "test" else splits.val
    figures = evaluate(model.to(device), images.normalized(result.norm), cfg, progress=progress)
    extra = {
        **sources,
        "split": splits.names(),
        "train_on": cfg.train_on,
        "kept_epoch": result.best_epoch,
        "validation_patch_miou": result.best_patch_miou,
        scored: figures,
        "history": result.history,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "precision": precision_for(device),
        "seconds": asked.seconds or None,  # the budget asked, and the step time it became
        "step_seconds": step,
    }
    save_model(out, result.state_dict, cfg, in_channels=splits.train.channels,
               labels=splits.train.labels, norm=result.norm, extra=extra)  # fmt: skip
    if state is not None:
        state.unlink(missing_ok=True)
    return extra


def resume_from(state: Path | None, cfg: TrialConfig) -> dict | None:
    """The training state a fit of `cfg` saved in `state`, if there is one (of another config,
    or cut short: none, and the fit starts afresh)."""
    if state is None or not state.is_file():
        return None
    try:
        saved = torch.load(state, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (a file cut short by a crash is no state to resume)
        return None
    config = saved.pop("config", None)
    try:  # a state of an older version lacks the newer fields, at their defaults
        same = config is not None and TrialConfig.from_dict(config).to_dict() == cfg.to_dict()
    except UserError:
        same = False
    return saved if same else None
