from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from segcore.patches import train_batches, validation_patches

torch.set_num_threads(1)

NUM_CLASSES = 3
LINE = 2


def _encode(image_index, rows, cols):
    # Nonzero, so zero padding is recognisable; decodable back to (image, row, col).
    return image_index * 10_000 + rows * 100 + cols + 1


@pytest.fixture(scope="module")
def dataset():
    """Four 64x48 images, one 20x20; channel 0 encodes (image, row, col), channel 1 = -channel 0."""
    images, masks = [], []
    for k, (h, w) in enumerate([(64, 48)] * 4 + [(20, 20)]):
        rows, cols = np.mgrid[:h, :w]
        code = _encode(k, rows, cols).astype(np.float32)
        images.append(np.stack([code, -code], axis=-1))
        mask = np.zeros((h, w), np.int64)
        mask[h // 4 : h // 2, w // 4 : w // 2] = 1
        # One pixel per column: the thin line class, ~2 % of a 64x48 image.
        mask[rows == (cols + 3 * k) % h] = LINE
        masks.append(mask)
    return images, masks


def _take(stream, n):
    return [tuple(t.clone() for t in next(stream)) for _ in range(n)]


def _batches(dataset, n=3, **kwargs):
    args = {"patch_size": 16, "batch_size": 8, "aug_strength": 0.0, "fg_fraction": 0.3, "seed": 0}
    args |= kwargs
    with train_batches(*dataset, **args) as stream:
        return _take(stream, n)


def _reference_crop(image, mask, top, left, size):
    """Crop with top-left (top, left), zero outside the image: (C, size, size), (size, size)."""
    rows = slice(top + size, top + 2 * size)
    cols = slice(left + size, left + 2 * size)
    data = np.pad(image, ((size, size), (size, size), (0, 0)))[rows, cols]
    return data.transpose(2, 0, 1), np.pad(mask, size)[rows, cols]


def _assert_raw_crops(x, y, images, masks):
    """Each patch is exactly a zero-padded crop of one image, with that crop's labels."""
    size = x.shape[-1]
    for patch, labels in zip(x.numpy(), y.numpy(), strict=True):
        inside = patch[0] > 0
        code = patch[0][inside].astype(np.int64) - 1
        k, r, c = code // 10_000, code // 100 % 100, code % 100
        rows, cols = np.nonzero(inside)
        tops, lefts = np.unique(r - rows), np.unique(c - cols)
        assert np.unique(k).size == tops.size == lefts.size == 1
        data, seg = _reference_crop(images[k[0]], masks[k[0]], tops[0], lefts[0], size)
        np.testing.assert_array_equal(patch, data)
        np.testing.assert_array_equal(labels, seg)


def test_strength_zero_gives_raw_crops(dataset):
    for x, y in _batches(dataset, n=3, batch_size=16):
        assert x.shape == (16, 2, 16, 16) and x.dtype == torch.float32
        assert y.shape == (16, 16, 16) and y.dtype == torch.int64
        _assert_raw_crops(x, y, *dataset)


def test_image_smaller_than_patch_is_zero_padded(dataset):
    images, masks = dataset
    small = ([images[4]], [masks[4]])
    for x, y in _batches(small, n=2, patch_size=32):
        assert x.shape == (8, 2, 32, 32)
        assert ((x[:, 0] == 0).flatten(1).any(dim=1)).all()
        _assert_raw_crops(x, y, *dataset)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_same_seed_same_batches(dataset, strength):
    first = _batches(dataset, aug_strength=strength, seed=3)
    again = _batches(dataset, aug_strength=strength, seed=3)
    other = _batches(dataset, aug_strength=strength, seed=4)
    for (x1, y1), (x2, y2), (x3, _) in zip(first, again, other, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert not torch.equal(x1, x3)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_augmentation_keeps_shapes_and_whole_labels(dataset, strength):
    augmented = _batches(dataset, aug_strength=strength, batch_size=16, patch_size=24)
    plain = _batches(dataset, aug_strength=0.0, batch_size=16, patch_size=24)
    for (x, y), (x0, _) in zip(augmented, plain, strict=True):
        assert x.shape == (16, 2, 24, 24) and x.dtype == torch.float32
        assert y.shape == (16, 24, 24) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(range(NUM_CLASSES))
        assert not torch.equal(x, x0)


def test_fg_fraction_oversamples_foreground(dataset):
    centre = 8  # patch 16: the sampled pixel sits at index P // 2
    on_fg = torch.cat([y[:, centre, centre] for _, y in _batches(dataset, n=5, fg_fraction=1.0)])
    uniform = torch.cat([y[:, centre, centre] for _, y in _batches(dataset, n=5, fg_fraction=0.0)])
    assert (on_fg > 0).all()
    # The class is drawn uniformly among those present, so the thin line gets about half.
    assert 0.25 < (on_fg == LINE).float().mean() < 0.75
    assert (uniform > 0).float().mean() < 0.3


def test_worker_processes_run_reproducibly_and_close(dataset):
    args = {"patch_size": 16, "batch_size": 4, "aug_strength": 0.5, "fg_fraction": 0.3, "seed": 5}
    stream = train_batches(*dataset, processes=2, **args)
    batches = _take(stream, 3)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    stream.close()
    assert not any(w.is_alive() for w in workers)
    with pytest.raises(StopIteration):
        next(stream)
    for x, y in batches:
        assert x.shape == (4, 2, 16, 16) and x.dtype == torch.float32
        assert y.shape == (4, 16, 16) and y.dtype == torch.int64
    with train_batches(*dataset, processes=2, **args) as again:
        for (x1, y1), (x2, y2) in zip(batches, _take(again, 3), strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not multiprocessing.active_children()
    # Worker 0 is seeded like the in-process path, so the first batch matches it.
    x0, y0 = _batches(dataset, n=1, **args)[0]
    assert torch.equal(batches[0][0], x0) and torch.equal(batches[0][1], y0)
    assert stream.rng_state() is None  # the states live in the worker processes


def test_validation_patches_half_centred_on_foreground():
    """per_image // 2 patches of each image are centred on a foreground pixel, the rest anywhere:
    with one foreground pixel, exactly those patches have it at their centre."""
    mask = np.zeros((60, 60), np.int64)
    mask[17, 41] = 1
    image = np.zeros((60, 60, 1), np.float32)
    for per_image, on_fg in ((1, 0), (3, 1), (5, 2)):
        _, y = validation_patches([image], [mask], patch_size=16, per_image=per_image, seed=0)
        assert len(y) == per_image and int(y[:, 8, 8].sum()) == on_fg, per_image
    with pytest.raises(ValueError, match="per_image: must be >= 1, got 0"):
        validation_patches([image], [mask], patch_size=16, per_image=0, seed=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("patch_size", 4), ("batch_size", 0), ("fg_fraction", 1.5), ("aug_strength", 2.0)],
)
def test_train_batches_rejects_bad_arguments(dataset, field, value):
    args = {"patch_size": 16, "batch_size": 2, "aug_strength": 0.0, "fg_fraction": 0.3, "seed": 0}
    with pytest.raises(ValueError, match=field):
        train_batches(*dataset, **(args | {field: value}))


def test_argument_limits_and_messages():
    image, mask = np.zeros((9, 9, 1), np.float32), np.zeros((9, 9), np.int64)
    args = {"patch_size": 8, "batch_size": 1, "aug_strength": 0.0, "fg_fraction": 0.5, "seed": 0}
    x, y = next(train_batches([image], [mask], **args))  # the smallest patch and batch allowed
    assert x.shape == (1, 1, 8, 8) and y.shape == (1, 8, 8)
    cases = [
        ([image, image], [mask], {}, "images: need as many as masks and at least one, got 2"),
        ([], [], {}, "images: need as many as masks and at least one, got 0"),
        ([image[:5]], [mask], {}, "images: (H, W, C) must match mask (H, W), got (5, 9, 1)"),
        ([image[..., 0]], [mask], {}, "images: (H, W, C) must match mask (H, W), got (9, 9)"),
        ([image], [mask], {"patch_size": 7}, "patch_size: must be >= 8, got 7"),
        ([image], [mask], {"processes": -1}, "processes: must be >= 0, got -1"),
    ]
    for images, masks, change, message in cases:
        with pytest.raises(ValueError) as e:
            train_batches(images, masks, **(args | change))
        assert str(e.value) == message


def test_validation_patches_fixed_centres(dataset):
    x32, y32 = validation_patches(*dataset, patch_size=32, per_image=4, seed=7)
    x64, y64 = validation_patches(*dataset, patch_size=64, per_image=4, seed=7)
    again, _ = validation_patches(*dataset, patch_size=32, per_image=4, seed=7)
    other, _ = validation_patches(*dataset, patch_size=32, per_image=4, seed=8)
    assert x32.shape == (20, 2, 32, 32) and x32.dtype == np.float32
    assert y32.shape == (20, 32, 32) and y32.dtype == np.int64
    assert x64.shape == (20, 2, 64, 64) and y64.shape == (20, 64, 64)
    np.testing.assert_array_equal(x32, again)
    assert not np.array_equal(x32, other)
    np.testing.assert_array_equal(x32[:, :, 16, 16], x64[:, :, 32, 32])
    np.testing.assert_array_equal(y32[:, 16, 16], y64[:, 32, 32])
    # The first half of each image's centres sit on foreground.
    assert (y32.reshape(5, 4, 32, 32)[:, :2, 16, 16] > 0).all()
    # Patches are zero-padded crops of the images (64 > every image side).
    _assert_raw_crops(torch.from_numpy(x64), torch.from_numpy(y64), *dataset)
