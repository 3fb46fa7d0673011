"""Users' own folders (issue 21): each format is read as meant or refused in one line that says
the fix; every case is built here, small, in a temporary folder."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from segcore.data import ZSCORE, colorize, load_folder, load_images, normalization_for
from segcore.errors import UserError
from segcore.labels import Labels, instances_to_classes

H, W = 24, 32
PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


def folder(root, images, masks, labels=None, image_ext="tif", mask_ext="png"):
    """DIR/images/a{i}.EXT and DIR/masks/a{i}.EXT from arrays; labels.json if given."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (image, mask) in enumerate(zip(images, masks)):
        write(root / "images" / f"a{i}.{image_ext}", image)
        write(root / "masks" / f"a{i}.{mask_ext}", mask)
    if labels is not None:
        (root / "labels.json").write_text(json.dumps(labels))
    return root


def write(path, array):
    if path.suffix == ".npy":
        np.save(path, array)
    elif path.suffix == ".tif":
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)


def grey_image(i=0):
    return np.random.RandomState(i).randint(0, 4000, (H, W)).astype(np.uint16)


def error(root, **kw) -> str:
    with pytest.raises(UserError) as e:
        load_folder(root, **kw)
    return str(e.value)


def test_binary_masks_saved_as_0_255_are_background_and_foreground(tmp_path, capsys):
    mask = np.zeros((H, W), np.uint8)
    mask[5:9, 6:12] = 255
    ds = load_folder(folder(tmp_path, [grey_image(0), grey_image(1)], [mask, mask * 0]))
    assert ds.classes == ["background", "foreground"]  # 2 classes, not 256
    assert ds.labels.values == (0, 255) and ds.masks[0][6, 7] == 1 and ds.masks[0][0, 0] == 0
    assert capsys.readouterr().err == (
        f"note: {tmp_path / 'masks'}: masks hold only 0 and 255: read as background (0) and "
        "foreground (255); a labels.json says otherwise\n"
    )


