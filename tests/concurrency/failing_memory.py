"""A GuestMemory that fails on purpose, for failure-injection tests.

`FailingGuestMemory` passes every call to an inner memory and counts them. At
its `fail_at`-th call (counting from 0) it fails in one of three ways:

- ``"raise"``: any call (read, write or compare-and-store) raises
  `InjectedFailure` before touching memory, as a hypervisor's mapping call
  might fail (an unmapped page, a dead domain);
- ``"refuse"``: that compare-and-store (counting compare-and-stores only)
  returns False without storing, as if a vCPU had changed the entry;
- ``"refuse_from"``: that compare-and-store and every later one return False,
  as under a vCPU that never stops changing the entry.
"""

from __future__ import annotations

from typing import Literal

from ptemu.memory import GuestMemory

Failure = Literal["raise", "refuse", "refuse_from"]
FAILURES: tuple[Failure, ...] = ("raise", "refuse", "refuse_from")


class InjectedFailure(Exception):
    """What a ``"raise"`` memory raises; a test expects exactly this type back."""


class FailingGuestMemory:
    """Wraps `inner`; fails at call `fail_at` (None: never) the way `how` says."""

    def __init__(self, inner: GuestMemory, fail_at: int | None = None,
                 how: Failure = "raise") -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.how = how
        self.calls = 0
        """Calls so far (every kind)."""
        self.stores = 0
        """Compare-and-store calls so far."""
        self.failed = False
        """Whether the failure was injected."""

    def _raise_now(self) -> None:
        call = self.calls
        self.calls += 1
        if self.how == "raise" and call == self.fail_at:
            self.failed = True
            raise InjectedFailure(f"injected failure at call {call}")

    def read(self, gpa: int, size: int) -> bytes:
        self._raise_now()
        return self.inner.read(gpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        self._raise_now()
        self.inner.write(gpa, data)

    def compare_and_store(self, gpa: int, expected: bytes, new: bytes) -> bool:
        self._raise_now()
        store = self.stores
        self.stores += 1
        if self.fail_at is not None and (
                (self.how == "refuse" and store == self.fail_at)
                or (self.how == "refuse_from" and store >= self.fail_at)):
            self.failed = True
            return False
        return self.inner.compare_and_store(gpa, expected, new)
