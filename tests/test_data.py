from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from segcore.data import ZSCORE, Dataset, colorize, load_folder, load_images, normalization_for
from segcore.errors import UserError
from segcore.labels import Labels
from segcore.split import split
from segcore.synthetic import ellipse_mask, synthetic_arrays, synthetic_dataset, write_synthetic

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


def make_folder(root, n=3, size=(16, 24), rgb_masks=True, labels=True, image_name="Img_{}.png",
                mask_name="Mask_{}.png"):  # fmt: skip
    rng = np.random.RandomState(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = []
    for i in range(n):
        img = rng.randint(0, 255, size + (3,), dtype=np.uint8)
        m = rng.randint(0, 3, size)
        masks.append(m)
        Image.fromarray(img).save(root / "images" / image_name.format(i))
        out = colorize(m, PALETTE) if rgb_masks else m.astype(np.uint8)
        Image.fromarray(out).save(root / "masks" / mask_name.format(i))
    if labels:
        data = {"classes": ["bg", "line", "ellipse"], "colors": [list(c) for c in PALETTE]}
        (root / "labels.json").write_text(json.dumps(data))
    return masks


def test_rgb_palette_round_trip(tmp_path):
    masks = make_folder(tmp_path)
    ds = load_folder(tmp_path)
    assert ds.classes == ["bg", "line", "ellipse"] and ds.palette == PALETTE
    assert ds.names == ["Img_0", "Img_1", "Img_2"]
    for got, want in zip(ds.masks, masks):
        assert np.array_equal(got, want)
    assert ds.raw[0].shape == (16, 24, 3) and ds.raw[0].dtype == np.uint8  # as stored
    image = np.asarray(ds.normalized(ZSCORE).images[0])
    assert image.shape == (16, 24, 3) and image.dtype == np.float32
    assert np.allclose(image.mean((0, 1)), 0, atol=1e-5)  # z-scored per channel


def test_grey_masks_without_labels_json(tmp_path, capsys):
    masks = make_folder(tmp_path, rgb_masks=False, labels=False)
    ds = load_folder(tmp_path)
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert all(np.array_equal(a, b) for a, b in zip(ds.masks, masks))
    assert capsys.readouterr().err == (
        f"note: {tmp_path / 'masks'}: grey masks without labels.json; values 0..2 read as "
        "classes class_0, class_1, class_2\n"
    )


def test_rgb_masks_without_labels_json_sorted_colours(tmp_path, capsys):
    make_folder(tmp_path, labels=False)
    ds = load_folder(tmp_path)
    # black first, then the other colours sorted: (0, 255, 0) < (255, 0, 0)
    assert ds.palette == [(0, 0, 0), (0, 255, 0), (255, 0, 0)]
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert capsys.readouterr().err == (
        f"note: {tmp_path / 'masks'} has RGB masks and no labels.json; "
        "classes: 0=(0, 0, 0), 1=(0, 255, 0), 2=(255, 0, 0)\n"
    )
    make_folder(tmp_path / "one", n=1, labels=False)  # a folder of one image (a test folder)
    assert len(load_folder(tmp_path / "one").classes) == 3


def test_pairing_by_stem_and_by_trailing_number(tmp_path):
    make_folder(tmp_path / "a", image_name="x{}.png", mask_name="x{}.png")
    assert load_folder(tmp_path / "a").names == ["x0", "x1", "x2"]
    make_folder(tmp_path / "b", image_name="Img_{}.png", mask_name="label-00{}.png")
    assert len(load_folder(tmp_path / "b").raw) == 3


def test_grey_rgb_image_becomes_one_channel_and_sizes_may_differ(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, size in enumerate([(10, 12), (30, 20)]):
        grey = np.random.RandomState(i).randint(0, 255, size, dtype=np.uint8)
        Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "images" / f"a{i}.png")
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / "masks" / f"a{i}.tif")
    np.save(tmp_path / "images" / "a2.npy", np.ones((8, 8), np.float32) * np.arange(8))
    np.save(tmp_path / "masks" / "a2.npy", np.ones((8, 8), np.int64))
    ds = load_folder(tmp_path)
    assert [im.shape for im in ds.raw] == [(10, 12, 1), (30, 20, 1), (8, 8, 1)]
    assert ds.classes == ["background", "foreground"]  # two values, 0 and 1