def instances(n_objects: int) -> np.ndarray:
    """uint16 ids 1..n, one 3x3 square each, spread over the image."""
    ids = np.zeros((H, W), np.uint16)
    for k in range(n_objects):
        y, x = 1 + 4 * (k // 7), 1 + 4 * (k % 7)
        ids[y : y + 3, x : x + 3] = k + 1
    return ids


def test_instance_masks_without_a_declaration_are_refused_with_the_fix(tmp_path):
    many = folder(tmp_path / "many", [grey_image()], [instances(20)], mask_ext="tif")
    assert error(many) == (
        f"{many / 'masks'}: masks hold 21 distinct values (0..20), too many for classes; if "
        'they are instance ids declare "instances": "boundary" (or "foreground") in labels.json, '
        'else list the classes in labels.json ("classes", and "values" if not 0..K-1)'
    )
    few = folder(tmp_path / "few", [grey_image()], [instances(4)], mask_ext="tif")
    assert error(few) == (  # 0..4 would pass for class indices: each value one blob says not
        f"{few / 'masks'}: masks look like instance ids (each of values 1..4 is one blob, 100% "
        'of them in one piece); if they are instance ids declare "instances": "boundary" (or '
        '"foreground") in labels.json, or if they are classes list them ("classes")'
    )


def test_declared_instances_become_interior_and_boundary_or_foreground(tmp_path):
    ids = np.zeros((H, W), np.uint16)
    ids[2:7, 2:7] = 300  # a 5x5 nucleus
    ids[2:7, 7:10] = 7  # touching it on the right
    declared = {"instances": "boundary", "classes": ["background", "nucleus", "boundary"]}
    ds = load_folder(folder(tmp_path / "b", [grey_image()], [ids], declared, mask_ext="tif"))
    assert ds.classes == ["background", "nucleus", "boundary"] and ds.labels.instances == "boundary"
    m = ds.masks[0]
    assert m[4, 4] == 1  # interior of the first nucleus
    assert m[2, 4] == 2 and m[4, 6] == 2 and m[4, 7] == 2  # its border and where the two touch
    assert m[0, 0] == 0 and m[4, 10] == 0
    assert np.array_equal(m, instances_to_classes(ids, "boundary"))
    fg = load_folder(folder(tmp_path / "f", [grey_image()], [ids], {"instances": "foreground"},
                            mask_ext="tif"))  # fmt: skip
    assert fg.classes == ["background", "foreground"]
    assert np.array_equal(fg.masks[0], (ids > 0).astype(np.uint8))


def test_the_boundary_rule_is_the_hela_builders():
    """../shared/datasets/hela/build.py's 3-class masks, from the same instance ids."""
    from scipy import ndimage as ndi

    ids = np.random.RandomState(0).randint(0, 6, (40, 40)).repeat(3, 0).repeat(3, 1)
    boundary = (ids > 0) & ((ndi.maximum_filter(ids, size=3) != ids)
                            | (ndi.minimum_filter(ids, size=3) != ids))  # fmt: skip
    expected = np.where(boundary, 2, (ids > 0).astype(np.uint8))
    assert np.array_equal(instances_to_classes(ids.astype(np.uint16), "boundary"), expected)


def two_channels() -> np.ndarray:
    stack = np.stack([grey_image(0), grey_image(1)])  # (C, H, W)
    stack[1, 3, 4] = 40000
    return stack


def test_multi_channel_stacks_are_read_from_their_metadata_or_refused(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[0, :3] = 1
    plain = folder(tmp_path / "plain", [two_channels()], [mask])
    fix = 'declare the layout in labels.json, e.g. "axes": "CYX" (channels, rows, columns)'
    assert error(plain) == (
        f"{plain / 'images' / 'a0.tif'}: cannot tell the layout of an array of shape (2, 24, 32) "
        f"(channels or planes?); {fix}"
    )
    tifffile.imwrite(plain / "images" / "a0.tif", two_channels(), imagej=True,
                     metadata={"axes": "CYX"})  # fmt: skip
    ds = load_folder(plain)  # ImageJ says: channels
    assert ds.channels == 2 and ds.raw[0].dtype == np.uint16 and ds.raw[0][3, 4, 1] == 40000
    assert np.array_equal(ds.raw[0][..., 0], two_channels()[0])
    declared = folder(tmp_path / "declared", [two_channels()], [mask], {"axes": "CYX"})
    assert load_folder(declared).raw[0][3, 4, 1] == 40000  # no metadata, but declared
    tifffile.imwrite(plain / "images" / "a0.tif", two_channels(), imagej=True,
                     metadata={"axes": "ZYX"})  # fmt: skip
    assert error(plain) == (
        f"{plain / 'images' / 'a0.tif'}: a stack of 2 Z planes; train_optuna segments 2-D "
        f"images: save one plane per file, or if they are channels {fix}"
    )
    last = folder(tmp_path / "npy", [two_channels().transpose(1, 2, 0)], [mask], image_ext="npy")
    assert load_folder(last).channels == 2  # (H, W, 2) arrays: channels last
    first = folder(tmp_path / "npy-first", [two_channels()], [mask], image_ext="npy")
    assert "cannot tell the layout of an array of shape (2, 24, 32)" in error(first)


def test_sixteen_bit_rgb_tiff_keeps_every_bit(tmp_path):
    rgb = np.random.RandomState(0).randint(0, 256, (H, W, 3)).astype(np.uint16)  # all below 256
    rgb[0, 0] = (40000, 65535, 7)
    mask = np.zeros((H, W), np.uint8)
    mask[0, :3] = 1
    path = tmp_path / "images" / "a0.tif"
    folder(tmp_path, [rgb], [mask])
    tifffile.imwrite(path, rgb, photometric="rgb")
    ds = load_folder(tmp_path)
    assert ds.channels == 3 and ds.raw[0].dtype == np.uint16 and np.array_equal(ds.raw[0], rgb)
    seen = np.asarray(ds.normalized(ZSCORE).images[0])
    assert len(np.unique(seen[1:, :, 0])) > 200  # the signal below 256 is not flattened to 0


def _png16_rgb(path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one): the bytes as the PNG specification lays out."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    h, w = rgb.shape[:2]
    rows = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))  # fmt: skip


def test_sixteen_bit_png_grey_is_read_whole_and_rgb_is_refused(tmp_path):
    grey = grey_image()
    grey[1, 1] = 40000
    mask = np.zeros((H, W), np.uint8)
    mask[0, :3] = 1
    root = folder(tmp_path, [grey], [mask], image_ext="png")
    assert load_folder(root).raw[0][1, 1, 0] == 40000
    _png16_rgb(root / "images" / "a0.png", np.full((H, W, 3), 300, np.uint16))
    assert error(root) == (
        f"{root / 'images' / 'a0.png'}: a 16-bit colour PNG, which would be read at 8 bits; "
        "save it as TIFF (16 bits kept)"
    )


def rgb_folder(root, masks, labels=True):
    images = [grey_image(i).astype(np.uint8) for i in range(len(masks))]
    declared = {"classes": ["background", "line", "ellipse"], "colors": [list(c) for c in PALETTE]}
    return folder(root, images, [colorize(m, PALETTE) for m in masks],
                  declared if labels else None, image_ext="png")  # fmt: skip


