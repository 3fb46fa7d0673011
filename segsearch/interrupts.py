"""Signals in a worker: SIGINT and SIGTERM stop the trial being trained at once (it ends FAIL and
is retried as a preemption, segsearch.lifecycle), never optuna's bookkeeping between trials, and
never a resumable state half-written."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Interrupts:
    """SIGINT/SIGTERM in a worker: interrupt the trial being trained, so that it ends FAIL with a
    reason; between trials only note the request, so optuna's own bookkeeping is never cut."""

    def __init__(self) -> None:
        self.requested = False
        self.in_training = False

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True
        if self.in_training:
            self.in_training = False  # one interrupt per trial
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The block where a signal interrupts at once (KeyboardInterrupt)."""
        self.in_training = True
        try:
            if self.requested:
                raise KeyboardInterrupt
            yield
        finally:
            self.in_training = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block inside training that a signal does not cut (saving a state): the interrupt
        comes right after it."""
        was, self.in_training = self.in_training, False
        try:
            yield
        finally:
            self.in_training = was
        if was and self.requested:
            self.in_training = False
            raise KeyboardInterrupt