def _break(root, how):
    if how == "missing folder":
        return root / "nope", "data folder not found"
    make_folder(root)
    if how == "no masks folder":
        for p in (root / "masks").iterdir():
            p.unlink()
        (root / "masks").rmdir()
        return root, "masks: folder not found"
    if how == "empty images":
        for p in (root / "images").iterdir():
            p.unlink()
        return root, "no images found"
    if how == "image without mask":
        (root / "masks" / "Mask_2.png").unlink()
        return root, "Img_2.png: no mask"
    if how == "mask without image":
        (root / "images" / "Img_2.png").unlink()
        return root, "Mask_2.png: no image pairs"
    if how == "ambiguous number":
        Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(root / "masks" / "Other_1.png")
        return root, "several masks end in the same number"
    if how == "size mismatch":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "masks" / "Mask_1.png")
        return root, "Mask_1.png: size 8x8 differs"
    if how == "unknown colour":
        Image.fromarray(np.full((16, 24, 3), 7, np.uint8)).save(root / "masks" / "Mask_0.png")
        return root, r"Mask_0.png: colour \(7, 7, 7\) at \(0, 0\) is not a class colour of"
    if how == "corrupt png":
        (root / "images" / "Img_1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return root, "Img_1.png: cannot read as an image"
    if how == "non-image file":
        (root / "images" / "notes.txt").write_text("hello")
        return root, "notes.txt: not an image file"
    if how == "bad labels json":
        (root / "labels.json").write_text("{nope")
        return root, "labels.json: not valid JSON"
    if how == "labels json too few colours":
        (root / "labels.json").write_text(
            json.dumps({"classes": ["a", "b"], "colors": [[0, 0, 0]]})
        )
        return root, "'colors' must hold one"
    if how == "grey label beyond classes":
        for p in (root / "masks").iterdir():
            Image.fromarray(np.full((16, 24), 5, np.uint8)).save(p)
        return root, r"Mask_0.png: value 5 at \(0, 0\) is not a class value of classes bg"
    if how == "mixed masks":  # without labels.json: nothing says what the grey values mean
        (root / "labels.json").unlink()
        Image.fromarray(np.zeros((16, 24), np.uint8)).save(root / "masks" / "Mask_0.png")
        return root, "masks mix grey values and RGB colours; use one kind"
    if how == "mixed channels":
        Image.fromarray(np.zeros((16, 24), np.uint8)).save(root / "images" / "Img_0.png")
        Image.fromarray(np.random.RandomState(0).randint(0, 9, (16, 24, 3), dtype=np.uint8)).save(
            root / "images" / "Img_1.png"
        )
        return root, "Img_1.png: has 3 channel.s., Img_0.png has 1; every image needs the same"
    raise AssertionError(how)


CASES = [
    "missing folder", "no masks folder", "empty images", "image without mask",
    "mask without image", "ambiguous number", "size mismatch", "unknown colour", "corrupt png",
    "non-image file", "bad labels json", "labels json too few colours",
    "grey label beyond classes", "mixed masks", "mixed channels",
]  # fmt: skip


@pytest.mark.parametrize("how", CASES)
def test_loader_errors_name_the_file(tmp_path, how):
    root, message = _break(tmp_path / "d", how)
    with pytest.raises(UserError, match=message):
        load_folder(root)


def test_load_images_plain_folder(tmp_path):
    make_folder(tmp_path / "d")
    ds = load_images(tmp_path / "d" / "images")
    assert ds.masks is None and len(ds.raw) == 3
    assert load_images(tmp_path / "d").masks is not None


def test_load_images_from_a_data_folder_without_masks(tmp_path):
    """`predict --data DIR`: DIR/images without DIR/masks is read as a folder of images, by
    name, with no classes; a bad image names its own file."""
    make_folder(tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "masks")
    ds = load_images(tmp_path / "d")
    assert ds.masks is None and ds.names == ["Img_0", "Img_1", "Img_2"]
    assert ds.classes == [] and ds.palette == []
    assert ds.raw[0].shape == (16, 24, 3)
    np.save(tmp_path / "d" / "images" / "Img_3.npy", np.zeros((16, 24, 2), np.float32))
    with pytest.raises(UserError, match=r"Img_3\.npy: has 2 channel\(s\), Img_0.png has 3"):
        load_images(tmp_path / "d")


def test_default_palette_beyond_the_built_in_colours():
    """Classes beyond the twelve built-in colours get fixed colours (the same on every run and
    machine, so masks written by `predict` read back the same): NumPy's RandomState(0) draws."""
    from segcore.labels import DEFAULT_PALETTE, default_palette

    assert default_palette(3) == DEFAULT_PALETTE[:3]
    palette = default_palette(14)
    assert palette[:12] == DEFAULT_PALETTE and len(set(palette)) == 14
    assert palette[12:] == [(172, 47, 117), (192, 67, 251)]


def test_split_by_whole_image_is_seeded():
    tr, va, te = split(10, 0.2, 0.3, seed=3)
    assert (len(tr), len(va), len(te)) == (5, 2, 3)
    assert sorted(tr + va + te) == list(range(10))  # every image in exactly one part
    assert split(10, 0.2, 0.3, seed=3) == (tr, va, te) != split(10, 0.2, 0.3, seed=4)
    assert split(10, 0.2, 0, seed=3)[2] == []  # no test images split off (--test-data)
    assert [len(part) for part in split(3, 0.01, 0.01, seed=0)] == [1, 1, 1]  # none empty
    with pytest.raises(UserError, match="need 3; add images or give --test-data"):
        split(2, 0.2, 0.2, 0)
    with pytest.raises(UserError, match="need 2$"):
        split(1, 0.2, 0, 0)


def test_synthetic_is_seeded_and_shaped_like_shapes():
    a = synthetic_arrays(4, seed=5)
    b = synthetic_arrays(4, seed=5)
    c = synthetic_arrays(4, seed=6)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert not np.array_equal(a[0][0], c[0][0])
    image, labels = a[0]
    assert image.shape == (400, 200) and image.dtype == np.uint8
    labels_all = np.concatenate([m.ravel() for _, m in synthetic_arrays(20, seed=0)])
    share = np.bincount(labels_all, minlength=3) / labels_all.size
    assert 0.005 < share[1] < 0.05 and 0.01 < share[2] < 0.1  # thin lines, some ellipses
    background = image[labels == 0]
    assert background.min() >= 153 and background.max() <= 254  # truncated Gaussian


def test_synthetic_ellipses_are_clipped_not_wrapped():
    yy, xx = np.mgrid[0:50, 0:40].astype(float)
    inside = ellipse_mask(yy, xx, cy=25, cx=1, a=10, b=5, theta=0)
    assert inside[25, 0] and inside[25, 11]
    assert not inside[:, 20:].any()  # the reference wrapped this ellipse to the right edge


def test_write_synthetic_then_load(tmp_path):
    write_synthetic(tmp_path / "syn", 3, seed=2)
    ds = load_folder(tmp_path / "syn")
    assert ds.classes == ["background", "line", "ellipse"] and len(ds.raw) == 3
    assert np.array_equal(ds.masks[0], synthetic_arrays(1, seed=2)[0][1])
    with pytest.raises(UserError, match="not empty"):
        write_synthetic(tmp_path / "syn", 3, seed=2)


def test_join_keeps_every_image_with_its_mask_and_name():
    """train + validation for the final fit: both sets' images, masks and names, in order."""
    labels = Labels.plain(["bg", "fg"], [(0, 0, 0), (9, 9, 9)])
    a = Dataset([np.zeros((2, 2, 1))], [np.zeros((2, 2), int)], ["a"], labels)
    b = Dataset([np.ones((2, 2, 1))], [np.ones((2, 2), int)], ["b"], labels)
    both = a.join(b)
    assert both.names == ["a", "b"] and both.classes == ["bg", "fg"]
    assert both.palette == [(0, 0, 0), (9, 9, 9)]  # the colours predict writes masks in
    assert [m.max() for m in both.masks] == [0, 1] and [i.max() for i in both.raw] == [0, 1]
    unlabelled = Dataset([np.ones((2, 2, 1))], None, ["c"], labels)
    assert a.join(unlabelled).masks is None and len(a.join(unlabelled).raw) == 2
    norm = normalization_for("percentile", a)
    stats_a, stats_b = np.array([1.0]), np.array([2.0])  # channel statistics known for both
    a = Dataset(a.raw, a.masks, a.names, labels, norm, [stats_a])
    b = Dataset(b.raw, b.masks, b.names, labels, norm, [stats_b])
    both = a.join(b)
    assert both.norm == norm and both.stats == [stats_a, stats_b]  # nothing recomputed or lost


def test_test_data_must_have_masks_and_the_channels_of_the_data():
    from segcore.split import check_test_data

    def data(channels=1, masks=True):
        image = np.zeros((2, 2, channels))
        return Dataset([image], [np.zeros((2, 2), int)] if masks else None, ["a"],
                       Labels.plain(["bg", "fg"], [(0, 0, 0), (255, 255, 255)]))  # fmt: skip

    check_test_data(data(), data())  # fits: no error
    cases = [
        (data(masks=False), "--test-data: test images need masks (DIR/images and DIR/masks)"),
        (data(channels=3), "--test-data: images have 3 channel(s), --data's 1"),
    ]
    for test_set, message in cases:
        with pytest.raises(UserError) as e:
            check_test_data(data(), test_set)
        assert str(e.value).startswith(message), str(e.value)


def test_pil_files_keep_palette_indices_in_masks_and_drop_alpha_and_cmyk(tmp_path):
    from segcore.reading import read_image, read_mask

    rgb = np.random.RandomState(0).randint(0, 256, (6, 5, 3), dtype=np.uint8)
    alpha = np.full((6, 5, 1), 128, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1)).save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped
    assert np.array_equal(read_mask(tmp_path / "rgba.png"), rgb)
    Image.fromarray(np.concatenate([rgb[..., :1], alpha], -1), mode="LA").save(tmp_path / "la.png")
    assert np.array_equal(read_image(tmp_path / "la.png"), rgb[..., :1])
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert np.array_equal(read_image(tmp_path / "cmyk.jpg"), np.array(im.convert("RGB")))
    indexed = Image.new("P", (5, 6))
    indexed.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
    labels = np.random.RandomState(1).randint(0, 3, (6, 5)).astype(np.uint8)
    indexed.putdata(labels.ravel().tolist())
    indexed.save(tmp_path / "indexed.png")
    assert np.array_equal(read_mask(tmp_path / "indexed.png"), labels)  # indices, not colours
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError) as e:  # a pickle is never loaded
        read_image(tmp_path / "objects.npy")
    assert str(e.value) == f"{tmp_path / 'objects.npy'}: cannot read as an image (ValueError)"


