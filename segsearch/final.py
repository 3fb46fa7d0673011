"""What a search hands over: the winner, its best-config JSON, and the final fit (best.pt).

The winner is the finalist with the best full-image mIoU on the validation images at the final
budget (segsearch.promote; the warm start where that lead is inside the validation noise), or,
without a promotion stage, the rescored trial with the best one at the trial budget. The final
fit trains its config with the space's `final:` overrides (or, when those train on the training
images only, keeps the finalist's model, which is exactly that) and scores it once on the test
images, which nothing in the search has read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch

from segcore.config import TrialConfig
from segcore.errors import UserError
from segcore.files import atomic_write, load_model, save_model, write_text
from segcore.fit import fit
from segcore.infer import Ensemble, evaluate
from segsearch.artifacts import fetch, open_store
from segsearch.checkpoints import WARM_START, checkpoints
from segsearch.internals import trial_id
from segsearch.notes import write_notes
from segsearch.promote import decide, finalist_path, ranked
from segsearch.space import Space, final_config
from segsearch.study import open_study, reports_dir, study_splits


def winner(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, dict, dict]:
    """The finalist with the best validation full-image mIoU at the final budget (the warm start
    where that lead over it is inside the noise: promote.decide), else the rescored trial with
    the best one at the trial budget (ties: the earlier); with its scores and how sure the choice
    is (promote.choice_noise)."""
    promoted = study.user_attrs.get("promotion")
    scores = promoted or study.user_attrs.get("full_image_scores")
    if not scores:
        name = study.study_name
        raise UserError(f"--study {name!r}: no full-image scores yet; run `score --study {name}`")
    number, noise = decide(scores, warm_start_number(study), bool(promoted))
    return study.trials[number], scores[str(number)], noise


def best_record(study: optuna.Study, space: Space) -> dict[str, Any]:
    """best.json: what `train --config` needs to reproduce best.pt (the final config, the data
    folders, the split, the seed, the thread count, the precision), the winner's validation
    figures, and the final model's test figures once it is fitted."""
    trial, best, noise = winner(study)
    promoted = bool(study.user_attrs.get("promotion"))
    final = study.user_attrs.get("final") or {}
    fitted = final.get("trial") == trial.number
    cfg = final_config(TrialConfig.from_dict(trial.user_attrs["config"]), space)
    if fitted and final.get("config"):  # what best.pt trained (a budget in seconds as steps)
        cfg = TrialConfig.from_dict(final["config"], "study final")
    return {
        "config": cfg.to_dict(),
        "study": study.study_name,
        "trial": trial.number,
        "data": study.user_attrs.get("data"),
        "test_data": study.user_attrs.get("test_data"),
        "split": study.user_attrs.get("split"),
        "seed": cfg.seed,
        "threads": final.get("threads") if fitted else None,
        "precision": final.get("precision") if fitted else None,
        "validation": {
            "patch_miou": trial.value,
            "full_image_miou": best["miou"],
            "per_class": best["per_class"],
            "images": best["images"],
            "budget": ("promotion" if space.promote else "final") if promoted else "trial",
            "noise": noise,
        },
        "test": final.get("test") if fitted else None,
        "ensemble": final.get("ensemble") if fitted else None,
        "test_single": final.get("test_single") if fitted else None,
        "model": str(reports_dir(study.study_name) / "best.pt") if fitted else None,
        "params": trial.params,
        "versions": {"torch": torch.__version__, "optuna": optuna.__version__},
    }


def export(name: str, url: str, out: str | Path | None = None, model: str | Path | None = None):
    """Write best.json (default reports/NAME/best.json); with `model`, also the winner trial's
    own checkpoint as a model file (no training). Returns the best.json path."""
    study, space = open_study(name, url)
    record = best_record(study, space)
    if model is not None:
        found = checkpoints(study).get(trial_id(study.trials[record["trial"]]))
        if found is None:
            raise UserError(f"--model: trial {record['trial']}'s checkpoint is no longer kept")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.pt"
            fetch(open_store(study), found[1], path)
            atomic_write(model, lambda dst: shutil.copyfile(path, dst))
    path = Path(out) if out else reports_dir(name) / "best.json"
    write_text(path, json.dumps(record, indent=2) + "\n")
    write_notes(study, record)
    return path


