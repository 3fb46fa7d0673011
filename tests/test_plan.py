"""`--space auto`: the space planned from the data's fingerprint and the device, and budgets in
seconds turned into steps by the measured step time."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, cli

from segcore.budget import budgeted, same_request
from segcore.config import TrialConfig
from segcore.data import Dataset
from segcore.fingerprint import fingerprint
from segcore.labels import Labels
from segsearch.plan import auto_space, plan, receptive_field
from segsearch.space import parse_space
from segsearch.study import warm_start_params

LABELS = Labels.plain(["background", "blob"], [(0, 0, 0), (255, 255, 255)])


def blobs(n: int, size: int, side: int, count: int) -> Dataset:
    """n images of size x size holding `count` squares of `side` pixels each."""
    rng = np.random.RandomState(0)
    images, masks = [], []
    for _ in range(n):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(count):
            y, x = rng.randint(0, size - side, 2)
            mask[y : y + side, x : x + side] = 1
        masks.append(mask)
        images.append(
            (mask[..., None] * 200 + rng.randint(0, 50, (size, size, 1))).astype(np.uint16)
        )
    return Dataset(images, masks, [f"i{k}" for k in range(n)], LABELS)


def test_the_receptive_field_of_a_unet_stage_by_stage():
    # two 3x3 convolutions (+4 at jump 1) and a 2x2 pooling (+1) per stage, jumps doubling
    assert [receptive_field(d) for d in (1, 2, 3, 4, 5)] == [14, 32, 68, 140, 284]


def test_large_images_of_small_objects_and_small_images_of_large_objects_plan_apart():
    """Large images: the device's largest patch, and a depth range reaching down to the
    shallow depths that already see a small object; small images: a patch no larger than the
    image, more patches a step, and only depths that see a whole large object. On the CPU the
    patch is capped at 64 (what converges in a search's minutes) and the centre is the CPU
    recipe's configuration."""
    small_objects = fingerprint(blobs(4, 512, 6, 40))
    large_objects = fingerprint(blobs(4, 96, 50, 1))
    a, b = plan(small_objects, "cpu"), plan(large_objects, "cpu")
    recipe = json.loads((ROOT / "configs" / "cpu-shapes.json").read_text())
    for centre in (a, b):
        assert (centre["patch_size"], centre["depth"], centre["batch_size"]) == (64, 4, 16)
        assert [centre[k] for k in ("patch_size", "depth", "batch_size", "base_width")] == [
            recipe[k] for k in ("patch_size", "depth", "batch_size", "base_width")
        ]
    assert (a["min_depth"], b["min_depth"]) == (2, 3)
    assert receptive_field(b["min_depth"]) >= b["object_side"] == 50
    assert receptive_field(b["min_depth"] - 1) < b["object_side"]
    c, d = plan(small_objects, "cuda"), plan(large_objects, "cuda")  # more memory
    assert (c["patch_size"], c["depth"], c["min_depth"], c["batch_size"]) == (256, 5, 2, 8)
    assert (d["patch_size"], d["depth"], d["min_depth"], d["batch_size"]) == (96, 4, 3, 56)
    for fp, centre, device in (
        (small_objects, a, "cpu"),
        (large_objects, b, "cpu"),
        (large_objects, d, "cuda"),
    ):
        raw = auto_space(fp, device)
        space = parse_space(raw, "auto")  # a valid space file
        assert (
            space.warm_start["patch_size"]
            == centre["patch_size"]
            == max(raw["search"]["patch_size"]["choices"])
        )
        assert space.search["depth"]["high"] == centre["depth"]
        assert space.fixed["batch_size"] == centre["batch_size"] and space.fixed["seconds"] > 0
        # the winner refitted on train + validation, no ensemble (measured on HeLa: the refit on
        # all the images matters more than averaging two models trained on fewer)
        assert space.ensemble == 1 and "train_on" not in space.final
        if device == "cpu":  # the finalists train half the final fit's seconds on the CPU
            assert 0 < space.promote["seconds"] < space.final["seconds"] == 600
        else:
            assert not space.promote and space.final["seconds"] == 600
    assert auto_space(small_objects, "cpu")["search"]["patch_size"]["choices"] == [32, 48, 64]
    # the width is fixed, not searched: with budgets in seconds a narrow network wins the trials
    for device, width in (("cpu", 16), ("cuda", 32)):
        raw = auto_space(small_objects, device)
        assert "base_width" not in raw["search"] and raw["fixed"]["base_width"] == width
    assert auto_space(small_objects, "cpu")["search"]["depth"]["low"] == 2
    assert auto_space(large_objects, "cpu")["search"]["depth"]["low"] == 3


def test_a_warm_start_of_values_must_name_every_searched_field_inside_its_range():
    raw = auto_space(fingerprint(blobs(2, 128, 10, 5)), "cuda")  # a centre that is no recipe
    space = parse_space(raw, "auto")
    assert space.warm_start == raw["study"]["warm_start"] != warm_start_params(space)
    for change, message in (
        ({"patch_size": 100}, r"study.warm_start.patch_size: 100 is not a value the search"),
        ({"depth": 3.5}, r"study.warm_start.depth: 3.5 is not a value the search samples"),
        ({"lr": 0.5}, r"study.warm_start.lr: 0.5 is not a value"),
        ({"momentum": 1}, r"study.warm_start.momentum: not a searched field"),
    ):
        bad = {**raw, "study": {**raw["study"], "warm_start": {**space.warm_start, **change}}}
        with pytest.raises(Exception, match=message):
            parse_space(bad, "auto")
    missing = dict(space.warm_start)
    del missing["lr"]
    with pytest.raises(Exception, match=r"warm_start.lr: missing"):
        parse_space({**raw, "study": {**raw["study"], "warm_start": missing}}, "auto")


def test_a_promotion_budget_cut_in_epochs_must_say_its_seconds():
    raw = auto_space(fingerprint(blobs(2, 128, 10, 5)), "cpu")
    with pytest.raises(Exception, match=r"promote.epochs: the final budget is in seconds \(600\)"):
        parse_space({**raw, "promote": {"epochs": 20}}, "auto")
    space = parse_space({**raw, "promote": {"epochs": 20, "seconds": 150}}, "auto")
    assert space.promote == {"epochs": 20, "seconds": 150}


def test_seconds_become_steps_from_the_measured_step_time_and_a_resumed_run_keeps_them():
    data = blobs(3, 64, 8, 6)
    cfg = TrialConfig(patch_size=32, depth=2, base_width=4, batch_size=2, epochs=2, seconds=3.0)
    ran, step = budgeted(cfg, data, torch.device("cpu"))
    assert step > 0 and ran.seconds == 0 and ran.epochs == 2
    assert ran.steps_per_epoch == max(1, round(3.0 / (2 * step)))
    assert dataclasses.replace(ran, steps_per_epoch=cfg.steps_per_epoch, seconds=3.0) == cfg
    assert same_request(cfg, ran.to_dict()) and same_request(cfg, cfg.to_dict())
    assert not same_request(dataclasses.replace(cfg, lr=0.1), ran.to_dict())
    recorded = dataclasses.replace(ran, steps_per_epoch=7).to_dict()  # as the first run measured
    assert budgeted(cfg, data, torch.device("cpu"), recorded) == (
        TrialConfig.from_dict(recorded),
        None,
    )
    plain = dataclasses.replace(cfg, seconds=0.0)
    assert budgeted(plain, data, torch.device("cpu")) == (plain, None)  # steps as given


@pytest.mark.slow  # the CLI in a process, measuring steps (tests/mutation.py runs it by name)
def test_check_prints_the_planned_space_for_a_data_folder(tmp_path):
    from PIL import Image

    data = blobs(4, 160, 12, 6)
    for folder in ("images", "masks"):
        (tmp_path / "d" / folder).mkdir(parents=True)
    for name, image, mask in zip(data.names, data.raw, data.masks):
        Image.fromarray(image[..., 0]).save(tmp_path / "d" / "images" / f"{name}.png")
        Image.fromarray(mask).save(tmp_path / "d" / "masks" / f"{name}.png")
    out = cli(tmp_path, "check", "--data", "d", "--space", "auto").stdout
    assert out.startswith("# Planned by `--space auto` from d on the CPU")
    (tmp_path / "auto.yaml").write_text(out)
    raw = yaml.safe_load(out)
    assert raw["study"]["warm_start"]["patch_size"] == 64 and raw["fixed"]["seconds"] == 30
    assert raw["promote"] == {"seconds": 300} and raw["final"]["seconds"] == 600
    assert "auto.yaml: ok" in cli(tmp_path, "check", "--space", "auto.yaml").stdout