@pytest.mark.parametrize(
    "labels,message",
    [
        ([], ("must be a JSON object with 'classes' (and optional 'colors', 'values', "
             "'instances', 'axes')")),
        ({"classes": ["only"]}, "'classes' must be a list of at least two names"),
        ({"classes": ["a", 3]}, "'classes' must be a list of at least two names"),
        ({"classes": ["a", "a"]}, "'classes' must be distinct names"),
        ({"classes": ["a", "b"], "colors": [[0, 0, 0], [256, 0, 0]]},
         "'colors' must hold one [r, g, b] (0-255) per class (2)"),
        ({"classes": ["a", "b"], "colors": [[9, 9, 9], [9, 9, 9]]}, "'colors' must be distinct"),
        ({"classes": ["a", "b"], "values": [0, -1]},
         "'values' must hold one whole number >= 0 per class (2)"),
        ({"classes": ["a", "b"], "values": [3, 3]}, "'values' must be distinct"),
        ({"values": [0, 255]}, "'values' needs 'classes' (one entry per class)"),
        ({"classes": ["a", "b"], "colours": []},
         "unknown field 'colours' (known: classes, colors, values, instances, axes)"),
        ({"instances": "cells"}, "'instances' must be \"boundary\" or \"foreground\", got 'cells'"),
        ({"instances": "boundary", "classes": ["bg", "cell"]},
         ("\"instances\": \"boundary\" makes 3 classes (background, interior, boundary); "
         "'classes' names 2")),
        ({"axes": "ZYX"}, "'axes' must be one of YX, CYX, YXC, got 'ZYX'"),
    ],
)  # fmt: skip
def test_labels_json_rules(tmp_path, labels, message):
    make_folder(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(UserError) as e:
        load_folder(tmp_path)
    assert str(e.value) == f"{tmp_path / 'labels.json'}: {message}"


def test_labels_json_without_colours_gets_the_default_palette(tmp_path):
    from segcore.labels import DEFAULT_PALETTE

    make_folder(tmp_path, rgb_masks=False, labels=False)
    (tmp_path / "labels.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    assert load_folder(tmp_path).labels == Labels(("a", "b", "c"), tuple(DEFAULT_PALETTE[:3]),
                                                  (0, 1, 2))  # fmt: skip


def _grey_masks(root, value, dtype, labels=None):
    make_folder(root, n=2, rgb_masks=False, labels=False)
    for p in (root / "masks").iterdir():
        p.unlink()
    for i in range(2):
        mask = np.full((16, 24), value, dtype) if i else np.zeros((16, 24), np.int64)
        mask[0, 0] = 0
        np.save(root / "masks" / f"Mask_{i}.npy", mask)
    if labels:
        (root / "labels.json").write_text(json.dumps({"classes": labels}))
    return root / "masks" / "Mask_1.npy"


@pytest.mark.parametrize(
    "value,dtype,labels,message",
    [
        (1.5, np.float32, None, "{path}: mask values must be whole numbers, got float32"),
        (-1, np.int64, None, "{path}: mask values must not be negative (found -1)"),
        (3, np.int64, ["a", "b", "c"], ("{path}: value 3 at (1, 0) is not a class value of classes "
         "a (value 0, colour (0, 0, 0)), b (value 1, colour (255, 0, 0)), c (value 2, colour "
         "(0, 255, 0))")),
    ],
)  # fmt: skip
def test_grey_mask_rules(tmp_path, value, dtype, labels, message):
    path = _grey_masks(tmp_path / "d", value, dtype, labels)
    with pytest.raises(UserError) as e:
        load_folder(tmp_path / "d")
    assert str(e.value) == message.format(path=path)


def test_grey_masks_load_as_class_indices_and_the_largest_colour_is_checked(tmp_path):
    _grey_masks(tmp_path / "d", 1.0, np.float32)  # whole numbers in a float array
    ds = load_folder(tmp_path / "d")
    assert ds.classes == ["background", "foreground"] and all(m.dtype == np.uint8 for m in ds.masks)
    assert ds.masks[1][0, 1] == 1
    make_folder(tmp_path / "rgb")  # white: beyond every class colour of the palette
    Image.fromarray(np.full((16, 24, 3), 255, np.uint8)).save(tmp_path / "rgb/masks/Mask_1.png")
    with pytest.raises(UserError, match=r"colour \(255, 255, 255\) at \(0, 0\) is not a class"):
        load_folder(tmp_path / "rgb")


def test_splits_are_recorded_under_their_names(tmp_path):
    from segcore.config import TrialConfig
    from segcore.split import split_dataset

    make_folder(tmp_path / "d", n=6)
    cfg = TrialConfig(val_fraction=0.2, test_fraction=0.2)
    splits = split_dataset(load_folder(tmp_path / "d"), cfg)
    names = splits.names()
    assert sorted(names) == ["test", "train", "validation"]
    assert sorted(n for part in names.values() for n in part) == [f"Img_{i}" for i in range(6)]
    other = load_folder(tmp_path / "d").subset([0])  # --test-data: no test images split off
    given = split_dataset(load_folder(tmp_path / "d"), cfg, other)
    assert len(given.train.raw) + len(given.val.raw) == 6 and given.test is other


def test_split_errors_say_what_each_part_needs():
    with pytest.raises(UserError) as e:
        split(2, 0.2, 0.2, 0)
    assert str(e.value) == (
        "data set has 2 image(s); 1 validation (val_fraction 0.2), 1 test (test_fraction 0.2) "
        "and at least 1 training image need 3; add images or give --test-data DIR"
    )
    with pytest.raises(UserError) as e:
        split(1, 0.2, 0, 0)
    assert str(e.value) == (
        "data set has 1 image(s); 1 validation (val_fraction 0.2) and at least 1 training image "
        "need 2"
    )


def test_normalisations_z_score_each_image_or_map_the_training_percentiles(tmp_path):
    from segcore.data import Normalization, normalization_for

    rng = np.random.RandomState(0)
    image = np.stack([rng.randn(9, 7) * 0.01 + 5, rng.randn(9, 7) * 40 - 3], -1)
    data = Dataset([image, np.full((3, 3, 2), 7.0)], None, ["a", "flat"], Labels((), (), ()))
    out = np.asarray(data.normalized(ZSCORE).images[0])
    assert out.dtype == np.float32 and out.shape == (9, 7, 2)
    assert np.allclose(out.mean((0, 1)), 0, atol=1e-4) and np.allclose(
        out.std((0, 1)), 1, atol=1e-3
    )
    flat = data.normalized(ZSCORE).images[1]
    assert np.array_equal(np.asarray(flat), np.zeros((3, 3, 2)))  # flat: zeros
    # percentile: each channel's 1st and 99.8th percentile over the images, in raw units
    ramp = np.arange(1000, dtype=np.uint16).reshape(20, 50, 1) * np.array([1, 10], np.uint16)
    norm = normalization_for("percentile", Dataset([ramp], None, ["r"], Labels((), (), ())))
    assert norm.mode == "percentile"
    assert np.allclose(norm.low, [9.99, 99.9]) and np.allclose(norm.high, [997.002, 9970.02])
    seen = Dataset([ramp], None, ["r"], Labels((), (), ())).normalized(norm).images[0]
    assert seen[0:1, 0:1][0, 0, 1] == pytest.approx((0 - 99.9) / (9970.02 - 99.9))
    assert np.allclose(seen[:, :], np.asarray(seen)) and np.allclose(seen[2:5, 7:9],
                                                                     np.asarray(seen)[2:5, 7:9])  # fmt: skip
    assert (
        Normalization.from_dict(norm.to_dict()) == norm and Normalization.from_dict(None) == ZSCORE
    )
    with pytest.raises(AssertionError, match="normalized"):
        Dataset([ramp], None, ["r"], Labels((), (), ())).images  # noqa: B018 (chosen first)


def test_subset_of_an_unlabelled_data_set():
    images = [np.zeros((2, 2, 1)), np.ones((2, 2, 1))]
    part = Dataset(images, None, ["a", "b"], Labels((), (), ())).subset([1])
    assert part.masks is None and part.names == ["b"] and part.raw[0].max() == 1


def test_file_listing_and_pairing_rules(tmp_path):
    from segcore.data import _trailing_number, list_images, pair_files
    from segcore.reading import IMAGE_SUFFIXES

    (tmp_path / "f").mkdir()
    for name in (".DS_Store", "a.png", "b.npy"):
        (tmp_path / "f" / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path / "f")] == ["a.png", "b.npy"]  # hidden: skipped
    (tmp_path / "f" / "c.txt").write_text("")
    with pytest.raises(UserError) as e:
        list_images(tmp_path / "f")
    assert (
        str(e.value)
        == f"{tmp_path / 'f' / 'c.txt'}: not an image file (expected "
        + ", ".join(IMAGE_SUFFIXES)
        + ")"
    )
    assert _trailing_number("scan_007") == "7" and _trailing_number("scan") is None

    def paths(folder, *names):
        return [tmp_path / folder / n for n in names]

    # the same stem, with no number to pair by; and the stem wins over the trailing number
    images, masks = paths("i", "cat.png", "dog_2.png"), paths("m", "dog_1.png", "cat.png")
    images.append(tmp_path / "i" / "dog_1.png")
    masks.append(tmp_path / "m" / "dog_2.png")
    assert pair_files(images, masks) == list(
        zip(images, [masks[1], masks[2], masks[0]], strict=True)
    )
    images, masks = paths("i", "x_3.png"), paths("m", "a_3.png", "b_3.png")
    with pytest.raises(UserError) as e:
        pair_files(images, masks)
    assert str(e.value) == f"{images[0]}: several masks end in the same number (a_3.png, b_3.png)"
    images, masks = paths("i", "1.png", "img_1.png"), paths("m", "1.png")
    with pytest.raises(UserError) as e:
        pair_files(images, masks)
    assert str(e.value) == f"{masks[0]}: paired with more than one image"


