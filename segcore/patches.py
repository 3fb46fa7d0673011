"""Random training patches through a batchgenerators loader, and the fixed validation patch set."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Self

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform

from segcore.augment import build_transforms, spatial_margin

# Stored foreground positions per (image, class): plenty of variety for sampling centres while
# keeping memory bounded on large data sets.
_MAX_LOCATIONS = 10_000


def _process_seeds(seed: int, thread_id: int) -> tuple[int, int, int]:
    """Seeds for (numpy's global RNG, the loader's RandomState, Python's random) of one process."""
    # Hashing (seed, thread_id) keeps streams apart; seed + i would give trial seed s worker 1
    # the same augmentation stream as trial seed s + 1 worker 0.
    state = np.random.SeedSequence([seed, thread_id]).generate_state(3)
    return int(state[0]), int(state[1]), int(state[2])


def _check_data(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if len(images) == 0 or len(images) != len(masks):
        raise ValueError(f"images: need as many as masks and at least one, got {len(images)}")
    for image, mask in zip(images, masks, strict=True):
        if image.ndim != 3 or image.shape[:2] != mask.shape:
            raise ValueError(f"images: (H, W, C) must match mask (H, W), got {image.shape}")


def _check_patch_size(patch_size: int) -> None:
    if patch_size < 8:
        raise ValueError(f"patch_size: must be >= 8, got {patch_size}")


def _fg_locations(mask: np.ndarray) -> list[np.ndarray]:
    """Flat pixel indices (N,) of each foreground class present in mask (H, W)."""
    flat = mask.ravel()
    locations = []
    for cls in np.unique(flat):
        if cls == 0:
            continue
        idx = np.flatnonzero(flat == cls)
        # An even stride through raster order keeps the kept pixels spread over the image.
        locations.append(idx[:: -(-idx.size // _MAX_LOCATIONS)])
    return locations


def _sample_centre(
    rng: np.random.RandomState, shape: tuple[int, int], locations: list[np.ndarray], fg: bool
) -> tuple[int, int]:
    """(row, col) of a patch centre: a pixel of a random present class if fg, else uniform."""
    if fg and locations:
        pixels = locations[rng.randint(len(locations))]
        row, col = divmod(int(pixels[rng.randint(pixels.size)]), shape[1])
        return row, col
    return int(rng.randint(shape[0])), int(rng.randint(shape[1]))


def _crop_into(
    data: np.ndarray, seg: np.ndarray, image: np.ndarray, mask: np.ndarray, row: int, col: int
) -> None:
    """Copy image (H, W, C) around (row, col) into zeroed data (C, S, S) and seg (S, S)."""
    size = seg.shape[0]
    top, left = row - size // 2, col - size // 2
    y0, y1 = max(top, 0), min(top + size, mask.shape[0])
    x0, x1 = max(left, 0), min(left + size, mask.shape[1])
    data[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1].transpose(2, 0, 1)
    seg[y0 - top : y1 - top, x0 - left : x1 - left] = mask[y0:y1, x0:x1]


class PatchLoader(SlimDataLoaderBase):
    """Random crops {'data': (B, C, S, S) float32, 'seg': (B, 1, S, S) float32}, S = crop_size."""

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        *,
        crop_size: int,
        batch_size: int,
        fg_fraction: float,
        seed: int,
    ) -> None:
        super().__init__((images, masks), batch_size)
        self.crop_size = crop_size
        self.fg_fraction = fg_fraction
        self.seed = seed
        self.channels = images[0].shape[2]
        pixels = np.array([m.size for m in masks], dtype=np.float64)
        self.image_p = pixels / pixels.sum()
        self.locations = [_fg_locations(m) for m in masks]
        self.rng = np.random.RandomState(_process_seeds(seed, 0)[1])

    def set_thread_id(self, thread_id: int) -> None:
        """Seed this process's streams: the loader's RandomState and Python's random."""
        super().set_thread_id(thread_id)
        _, loader_seed, python_seed = _process_seeds(self.seed, thread_id)
        self.rng = np.random.RandomState(loader_seed)
        # MultiThreadedAugmenter seeds only numpy's global RNG per worker, but GaussianNoise draws
        # from `random`, whose state fork would otherwise copy identically into every worker.
        random.seed(python_seed)

    def generate_train_batch(self) -> dict[str, np.ndarray]:
        """One batch of crops: data (B, C, S, S) float32, seg (B, 1, S, S) float32."""
        images, masks = self._data
        size = self.crop_size
        data = np.zeros((self.batch_size, self.channels, size, size), dtype=np.float32)
        seg = np.zeros((self.batch_size, 1, size, size), dtype=np.float32)
        for b in range(self.batch_size):
            i = self.rng.choice(len(masks), p=self.image_p)
            fg = self.rng.uniform() < self.fg_fraction
            row, col = _sample_centre(self.rng, masks[i].shape, self.locations[i], fg)
            _crop_into(data[b], seg[b, 0], images[i], masks[i], row, col)
        return {"data": data, "seg": seg}


def _to_torch(batch: dict[str, np.ndarray], pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """{'data': (B, C, P, P), 'seg': (B, 1, P, P)} -> x float32 (B, C, P, P), y int64 (B, P, P)."""
    x = torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32))
    # Spatial transforms hand labels back as float; nearest interpolation keeps them whole.
    y = torch.from_numpy(np.rint(batch["seg"][:, 0]).astype(np.int64))
    if pin:
        return x.pin_memory(), y.pin_memory()
    return x, y


def rng_state(loader: PatchLoader) -> dict:
    """Every random state an in-process stream draws from (the loader's, numpy's global one, used
    by the transforms, and Python's), as plain values and tensors that torch.save can store."""
    name, keys, pos, has_gauss, gauss = loader.rng.get_state()
    g_name, g_keys, g_pos, g_has, g_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "loader": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "numpy": [g_name, torch.from_numpy(g_keys.astype(np.int64)), g_pos, g_has, g_gauss],
        "python": [version, list(internal), gauss_next],
    }


def _set_rng_state(loader: PatchLoader, state: dict) -> None:
    name, keys, pos, has_gauss, gauss = state["loader"]
    loader.rng.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _in_process(
    loader: PatchLoader, transform: AbstractTransform | None, seed: int, resume: dict | None
) -> Iterator[dict[str, np.ndarray]]:
    """Endless transformed batches computed in this process; from a saved rng_state if given."""
    # Seeded on the first batch, not at construction, so creating another stream in between
    # does not reseed this one; same seeds as MultiThreadedAugmenter's worker 0.
    np.random.seed(_process_seeds(seed, 0)[0])
    loader.set_thread_id(0)
    if resume is not None:
        _set_rng_state(loader, resume)
    for batch in loader:
        yield batch if transform is None else transform(**batch)


class BatchStream(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """Endless (x (B, C, P, P) float32, y (B, P, P) int64) batches; close() ends the workers."""

    def __init__(
        self,
        source: Iterator[dict[str, np.ndarray]],
        augmenter: MultiThreadedAugmenter | None,
        pin_memory: bool,
        loader: PatchLoader | None = None,
    ) -> None:
        self._source = source
        self._augmenter = augmenter
        self._pin = pin_memory and torch.cuda.is_available()
        self._closed = False
        self._loader = loader

    def rng_state(self) -> dict | None:
        """The random state to resume this stream from exactly (train_batches(resume=...)),
        or None with augmentation processes, whose states live in other processes."""
        return None if self._loader is None else rng_state(self._loader)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._closed:
            raise StopIteration
        return _to_torch(next(self._source), self._pin)

    def close(self) -> None:
        """Stop and join the worker processes (if any); later next() raises StopIteration."""
        self._closed = True
        if self._augmenter is not None:
            # batchgenerators has no public shutdown; _finish is what restart() and __del__ use.
            self._augmenter._finish()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train_batches(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    patch_size: int,
    batch_size: int,
    aug_strength: float,
    fg_fraction: float,
    seed: int,
    processes: int = 0,
    pin_memory: bool = False,
    resume: dict | None = None,
) -> BatchStream:
    """Endless augmented batches: x (B, C, P, P) float32, y (B, P, P) int64 torch tensors.
    `resume`: a BatchStream.rng_state() to continue exactly where that stream was (in-process)."""
    _check_data(images, masks)
    _check_patch_size(patch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not 0.0 <= fg_fraction <= 1.0:
        raise ValueError(f"fg_fraction: must be in [0, 1], got {fg_fraction}")
    if processes < 0:
        raise ValueError(f"processes: must be >= 0, got {processes}")
    loader = PatchLoader(
        images,
        masks,
        crop_size=spatial_margin(aug_strength, patch_size),
        batch_size=batch_size,
        fg_fraction=fg_fraction,
        seed=seed,
    )
    transform = build_transforms(aug_strength, patch_size)
    if processes == 0:
        return BatchStream(_in_process(loader, transform, seed, resume), None, pin_memory, loader)
    # Workers hand back numpy, not tensors: torch shares tensors between processes by passing
    # file descriptors, which fails when a worker exits with a batch still queued (at close()).
    # So tensors are made, and pinned, here; MultiThreadedAugmenter's pinning only sees tensors.
    augmenter = MultiThreadedAugmenter(
        loader,
        transform,
        num_processes=processes,
        num_cached_per_queue=2,
        seeds=[_process_seeds(seed, i)[0] for i in range(processes)],
        pin_memory=False,
    )
    return BatchStream(augmenter, augmenter, pin_memory)


def validation_patches(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    patch_size: int,
    per_image: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed patches: x (N, C, P, P) float32, y (N, P, P) int64, N = len(images) * per_image."""
    _check_data(images, masks)
    _check_patch_size(patch_size)
    if per_image < 1:
        raise ValueError(f"per_image: must be >= 1, got {per_image}")
    # Centres come from the seed alone, so trials with different patch sizes score around the
    # same pixels.
    rng = np.random.RandomState(seed)
    centres = []
    for i, mask in enumerate(masks):
        locations = _fg_locations(mask)
        n_fg = per_image // 2 if locations else 0
        for j in range(per_image):
            centres.append((i, *_sample_centre(rng, mask.shape, locations, j < n_fg)))
    x = np.zeros((len(centres), images[0].shape[2], patch_size, patch_size), dtype=np.float32)
    y = np.zeros((len(centres), patch_size, patch_size), dtype=np.int64)
    for n, (i, row, col) in enumerate(centres):
        _crop_into(x[n], y[n], images[i], masks[i], row, col)
    return x, y