def final_fit(name: str, url: str, *, device: torch.device, progress: bool = True) -> dict:
    """Train the winner's final config, score it on the test images, write reports/NAME/best.pt
    and best.json; returns what the model file records."""
    study, space = open_study(name, url)
    trial, _, _ = winner(study)
    cfg = final_config(TrialConfig.from_dict(trial.user_attrs["config"]), space)
    splits = study_splits(study, space)
    out = reports_dir(name) / "best.pt"
    finalist = finalist_path(name, trial.number)
    if space.ensemble > 1:
        done = ensemble_finalists(name, study, space.ensemble, out, splits, device, progress)
    elif (study.user_attrs.get("promotion") and cfg.train_on == "train" and not space.promote
          and finalist.is_file()):  # fmt: skip
        done = keep_finalist(finalist, out, splits, device, progress)
    else:
        sources = {"data": study.user_attrs.get("data"),
                   "test_data": study.user_attrs.get("test_data"), "study": name,
                   "trial": trial.number}  # fmt: skip
        done = fit(cfg, splits, out, sources=sources, device=device, progress=progress,
                   state=out.with_suffix(".state.pt"))  # fmt: skip
    study.set_user_attr("final", {
        "trial": trial.number, "test": done["test"], "threads": done["threads"],
        "device": done["device"], "precision": done["precision"], "train_on": done["train_on"],
        "kept_epoch": done["kept_epoch"], "kept_finalist": done.get("kept_finalist", False),
        "ensemble": done.get("ensemble"), "test_single": done.get("test_single"),
        "config": torch.load(out, map_location="cpu", weights_only=True)["config"],
    })  # fmt: skip
    export(name, url)
    return done


def keep_finalist(
    finalist: Path, out: Path, splits, device: torch.device, progress: bool
) -> dict[str, Any]:
    """best.pt as the promoted finalist's own model (the final config trained on the training
    images: what a refit would train again), scored once on the test images."""
    model, payload = load_model(finalist, device)
    cfg = payload["config"]
    test = evaluate(model, splits.test.normalized(payload["normalization"]), cfg,
                    progress=progress)  # fmt: skip
    extra = {**payload["extra"], "test": test, "kept_finalist": True}
    save_model(out, payload["state_dict"], cfg, in_channels=splits.train.channels,
               labels=payload["labels"], norm=payload["normalization"], extra=extra)  # fmt: skip
    return extra


def ensemble_finalists(
    name: str, study: optuna.Study, n: int, out: Path, splits, device: torch.device, progress: bool
) -> dict[str, Any]:  # fmt: skip
    """best.pt as the winner's and the next best `n - 1` finalists' own models in one file (an
    Ensemble: their stitched probabilities averaged), scored once on the test images; the winner
    alone is scored there too ("test_single"), so that what the ensemble adds is measured, not
    assumed."""
    scores = study.user_attrs.get("promotion") or {}
    if len(scores) < n:
        raise UserError(f"--study {name}: final.ensemble {n} needs {n} promoted finalists; "
                        f"run `promote --study {name}`")  # fmt: skip
    first = str(winner(study)[0].number)  # the best, or the warm start kept (promote.decide)
    numbers = [first, *[k for k in ranked(scores) if k != first]][:n]
    loaded = [load_model(finalist_path(name, int(k)), device) for k in numbers]
    test_set = splits.test.normalized(loaded[0][1]["normalization"])
    single = evaluate(loaded[0][0], test_set, loaded[0][1]["config"], progress=progress)
    models, payloads = zip(*loaded)
    norms = [p["normalization"].to_dict() for p in payloads]
    if any(norm != norms[0] for norm in norms):
        raise UserError(f"--study {name}: final.ensemble: finalists {', '.join(numbers)} "
                        f"normalise their input differently; do not search normalization")  # fmt: skip
    test = evaluate(Ensemble(models, [p["config"] for p in payloads]), test_set,
                    payloads[0]["config"], progress=progress)  # fmt: skip
    head = payloads[0]
    extra = {**head["extra"], "test": test, "test_single": single, "kept_finalist": True,
             "ensemble": [int(k) for k in numbers]}  # fmt: skip
    save_model(out, head["state_dict"], head["config"], in_channels=splits.train.channels,
               labels=head["labels"], norm=head["normalization"], extra=extra,
               members=[(p["state_dict"], p["config"]) for p in payloads[1:]])  # fmt: skip
    return extra


def warm_start_number(study: optuna.Study) -> int | None:
    warm = [t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get(WARM_START)]
    return warm[0] if warm else None
