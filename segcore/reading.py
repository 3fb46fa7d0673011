"""Reading image and mask files as stored: TIFF with tifffile (every page and channel, axes from
ImageJ/OME metadata), PNG/JPEG/BMP with Pillow, NPY with numpy; pixels kept at full bit depth.

The rules (README, "Your own data"): an image is (H, W, C) with C channels; a layout that cannot
be told from the file (a multi-page TIFF without ImageJ or OME metadata, a 3-D array whose first
axis is short) is refused unless `labels.json` declares `"axes"`; Z-stacks and time series are
refused (one 2-D image per file). Masks are (H, W) values or (H, W, 3) colours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segcore.errors import UserError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (*PIL_SUFFIXES, *TIFF_SUFFIXES, ".npy")
MAX_CHANNELS = 16  # a 3-D .npy's last axis is channels when this long at most, and the shortest
DECLARABLE = ("YX", "CYX", "YXC")  # the `axes` a labels.json may declare
AXES_FIX = 'declare the layout in labels.json, e.g. "axes": "CYX" (channels, rows, columns)'
_STACK = {"Z": "Z planes", "T": "time points"}


def read_image(path: Path, axes: str | None = None) -> np.ndarray:
    """An image file as (H, W, C) at its own dtype; `axes` (labels.json's declaration) gives the
    layout of files with as many dimensions, whatever their metadata says."""
    array, found = _read(path)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UserError(f"{path}: pixels of type {array.dtype} are not numbers an image can hold")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UserError(f"{path}: has NaN or infinite pixel values")
    if axes is not None and array.ndim == len(axes):
        found = axes
    image = _to_hwc(array, found, path)
    if image.shape[2] == 3 and (image == image[:, :, :1]).all():
        return image[:, :, :1]  # a grey image saved as RGB: one channel
    return image


def read_mask(path: Path) -> np.ndarray:
    """A mask file as (H, W) values or (H, W, 3) colours, at its own dtype."""
    array, axes = _read(path, mask=True)
    keep = [i for i, n in enumerate(array.shape) if n > 1 or axes[i] in "YX"]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if array.ndim == 3 and axes[2] == "S" and array.shape[2] in (3, 4):
        return array[:, :, :3]
    if array.ndim != 2:
        raise UserError(f"{path}: a mask must be (H, W) values or (H, W, 3) colours, got shape "
                        f"{array.shape}")  # fmt: skip
    if array.dtype == bool:
        return array.astype(np.uint8)
    return array


def _read(path: Path, mask: bool = False) -> tuple[np.ndarray, str]:
    """(array, axes): tifffile's axes letters for TIFF ('?' where the file does not say)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            return array, _npy_axes(array)
        if suffix in TIFF_SUFFIXES:
            return _read_tiff(path)
        return _read_pil(path, mask)
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, EOFError, KeyError) as e:
        raise UserError(f"{path}: cannot read as an image ({type(e).__name__})") from None


def _npy_axes(array: np.ndarray) -> str:
    if array.ndim == 2:
        return "YX"
    if array.ndim == 3 and array.shape[2] <= min(MAX_CHANNELS, *array.shape[:2]):
        return "YXS"  # the last axis is the shortest: channels, as numpy and Pillow store them
    return "?" * array.ndim


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        array = series.asarray()
        axes = series.axes
        if not (tif.is_imagej or tif.is_ome):  # only 'YX' and RGB 'S' are sure without them
            axes = "".join(a if a in "YXS" else "?" for a in axes)
    return array, axes


def _read_pil(path: Path, mask: bool) -> tuple[np.ndarray, str]:
    with Image.open(path) as im:
        if im.format == "PNG":
            _check_png_depth(path)
        if getattr(im, "n_frames", 1) > 1:
            raise UserError(f"{path}: holds {im.n_frames} frames; save one image per file (TIFF "
                            f"for channels)")  # fmt: skip
        if im.mode == "P" and mask:  # palette PNGs store label indices: keep them
            return np.array(im), "YX"
        if im.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "La", "RGBa"):
            im = im.convert("L" if im.mode in ("LA", "La") else "RGB")  # alpha is not data
        array = np.array(im)
    return array, "YX" if array.ndim == 2 else "YXS"


def _check_png_depth(path: Path) -> None:
    """Pillow reads 16-bit RGB(A) and grey+alpha PNGs at 8 bits: refuse them, never truncate."""
    with open(path, "rb") as f:
        head = f.read(26)
    depth, colour = head[24], head[25]
    if depth == 16 and colour in (2, 4, 6):
        raise UserError(f"{path}: a 16-bit colour PNG, which would be read at 8 bits; save it as "
                        f"TIFF (16 bits kept)")  # fmt: skip


def _to_hwc(array: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """(H, W, C) from an array and its axes letters (Y, X; C or S channels; Z, T stacks;
    anything else unknown): singleton axes dropped, stacks and unknown layouts refused."""
    keep = [i for i, n in enumerate(array.shape) if n > 1 or axes[i] in "YX"]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    for letter, what in _STACK.items():
        if letter in axes:
            n = array.shape[axes.index(letter)]
            raise UserError(f"{path}: a stack of {n} {what}; train_optuna segments 2-D images: "
                            f"save one plane per file, or if they are channels {AXES_FIX}")  # fmt: skip
    if array.ndim == 2:
        return array[:, :, None]  # one plane is (H, W), whatever the file calls its axes
    channel = [i for i, a in enumerate(axes) if a in "CS"]
    rest = [a for a in axes if a not in "CSYX"]
    if rest or len(channel) != 1 or axes.count("Y") != 1 or axes.count("X") != 1:
        raise UserError(f"{path}: cannot tell the layout of an array of shape {array.shape} "
                        f"(channels or planes?); {AXES_FIX}")  # fmt: skip
    order = [axes.index("Y"), axes.index("X"), channel[0]]
    return np.ascontiguousarray(array.transpose(order))
