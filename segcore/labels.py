"""Classes and how masks encode them: labels.json, the rules for masks without it, instance masks,
and the mapping a model (and a study) records, which decodes every other folder's masks.

A mapping (`Labels`) names each class and gives its colour (RGB masks, pictures) and its value
(grey masks); or says the masks are instance ids, converted to background / interior / boundary
or background / foreground. Without labels.json: RGB masks get black as class 0 and the other
colours in sorted order; grey masks holding exactly two values {0, v} are background /
foreground; grey masks holding 0..K-1 (K <= 16) are class indices; anything else (instance ids,
gaps, more values) is refused with the fix. Every choice made without a declaration is printed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcore.errors import UserError
from segcore.reading import DECLARABLE

INSTANCE_CLASSES = {
    "boundary": ("background", "interior", "boundary"),  # what nucleus U-Nets are trained on
    "foreground": ("background", "foreground"),
}
MAX_INDEX_CLASSES = 16  # grey values 0..K-1 read as class indices without labels.json
FIELDS = ("classes", "colors", "values", "instances", "axes")
DECLARE_INSTANCES = 'if they are instance ids declare "instances": "boundary" (or "foreground")'
# Colours for masks and pictures when a data set brings none (class 0 is black).
DEFAULT_PALETTE = [
    (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
    (0, 255, 255), (255, 128, 0), (128, 0, 255), (0, 128, 128), (128, 128, 0), (128, 0, 0),
]  # fmt: skip


def default_palette(n: int) -> list[tuple[int, int, int]]:
    rng = np.random.RandomState(0)
    extra = [tuple(int(v) for v in rng.randint(0, 256, 3)) for _ in range(max(0, n - 12))]
    return (DEFAULT_PALETTE + extra)[:n]


@dataclass(frozen=True)
class Labels:
    """The classes (names in label order), each one's colour and grey value in masks; with
    `instances`, masks hold instance ids converted to these classes; `axes`: declared image
    layout (segcore.reading)."""

    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    values: tuple[int, ...]
    instances: str | None = None
    axes: str | None = None

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return list(self.colors)

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "colors": [list(c) for c in self.colors],
                "values": list(self.values), "instances": self.instances, "axes": self.axes}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> Labels:
        """A recorded mapping (model file, study) or a labels.json, every field checked."""
        return from_declarations(check_declarations(data, source), source)

    @classmethod
    def plain(cls, classes: list[str], palette: list[tuple[int, int, int]]) -> Labels:
        """Class indices 0..K-1 in grey masks, these colours in RGB masks."""
        return cls(tuple(classes), tuple(tuple(c) for c in palette), tuple(range(len(classes))))

    def decode(self, mask: np.ndarray, path: Path) -> np.ndarray:
        """(H, W) class indices (uint8) of a mask: (H, W) values or (H, W, 3) colours."""
        if self.instances is not None:
            return instances_to_classes(_grey(mask, path, "instance ids"), self.instances)
        if mask.ndim == 3:
            codes = _encode_colours(mask, path)
            keys = [(r << 16) | (g << 8) | b for r, g, b in self.colors]
            found, where = _lookup(codes, keys)
            if found is None:
                c = codes[where[1], where[0]]
                colour = (int(c >> 16) & 255, int(c >> 8) & 255, int(c) & 255)
                raise UserError(f"{path}: colour {colour} at {where} is not a class colour of "
                                f"{self.known()}")  # fmt: skip
            return found
        grey = _grey(mask, path, "class values")
        found, where = _lookup(grey, list(self.values))
        if found is None:
            raise UserError(f"{path}: value {grey[where[1], where[0]]} at {where} is not a class "
                            f"value of {self.known()}")  # fmt: skip
        return found

    def known(self) -> str:
        """The classes with their grey value and colour, for messages."""
        pairs = zip(self.classes, self.values, self.colors)
        return "classes " + ", ".join(f"{n} (value {v}, colour {tuple(c)})" for n, v, c in pairs)


def _grey(mask: np.ndarray, path: Path, what: str) -> np.ndarray:
    if mask.ndim != 2:
        raise UserError(f"{path}: RGB colours where {what} are expected; give grey masks")
    if not np.issubdtype(mask.dtype, np.integer):
        if not (np.isfinite(mask).all() and (mask == np.round(mask)).all()):
            raise UserError(f"{path}: mask values must be whole numbers, got {mask.dtype}")
        mask = mask.astype(np.int64)
    if mask.size and mask.min() < 0:
        raise UserError(f"{path}: mask values must not be negative (found {int(mask.min())})")
    return mask


def _encode_colours(mask: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, 3) colours -> (H, W) int64 codes r*65536 + g*256 + b."""
    if mask.dtype != np.uint8:
        raise UserError(f"{path}: RGB masks must be 8-bit, got {mask.dtype}")
    m = mask.astype(np.int64)
    return (m[..., 0] << 16) | (m[..., 1] << 8) | m[..., 2]


