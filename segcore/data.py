"""Data sets: the folder loader, label palettes and the seeded split by whole image."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segcore.errors import UserError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
# Colours for masks and pictures when a data set brings no labels.json (label 0 is black).
DEFAULT_PALETTE = [
    (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
    (0, 255, 255), (255, 128, 0), (128, 0, 255), (0, 128, 128), (128, 128, 0), (128, 0, 0),
]  # fmt: skip


@dataclass
class Dataset:
    """Images (H, W, C) float32 z-scored per image and channel, masks (H, W) int64 or None."""

    images: list[np.ndarray]
    masks: list[np.ndarray] | None
    names: list[str]
    classes: list[str]
    palette: list[tuple[int, int, int]]

    @property
    def channels(self) -> int:
        return self.images[0].shape[2]

    def join(self, other: Dataset) -> Dataset:
        """The images of both (same classes), e.g. train + validation for a final fit."""
        masks = None if self.masks is None or other.masks is None else self.masks + other.masks
        return Dataset(self.images + other.images, masks, self.names + other.names,
                       self.classes, self.palette)  # fmt: skip

    def subset(self, indices: list[int]) -> Dataset:
        masks = None if self.masks is None else [self.masks[i] for i in indices]
        return Dataset(
            [self.images[i] for i in indices],
            masks,
            [self.names[i] for i in indices],
            self.classes,
            self.palette,
        )


def normalize(image: np.ndarray) -> np.ndarray:
    """Z-score each channel of an (H, W, C) image, so intensity scale never matters."""
    image = image.astype(np.float32)
    mean = image.mean(axis=(0, 1), keepdims=True)
    std = image.std(axis=(0, 1), keepdims=True)
    return (image - mean) / np.maximum(std, 1e-6)


def read_array(path: Path) -> np.ndarray:
    """Read a PNG, TIFF or NPY file into a numpy array, naming the file if it is unreadable."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with Image.open(path) as im:
            if im.mode == "P":  # palette PNGs store label indices: keep them
                return np.array(im)
            return np.array(im.convert("RGB") if im.mode in ("RGBA", "LA", "CMYK") else im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read as an image ({type(e).__name__})") from None


def image_channels(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W[, C]) array -> (H, W, C); RGB with three equal channels becomes one channel."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UserError(f"{path}: has NaN or infinite pixel values")
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[:, :, :3]
        if array.shape[2] == 3 and (array == array[:, :, :1]).all():
            return array[:, :, :1]
        return array
    raise UserError(f"{path}: image must be (H, W) or (H, W, 1|3|4), got shape {array.shape}")


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


def read_labels(path: Path) -> tuple[list[str], list[tuple[int, int, int]]] | None:
    """Parse labels.json: {"classes": [...], "colors": [[r, g, b], ...]} (colors optional)."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a folder, a broken or looping link, no permission
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not (
        isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)
    ):
        raise UserError(f"{path}: 'classes' must be a list of at least two names")
    colors = data.get("colors")
    if colors is None:
        return classes, _default_palette(len(classes))
    ok = isinstance(colors, list) and len(colors) == len(classes)
    ok = ok and all(
        isinstance(c, list) and len(c) == 3 and all(type(v) is int and 0 <= v <= 255 for v in c)
        for c in colors
    )
    if not ok:
        raise UserError(f"{path}: 'colors' must hold one [r, g, b] (0-255) per class")
    palette = [tuple(c) for c in colors]
    if len(set(palette)) != len(palette):
        raise UserError(f"{path}: 'colors' must be distinct")
    return classes, palette


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    rng = np.random.RandomState(0)
    extra = [tuple(int(v) for v in rng.randint(0, 256, 3)) for _ in range(max(0, n - 12))]
    return (DEFAULT_PALETTE + extra)[:n]


def _encode_colours(mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W) int64 codes r*65536 + g*256 + b."""
    m = mask.astype(np.int64)
    return (m[..., 0] << 16) | (m[..., 1] << 8) | m[..., 2]


def load_folder(root: str | Path) -> Dataset:
    """Load DIR/images + DIR/masks (+ optional DIR/labels.json), validating every file."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    pairs = pair_files(list_images(root / "images"), list_images(root / "masks"))
    labels = read_labels(root / "labels.json")
    images, raw_masks, channels = [], [], None
    for image_path, mask_path in pairs:
        image = image_channels(read_array(image_path), image_path)
        if channels is not None and image.shape[2] != channels:
            raise UserError(f"{image_path}: has {image.shape[2]} channels, others have {channels}")
        channels = image.shape[2]
        mask = read_array(mask_path)
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[:, :, 0]
        if mask.ndim == 3 and mask.shape[2] == 4:
            mask = mask[:, :, :3]
        if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[2] != 3):
            raise UserError(f"{mask_path}: mask must be (H, W) labels or (H, W, 3) colours")
        if mask.shape[:2] != image.shape[:2]:
            raise UserError(
                f"{mask_path}: size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                f"{image_path.name} ({image.shape[1]}x{image.shape[0]})"
            )
        images.append(normalize(image))
        raw_masks.append((mask_path, mask))
    masks, classes, palette = _decode_masks(raw_masks, labels, root / "labels.json")
    names = [p[0].stem for p in pairs]
    return Dataset(images, masks, names, classes, palette)


MAX_GREY_CLASSES = 256  # classes a grey mask may mean without labels.json


def _decode_masks(raw, labels, labels_path: Path):
    """Turn grey or colour masks into label maps; classes and palette from labels.json or data."""
    kinds = {m.ndim for _, m in raw}
    if len(kinds) > 1:
        raise UserError(f"{raw[0][0].parent}: masks mix grey labels and RGB colours")
    if kinds == {2}:
        masks = []
        for path, m in raw:
            if not np.issubdtype(m.dtype, np.integer) or m.min() < 0:
                raise UserError(f"{path}: grey mask values must be non-negative integers")
            masks.append(m.astype(np.int64))
        top = max(int(m.max()) for m in masks)
        if labels is None:
            for (path, _), m in zip(raw, masks):
                if m.max() >= MAX_GREY_CLASSES:
                    raise UserError(
                        f"{path}: grey label {int(m.max())}; without labels.json grey masks hold "
                        f"class indices 0..{MAX_GREY_CLASSES - 1}"
                    )
            n = max(top + 1, 2)
            return masks, [f"class_{i}" for i in range(n)], _default_palette(n)
        classes, palette = labels
        for (path, _), m in zip(raw, masks):
            if m.max() >= len(classes):
                raise UserError(
                    f"{path}: label {int(m.max())} has no class in {labels_path} "
                    f"({len(classes)} classes)"
                )
        return masks, classes, palette
    codes = [(path, _encode_colours(m)) for path, m in raw]
    if labels is None:
        found = sorted(set().union(*(np.unique(c).tolist() for _, c in codes)) - {0})
        colours = [(0, 0, 0)] + [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in found]
        classes = [f"class_{i}" for i in range(len(colours))]
        mapping = ", ".join(f"{i}={c}" for i, c in enumerate(colours))
        print(f"note: {raw[0][0].parent} has RGB masks and no labels.json; labels: {mapping}")
        palette = colours
    else:
        classes, palette = labels
    lut = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(palette)}
    keys = np.array(sorted(lut), dtype=np.int64)
    values = np.array([lut[k] for k in keys], dtype=np.int64)
    masks = []
    for (path, mask), (_, c) in zip(raw, codes):
        idx = np.clip(np.searchsorted(keys, c), 0, len(keys) - 1)
        bad = keys[idx] != c
        if bad.any():
            y, x = np.argwhere(bad)[0]
            colour = tuple(int(v) for v in mask[y, x])
            raise UserError(f"{path}: colour {colour} at ({x}, {y}) is not a class colour")
        masks.append(values[idx])
    return masks, classes, palette


def load_images(folder: str | Path) -> Dataset:
    """Load images for prediction: a data folder (with masks if present) or a folder of images."""
    folder = Path(folder)
    if (folder / "images").is_dir():
        if (folder / "masks").is_dir():
            return load_folder(folder)
        folder = folder / "images"
    paths = list_images(folder)
    images = [image_channels(read_array(p), p) for p in paths]
    for p, image in zip(paths, images):
        if image.shape[2] != images[0].shape[2]:
            raise UserError(
                f"{p}: has {image.shape[2]} channels, {paths[0].name} has {images[0].shape[2]}"
            )
    return Dataset([normalize(i) for i in images], None, [p.stem for p in paths], [], [])


def colorize(mask: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 colours."""
    return np.asarray(palette, dtype=np.uint8)[mask]


DEFAULT_SYNTHETIC = (100, 0)  # images, seed: the data set of every command run without --data


def dataset_from(folder: str | Path | None) -> Dataset:
    """A labelled folder, or the default synthetic data set when no folder is given."""
    if folder is not None:
        return load_folder(folder)
    from segcore.synthetic import synthetic_dataset

    return synthetic_dataset(*DEFAULT_SYNTHETIC)
