"""Data sets: the folder loader (files paired, read and decoded with one class mapping),
normalisation, and the default synthetic data set.

Pixels stay at their own bit depth (`Dataset.raw`, possibly memory maps of the decode cache);
what the model sees (`Dataset.images`) is normalised on access with a `Normalization` chosen
from the training images (segcore.train) or recorded in a model file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from segcore.cache import DecodeCache
from segcore.errors import UserError
from segcore.labels import (
    Labels,
    declares_classes,
    from_declarations,
    infer_labels,
    read_declarations,
)
from segcore.reading import IMAGE_SUFFIXES, read_image, read_mask

PERCENTILES = (1.0, 99.8)  # CSBDeep/StarDist's defaults for fluorescence
PERCENTILE_SAMPLE = 4_000_000  # pixels per channel the percentiles are taken from


@dataclass(frozen=True)
class Normalization:
    """How raw pixels become model input: "zscore" (each image and channel to mean 0, std 1) or
    "percentile" (each channel: (x - low) / (high - low), low and high the 1st and 99.8th
    percentiles over the training images, in raw units)."""

    mode: str = "zscore"
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "low": self.low and list(self.low),
                "high": self.high and list(self.high)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Normalization:
        if not data:  # model files written before normalisation was recorded
            return ZSCORE
        low, high = data.get("low"), data.get("high")
        return cls(data["mode"], low and tuple(low), high and tuple(high))


ZSCORE = Normalization()


class Normalized:
    """An (H, W, C) image normalised on access: raw pixels (any dtype, maybe a memory map) to
    float32 with a per-channel offset and scale. Slicing rows and columns normalises only the
    slice (a training patch); np.asarray normalises the whole image."""

    def __init__(self, raw: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> None:
        self.raw, self.offset, self.scale = raw, offset, scale
        self.shape, self.ndim, self.dtype = raw.shape, 3, np.dtype(np.float32)

    def _apply(self, part: np.ndarray) -> np.ndarray:
        return (part.astype(np.float32) - self.offset) * self.scale

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key):
            return self._apply(self.raw[key])
        return self.__array__()[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._apply(self.raw)
        return out if dtype is None else out.astype(dtype)


def channel_stats(raw: np.ndarray) -> np.ndarray:
    """(2, C) float64: mean and standard deviation of each channel of an (H, W, C) image."""
    flat = np.asarray(raw).reshape(-1, raw.shape[2]).astype(np.float64)
    return np.stack([flat.mean(0), flat.std(0)])


@dataclass
class Dataset:
    """Images (H, W, C) at their own dtype, masks (H, W) class indices (uint8) or None, names,
    the class mapping, and the normalisation `images` applies (None until chosen)."""

    raw: list[np.ndarray]
    masks: list[np.ndarray] | None
    names: list[str]
    labels: Labels
    norm: Normalization | None = None
    stats: list[np.ndarray | None] = field(default_factory=list)  # channel_stats, when known
    _views: list[Normalized] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.stats) != len(self.raw):
            self.stats = [None] * len(self.raw)

    @property
    def classes(self) -> list[str]:
        return list(self.labels.classes)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return self.labels.palette

    @property
    def channels(self) -> int:
        return self.raw[0].shape[2]

    @property
    def images(self) -> list[Normalized]:
        """What the model sees; the normalisation must have been chosen (normalized())."""
        assert self.norm is not None, "a data set's images are read after normalized(norm)"
        if self._views is None:
            self._views = [self._view(i) for i in range(len(self.raw))]
        return self._views

    def _view(self, i: int) -> Normalized:
        if self.norm.mode == "percentile":
            low = np.asarray(self.norm.low, np.float32)
            span = np.asarray(self.norm.high, np.float32) - low
            return Normalized(self.raw[i], low, 1 / np.maximum(span, 1e-6))
        if self.stats[i] is None:
            self.stats[i] = channel_stats(self.raw[i])
        mean, std = self.stats[i].astype(np.float32)
        return Normalized(self.raw[i], mean, 1 / np.maximum(std, 1e-6))

    def normalized(self, norm: Normalization) -> Dataset:
        """The same images and masks, normalised with `norm`."""
        return replace(self, norm=norm, _views=None)

    def join(self, other: Dataset) -> Dataset:
        """The images of both (same classes), e.g. train + validation for a final fit."""
        masks = None if self.masks is None or other.masks is None else self.masks + other.masks
        return Dataset(self.raw + other.raw, masks, self.names + other.names, self.labels,
                       self.norm, self.stats + other.stats)  # fmt: skip

    def subset(self, indices: list[int]) -> Dataset:
        masks = None if self.masks is None else [self.masks[i] for i in indices]
        return Dataset([self.raw[i] for i in indices], masks, [self.names[i] for i in indices],
                       self.labels, self.norm, [self.stats[i] for i in indices])  # fmt: skip


def normalization_for(mode: str, dataset: Dataset) -> Normalization:
    """The normalisation `mode` fitted to these (training) images."""
    if mode == "zscore":
        return ZSCORE
    total = sum(r.shape[0] * r.shape[1] for r in dataset.raw)
    step = max(1, int(np.sqrt(total / PERCENTILE_SAMPLE)))  # every step-th row and column
    sample = np.concatenate(
        [np.asarray(r[::step, ::step]).reshape(-1, r.shape[2]) for r in dataset.raw]
    )
    low, high = np.percentile(sample.astype(np.float64), PERCENTILES, axis=0)
    return Normalization("percentile", tuple(map(float, low)), tuple(map(float, high)))


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name; other files are errors, hidden files skipped."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{p}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
        files.append(p)
    if not files:
        raise UserError(f"{folder}: no images found")
    return files


def _trailing_number(stem: str) -> str | None:
    match = re.search(r"(\d+)$", stem)
    return str(int(match.group(1))) if match else None


def pair_files(images: list[Path], masks: list[Path]) -> list[tuple[Path, Path]]:
    """Pair each image with the mask of the same stem, else the one ending in the same number."""
    by_stem = {m.stem: m for m in masks}
    by_number: dict[str, list[Path]] = {}
    for m in masks:
        number = _trailing_number(m.stem)
        if number is not None:
            by_number.setdefault(number, []).append(m)
    pairs, used = [], set()
    for image in images:
        mask = by_stem.get(image.stem)
        if mask is None:
            number = _trailing_number(image.stem)
            candidates = by_number.get(number, []) if number is not None else []
            if len(candidates) > 1:
                names = ", ".join(c.name for c in candidates)
                raise UserError(f"{image}: several masks end in the same number ({names})")
            mask = candidates[0] if candidates else None
        if mask is None:
            raise UserError(f"{image}: no mask with the same name or trailing number")
        if mask in used:
            raise UserError(f"{mask}: paired with more than one image")
        used.add(mask)
        pairs.append((image, mask))
    for m in masks:
        if m not in used:
            raise UserError(f"{m}: no image pairs with this mask")
    return pairs


class _Reader:
    """Reads a folder's images and masks, through the decode cache when there is one."""

    def __init__(self, cache: str | Path | None, axes: str | None) -> None:
        self.cache = DecodeCache(cache) if cache is not None else None
        self.axes = axes

    def image(self, path: Path) -> np.ndarray:
        if self.cache is None:
            return read_image(path, self.axes)
        return self.cache.get(path, ["image", self.axes], lambda: read_image(path, self.axes))

    def mask(self, path: Path, labels: Labels, remap: np.ndarray | None) -> np.ndarray:
        def decode() -> np.ndarray:
            classes = labels.decode(read_mask(path), path)
            return classes if remap is None else remap[classes]

        if self.cache is None:
            return decode()
        how = ["mask", labels.to_dict(), None if remap is None else remap.tolist()]
        return self.cache.get(path, how, decode)