def _lookup(values: np.ndarray, keys: list[int]) -> tuple[np.ndarray | None, tuple[int, int]]:
    """(class index of each pixel: uint8, or uint16 past 256 classes; None if a pixel's value is
    not one of `keys`), and the (x, y) of the first such pixel."""
    order = np.argsort(keys)
    sorted_keys = np.asarray(keys, dtype=np.int64)[order]
    idx = np.clip(np.searchsorted(sorted_keys, values), 0, len(keys) - 1)
    bad = sorted_keys[idx] != values
    if bad.any():
        y, x = np.argwhere(bad)[0]
        return None, (int(x), int(y))
    dtype = np.uint8 if len(keys) <= 256 else np.uint16
    return order.astype(dtype)[idx], (0, 0)


def instances_to_classes(ids: np.ndarray, mode: str) -> np.ndarray:
    """Instance ids (H, W) -> background 0 / interior 1 / boundary 2 ("boundary": instance pixels
    whose 3x3 neighbourhood holds another id or background) or background 0 / foreground 1."""
    from scipy import ndimage

    out = (ids > 0).astype(np.uint8)
    if mode == "boundary":
        edge = (ndimage.maximum_filter(ids, size=3) != ids) | (ndimage.minimum_filter(ids, size=3)
                                                               != ids)  # fmt: skip
        out[(ids > 0) & edge] = 2
    return out


def check_declarations(data: Any, source: str) -> dict[str, Any]:
    """The fields of a labels.json (or a recorded mapping), each checked; unknown ones refused."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: must be a JSON object with 'classes' (and optional "
                        f"{', '.join(repr(f) for f in FIELDS[1:])})")  # fmt: skip
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise UserError(f"{source}: unknown field '{unknown[0]}' (known: {', '.join(FIELDS)})")
    out = {k: v for k, v in data.items() if v is not None}
    mode = out.get("instances")
    if mode is not None and mode not in INSTANCE_CLASSES:
        raise UserError(f"{source}: 'instances' must be \"boundary\" or \"foreground\", got "
                        f"{mode!r}")  # fmt: skip
    if out.get("axes") is not None and out["axes"] not in DECLARABLE:
        raise UserError(f"{source}: 'axes' must be one of {', '.join(DECLARABLE)}, got "
                        f"{out['axes']!r}")  # fmt: skip
    classes = out.get("classes")
    if classes is not None:
        if not (isinstance(classes, list) and len(classes) >= 2
                and all(isinstance(c, str) and c for c in classes)):  # fmt: skip
            raise UserError(f"{source}: 'classes' must be a list of at least two names")
        if len(set(classes)) != len(classes):
            raise UserError(f"{source}: 'classes' must be distinct names")
        if mode is not None and len(classes) != len(INSTANCE_CLASSES[mode]):
            raise UserError(f"{source}: \"instances\": \"{mode}\" makes "
                            f"{len(INSTANCE_CLASSES[mode])} classes "
                            f"({', '.join(INSTANCE_CLASSES[mode])}); 'classes' names "
                            f"{len(classes)}")  # fmt: skip
    n = len(classes) if classes else len(INSTANCE_CLASSES[mode]) if mode else None
    for key, rule in (("colors", _colour), ("values", _value)):
        if key not in out:
            continue
        given = out[key]
        if n is None:
            raise UserError(f"{source}: '{key}' needs 'classes' (one entry per class)")
        if not (isinstance(given, list) and len(given) == n and all(rule(v) for v in given)):
            what = "one [r, g, b] (0-255)" if key == "colors" else "one whole number >= 0"
            raise UserError(f"{source}: '{key}' must hold {what} per class ({n})")
        if len({json.dumps(v) for v in given}) != n:
            raise UserError(f"{source}: '{key}' must be distinct")
    return out


def _colour(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(type(c) is int and 0 <= c <= 255 for c in v)


def _value(v: Any) -> bool:
    return type(v) is int and v >= 0


def from_declarations(decl: dict[str, Any], source: str) -> Labels:
    """The mapping a labels.json declares in full ('classes' or 'instances')."""
    mode = decl.get("instances")
    classes = decl.get("classes") or (list(INSTANCE_CLASSES[mode]) if mode else None)
    if classes is None:
        raise UserError(f"{source}: 'classes' (or 'instances') is needed")
    colors = [tuple(c) for c in decl.get("colors") or default_palette(len(classes))]
    values = decl.get("values") or list(range(len(classes)))
    return Labels(tuple(classes), tuple(colors), tuple(values), mode, decl.get("axes"))


def read_declarations(path: Path) -> dict[str, Any]:
    """labels.json's fields, checked ({} when the file is not there)."""
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a folder, a broken or looping link, no permission
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return check_declarations(data, str(path))


