"""The one exception type for mistakes a user can fix; the CLI prints it on one line, exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A bad file, value or option: the message names it and the rule broken."""


class DivergedError(RuntimeError):
    """Training loss became NaN or infinite."""
