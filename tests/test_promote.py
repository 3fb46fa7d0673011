"""The promotion stage's choices, in process: which trials are finalists, and how sure the choice
among them is. The stage itself runs end to end in tests/test_search.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import optuna
import pytest

from segcore.errors import UserError
from segcore.metrics import mean_iou
from segsearch.checkpoints import WARM_START
from segsearch.final import winner
from segsearch.promote import choice_noise, decide, finalist_numbers, margin_text, ranked
from segsearch.space import parse_space

SPACE = {"search": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}},
         "fixed": {"epochs": 1}, "study": {"finalists": 2}}  # fmt: skip


def study_with(full_image: dict[int, float], warm: int | None) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for n in range(max(full_image) + 1):
        attrs = {WARM_START: True} if n == warm else {}
        study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={},
                                                  user_attrs=attrs))  # fmt: skip
    study.set_user_attr("full_image_scores", {str(n): {"miou": m} for n, m in full_image.items()})
    return study


def test_finalists_are_the_best_on_whole_images_with_the_warm_start_always_among_them():
    space = parse_space(SPACE, "space")
    scores = {0: 0.80, 1: 0.90, 2: 0.85, 3: 0.90}
    assert finalist_numbers(study_with(scores, None), space) == [1, 3]  # a tie: both, by number
    assert finalist_numbers(study_with(scores, 0), space) == [0, 1]  # the recipe, last, is in
    assert finalist_numbers(study_with(scores, 3), space) == [1, 3]  # in on its own rank
    three = dataclasses.replace(space, finalists=3)
    assert finalist_numbers(study_with(scores, 0), three) == [0, 1, 3]
    assert finalist_numbers(study_with(scores, 0), dataclasses.replace(space, finalists=0)) == []


def test_the_winner_is_the_best_on_whole_images_and_a_tie_goes_to_the_earlier_trial():
    scores = {0: 0.80, 1: 0.90, 2: 0.85, 3: 0.90}  # 1 and 3 tie: 1 was first
    assert ranked({str(n): {"miou": m} for n, m in scores.items()}) == ["1", "3", "2", "0"]
    study = study_with(scores, None)
    assert winner(study)[0].number == 1 and winner(study)[1] == {"miou": 0.90}
    study.set_user_attr("promotion", {"3": {"miou": 0.93}, "1": {"miou": 0.91}})
    assert winner(study)[0].number == 3  # at the final budget, the promotion decides


def test_finalists_must_be_a_count():
    with pytest.raises(UserError, match=r"study.finalists: 0 \(no promotion stage\) or more"):
        parse_space({**SPACE, "study": {"finalists": -1}}, "space")
    assert parse_space({**SPACE, "study": {}}, "space").finalists == 0  # off unless asked


def image(hits: int, misses: int) -> list[list[int]]:
    """A two-class image's confusion matrix: `hits` right per class, `misses` wrong per class."""
    return [[hits, misses], [misses, hits]]


def test_a_margin_inside_the_noise_is_called_so_and_one_outside_is_not():
    steady = {"0": {"miou": 0.0, "confusion": [image(90, 10)] * 8},  # the warm start
              "1": {"miou": 0.0, "confusion": [image(95, 5)] * 8},  # better on every image
              "2": {"miou": 0.0, "confusion": [image(99, 1), image(90, 10)] * 4}}  # fmt: skip
    for s in steady.values():
        s["miou"] = mean_iou(np.sum(s["confusion"], axis=0))
    noise = choice_noise(steady, 1, warm=0)
    assert noise["warm_start"]["trial"] == 0 and not noise["warm_start"]["within_noise"]
    assert noise["warm_start"]["interval"][0] > 0
    assert noise["runner_up"]["trial"] == 2 and noise["runner_up"]["within_noise"]
    assert noise["within_noise"] and "within the validation noise" in margin_text(noise)
    alone = choice_noise({k: steady[k] for k in ("0", "1")}, 1, warm=0)
    assert not alone["within_noise"] and "outside the validation noise" in margin_text(alone)
    assert "warm_start" not in choice_noise(steady, 0, warm=0)  # the winner is the warm start
    assert choice_noise({"0": {"miou": 0.5}}, 0, warm=None) == {}  # scored before intervals
    few = {k: {**s, "confusion": s["confusion"][:3]} for k, s in steady.items() if k != "2"}
    unsure = choice_noise(few, 1, warm=0)  # better on each of 3 images: still unsure
    assert unsure["warm_start"]["interval"][0] > 0 and unsure["within_noise"]
    assert "only 3 validation images, too few" in margin_text(unsure)


