"""The hypervisor's side of EPT write protection, as a two-call protocol.

The translation monitor decides which guest-physical pages hold paging
structures it must watch; a `PageProtector` makes writes to them exit. The
unit is one 4 KiB page, the granularity of an EPT entry (and of a KVM memslot:
a KVM runner can implement `protect` by splitting the slot that holds the page
and making a 4 KiB read-only slot of it, and `unprotect` by merging it back).

The monitor calls `protect` once when a page becomes reached and `unprotect`
once when the last reference to it goes; it never calls either twice in a
row for the same page. `InMemoryProtector` keeps the protected set and a log
for replay, the CLI and the tests, and raises on a call the protocol forbids,
so a monitor bug shows up as an error rather than as a silently stale set.
"""

from __future__ import annotations

from typing import Literal, Protocol

from ptemu.errors import UsageError
from ptemu.values import PAGE_OFFSET_MASK

ProtectionOp = Literal["protect", "unprotect"]


class PageProtector(Protocol):
    """Write-protects one 4 KiB guest-physical page in the EPT, or lifts that."""

    def protect(self, gpa: int) -> None:
        """Make guest writes to the page at `gpa` (page-aligned) exit to the monitor."""
        ...

    def unprotect(self, gpa: int) -> None:
        """Let guest writes to the page at `gpa` (page-aligned) proceed without an exit."""
        ...


class InMemoryProtector:
    """A `PageProtector` that only records: the protected set and every call in order."""

    __slots__ = ("log", "protected")

    def __init__(self) -> None:
        self.protected: set[int] = set()
        """Page GPAs protected now."""
        self.log: list[tuple[ProtectionOp, int]] = []
        """Every call, in order: ``("protect", gpa)`` or ``("unprotect", gpa)``."""

    def protect(self, gpa: int) -> None:
        _check_page(gpa)
        if gpa in self.protected:
            raise UsageError(f"page {gpa:#x} is already protected")
        self.protected.add(gpa)
        self.log.append(("protect", gpa))

    def unprotect(self, gpa: int) -> None:
        _check_page(gpa)
        if gpa not in self.protected:
            raise UsageError(f"page {gpa:#x} is not protected")
        self.protected.remove(gpa)
        self.log.append(("unprotect", gpa))

    def is_protected(self, gpa: int) -> bool:
        """Whether the page holding `gpa` is protected."""
        return (gpa & ~PAGE_OFFSET_MASK) in self.protected


def _check_page(gpa: int) -> None:
    if isinstance(gpa, bool) or not isinstance(gpa, int) or gpa < 0 or gpa & PAGE_OFFSET_MASK:
        raise UsageError(f"protection takes a page-aligned guest-physical address, got {gpa!r}")
