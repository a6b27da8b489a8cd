"""Per-vCPU state the handler fills: the PtEmuBuffer of the current exit."""

from __future__ import annotations

from dataclasses import dataclass

from ptemu.results import WriteRecord


@dataclass(slots=True)
class PtEmuBuffer:
    """What the last emulated page-table write stored (the seed's PtEmuBuffer).

    For a single-entry write: `old` is the whole entry before the write, `new`
    the value written (only the written bytes: `partial` says whether it
    covered less than the whole entry). A multi-entry write (a 16-byte store,
    REP STOS) fills the fields from its first record and lists every record in
    `writes`.
    """

    old: int = 0
    new: int = 0
    partial: bool = False
    valid: bool = False
    """Filled during the current exit: a second emulation is refused."""
    emulated: bool = False
    writes: tuple[WriteRecord, ...] = ()

    def clear(self) -> None:
        self.old = self.new = 0
        self.partial = self.valid = self.emulated = False
        self.writes = ()


class Vcpu:
    """One virtual CPU as the handler sees it: an index and its PtEmuBuffer.

    Call `begin_exit` at the start of every VM exit; the handler fills the
    buffer at most once per exit (the seed's INT_STATUS_ALREADY_INITIALIZED).
    """

    __slots__ = ("index", "pt_emu_buffer")

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.pt_emu_buffer = PtEmuBuffer()

    def begin_exit(self) -> None:
        """Forget the previous exit's buffer."""
        self.pt_emu_buffer.clear()

    def __repr__(self) -> str:
        return f"Vcpu({self.index})"