def test_after_the_promotion_a_lead_inside_the_noise_keeps_the_warm_start():
    def scored(confusions: dict[str, list]) -> dict[str, dict]:
        return {k: {"miou": mean_iou(np.sum(c, axis=0)), "confusion": c}
                for k, c in confusions.items()}  # fmt: skip

    clear = scored({"0": [image(90, 10)] * 8, "1": [image(95, 5)] * 8})  # better on every image
    assert decide(clear, 0, promoted=True) == (1, choice_noise(clear, 1, 0))
    mixed = scored({"0": [image(90, 10)] * 8, "1": [image(99, 1), image(82, 18)] * 4})
    assert mixed["1"]["miou"] > mixed["0"]["miou"]  # ahead, on half of the images
    number, noise = decide(mixed, 0, promoted=True)
    assert number == 0 and noise["kept_warm_start"]["trial"] == 1 and noise["within_noise"]
    assert noise["kept_warm_start"]["interval"][0] <= 0 <= noise["kept_warm_start"]["interval"][1]
    assert noise["interval"] == choice_noise(mixed, 0, None)["interval"]  # the warm start's own
    text = margin_text(noise)
    assert text.startswith("The warm start is handed over: trial 1 led it by +0.0")
    assert "within the validation noise" in text and "val_fraction" in text
    few = scored({"0": [image(90, 10)] * 3, "1": [image(95, 5)] * 3})  # clear, but 3 images
    number, noise = decide(few, 0, promoted=True)
    assert number == 0 and "only 3 validation images, too few" in margin_text(noise)
    assert decide(few, 0, promoted=False)[0] == 1  # at the trial budget: the best, as before
    assert decide(few, None, promoted=True)[0] == 1  # no warm start to keep
    study = study_with({0: 0.5, 1: 0.6}, 0)
    study.set_user_attr("promotion", few)
    trial, score, noise = winner(study)
    assert trial.number == 0 and score == few["0"] and noise["kept_warm_start"]["trial"] == 1


@pytest.mark.parametrize(
    ("final", "finalists", "message"),
    [
        ({"ensemble": 0}, 2, r"final.ensemble: 1 \(the winner alone\) or more finalists"),
        ({"ensemble": 3, "train_on": "train"}, 2, r"3 models need study.finalists: 3 or more"),
        ({"ensemble": 2}, 2, r"the finalists' own models.*set final.train_on: train"),
        ({"ensemble": 1.5}, 2, r"final.ensemble: must be a finite int number"),
        (
            {"ensemble": 4, "train_on": "train"},
            4,
            r"4 models need study.top_k: 4 or more \(it is 3",
        ),
    ],
)
def test_an_ensemble_is_of_trained_finalists(final, finalists, message):
    raw = {**SPACE, "study": {"finalists": finalists}, "final": final}
    with pytest.raises(UserError, match=message):
        parse_space(raw, "space")
    ok = parse_space({**raw, "final": {"ensemble": 2, "train_on": "train"}}, "space")
    assert ok.ensemble == 2 and ok.final == {"train_on": "train"}  # not a config field
    assert parse_space(SPACE, "space").ensemble == 1
    fixed = {**raw, "fixed": {"epochs": 1, "train_on": "train"}, "final": {"ensemble": 2}}
    assert parse_space(fixed, "space").ensemble == 2  # train_on: train from fixed
    searched = {**SPACE, "search": {**SPACE["search"], "normalization": {
        "type": "categorical", "choices": ["zscore", "percentile"]}}}  # fmt: skip
    with pytest.raises(UserError, match=r"same input; do not search normalization"):
        parse_space({**searched, "study": {"finalists": 2}, "final": ok.raw["final"]}, "space")


def test_the_promote_section_sets_the_finalists_budget_over_the_final_one():
    from segsearch.promote import promotion_config

    raw = {**SPACE, "final": {"epochs": 8, "batch_size": 4}, "promote": {"epochs": 3}}
    space = parse_space(raw, "space")
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={},
                                              user_attrs={"config": {"lr": 0.01, "epochs": 1}}))  # fmt: skip
    cfg = promotion_config(study, space, 0)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.train_on) == (3, 4, 0.01, "train")
    for promote, message in (
        ({"train_on": "train"}, r"promote.train_on: the promotion stage keeps the study's value"),
        ({"lr": 0.1}, r"promote.lr: the promotion stage keeps the winner's value"),
        ({"epochs": 0}, r"space: promote"),
    ):
        with pytest.raises(UserError, match=message):
            parse_space({**raw, "promote": promote}, "space")
    both = {**raw, "study": {"finalists": 2},
            "final": {"ensemble": 2, "train_on": "train"}}  # fmt: skip
    with pytest.raises(UserError, match=r"final.ensemble: .*final budget; remove 'promote'"):
        parse_space(both, "space")
