"""The data split by whole image: train (trials learn from it), validation (chooses: the best
epoch, pruning, the top K, the winner) and test (read once, by the final fit, to score the model
handed over), seeded; or test images from another folder (--test-data)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segcore.data import Dataset
from segcore.errors import UserError


def split(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Seeded split by whole image: (train, validation, test) indices, sorted, none empty;
    test_fraction 0 splits off no test images (they come from another folder, --test-data)."""
    n_test = max(1, round(n * test_fraction)) if test_fraction else 0
    n_val = max(1, round(n * val_fraction))
    if n - n_test - n_val < 1:
        test = f", {n_test} test (test_fraction {test_fraction})" if n_test else ""
        raise UserError(
            f"data set has {n} image(s); {n_val} validation (val_fraction {val_fraction}){test} "
            f"and at least 1 training image need {n_val + n_test + 1}"
            + ("; add images or give --test-data DIR" if n_test else "")
        )
    order = np.random.RandomState(seed).permutation(n).tolist()
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return sorted(train), sorted(val), sorted(test)


@dataclass
class Splits:
    """A data set split by whole image: train, validation (chooses) and test (only measures)."""

    train: Dataset
    val: Dataset
    test: Dataset

    def names(self) -> dict[str, list[str]]:
        return {"train": self.train.names, "validation": self.val.names, "test": self.test.names}


def split_dataset(dataset: Dataset, cfg, test_set: Dataset | None = None) -> Splits:
    """Split by the config's seed, val_fraction and test_fraction; with `test_set` (from
    --test-data) the data set gives only train and validation images."""
    fraction = 0.0 if test_set is not None else cfg.test_fraction
    train, val, test = split(len(dataset.raw), cfg.val_fraction, fraction, cfg.seed)
    if test_set is None:
        test_set = dataset.subset(test)
    return Splits(dataset.subset(train), dataset.subset(val), test_set)


def check_test_data(dataset: Dataset, test_set: Dataset, option: str = "--test-data") -> None:
    """Test images must fit the data set: masks, the same channels (their classes are the data
    set's: load_folder decodes them with its mapping)."""
    if test_set.masks is None:
        raise UserError(f"{option}: test images need masks (DIR/images and DIR/masks)")
    if test_set.channels != dataset.channels:
        raise UserError(
            f"{option}: images have {test_set.channels} channel(s), --data's {dataset.channels}"
        )
    assert test_set.labels.classes == dataset.labels.classes, "decoded with the data's mapping"