def test_classes_belong_to_the_model_not_to_the_folder(tmp_path):
    both = np.zeros((H, W), np.uint8)
    both[2, :] = 1  # a red line
    both[10:14, 10:14] = 2  # a green ellipse
    trained = load_folder(rgb_folder(tmp_path / "trained", [both])).labels
    # red sorts after green: the folder's own order would swap line and ellipse
    alone = load_folder(rgb_folder(tmp_path / "same", [both], labels=False))
    assert alone.masks[0][2, 0] == 2
    again = load_folder(tmp_path / "same", trained)
    assert again.classes == ["background", "line", "ellipse"] and again.masks[0][2, 0] == 1
    assert again.masks[0][11, 11] == 2
    only_ellipse = both * (both == 2)  # a folder without a line: no class shifts
    lacking = load_folder(rgb_folder(tmp_path / "lacking", [only_ellipse], labels=False), trained)
    assert lacking.masks[0][11, 11] == 2 and load_folder(tmp_path / "lacking").masks[0][11, 11] == 1
    odd = rgb_folder(tmp_path / "odd", [both], labels=False)
    colours = colorize(both, PALETTE)
    colours[5, 6] = (0, 0, 255)
    Image.fromarray(colours).save(odd / "masks" / "a0.png")
    assert error(odd, labels=trained).startswith(
        f"{odd / 'masks' / 'a0.png'}: colour (0, 0, 255) at (6, 5) is not a class colour of "
        "classes background (value 0, colour (0, 0, 0)), line"
    )


def test_a_folder_naming_the_classes_in_another_order_is_mapped_by_name(tmp_path):
    both = np.zeros((H, W), np.uint8)
    both[2, :], both[10:14, 10:14] = 1, 2
    trained = load_folder(rgb_folder(tmp_path / "trained", [both])).labels
    other = rgb_folder(tmp_path / "other", [both], labels=False)
    swapped = {"classes": ["background", "ellipse", "line"], "values": [0, 1, 2],
               "colors": [[0, 0, 0], [0, 255, 0], [255, 0, 0]]}  # fmt: skip
    (other / "labels.json").write_text(json.dumps(swapped))
    cache = tmp_path / "cache"
    own = load_folder(other, cache=cache)  # its own order, cached
    assert own.masks[0][2, 0] == 2 and own.masks[0][11, 11] == 1
    ds = load_folder(other, trained, cache)  # the same file decoded another way: not the cached
    assert ds.classes == ["background", "line", "ellipse"]
    assert ds.masks[0][2, 0] == 1 and ds.masks[0][11, 11] == 2  # by name, not by position


def test_a_folders_declared_axes_win_and_a_models_fill_in(tmp_path):
    """The axes a data folder's labels.json declares are how its images are read, with or
    without a model's mapping; where it declares none, the model's are used."""
    from dataclasses import replace

    from segcore.data import folder_labels

    both = np.zeros((H, W), np.uint8)
    both[2, :] = 1
    trained = load_folder(rgb_folder(tmp_path / "trained", [both])).labels
    named = rgb_folder(tmp_path / "named", [both])  # declares the classes, no axes
    _, decoded, remap = folder_labels(named, replace(trained, axes="YXC"), [])
    assert decoded.classes == trained.classes and remap is None and decoded.axes == "YXC"
    bare = rgb_folder(tmp_path / "bare", [both], labels=False)
    (bare / "labels.json").write_text(json.dumps({"axes": "YXC"}))  # only the layout
    mapping, decoded, remap = folder_labels(bare, trained, [])
    assert mapping == trained and remap is None
    assert decoded == replace(trained, axes="YXC")


