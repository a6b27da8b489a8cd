"""Outcomes a guest can cause, as enums callers match on.

There is deliberately no "is success" helper that lumps `PARTIAL` in with a
completed write (the seed's ``INT_SUCCESS`` trap): match on the member.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """What became of one EPT write event."""

    EMULATED = "emulated"
    """The instruction was emulated and its stores committed to guest memory."""
    UNSUPPORTED = "unsupported"
    """The instruction is not one ptemu emulates, stores no memory, or its write
    leaves the faulting page (other than by REP iterations). Nothing changed."""
    REJECTED = "rejected"
    """The event is inconsistent: the instruction does not write the faulting
    GLA, or GLA and GPA disagree on the page offset. Nothing changed."""
    ALREADY_INITIALIZED = "already-initialized"
    """This vCPU's PtEmuBuffer was already filled during the current exit."""
    CONTENDED = "contended"
    """The entry kept changing under the emulator past the retry bound. Nothing
    changed: let the guest re-execute the instruction."""
    FAULT = "fault"
    """The instruction raises an exception on the CPU (e.g. #GP for a misaligned
    CMPXCHG16B) instead of writing. Nothing changed; `fault` names it."""


class EntryState(StrEnum):
    """Where one page-table entry's write state stands after an event."""

    COMPLETE = "complete"
    PARTIAL = "partial"
    DUPLICATE = "duplicate"


class Policy(StrEnum):
    """How the per-entry write state treats partial and repeated writes."""

    STRICT = "strict"
    """ptemu's default: exact duplicate test, read-modify-write completes."""
    HVMI = "hvmi"
    """Exactly the seed: duplicate = same RIP low 23 bits on 32-bit guests."""
