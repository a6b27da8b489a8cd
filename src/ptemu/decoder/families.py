"""The table of instruction families ptemu emulates: one row per family.

Adding a family is adding a row here (and its tests): the decoder finds the
row by instruction name, the handler reads from the row whether the
instruction reads the entry before writing it (which completes the entry under
the `strict` policy), which RFLAGS bits it leaves undefined, whether it may be
coalesced as the second half of a PAE entry write, and which alignment the CPU
enforces. Flag behaviour is from the Intel SDM vol. 2 instruction pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# RFLAGS bits (SDM vol. 1, 3.4.3).
CF = 1 << 0
PF = 1 << 2
AF = 1 << 4
ZF = 1 << 6
SF = 1 << 7
DF = 1 << 10
OF = 1 << 11
STATUS_FLAGS = CF | PF | AF | ZF | SF | OF


class Access(StrEnum):
    """How an instruction touches the entry it writes."""

    STORE = "store"
    """Writes without reading: bytes it does not cover are not known coherent."""
    READ_MODIFY_WRITE = "read-modify-write"
    """Reads the destination first (locked or not), so the whole entry is coherent."""


class MemoryPosition(StrEnum):
    """Where the destination memory operand must stand for the form to be a store."""

    FIRST = "first"
    """Intel-syntax operand 0 (every store but XCHG)."""
    EITHER = "either"
    """XCHG exchanges register and memory in either written order."""


@dataclass(frozen=True, slots=True, repr=False)
class Family:
    """One row: instructions that store to memory the same way."""

    name: str
    instructions: frozenset[str]
    """Capstone instruction names (no prefixes), e.g. ``stosq``."""
    access: Access
    undefined_flags: int = 0
    """RFLAGS bits the SDM leaves undefined after the instruction."""
    memory_position: MemoryPosition = MemoryPosition.FIRST
    string: bool = False
    """STOS/MOVS: repeats under REP, addresses from rDI (and rSI)."""
    bit_test: bool = False
    """BTS/BTR/BTC: a register bit offset may address another unit (bit-base)."""
    pae_second_half: bool = False
    """May be coalesced as the second 4-byte half of a PAE entry write (semantics.md 2)."""
    alignment: int = 1
    """The CPU raises #GP(0) when the destination is not aligned to this."""
    in_seed: bool = False
    """The seed's own fast emulator handles this family."""
    integer: bool = False
    """A general-purpose integer instruction whose operand size (when not a
    byte form) follows from the prefixes and the code size alone: REX.W gives
    8 bytes, else 0x66 toggles the default (2 bytes in 16-bit code, 4 otherwise).
    F2/F3 (REP, XACQUIRE/XRELEASE) never change it (SDM vol. 1, 3.6.1)."""
    register_store: bool = False
    """Emulated by ptemu itself: the store writes the low bytes of its source
    register and changes nothing else (Unicorn 2.1's CPU model has no VEX)."""

    def __repr__(self) -> str:
        return f"Family({self.name!r})"


FAMILIES: tuple[Family, ...] = (
    # MOV, MOVABS: Capstone names the moffs forms (A2/A3) with a 64-bit address "movabs".
    Family("mov", frozenset({"mov", "movabs"}), Access.STORE, pae_second_half=True,
           in_seed=True, integer=True),
    Family("stos", frozenset({"stosb", "stosw", "stosd", "stosq"}), Access.STORE,
           string=True, in_seed=True, integer=True),
    Family("movs", frozenset({"movsb", "movsw", "movsd", "movsq"}), Access.STORE, string=True,
           integer=True),
    Family("xchg", frozenset({"xchg"}), Access.READ_MODIFY_WRITE,
           memory_position=MemoryPosition.EITHER, pae_second_half=True, in_seed=True,
           integer=True),
    # CMPXCHG: flags as CMP (all six defined).
    Family("cmpxchg", frozenset({"cmpxchg"}), Access.READ_MODIFY_WRITE,
           pae_second_half=True, in_seed=True, integer=True),
    # CMPXCHG8B/16B: ZF only; CF PF AF SF OF unaffected.
    Family("cmpxchg8b", frozenset({"cmpxchg8b"}), Access.READ_MODIFY_WRITE, in_seed=True),
    Family("cmpxchg16b", frozenset({"cmpxchg16b"}), Access.READ_MODIFY_WRITE, alignment=16),
    # AND/OR/XOR: OF=CF=0, SF ZF PF by result, AF undefined.
    Family("logic", frozenset({"and", "or", "xor"}), Access.READ_MODIFY_WRITE,
           undefined_flags=AF, in_seed=True, integer=True),
    # BTS/BTR/BTC: CF = the old bit, ZF unaffected, OF SF AF PF undefined.
    Family("bit-test", frozenset({"bts", "btr", "btc"}), Access.READ_MODIFY_WRITE,
           undefined_flags=OF | SF | AF | PF, bit_test=True, in_seed=True, integer=True),
    # ADD/SUB/ADC/SBB/NEG/XADD: all six status flags by result.
    Family("arithmetic", frozenset({"add", "sub", "adc", "sbb", "neg", "xadd"}),
           Access.READ_MODIFY_WRITE, integer=True),
    # INC/DEC: CF unaffected, the others by result.
    Family("inc-dec", frozenset({"inc", "dec"}), Access.READ_MODIFY_WRITE, integer=True),
    # NOT: no flags.
    Family("not", frozenset({"not"}), Access.READ_MODIFY_WRITE, integer=True),
    Family("movnti", frozenset({"movnti"}), Access.STORE),
    Family("vector-store", frozenset({"movd", "movq", "movdqu", "movups", "movupd", "movlps",
                                      "movlpd", "movhps", "movhpd"}), Access.STORE),
    Family("aligned-vector-store", frozenset({"movdqa", "movaps", "movapd", "movntdq",
                                              "movntps", "movntpd"}),
           Access.STORE, alignment=16),
    Family("avx-store", frozenset({"vmovdqu", "vmovups", "vmovupd", "vmovd", "vmovq"}),
           Access.STORE, register_store=True),
    Family("aligned-avx-store", frozenset({"vmovdqa", "vmovaps", "vmovapd", "vmovntdq"}),
           Access.STORE, alignment=-1, register_store=True),
)
"""Every family ptemu emulates. ``alignment=-1`` means: aligned to the access size."""

FAMILY_BY_INSTRUCTION: dict[str, Family] = {
    name: family for family in FAMILIES for name in family.instructions
}
"""Lookup from Capstone instruction name to its row."""
