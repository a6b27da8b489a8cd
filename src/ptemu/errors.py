"""Exceptions for mistakes a *caller* makes.

What a guest can cause never raises: it comes back as a `ptemu.status.Status`
in a result record. These exceptions are for programmer and user errors (an
unknown paging mode, a bad register name, a malformed fixture file), and each
message names the thing that is wrong.
"""

from __future__ import annotations


class PtemuError(Exception):
    """Base class of every exception ptemu raises on purpose."""


class UsageError(PtemuError, ValueError):
    """A caller passed something ptemu cannot use (unknown name, bad value)."""


class FixtureError(PtemuError):
    """A fixture file is unusable; the message names file, event and key."""

    def __init__(self, path: str, message: str, *, event: int | None = None,
                 key: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.event = event
        self.key = key
        self.line = line
        """The line of a streamed (JSON Lines) trace, counting from 1."""
        self.reason = message
        where = path
        if line is not None:
            where += f": line {line}"
        if event is not None:
            where += f": event {event}"
        if key is not None:
            where += f": key '{key}'"
        super().__init__(f"{where}: {message}")