def test_grey_masks_decode_with_the_models_values(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[4:8, 4:8] = 255
    trained = load_folder(folder(tmp_path / "t", [grey_image()], [mask])).labels
    assert trained.values == (0, 255)
    test = folder(tmp_path / "test", [grey_image(1)], [np.zeros((H, W), np.uint8)])
    assert load_folder(test, trained).classes == ["background", "foreground"]  # only 0 there
    write(test / "masks" / "a0.png", np.full((H, W), 128, np.uint8))
    assert error(test, labels=trained).startswith(
        f"{test / 'masks' / 'a0.png'}: value 128 at (0, 0) is not a class value of classes "
        "background (value 0"
    )


def test_a_recorded_mapping_survives_json_and_a_folder_of_images_follows_its_axes(tmp_path):
    labels = Labels(("bg", "cell", "edge"), ((0, 0, 0), (1, 2, 3), (4, 5, 6)), (0, 9, 12),
                    "boundary", "CYX")  # fmt: skip
    assert Labels.from_dict(json.loads(json.dumps(labels.to_dict())), "x") == labels
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", two_channels())  # no metadata
    assert load_images(tmp_path / "images", labels).raw[0][3, 4, 1] == 40000  # the model's axes
    with pytest.raises(UserError, match="cannot tell the layout"):
        load_images(tmp_path / "images")
    (tmp_path / "labels.json").write_text(json.dumps({"axes": "CYX"}))
    assert load_images(tmp_path).raw[0][3, 4, 1] == 40000  # a data folder's labels.json says
    (tmp_path / "labels.json").unlink()
    plain = Labels(labels.classes, labels.colors, labels.values, None, "CYX")
    mask = np.zeros((H, W), np.uint8)
    mask[0, 0], mask[1, 1] = 9, 12
    (tmp_path / "masks").mkdir()
    write(tmp_path / "masks" / "a.png", mask)
    data = load_images(tmp_path, plain)  # a data folder: masks decoded with the model's mapping
    assert data.labels == plain and data.masks[0][0, 0] == 1 and data.masks[0][1, 1] == 2


def test_percentile_normalisation_is_fitted_on_the_images_given():
    from segcore.data import Dataset

    ramp = np.arange(H * W, dtype=np.uint16).reshape(H, W, 1)
    data = Dataset([ramp, ramp + 1000], None, ["a", "b"], Labels((), (), ()))
    norm = normalization_for("percentile", data)
    assert norm.low == pytest.approx((np.percentile(np.r_[ramp.ravel(), ramp.ravel() + 1000], 1),))
    seen = data.normalized(norm).images[1]
    assert seen[0:1, 0:1][0, 0, 0] == pytest.approx((1000 - norm.low[0]) / (norm.high[0]
                                                                           - norm.low[0]))  # fmt: skip
    assert np.asarray(seen).dtype == np.float32  # as numpy asks for it, in the type asked
    assert np.asarray(seen, dtype=np.float16).dtype == np.float16
    assert np.array_equal(np.asarray(seen, dtype=np.float16), np.asarray(seen).astype(np.float16))


def test_the_decode_cache_maps_each_file_once_and_follows_changes(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[4:8, 4:8] = 255
    root = folder(tmp_path / "d", [grey_image(0), grey_image(1)], [mask, mask])
    cache = tmp_path / "cache"
    first = load_folder(root, cache=cache)
    assert len(list(cache.glob("*.npy"))) == 4  # two images, two masks
    again = load_folder(root, first.labels, cache)
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in again.raw + again.masks)
    assert all(
        np.array_equal(a, b) for a, b in zip(first.raw + first.masks, again.raw + again.masks)
    )
    assert np.array_equal(again.raw[0][..., 0], grey_image(0)) and again.masks[0][5, 5] == 1
    changed = grey_image(7)
    write(root / "images" / "a0.tif", changed)
    assert np.array_equal(load_folder(root, first.labels, cache).raw[0][..., 0], changed)
    assert len(list(cache.glob("*.npy"))) == 5  # a changed file is decoded afresh


def test_the_cache_follows_a_changed_layout_or_mapping_and_keeps_the_declared_axes(tmp_path):
    """A cached decode is keyed by how the file was read: declaring another layout, or
    another class mapping, decodes afresh; the declared axes stay on the data set's classes
    (a model trained on it records them for predict)."""
    mask = np.zeros((H, W), np.uint8)
    mask[3, 4] = 1
    root = folder(tmp_path / "d", [two_channels()], [mask], {"axes": "CYX"})
    cache = tmp_path / "cache"
    first = load_folder(root, cache=cache)
    assert first.raw[0].shape == (H, W, 2) and first.raw[0][3, 4, 1] == 40000
    assert first.labels.axes == "CYX"
    (root / "labels.json").write_text(json.dumps({"axes": "YXC"}))  # the same file, read anew
    with pytest.raises(UserError, match=r"size 32x24 differs from its image a0.tif \(24x2\)"):
        load_folder(root, cache=cache)
    (root / "labels.json").write_text(json.dumps({"axes": "CYX", "classes": ["bg", "a", "b"],
                                                  "values": [0, 2, 1]}))  # fmt: skip
    remapped = load_folder(root, cache=cache)
    assert remapped.masks[0][3, 4] == 2 and remapped.labels.axes == "CYX"  # value 1 is "b"
    again = load_folder(root, cache=cache)
    assert again.masks[0][3, 4] == 2 and isinstance(again.masks[0], np.memmap)