def folder_labels(
    root: Path, given: Labels | None, mask_paths: list[Path]
) -> tuple[Labels, Labels, np.ndarray | None]:
    """(the data set's mapping, the one its masks are decoded with, class remap or None).
    With `given` (a model's or study's mapping), masks decode to its classes: through the
    folder's own labels.json when it names classes (by name), else with `given` itself."""
    path = root / "labels.json"
    decl = read_declarations(path)
    axes = decl.get("axes") or (given.axes if given else None)
    if declares_classes(decl):
        own = replace(from_declarations(decl, str(path)), axes=axes)
    elif given is not None:
        return given, replace(given, axes=axes), None
    else:
        masks = [(p, read_mask(p)) for p in mask_paths]
        own = infer_labels(root / "masks", masks, axes)
    if given is None or own.classes == given.classes:
        return given or own, own, None
    missing = [c for c in own.classes if c not in given.classes]
    if missing:
        raise UserError(f"{path}: class '{missing[0]}' is not one of the classes trained on "
                        f"({', '.join(given.classes)})")  # fmt: skip
    return given, own, np.array([given.classes.index(c) for c in own.classes], np.uint8)


def load_folder(
    root: str | Path, labels: Labels | None = None, cache: str | Path | None = None
) -> Dataset:
    """Load DIR/images + DIR/masks (+ DIR/labels.json), validating every file; masks decoded
    with `labels` (a model's or study's mapping) when given; decoded files kept in `cache`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    pairs = pair_files(list_images(root / "images"), list_images(root / "masks"))
    mapping, decoding, remap = folder_labels(root, labels, [m for _, m in pairs])
    reader = _Reader(cache, decoding.axes)
    images = _check_channels([(p, reader.image(p)) for p, _ in pairs])
    masks = []
    for (image_path, mask_path), image in zip(pairs, images):
        mask = reader.mask(mask_path, decoding, remap)
        if mask.shape[:2] != image.shape[:2]:
            raise UserError(
                f"{mask_path}: size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                f"{image_path.name} ({image.shape[1]}x{image.shape[0]})"
            )
        masks.append(mask)
    return Dataset(images, masks, [p.stem for p, _ in pairs], mapping)


def _check_channels(images: list[tuple[Path, np.ndarray]]) -> list[np.ndarray]:
    first_path, first = images[0]
    for path, image in images:
        if image.shape[2] != first.shape[2]:
            raise UserError(f"{path}: has {image.shape[2]} channel(s), {first_path.name} has "
                            f"{first.shape[2]}; every image needs the same channels")  # fmt: skip
    return [image for _, image in images]


def load_images(folder: str | Path, labels: Labels | None = None) -> Dataset:
    """Images for prediction: a data folder (masks decoded with `labels`, a model's mapping, if
    present), its images/ when it has no masks, or a folder of images; laid out as the data
    folder's labels.json declares, else as `labels` declares."""
    folder = Path(folder)
    decl = {}
    if (folder / "images").is_dir():
        if (folder / "masks").is_dir():
            return load_folder(folder, labels)
        decl = read_declarations(folder / "labels.json")
        folder = folder / "images"
    axes = decl.get("axes") or (labels.axes if labels else None)
    paths = list_images(folder)
    images = _check_channels([(p, read_image(p, axes)) for p in paths])
    return Dataset(images, None, [p.stem for p in paths], labels or Labels((), (), ()))


def colorize(mask: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 colours."""
    return np.asarray(palette, dtype=np.uint8)[mask]


DEFAULT_SYNTHETIC = (100, 0)  # images, seed: the data set of every command run without --data


def dataset_from(
    folder: str | Path | None, labels: Labels | None = None, cache: str | Path | None = None
) -> Dataset:
    """A labelled folder, or the default synthetic data set when no folder is given."""
    if folder is not None:
        return load_folder(folder, labels, cache)
    from segcore.synthetic import synthetic_dataset

    return synthetic_dataset(*DEFAULT_SYNTHETIC)
