"""After the trials: stitched full-image rescoring of the top K on the validation images, panels."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from segcore.data import Dataset
from segcore.device import pick_device
from segcore.errors import UserError
from segcore.files import write_text
from segcore.infer import evaluate
from segcore.pictures import prediction_panel
from segsearch.artifacts import attach, detach, listed, open_store
from segsearch.checkpoints import checkpoints, kept_trials, load_checkpoint
from segsearch.internals import trial_id
from segsearch.promote import with_interval
from segsearch.study import open_study, reports_dir, study_splits

PANEL_IMAGES = 3  # prediction pictures per rescored trial


def score(
    name: str, url: str, top_k: int | None = None, progress: bool = True, panels: bool = True,
    device: str | None = None,
) -> dict:  # fmt: skip
    """Stitched full-image mIoU of the top-K trials and the warm start (kept_trials) on the
    validation images (and their prediction pictures, unless `panels` is false)."""
    study, space = open_study(name, url)
    dev = pick_device(device)
    store = open_store(study)
    found = checkpoints(study)
    top = [t for t in kept_trials(study, top_k or space.top_k) if trial_id(t) in found]
    if not top:
        raise UserError(f"--study {name!r}: no completed trial with a checkpoint to score yet")
    val_set = study_splits(study, space).val
    keep = {f"trial-{t.number}-" for t in top}
    for old in (reports_dir(name) / "panels").glob("trial-*.png"):  # trials no longer rescored
        if not any(old.name.startswith(k) for k in keep):
            old.unlink()
    scores = {}
    shown: dict[int, np.ndarray] = {}  # the panel images' probabilities, kept from scoring

    def remember(i: int, probs: torch.Tensor) -> None:
        if panels and i < PANEL_IMAGES:
            shown[i] = probs.cpu().numpy()

    for t in top:
        model, payload = load_checkpoint(study, t, store, dev)
        shown.clear()
        scored = val_set.normalized(payload["normalization"])
        result = evaluate(model, scored, payload["config"], progress=progress, on_image=remember)
        scores[str(t.number)] = {"patch_miou": t.value, **with_interval(result)}
        if panels:
            attach_panels(study, t, shown, payload, scored, result["miou"], store)
    study.set_user_attr("full_image_scores", scores)
    study.set_user_attr("promotion", None)  # the finalists follow these scores: promote again
    write_text(reports_dir(name) / "scores.json", json.dumps(scores, indent=2) + "\n")
    return scores


def attach_panels(
    study, trial, probs: dict[int, np.ndarray], payload, val_set: Dataset, miou: float, store
) -> None:
    """Prediction panels of the first validation images (`probs`: index -> class probabilities):
    trial artifacts and reports/NAME/panels/."""
    for tid, key, meta in listed(study):  # rescoring replaces the old pictures
        if tid == trial_id(trial) and meta.get("filename", "").startswith("prediction-"):
            detach(study, key, meta["artifact_id"], store)
    panels = reports_dir(study.study_name) / "panels"
    names = ", ".join(payload["classes"])
    for i in sorted(probs):
        image, name = val_set.images[i], val_set.names[i]
        title = f"trial {trial.number}: validation full-image mIoU {miou:.4f} ({names}) - {name}"
        path = panels / f"trial-{trial.number}-{name}.png"
        prediction_panel(path, image, probs[i], payload["classes"], payload["palette"],
                         val_set.masks[i], title=title)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            upload = Path(tmp) / f"prediction-{name}.png"
            upload.write_bytes(path.read_bytes())
            attach(study, trial_id(trial), upload, store, "image/png")
