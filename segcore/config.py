"""TrialConfig: every knob of one training run, frozen and validated; to and from JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from segcore.errors import UserError

ARCHS = ("unet", "unet3plus")
OPTIMIZERS = ("sgd", "adamw")
LOSSES = ("ce", "ce+dice")
SCHEDULES = ("step", "poly", "constant")
TRAIN_ON = ("train", "train+val")
NORMALIZATIONS = ("zscore", "percentile")


@dataclass(frozen=True)
class TrialConfig:
    """One configuration: model shape, training recipe, augmentation, inference, seed."""

    # model: stage widths are base_width * 2**i, capped at max_width
    arch: str = "unet"
    depth: int = 4
    base_width: int = 16
    max_width: int = 256
    # training: epochs of a fixed number of steps on random patches
    patch_size: int = 64
    batch_size: int = 16
    epochs: int = 10
    steps_per_epoch: int = 100
    # a budget in seconds instead: 0 = steps_per_epoch as given; above 0, steps_per_epoch follows
    # from the step time measured on the device, so that the epochs train for about this long
    # (segcore.budget; the config recorded for a trial or a model holds the steps it ran)
    seconds: float = 0.0
    optimizer: str = "sgd"
    lr: float = 0.05
    # "step" divides lr by 10 for the second half of training (the reference recipe)
    schedule: str = "step"
    weight_decay: float = 5e-4
    loss: str = "ce"
    aug_strength: float = 0.5
    # input: "zscore" per image and channel, or "percentile" (1 and 99.8 % of each channel over
    # the training images, CSBDeep's choice for fluorescence); recorded in the model file
    normalization: str = "zscore"
    # share of patches centred on a foreground pixel (thin classes are rare)
    fg_fraction: float = 0.33
    # the split by whole image: test images are only ever used to score the final model;
    # validation images choose (best epoch, pruning, the top K, the winner)
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    # the fixed validation patch set: per image, and their side (0 = patch_size; a search sets
    # one side for all its trials, so that every trial is scored on the same pixels)
    val_patches_per_image: int = 8
    val_patch_size: int = 0
    # what `train` and a search's final fit train on: "train", keeping the epoch of best
    # validation patch mIoU, or "train+val", keeping the last epoch (measured better on shapes:
    # README, "The final fit: train or train + validation")
    train_on: str = "train+val"
    # stitched inference: tiles of tile_size (0 = patch_size) spaced with this overlap
    tile_size: int = 0
    tile_overlap: float = 0.5
    gaussian: bool = False
    tta: bool = False
    # augmentation processes feeding training (0 = in the training process)
    aug_processes: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, rule in _RULES.items():
            value = getattr(self, name)
            message = rule(value)
            if message:
                raise UserError(f"config field '{name}': {message}, got {value!r}")
        if self.max_width < self.base_width:
            raise UserError(
                f"config field 'max_width': must be at least base_width ({self.base_width}), "
                f"got {self.max_width}"
            )
        multiple = 2**self.depth
        if self.patch_size < 2 * multiple:
            # a 1x1 bottom stage leaves BatchNorm one value per channel and patch
            raise UserError(
                f"config field 'patch_size': must be at least 2 * 2**depth = {2 * multiple} "
                f"(depth {self.depth}), got {self.patch_size}"
            )
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError(
                f"config field 'test_fraction': with val_fraction {self.val_fraction} it leaves "
                f"no training images, got {self.test_fraction}"
            )
        for name in ("patch_size", "tile_size", "val_patch_size"):
            value = getattr(self, name)
            if value and value % multiple:
                raise UserError(
                    f"config field '{name}': must be a multiple of 2**depth = {multiple} "
                    f"(depth {self.depth}), got {value}"
                )

    @property
    def tile(self) -> int:
        """Tile side for stitched inference (pixels)."""
        return self.tile_size or self.patch_size

    @property
    def val_patch(self) -> int:
        """Side of the validation patches (pixels)."""
        return self.val_patch_size or self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrialConfig:
        """Build from a plain dict; unknown keys and wrong types are errors naming `source`."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: must be a JSON object of config fields")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"{source}: unknown config field '{unknown[0]}'")
        values = {}
        for name, value in data.items():
            values[name] = coerce(value, known[name].type, f"{source}: config field '{name}'")
        try:
            return cls(**values)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> TrialConfig:
        """Read a bare config JSON or an exported best-config file (its `config` key)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:  # a folder, no permission
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]
        return cls.from_dict(data, str(path))


def read_record(path: str | Path) -> dict[str, Any]:
    """What an exported best-config file records beside its config (data folders, split,
    threads, precision); {} for a bare config. Call after TrialConfig.load, which checks it."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data.get("config"), dict):
        return {}
    record = {k: v for k, v in data.items() if k != "config"}
    for key in ("data", "test_data"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise UserError(f"{path}: '{key}' must be a folder name or null")
    if record.get("threads") is not None and not (
        type(record["threads"]) is int and record["threads"] >= 1
    ):
        raise UserError(f"{path}: 'threads' must be a positive integer or null")
    if record.get("precision") not in (None, "bf16", "fp16", "fp32"):
        raise UserError(f"{path}: 'precision' must be bf16, fp16, fp32 or null")
    return record


def coerce(value: Any, type_name: str, where: str) -> Any:
    """Check a JSON value against a field's annotated type; ints are accepted for floats."""
    if type_name == "bool":
        ok = isinstance(value, bool)
    elif type_name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_name == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{where}: must be of type {type_name}, got {value!r}")
    return value


def _between(low: float, high: float) -> Any:
    return lambda v: "" if low <= v <= high else f"must be from {low} to {high}"


def _one_of(choices: tuple[str, ...]) -> Any:
    return lambda v: "" if v in choices else f"must be one of {', '.join(choices)}"


_RULES = {
    "arch": _one_of(ARCHS),
    "depth": _between(1, 6),
    "base_width": _between(1, 1024),
    "max_width": _between(1, 4096),
    "patch_size": _between(8, 4096),
    "batch_size": _between(1, 4096),
    "epochs": _between(1, 100_000),
    "steps_per_epoch": _between(1, 1_000_000),
    "seconds": _between(0, 10_000_000),
    "optimizer": _one_of(OPTIMIZERS),
    "lr": lambda v: "" if 0 < v < float("inf") else "must be above 0 and finite",
    "schedule": _one_of(SCHEDULES),
    "weight_decay": _between(0, 1),
    "loss": _one_of(LOSSES),
    "aug_strength": _between(0, 1),
    "normalization": _one_of(NORMALIZATIONS),
    "fg_fraction": _between(0, 1),
    "test_fraction": lambda v: "" if 0 < v < 1 else "must be above 0 and below 1",
    "val_fraction": lambda v: "" if 0 < v < 1 else "must be above 0 and below 1",
    "val_patches_per_image": _between(1, 10_000),
    "val_patch_size": lambda v: "" if v == 0 or 8 <= v <= 4096 else "must be 0 or from 8 to 4096",
    "train_on": _one_of(TRAIN_ON),
    "tile_size": lambda v: "" if v == 0 or 8 <= v <= 8192 else "must be 0 or from 8 to 8192",
    "tile_overlap": lambda v: "" if 0 <= v < 1 else "must be at least 0 and below 1",
    "aug_processes": _between(0, 64),
    "seed": _between(0, 2**31 - 1),
}
