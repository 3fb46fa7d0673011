"""The one exception type for mistakes a user can fix; the CLI prints it on one line, exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A bad file, value or option: the message names it and the rule broken."""


class DivergedError(RuntimeError):
    """Training loss became NaN or infinite."""


class OutOfMemory(RuntimeError):
    """A trial ran out of GPU or host memory; only that trial fails."""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, numpy's MemoryError, or torch's CPU allocator giving up."""
    import torch

    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )
