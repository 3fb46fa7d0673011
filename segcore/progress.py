"""Progress for the place it goes to: tqdm bars on a terminal, plain lines at intervals in a log
file or pipe (no carriage returns), nothing when quiet. Used by training, scoring, the report and
prediction alike; the launcher's own progress line follows the same rule."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
EVERY_S = 30.0  # seconds between plain progress lines


class Progress:
    """A bar on a terminal; elsewhere a line like `train: 1200/4000 steps (30%), 95 s` at most
    every EVERY_S seconds and at the end; write() prints a line either way."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, enabled: bool = True,
                 initial: int = 0, stream: TextIO | None = None) -> None:  # fmt: skip
        self.stream = stream or sys.stderr
        self.enabled, self.total, self.desc, self.unit = enabled, total, desc, unit
        self.count, self.started, self.last = initial, time.monotonic(), time.monotonic()
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                            file=self.stream)  # fmt: skip

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
            return
        self.count += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= EVERY_S or self.count == self.total):
            self.last = now
            share = f" ({self.count / self.total:.0%})" if self.total else ""
            print(f"{self.desc}: {self.count}/{self.total} {self.unit}{share}, "
                  f"{now - self.started:.0f} s", file=self.stream, flush=True)  # fmt: skip

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        elif self.enabled:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(items: Iterable[T], total: int, desc: str, unit: str = "it",
             enabled: bool = True) -> Iterator[T]:  # fmt: skip
    """Iterate `items` with a Progress."""
    shown = Progress(total, desc, unit, enabled=enabled)
    try:
        for item in items:
            yield item
            shown.update()
    finally:
        shown.close()
