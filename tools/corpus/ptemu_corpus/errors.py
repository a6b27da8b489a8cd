"""The one error the extraction raises."""

from __future__ import annotations


class ExtractError(Exception):
    """A step failed in a way the user can act on; the message says which step and why."""
