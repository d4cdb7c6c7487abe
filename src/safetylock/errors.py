"""The one exception type users see: a one-line message naming the problem and the fix."""

from __future__ import annotations


class SafetylockError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with code 2."""
