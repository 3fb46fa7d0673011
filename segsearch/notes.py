"""What optuna-dashboard says about a study: the study's note (the winner and why, its test
mIoU, the split, the commands), each rescored trial's note, and the rescoring table.

Notes are markdown, saved with optuna-dashboard's `save_note`, which keeps them in the study's
system attributes, so finished trials can get theirs; it takes a live Trial, so a finished trial
is handed over as optuna.Trial(study, trial_id), a handle that changes nothing in it.
"""

from __future__ import annotations

import json

import optuna

from segsearch.checkpoints import top_trials
from segsearch.internals import trial_id
from segsearch.promote import margin_text


def _iou_table(per_class: dict[str, float | None]) -> list[str]:
    names = list(per_class)
    values = ["absent" if v is None else f"{v:.4f}" for v in per_class.values()]
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names),
            "| " + " | ".join(values) + " |"]  # fmt: skip


def trial_note(trial: optuna.trial.FrozenTrial, score: dict, ranks: tuple[int, int, int],
               winner: bool) -> str:  # fmt: skip
    """A rescored trial's note: validation figures, ranks before and after rescoring, config."""
    before, after, rescored = ranks
    title = f"## Trial {trial.number}" + (": the winner, exported" if winner else "")
    figures = (
        f"Validation full-image mIoU **{score['miou']:.4f}** on {score['images']} whole images "
        f"(stitched inference); validation patch mIoU {trial.value:.4f}."
    )
    ranking = (
        f"Rank by validation patch mIoU (the trials' own figure): **{before}**; rank by "
        f"validation full-image mIoU among the {rescored} rescored trials: **{after}**"
        + (" (this decided the winner)." if winner else ".")
    )
    caveat = (
        "Validation images chose this ranking, so these figures are optimistic; the test "
        "figure of the final model is in the study's note."
    )
    config = json.dumps(trial.user_attrs.get("config", {}), indent=1)
    return "\n".join([
        title, "", figures, "", ranking, "", "Per-class IoU on the validation images:", "",
        *_iou_table(score["per_class"]), "", caveat, "", "Config:", "", "```json", config, "```",
    ])  # fmt: skip


def study_note(study: optuna.Study, record: dict) -> str:
    """The study's note: the winner and why, its test mIoU, the split, what to run next."""
    name, split, model = study.study_name, record.get("split") or {}, record["model"]
    sizes = ", ".join(f"{len(split.get(k, []))} {k}" for k in ("train", "validation", "test"))
    v, test = record["validation"], record["test"]
    among = {"final": "the finalists, each trained at the final budget",
             "promotion": "the finalists, each trained at the promotion budget (`promote:`)"
             }.get(v.get("budget"), "the rescored trials, at the trial budget")  # fmt: skip
    kept = bool((v.get("noise") or {}).get("kept_warm_start"))
    why = (
        f"{'The warm start, kept' if kept else 'Chosen for the best'} (**validation full-image "
        f"mIoU** {v['full_image_miou']:.4f} on {v['images']} validation images, among {among}); "
        f"its validation patch mIoU in the search was {v['patch_miou']:.4f}. "
        f"{margin_text(v['noise']) if v.get('noise') else ''}"
    ).rstrip()
    lines = [f"## Study {name}: the winner is trial {record['trial']}", "", why, "",
             f"Images: {sizes}."]  # fmt: skip
    if test is None:
        return "\n".join([*lines, "", f"No final fit yet: `train_optuna.py final --study {name}`."])
    single = record.get("test_single") or test  # the winner's own model, which validation chose
    honest = (
        f"The final model `{model}` (the winner's config at the final budget, trained on "
        f"{record['config']['train_on']}): **test mIoU {test['miou']:.4f}** on {test['images']} "
        f"test images that nothing chose from (validation minus test: "
        f"{v['full_image_miou'] - single['miou']:+.4f})."
    )
    if record.get("ensemble"):
        honest += (
            f" It averages the models of finalists {', '.join(map(str, record['ensemble']))} "
            f"(final.ensemble); the winner's model alone: test mIoU {single['miou']:.4f} (the "
            f"gap above is of that model)."
        )
    commands = [
        f"python train_optuna.py evaluate --model {model} --split test",
        f"python train_optuna.py predict --model {model} --images DIR --out predictions",
        f"python train_optuna.py train --config reports/{name}/best.json --out again.pt",
    ]
    return "\n".join([
        *lines, "", honest, "", "Per-class IoU on the test images:", "",
        *_iou_table(test["per_class"]), "", "Evaluate, predict with and retrain it:", "",
        "```bash", *commands, "```",
    ])  # fmt: skip


def data_section(study: optuna.Study) -> list[str]:
    """The data's fingerprint (segcore.fingerprint) as note lines, when the study records one."""
    from segcore.fingerprint import describe

    fp = study.user_attrs.get("fingerprint")
    where = study.user_attrs.get("data") or "synthetic data"
    return ["", "Data:", "", "```", describe(fp, where), "```"] if fp else []


def data_note(study: optuna.Study) -> None:
    """The study's note before any trial: what the data holds."""
    from optuna_dashboard import save_note

    save_note(study, "\n".join([f"## Study {study.study_name}: running", *data_section(study)]))


def write_notes(study: optuna.Study, record: dict) -> None:
    """Notes for the study and every rescored trial, and the rescoring figures as study user
    attributes (one row per trial, which the dashboard's study page shows as a table)."""
    from optuna_dashboard import save_note  # imported here: it brings scikit-learn and pandas

    scores = study.user_attrs.get("full_image_scores") or {}
    trials = study.get_trials(deepcopy=False)
    by_patch = [t.number for t in top_trials(study, len(trials), trials)]
    by_full = sorted(scores, key=lambda n: (-scores[n]["miou"], int(n)))
    for number, score in scores.items():
        trial = trials[int(number)]
        ranks = (by_patch.index(trial.number) + 1, by_full.index(number) + 1, len(scores))
        note = trial_note(trial, score, ranks, trial.number == record["trial"])
        save_note(optuna.Trial(study, trial_id(trial)), note)
        study.set_user_attr(f"rescored trial {number}", (
            f"validation full-image mIoU {score['miou']:.4f}, rank {ranks[1]} of {ranks[2]} "
            f"(patch mIoU rank {ranks[0]})"))  # fmt: skip
    study.set_user_attr("winner", f"trial {record['trial']}")
    if record["test"] is not None:
        study.set_user_attr("final model test mIoU", round(record["test"]["miou"], 4))
    save_note(study, "\n".join([study_note(study, record), *data_section(study)]))
