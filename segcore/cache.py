"""Decode once: decoded images and masks as .npy files that every process maps read-only.

A study's workers all read the same files; each decoding them into its own memory would cost
every worker the decoding time and as much memory as the decoded data set. Here the first
process to need a file decodes it and writes `<key>.npy` (atomically); every process then maps
it with numpy's memmap, so the pages are the operating system's, shared by all workers, and a
worker's own memory does not grow with the data set (docs/benchmarks.md, "Decode once").
The key hashes the file's absolute path, size and modification time and how it is decoded, so
a changed file or rule is decoded afresh; stale entries are left for `rm -r` (the folder only
ever holds copies).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

VERSION = 1  # bump when the decoding rules change what a file decodes to


class DecodeCache:
    """Decoded arrays under `folder`, memory-mapped read-only."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def key(self, path: Path, how: Any) -> str:
        stat = path.stat()
        text = json.dumps([VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns, how])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, path: Path, how: Any, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The decoded array of `path` (decoded with `decode` the first time), memory-mapped."""
        file = self.folder / f"{self.key(path, how)}.npy"
        try:
            return np.load(file, mmap_mode="r")
        except (FileNotFoundError, ValueError, OSError):  # not there yet, or cut short
            pass
        array = np.ascontiguousarray(decode())
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npy", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array)
            os.replace(tmp, file)  # two processes decoding at once: either copy is the same
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return np.load(file, mmap_mode="r")