def declares_classes(decl: dict[str, Any]) -> bool:
    return "classes" in decl or "instances" in decl


def mask_values(mask: np.ndarray, path: Path) -> set[int]:
    """The distinct values of a grey mask, or colour codes (r*65536 + g*256 + b) of an RGB one."""
    return set(np.unique(_encode_colours(mask, path) if mask.ndim == 3 else mask).tolist())


def infer_labels(folder: Path, masks: list[tuple[Path, np.ndarray]], axes: str | None) -> Labels:
    """The mapping of masks that no labels.json declares (the rules in this module's docstring);
    the choice is printed."""
    kinds = {m.ndim for _, m in masks}
    if len(kinds) > 1:
        raise UserError(f"{folder}: masks mix grey values and RGB colours; use one kind")
    found = set().union(*(mask_values(m, p) for p, m in masks))
    if kinds == {3}:
        colours = [(0, 0, 0)] + [((c >> 16) & 255, (c >> 8) & 255, c & 255)
                                 for c in sorted(found - {0})]  # fmt: skip
        classes = [f"class_{i}" for i in range(len(colours))]
        mapping = ", ".join(f"{i}={c}" for i, c in enumerate(colours))
        note(f"{folder} has RGB masks and no labels.json; classes: {mapping}")
        return Labels(tuple(classes), tuple(colours), tuple(range(len(classes))), None, axes)
    for path, m in masks:
        _grey(m, path, "class values")
    values = sorted(int(v) for v in found)
    fix = 'list the classes in labels.json ("classes", and "values" if not 0..K-1)'
    if len(values) == 1:
        raise UserError(f"{folder}: every mask holds only the value {values[0]}: nothing to learn")
    if len(values) == 2 and values[0] == 0:
        note(f"{folder}: masks hold only 0 and {values[1]}: read as background (0) and "
             f"foreground ({values[1]}); a labels.json says otherwise")  # fmt: skip
        return Labels(("background", "foreground"), tuple(default_palette(2)), (0, values[1]),
                      None, axes)  # fmt: skip
    shown = _span(values)
    if len(values) > MAX_INDEX_CLASSES:
        raise UserError(f"{folder}: masks hold {len(values)} distinct values ({shown}), too many "
                        f"for classes; {DECLARE_INSTANCES} in labels.json, else {fix}")  # fmt: skip
    if values != list(range(len(values))):
        raise UserError(f"{folder}: mask values {shown} are not class indices 0..K-1; {fix}")
    single = instance_like(masks)
    if single is not None:
        raise UserError(f"{folder}: masks look like instance ids (each of values 1..{values[-1]} "
                        f"is one blob, {single}); {DECLARE_INSTANCES} in labels.json, or "
                        f"if they are classes list them (\"classes\")")  # fmt: skip
    classes = tuple(f"class_{i}" for i in range(len(values)))
    note(f"{folder}: grey masks without labels.json; values 0..{values[-1]} read as classes "
         f"{', '.join(classes)}")  # fmt: skip
    return Labels(classes, tuple(default_palette(len(values))), tuple(values), None, axes)


def _span(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 6 else f"{values[0]}..{values[-1]}"


def instance_like(masks: list[tuple[Path, np.ndarray]]) -> str | None:
    """Why grey masks look like instance ids (None if they do not): on average at least three
    non-zero values per mask, and nearly every value one connected blob in every mask, as in an
    instance mask; a class mask's values usually come in several pieces."""
    from scipy import ndimage

    pieces, per_mask = [], []
    for _, m in masks:
        m = m.astype(np.int64)
        boxes = ndimage.find_objects(m)
        present = [v for v, box in enumerate(boxes, 1) if box is not None]
        per_mask.append(len(present))
        pieces += [ndimage.label(m[boxes[v - 1]] == v)[1] for v in present]
    if not pieces or np.mean(per_mask) < 3:
        return None
    single = float(np.mean([p == 1 for p in pieces]))
    return f"{single:.0%} of them in one piece" if single >= 0.9 else None


def note(message: str) -> None:
    """A choice made without a declaration, said on stderr."""
    print(f"note: {message}", file=sys.stderr)