def test_mask_shapes_a_folder_may_hold(tmp_path):
    make_folder(tmp_path / "d", n=2, size=(6, 10))
    masks = load_folder(tmp_path / "d").masks
    one = tmp_path / "d" / "masks" / "Mask_0.png"
    one.unlink()  # the same labels as (H, W, 1) grey in a .npy, and as RGBA colours
    rgba = np.concatenate([colorize(masks[1], PALETTE), np.full((6, 10, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "d" / "masks" / "Mask_1.png")
    np.save(tmp_path / "d" / "masks" / "Mask_0.npy", np.full((6, 10, 1), 2, np.uint8))
    ds = load_folder(tmp_path / "d")  # (H, W, 1) counts as grey values, RGBA as colours
    assert (ds.masks[0] == 2).all() and np.array_equal(ds.masks[1], masks[1])
    np.save(tmp_path / "d" / "masks" / "Mask_0.npy", colorize(np.full((6, 10), 2), PALETTE))
    ds = load_folder(tmp_path / "d")
    assert np.array_equal(ds.masks[1], masks[1]) and (ds.masks[0] == 2).all()
    np.save(tmp_path / "d" / "masks" / "Mask_0.npy", rgba)  # RGBA colours in a .npy
    assert np.array_equal(load_folder(tmp_path / "d").masks[0], masks[1])
    for i in range(2):  # (H, W, 1) grey on both
        mask = np.full((6, 10, 1), i, np.uint8)
        (tmp_path / "d" / "masks" / f"Mask_{i}.{'npy' if i == 0 else 'png'}").unlink()
        np.save(tmp_path / "d" / "masks" / f"Mask_{i}.npy", mask)
    assert [int(m.max()) for m in load_folder(tmp_path / "d").masks] == [0, 1]
    bad = tmp_path / "d" / "masks" / "Mask_1.npy"
    np.save(bad, np.zeros((6, 10, 2), np.uint8))
    with pytest.raises(UserError) as e:
        load_folder(tmp_path / "d")
    assert (
        str(e.value)
        == f"{bad}: a mask must be (H, W) values or (H, W, 3) colours, got shape (6, 10, 2)"
    )
    np.save(bad, np.zeros((4, 10), np.uint8))
    with pytest.raises(UserError) as e:
        load_folder(tmp_path / "d")
    assert str(e.value) == f"{bad}: size 10x4 differs from its image Img_1.png (10x6)"


def test_a_normalized_view_behaves_as_a_float32_image():
    from segcore.data import Normalized

    raw = np.arange(2 * 3 * 2, dtype=np.uint16).reshape(2, 3, 2)
    view = Normalized(raw, np.array([1.0, 2.0], np.float32), np.array([0.5, 2.0], np.float32))
    whole = (raw.astype(np.float32) - [1.0, 2.0]) * [0.5, 2.0]
    assert view.shape == (2, 3, 2) and view.ndim == 3 and view.dtype == np.float32
    assert np.array_equal(np.asarray(view), whole) and np.asarray(view).dtype == np.float32
    assert np.asarray(view, np.float16).dtype == np.float16
    assert np.array_equal(view[0:1, 1:3], whole[0:1, 1:3])  # a patch: only it normalised
    assert np.array_equal(view[1], whole[1]) and np.array_equal(view[..., 0], whole[..., 0])
    assert np.array_equal(view[:, :, 1:2], whole[:, :, 1:2]) and np.array_equal(view[:1], whole[:1])


def test_subsets_and_renormalised_sets_keep_everything_else():
    from segcore.data import normalization_for

    labels = Labels.plain(["bg", "fg"], [(0, 0, 0), (9, 9, 9)])
    raw = [np.full((4, 4, 1), v, np.float32) for v in (0.1, 0.2, 0.3)]
    masks = [np.full((4, 4), i % 2, np.uint8) for i in range(3)]
    stats = [np.array([[v], [0.0]]) for v in (0.1, 0.2, 0.3)]
    data = Dataset(raw, masks, ["a", "b", "c"], labels, ZSCORE, stats)
    part = data.subset([2, 0])
    assert part.names == ["c", "a"] and part.labels == labels and part.norm == ZSCORE
    assert [m[0, 0] for m in part.masks] == [0, 0] and part.stats == [stats[2], stats[0]]
    assert data.subset([1]).masks[0][0, 0] == 1
    assert Dataset(raw, None, ["a", "b", "c"], labels).subset([0]).masks is None
    assert normalization_for("zscore", data) is ZSCORE
    before = data.images[0][0, 0, 0]  # views made (and cached) for z-scores
    percentile = normalization_for("percentile", data)  # floats spanning 0.2: not clipped to 1
    view = data.normalized(percentile).images[2]
    assert np.asarray(view).dtype == view[0:2, 0:2].dtype == np.float32  # what the model takes
    after = view[0, 0, 0]
    assert after != before and after == pytest.approx(
        (0.3 - percentile.low[0]) / (percentile.high[0] - percentile.low[0]), rel=1e-5
    )


def test_dataset_from_a_folder_decodes_with_the_mapping_given_and_caches(tmp_path):
    from segcore.data import dataset_from

    write_synthetic(tmp_path / "d", 3, seed=1, height=24, width=32)
    own = load_folder(tmp_path / "d").labels
    (tmp_path / "d" / "labels.json").unlink()  # a test folder: the model's mapping decodes it
    mapping = Labels(("x", "y", "z"), own.colors, own.values)
    data = dataset_from(tmp_path / "d", mapping, tmp_path / "cache")
    assert data.classes == ["x", "y", "z"]
    assert list((tmp_path / "cache").glob("*.npy"))
    assert dataset_from(None).names[:2] == synthetic_dataset(100, seed=0).names[:2]


def test_the_split_is_the_configs_seed_every_time():
    from segcore.config import TrialConfig
    from segcore.split import split_dataset

    data = synthetic_dataset(12, seed=0, height=16, width=16)
    cfg = TrialConfig(seed=3)
    names = split_dataset(data, cfg).names()
    assert names == split_dataset(data, cfg).names()
    assert names != split_dataset(data, TrialConfig(seed=4)).names()
