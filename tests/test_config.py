from __future__ import annotations

import json

import pytest

from segcore.config import TrialConfig
from segcore.errors import UserError


def test_round_trip_and_best_config_file(tmp_path):
    cfg = TrialConfig(depth=3, patch_size=48, lr=0.1, arch="unet3plus")
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "bare.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "best.json").write_text(json.dumps({"config": cfg.to_dict(), "trial": 3}))
    assert TrialConfig.load(tmp_path / "bare.json") == cfg
    assert TrialConfig.load(tmp_path / "best.json") == cfg
    assert TrialConfig(tile_size=0, patch_size=64).tile == 64


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"depthh": 3}, "unknown config field 'depthh'"),
        ({"depth": 7}, "field 'depth': must be from 1 to 6"),
        ({"depth": "3"}, "field 'depth': must be of type int"),
        ({"lr": "1e-4"}, "field 'lr': must be of type float"),
        ({"lr": 0}, "field 'lr': must be above 0"),
        ({"patch_size": 60, "depth": 3}, "'patch_size': must be a multiple of 2\\*\\*depth = 8"),
        ({"patch_size": 64, "depth": 6}, "'patch_size': must be at least 2 \\* 2\\*\\*depth = 128"),
        ({"arch": "segformer"}, "field 'arch': must be one of unet, unet3plus"),
        ({"aug_strength": 1.5}, "'aug_strength': must be from 0 to 1"),
        ({"base_width": 32, "max_width": 16}, "'max_width': must be at least base_width"),
        ({"gaussian": 1}, "'gaussian': must be of type bool"),
    ],
)
def test_validation_names_the_field(tmp_path, fields, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(UserError, match=message) as info:
        TrialConfig.load(path)
    assert str(path) in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        TrialConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        TrialConfig.load(tmp_path / "bad.json")
