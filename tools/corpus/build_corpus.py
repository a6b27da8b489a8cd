#!/usr/bin/env python3
"""Rebuild ptemu's fixture corpus (src/ptemu/corpus/, the repository's fixtures/).

Run from the repository root::

    python tools/corpus/build_corpus.py            # rebuild everything
    python tools/corpus/build_corpus.py --check    # rebuild in memory, diff with the files

Every trace but a handful is made by ``ptemu capture``: the code runs in Unicorn
with paging on, at its real addresses, and the fixture's expectations are what
the execution stored and the registers it left (docs/capture.md). Three groups:

* **kernel**: the out-of-line page-table writers of Debian's kernels
  (``tools/corpus/kernel_writers.json``, made by
  ``tools/corpus/extract_kernel_writers.py`` from the packages), with the bytes
  the running kernel executes (ftrace sites NOPed, return thunks patched to
  ``ret``, boot-time alternatives applied: the record's ``runtime`` bytes),
  called with realistic arguments at direct-map addresses. amd64 functions run
  under 4-level paging and again under 5-level paging (addresses
  ``0xff11...``), 686-pae functions under PAE paging, 686 functions under
  legacy 2-level paging. Callees (TLB flushes) are stubbed with ``ret`` and
  the kernel globals the code reads get their boot-time values (see
  ``kernel_globals``); each fixture's ``source`` says so.
* **synthetic**: short snippets written here, one per instruction family,
  addressing form and state-machine case the handler must cover.
* **hand-written**: the events a capture cannot produce because the CPU never
  writes (a store that misses the faulting GLA: ``rejected``; an instruction
  that stores nothing: ``unsupported``), built from a captured event's real
  registers and code.

The build is deterministic: fixed seeds, fixed order, stable JSON. It deletes
the corpus's ``*.json`` files first, so a trace dropped here disappears there.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from ptemu.capture import capture_description as _capture_description
from ptemu.capture import dump_fixture

CORPUS = ROOT / "src" / "ptemu" / "corpus"
KERNEL_WRITERS = ROOT / "src" / "ptemu" / "kvm" / "data" / "kernel_writers.json"
SEED = 0x5EED_2024

Json = dict[str, Any]


def capture_description(description: Json) -> Json:
    """`ptemu.capture.capture_description`, typed for this script's JSON dicts."""
    return dict(_capture_description(description))

# --------------------------------------------------------------------------------------
# Entry bits (Intel SDM vol. 3, Tables 4-4..4-20; Linux pgtable_types.h names)
# --------------------------------------------------------------------------------------

P, RW, US, PWT, PCD, A, D, PS, G = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100
PAT_4K = 0x80
"""PAT in a PTE is bit 7 (PS's position in upper levels)."""
PAT_LARGE = 0x1000
"""PAT in a 2 MiB / 1 GiB leaf is bit 12."""
PROTNONE = G
"""Linux's _PAGE_PROTNONE: G's position in a non-present PTE."""
NX = 1 << 63

DIRECT_MAP = {"4level": 0xFFFF_8880_0000_0000, "5level": 0xFF11_0000_0000_0000,
              "pae": 0xC000_0000, "legacy": 0xC000_0000}
"""Linux's direct map (page_offset_base / PAGE_OFFSET): gla = base + gpa."""
TEXT = {"4level": 0xFFFF_FFFF_8100_0000, "5level": 0xFFFF_FFFF_8100_0000,
        "pae": 0xC100_0000, "legacy": 0xC100_0000}
"""Where synthetic snippets are placed (the kernel text)."""
ENTRY_SIZE = {"legacy": 4, "pae": 8, "4level": 8, "5level": 8}


def direct(paging: str, gpa: int) -> int:
    """The direct-map linear address of `gpa`."""
    return DIRECT_MAP[paging] + gpa


def h(value: int) -> str:
    return f"{value:#x}"


# --------------------------------------------------------------------------------------
# Realistic entry values
# --------------------------------------------------------------------------------------


@dataclass
class Values:
    """Entry values a kernel really writes, drawn from a seeded generator."""

    paging: str
    rng: random.Random

    @property
    def wide(self) -> bool:
        return self.paging != "legacy"

    def frame(self, align: int = 0x1000) -> int:
        top = 1 << (32 if self.paging == "legacy" else 36 if self.paging == "pae" else 40)
        return self.rng.randrange(0x100000, top, align) & ~(align - 1)

    def nx(self) -> int:
        return NX if self.wide else 0

    def pte(self, kind: str | None = None) -> int:
        """A PTE of one of Linux's common kinds (a random kind when None)."""
        kinds = ["kernel-rw", "kernel-ro", "kernel-rx", "user-rw", "user-ro", "user-rx",
                 "user-clean", "wc-pat", "uncached", "not-present-swap", "protnone", "zero"]
        kind = kind or self.rng.choice(kinds)
        frame = self.frame()
        flags = {
            "kernel-rw": P | RW | A | D | G | self.nx(),
            "kernel-ro": P | A | G | self.nx(),
            "kernel-rx": P | A | G,
            "user-rw": P | RW | US | A | D | self.nx(),
            "user-ro": P | US | A | self.nx(),
            "user-rx": P | US | A,
            "user-clean": P | RW | US | A | self.nx(),
            "wc-pat": P | RW | A | D | G | PAT_4K | self.nx(),
            "uncached": P | RW | PCD | PWT | A | D | G | self.nx(),
            "protnone": PROTNONE | US | A | self.nx(),
        }
        if kind == "zero":
            return 0
        if kind == "not-present-swap":
            # A swap entry: P=0, type and offset in the upper bits (inverted on x86-64).
            offset = self.rng.randrange(1, 1 << 20)
            return (offset << 12 | self.rng.randrange(0, 32) << 1) & ~P
        return frame | flags[kind]

    def pde_large(self) -> int:
        """A 2 MiB (PAE/4-level) or 4 MiB (legacy, PSE) leaf PDE."""
        size = 0x40_0000 if self.paging == "legacy" else 0x20_0000
        flags = self.rng.choice([P | RW | PS | A | D | G, P | RW | US | PS | A | D,
                                 P | PS | A | G, P | RW | PS | A | D | G | PAT_LARGE])
        nx = self.nx() if flags & RW else 0
        return self.frame(size) | flags | nx

    def table(self) -> int:
        """A non-leaf entry pointing to a page table (_KERNPG_TABLE / _PAGE_TABLE)."""
        return self.frame() | self.rng.choice([P | RW | A | D, P | RW | US | A | D])

    def pud_large(self) -> int:
        return self.frame(1 << 30) | P | RW | PS | A | D | G | self.nx()


# --------------------------------------------------------------------------------------
# Descriptions
# --------------------------------------------------------------------------------------


@dataclass
class Trace:
    """One description to capture (or a hand-written fixture)."""

    name: str
    description: Json | None = None
    fixture: Json | None = None


@dataclass
class Guest:
    """Helper that grows one description: a page-table page and code blobs."""

    name: str
    paging: str
    code_bits: int
    source: str
    table_gpa: int
    table_gla: int | None = None
    policy: str | None = None
    code: list[Json] = field(default_factory=list)
    calls: list[Json] = field(default_factory=list)
    entries: dict[int, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=dict)
    extra_pages: list[Json] = field(default_factory=list)
    data_pages: list[Json] = field(default_factory=list)
    code_base: int | None = None
    """Linear address of the first snippet (default: the kernel text)."""
    include_page_tables: bool = False

    def __post_init__(self) -> None:
        if self.table_gla is None:
            self.table_gla = direct(self.paging, self.table_gpa)
        self._next_code = self.code_base or TEXT[self.paging] + 0x1000

    @property
    def entry_size(self) -> int:
        return ENTRY_SIZE[self.paging]

    def entry(self, index: int) -> int:
        """Linear address of entry `index` of the monitored page."""
        assert self.table_gla is not None
        return self.table_gla + index * self.entry_size

    def entry_gpa(self, index: int) -> int:
        return self.table_gpa + index * self.entry_size

    def blob(self, label: str, code: str, gla: int | None = None) -> str:
        if gla is None:
            gla = self._next_code
            self._next_code += 0x40
        self.code.append({"label": label, "gla": h(gla), "bytes": code})
        return label

    def call(self, entry: str, memory: list[Json] | None = None, twice: list[int] | None = None,
             stack: list[int] | None = None, **regs: int) -> None:
        item: Json = {"entry": entry, "regs": {k: h(v) for k, v in regs.items()}}
        if memory:
            item["memory"] = memory
        if twice:
            item["deliver_twice"] = twice
        if stack:
            item["stack"] = [h(v) for v in stack]
        self.calls.append(item)

    def description(self) -> Json:
        out: Json = {
            "name": self.name,
            "source": self.source,
            "paging": self.paging,
            "code_bits": self.code_bits,
            "code": self.code,
            "page_tables": [{"gpa": h(self.table_gpa), "gla": h(self.table_gla or 0),
                             "entries": {str(i): h(v) for i, v in sorted(self.entries.items())}},
                            *self.extra_pages],
            "calls": self.calls,
        }
        if self.policy:
            out["policy"] = self.policy
        if self.segments:
            out["segments"] = {k: h(v) for k, v in self.segments.items()}
        if self.data_pages:
            out["data_pages"] = self.data_pages
        if self.include_page_tables:
            out["include_page_tables"] = True
        return out

    def trace(self) -> Trace:
        return Trace(self.name, description=self.description())


SYNTHETIC_SOURCE = ("synthetic snippet written for the corpus (tools/corpus/build_corpus.py), "
                    "captured with ptemu capture")


def guest(name: str, paging: str, code_bits: int, rng: random.Random, what: str,
          **kwargs: Any) -> Guest:
    """A guest whose monitored page is a random page below 512 MiB, in the direct map."""
    gpa = kwargs.pop("table_gpa", None) or rng.randrange(0x0100_0000, 0x2000_0000, 0x1000)
    return Guest(name=f"{paging}/{name}", paging=paging, code_bits=code_bits,
                 source=f"{SYNTHETIC_SOURCE}: {what}", table_gpa=gpa, **kwargs)


def patch(gpa: int, value: int, size: int) -> Json:
    return {"gpa": h(gpa), "data": value.to_bytes(size, "little").hex()}


# --------------------------------------------------------------------------------------
# Synthetic traces: 64-bit code (4-level and 5-level paging)
# --------------------------------------------------------------------------------------


def synthetic_64(paging: str, rng: random.Random) -> Iterator[Trace]:
    v = Values(paging, rng)

    g = guest("mov-register-1-2-4-8-bytes", paging, 64, rng, "MOV r/m, reg of every size")
    g.entries = {i: v.pte() for i in range(2, 8)}
    g.blob("m8", "48 89 37 c3")        # mov [rdi], rsi
    g.blob("m4", "89 77 04 c3")        # mov [rdi+4], esi
    g.blob("m4lo", "89 37 c3")         # mov [rdi], esi
    g.blob("m2", "66 89 37 c3")        # mov [rdi], si
    g.blob("m1", "40 88 37 c3")        # mov [rdi], sil
    g.call("m8", rdi=g.entry(2), rsi=v.pte("user-rw"))
    g.call("m4", rdi=g.entry(3), rsi=0x8000_0000)       # high half: NX on
    g.call("m4lo", rdi=g.entry(3), rsi=v.pte("kernel-rx") & 0xFFFF_FFFF)
    g.call("m2", rdi=g.entry(4), rsi=0x0067)
    g.call("m1", rdi=g.entry(5), rsi=0x65)
    g.call("m8", rdi=g.entry(6), rsi=v.pte("not-present-swap"))
    yield g.trace()

    g = guest("mov-immediate-1-2-4-8-bytes", paging, 64, rng, "MOV r/m, imm of every size")
    g.entries = {i: v.pte() for i in range(6)}
    g.blob("i8", "48 c7 07 00 00 00 00 c3")       # mov qword [rdi], 0
    g.blob("i8s", "48 c7 07 63 30 34 12 c3")      # mov qword [rdi], 0x12343063
    g.blob("i4", "c7 47 04 00 00 00 80 c3")       # mov dword [rdi+4], 0x80000000
    g.blob("i2", "66 c7 07 67 00 c3")             # mov word [rdi], 0x67
    g.blob("i1", "c6 07 63 c3")                   # mov byte [rdi], 0x63
    g.call("i8", rdi=g.entry(0))
    g.call("i8s", rdi=g.entry(1))
    g.call("i4", rdi=g.entry(2))
    g.call("i2", rdi=g.entry(3))
    g.call("i1", rdi=g.entry(4))
    yield g.trace()

    g = guest("stos-without-rep-df0-df1", paging, 64, rng,
              "STOSQ/STOSD/STOSB without REP, DF=0 and DF=1 (RDI moves)")
    g.entries = {i: v.pte() for i in range(8, 16)}
    g.blob("sq", "48 ab c3")                      # stosq
    g.blob("sq_down", "fd 48 ab fc c3")           # std; stosq; cld
    g.blob("sd", "ab c3")                         # stosd
    g.blob("sb_down", "fd aa fc c3")              # std; stosb; cld
    g.call("sq", rdi=g.entry(8), rax=v.pte("kernel-rw"))
    g.call("sq_down", rdi=g.entry(9), rax=v.pte("user-ro"))
    g.call("sd", rdi=g.entry(10), rax=0x1234_5067)
    g.call("sd", rdi=g.entry(10) + 4, rax=0x8000_0000)
    g.call("sb_down", rdi=g.entry(11), rax=0x25)
    yield g.trace()

    g = guest("rep-stosq-clear-entries", paging, 64, rng,
              "REP STOSQ clearing a run of entries (clear_page-style), DF=0 and DF=1")
    g.entries = {i: v.pte() for i in range(32, 48)}
    g.blob("rep", "f3 48 ab c3")                  # rep stosq
    g.blob("rep_down", "fd f3 48 ab fc c3")       # std; rep stosq; cld
    g.call("rep", rdi=g.entry(32), rcx=4, rax=0)
    g.call("rep_down", rdi=g.entry(43), rcx=3, rax=v.pte("kernel-ro"))
    yield g.trace()

    g = guest("xchg-forms", paging, 64, rng, "XCHG with memory: 8/4/1 bytes, LOCK, other bases")
    g.entries = {i: v.pte() for i in range(16, 24)}
    g.blob("x8", "48 87 37 c3")                   # xchg [rdi], rsi
    g.blob("x8_lock", "f0 48 87 37 c3")           # lock xchg [rdi], rsi
    g.blob("x4", "87 37 c3")                      # xchg [rdi], esi
    g.blob("x1", "86 1f c3")                      # xchg [rdi], bl
    g.blob("x8_rsi", "48 87 3e c3")               # xchg [rsi], rdi
    g.call("x8", rdi=g.entry(16), rsi=0)
    g.call("x8_lock", rdi=g.entry(17), rsi=v.pte("user-rw"))
    g.call("x4", rdi=g.entry(18), rsi=0xDEAD_BEEF_0000_0025)
    g.call("x1", rdi=g.entry(19), rbx=0x61)
    g.call("x8_rsi", rsi=g.entry(20), rdi=v.pte("kernel-rw"))
    yield g.trace()

    g = guest("cmpxchg-match-and-mismatch", paging, 64, rng,
              "CMPXCHG 8/1 bytes, locked and not, compare matching and failing")
    g.entries = {i: v.pte() for i in range(24, 28)}
    g.blob("c8_lock", "f0 48 0f b1 37 c3")        # lock cmpxchg [rdi], rsi
    g.blob("c8", "48 0f b1 37 c3")                # cmpxchg [rdi], rsi
    g.blob("c1_lock", "f0 40 0f b0 37 c3")        # lock cmpxchg [rdi], sil
    g.call("c8_lock", rdi=g.entry(24), rax=g.entries[24], rsi=v.pte("user-ro"))
    g.call("c8_lock", rdi=g.entry(25), rax=g.entries[25] ^ A, rsi=v.pte("user-rw"))
    g.call("c8", rdi=g.entry(26), rax=g.entries[26], rsi=0)
    g.call("c8", rdi=g.entry(27), rax=0x1234, rsi=0)
    g.call("c1_lock", rdi=g.entry(26), rax=0, rsi=0x67)
    yield g.trace()

    g = guest("cmpxchg-32bit-accumulator", paging, 64, rng,
              "CMPXCHG r/m32 in 64-bit code: on mismatch EAX is loaded and RAX[63:32] "
              "cleared; on match RAX is left alone (SDM CMPXCHG)")
    g.entries = {i: v.pte() for i in range(28, 32)}
    g.blob("c4_lock", "f0 0f b1 37 c3")           # lock cmpxchg [rdi], esi
    low28 = g.entries[28] & 0xFFFF_FFFF
    g.call("c4_lock", rdi=g.entry(28), rax=0xFFFF_FFFF_0000_0000 | low28, rsi=low28 | D)
    g.call("c4_lock", rdi=g.entry(29), rax=0xFFFF_FFFF_FFFF_FFFF, rsi=0x1234_5067)
    yield g.trace()

    g = guest("cmpxchg8b-cmpxchg16b", paging, 64, rng,
              "LOCK CMPXCHG8B and CMPXCHG16B (two entries), match and mismatch")
    g.entries = {i: v.pte() for i in range(40, 46)}
    g.blob("c8b", "f0 0f c7 0f c3")               # lock cmpxchg8b [rdi]
    g.blob("c16b", "f0 48 0f c7 0f c3")           # lock cmpxchg16b [rdi]
    e40 = g.entries[40]
    g.call("c8b", rdi=g.entry(40), rax=e40 & 0xFFFF_FFFF, rdx=e40 >> 32,
           rbx=0x1111_1063, rcx=0x8000_0000)
    g.call("c8b", rdi=g.entry(41), rax=0, rdx=0, rbx=0x2222_2063, rcx=0)
    e42, e43 = g.entries[42], g.entries[43]
    g.call("c16b", rdi=g.entry(42), rax=e42, rdx=e43, rbx=v.pte("kernel-rw"),
           rcx=v.pte("kernel-rw"))
    g.call("c16b", rdi=g.entry(44), rax=1, rdx=2, rbx=0, rcx=0)
    yield g.trace()

    g = guest("and-or-xor", paging, 64, rng,
              "AND/OR/XOR with memory destination, LOCK and not, 1/2/4/8 bytes")
    g.entries = {i: v.pte("user-rw") for i in range(48, 56)}
    g.blob("andb", "f0 80 27 fd c3")              # lock and byte [rdi], 0xfd (clear RW)
    g.blob("andq", "f0 48 21 37 c3")              # lock and [rdi], rsi
    g.blob("orq_imm", "48 83 0f 20 c3")           # or qword [rdi], 0x20 (set A)
    g.blob("orq", "f0 48 09 37 c3")               # lock or [rdi], rsi
    g.blob("xorq", "48 31 37 c3")                 # xor [rdi], rsi
    g.blob("andd_hi", "81 67 04 ff ff ff 7f c3")  # and dword [rdi+4], 0x7fffffff (clear NX)
    g.blob("orw", "66 83 0f 40 c3")               # or word [rdi], 0x40 (set D)
    g.call("andb", rdi=g.entry(48))
    g.call("andq", rdi=g.entry(49), rsi=~(RW | D) & ((1 << 64) - 1))
    g.call("orq_imm", rdi=g.entry(50))
    g.call("orq", rdi=g.entry(51), rsi=NX)
    g.call("xorq", rdi=g.entry(52), rsi=P)
    g.call("andd_hi", rdi=g.entry(53))
    g.call("orw", rdi=g.entry(54))
    yield g.trace()

    g = guest("bts-btr-btc-immediate", paging, 64, rng,
              "BTS/BTR/BTC with an immediate bit offset, LOCK and not")
    g.entries = {i: v.pte("user-rw") for i in range(56, 62)}
    g.blob("bts63", "f0 48 0f ba 2f 3f c3")       # lock bts qword [rdi], 63 (set NX)
    g.blob("btr1", "f0 48 0f ba 37 01 c3")        # lock btr qword [rdi], 1 (clear RW)
    g.blob("btc5", "48 0f ba 3f 05 c3")           # btc qword [rdi], 5 (toggle A)
    g.blob("btr5d", "f0 0f ba 37 05 c3")          # lock btr dword [rdi], 5 (clear young)
    g.call("bts63", rdi=g.entry(56))
    g.call("btr1", rdi=g.entry(57))
    g.call("btc5", rdi=g.entry(58))
    g.call("btr5d", rdi=g.entry(59))
    g.call("btr5d", rdi=g.entry(59))
    yield g.trace()

    g = guest("bts-btr-btc-register", paging, 64, rng,
              "BTS/BTR/BTC with a register bit offset inside the operand")
    g.entries = {i: v.pte("kernel-rw") for i in range(62, 66)}
    g.blob("btsr", "f0 48 0f ab 37 c3")           # lock bts [rdi], rsi
    g.blob("btrr", "48 0f b3 37 c3")              # btr [rdi], rsi
    g.blob("btcr", "f0 0f bb 37 c3")              # lock btc dword [rdi], esi
    g.call("btsr", rdi=g.entry(62), rsi=63)
    g.call("btrr", rdi=g.entry(63), rsi=8)
    g.call("btcr", rdi=g.entry(64), rsi=6)
    yield g.trace()

    g = guest("addressing-sib-disp8-disp32", paging, 64, rng,
              "base+index*scale+disp8/disp32 and base+disp32 destinations")
    g.entries = {i: v.pte() for i in (2, 130, 260, 511)}
    g.blob("sib8", "48 89 74 cf 10 c3")           # mov [rdi+rcx*8+0x10], rsi
    g.blob("sib32", "48 89 b4 cf 00 08 00 00 c3")  # mov [rdi+rcx*8+0x800], rsi
    g.blob("sib2", "48 89 34 4f c3")              # mov [rdi+rcx*2], rsi
    g.blob("disp32", "48 89 b3 f8 0f 00 00 c3")   # mov [rbx+0xff8], rsi
    g.call("sib8", rdi=g.entry(0), rcx=0, rsi=v.pte())
    g.call("sib32", rdi=g.entry(0), rcx=4, rsi=v.pte())
    g.call("sib2", rdi=g.entry(0), rcx=130 * 4, rsi=v.pte())
    g.call("disp32", rbx=g.entry(0), rsi=v.pte())
    yield g.trace()

    # A page table in the kernel image (like init_top_pgt / level2_kernel_pgt):
    # reachable by RIP-relative and 32-bit absolute (sign-extended) addressing.
    image_gpa = 0x0234_5000
    image_gla = 0xFFFF_FFFF_8000_0000 + image_gpa
    g = guest("addressing-rip-relative-and-absolute", paging, 64, rng,
              "RIP-relative and disp32-only destinations on a page table in the kernel "
              "image", table_gpa=image_gpa, table_gla=image_gla)
    g.entries = {2: v.table(), 3: v.table(), 511: v.table()}
    absolute = (image_gla + 0x10) & 0xFFFF_FFFF
    g.blob("abs", "48 89 34 25 " + absolute.to_bytes(4, "little").hex(" ") + " c3")
    rip_code = TEXT[paging] + 0x2000
    target = image_gla + 0x18
    disp = (target - (rip_code + 7)) & 0xFFFF_FFFF
    g.blob("riprel", "48 89 35 " + disp.to_bytes(4, "little").hex(" ") + " c3", gla=rip_code)
    g.call("abs", rsi=v.table())
    g.call("riprel", rsi=v.table())
    yield g.trace()

    g = guest("segment-override-fs-gs", paging, 64, rng,
              "FS and GS overrides with non-zero bases (per-CPU style)")
    g.entries = {i: v.pte() for i in (2, 3)}
    assert g.table_gla is not None
    g.segments = {"gs_base": g.table_gla - 0x5000, "fs_base": g.table_gla}
    g.blob("gs", "65 48 89 37 c3")                         # mov gs:[rdi], rsi
    g.blob("fs", "64 48 89 34 25 18 00 00 00 c3")          # mov fs:[0x18], rsi
    g.call("gs", rdi=0x5010, rsi=v.pte())
    g.call("fs", rsi=v.pte())
    yield g.trace()

    low_gpa = 0x0345_6000
    g = guest("address-size-and-operand-size-prefixes", paging, 64, rng,
              "0x67 (32-bit address: EDI, upper RDI ignored) and 0x66 prefixes",
              table_gpa=low_gpa, table_gla=low_gpa)
    g.entries = {i: v.pte() for i in (2, 3)}
    g.blob("a67", "67 48 89 37 c3")        # mov [edi], rsi
    g.blob("a67w", "67 66 89 37 c3")       # mov [edi], si
    g.call("a67", rdi=0xDEAD_0000_0000_0000 | g.entry(2), rsi=v.pte())
    g.call("a67w", rdi=0xBEEF_0000_0000_0000 | g.entry(3), rsi=0x0027)
    yield g.trace()

    g = guest("accessed-bit-set-by-cpu-between-events", paging, 64, rng,
              "the CPU sets A then D between the guest's writes (memory patches)")
    g.entries = {5: 0}
    g.blob("set", "48 89 37 c3")                  # mov [rdi], rsi
    g.blob("wrprotect", "f0 80 27 fd c3")         # lock and byte [rdi], 0xfd
    g.blob("get_and_clear", "31 c0 48 87 07 c3")  # xor eax, eax; xchg [rdi], rax
    fresh = v.frame() | P | RW | US | NX
    g.call("set", rdi=g.entry(5), rsi=fresh)
    g.call("wrprotect", rdi=g.entry(5), memory=[patch(g.entry_gpa(5), (fresh | A) & 0xFF, 1)])
    g.call("get_and_clear", rdi=g.entry(5),
           memory=[patch(g.entry_gpa(5), (fresh | A | D) & ~RW & 0xFF, 1)])
    yield g.trace()

    for policy in ("strict", "hvmi"):
        g = guest(f"lock-and-byte-{policy}", paging, 64, rng,
                  f"1-byte LOCK AND clearing RW (ptep_set_wrprotect) under policy {policy}: "
                  "strict completes the entry, hvmi leaves it partial until a later write",
                  policy=policy)
        g.entries = {7: v.pte("user-rw"), 8: v.pte("user-rw")}
        g.blob("wrprotect", "f0 80 27 fd c3")
        g.blob("set", "48 89 37 c3")
        g.call("wrprotect", rdi=g.entry(7))
        g.call("set", rdi=g.entry(7), rsi=v.pte("user-ro"))
        g.call("wrprotect", rdi=g.entry(8))
        yield g.trace()

    g = guest("vector-store-two-entries", paging, 64, rng,
              "MOVDQU xmmword store covering two entries")
    g.entries = {i: v.pte() for i in (20, 21)}
    g.blob("movdqu", "f3 0f 7f 07 c3")            # movdqu [rdi], xmm0
    g.call("movdqu", rdi=g.entry(20), xmm0=v.pte("kernel-rw") | v.pte("user-ro") << 64)
    yield g.trace()


    g = guest("rep-movsq-copy-entries", paging, 64, rng,
              "REP MOVSQ copying entries from another page (the source found through the "
              "guest's own page tables, which the fixture carries), DF=0 and DF=1",
              include_page_tables=True)
    g.entries = {i: v.pte() for i in range(60, 72)}
    source_gpa = rng.randrange(0x0100_0000, 0x2000_0000, 0x1000)
    source = b"".join(v.pte().to_bytes(8, "little") for _ in range(16)) + bytes(4096 - 128)
    g.data_pages.append({"gpa": h(source_gpa), "gla": h(direct(paging, source_gpa)),
                         "data": source.hex()})
    g.blob("movs", "f3 48 a5 c3")                 # rep movsq
    g.blob("movs_down", "fd f3 48 a5 fc c3")      # std; rep movsq; cld
    g.call("movs", rdi=g.entry(60), rsi=direct(paging, source_gpa), rcx=4)
    g.call("movs_down", rdi=g.entry(71), rsi=direct(paging, source_gpa) + 0x70, rcx=3)
    yield g.trace()

    g = guest("arithmetic-read-modify-write", paging, 64, rng,
              "XADD, ADD, SUB, ADC, SBB, INC, DEC, NOT, NEG on entries, with and without LOCK")
    g.entries = {i: v.pte() for i in range(24, 34)}
    g.blob("xadd", "f0 48 0f c1 37 c3")           # lock xadd [rdi], rsi
    g.blob("add8", "f0 48 83 07 20 c3")           # lock add qword [rdi], 0x20
    g.blob("sub", "48 29 37 c3")                  # sub [rdi], rsi
    g.blob("adc", "f9 48 11 37 c3")               # stc; adc [rdi], rsi
    g.blob("sbb", "f9 f0 48 19 37 c3")            # stc; lock sbb [rdi], rsi
    g.blob("inc", "f0 48 ff 07 c3")               # lock inc qword [rdi]
    g.blob("dec", "48 ff 0f c3")                  # dec qword [rdi]
    g.blob("not", "f0 48 f7 17 c3")               # lock not qword [rdi]
    g.blob("neg", "48 f7 1f c3")                  # neg qword [rdi]
    g.blob("add1", "80 07 40 c3")                 # add byte [rdi], 0x40 (sets D)
    g.call("xadd", rdi=g.entry(24), rsi=0x1000)
    g.call("add8", rdi=g.entry(25))
    g.call("sub", rdi=g.entry(26), rsi=0x20)
    g.call("adc", rdi=g.entry(27), rsi=0x1)
    g.call("sbb", rdi=g.entry(28), rsi=0x1)
    g.call("inc", rdi=g.entry(29))
    g.call("dec", rdi=g.entry(30))
    g.call("not", rdi=g.entry(31))
    g.call("neg", rdi=g.entry(32))
    g.call("add1", rdi=g.entry(33))
    yield g.trace()

    g = guest("movnti-and-sse-stores", paging, 64, rng,
              "MOVNTI and SSE stores (MOVUPS, MOVDQA, MOVNTDQ, MOVQ, MOVD) over entries")
    g.entries = {i: v.pte() for i in range(40, 52)}
    g.blob("movnti", "48 0f c3 37 c3")            # movnti [rdi], rsi
    g.blob("movups", "0f 11 07 c3")               # movups [rdi], xmm0
    g.blob("movdqa", "66 0f 7f 07 c3")            # movdqa [rdi], xmm0
    g.blob("movntdq", "66 0f e7 07 c3")           # movntdq [rdi], xmm0
    g.blob("movq", "66 0f d6 07 c3")              # movq [rdi], xmm0
    g.blob("movd", "66 0f 7e 47 04 c3")           # movd [rdi+4], xmm0
    pair = v.pte("kernel-rw") | v.pte("user-ro") << 64
    g.call("movnti", rdi=g.entry(40), rsi=v.pte("user-rw"))
    g.call("movups", rdi=g.entry(41), xmm0=pair)
    g.call("movdqa", rdi=g.entry(44), xmm0=pair)
    g.call("movntdq", rdi=g.entry(46), xmm0=pair)
    g.call("movq", rdi=g.entry(48), xmm0=v.pte("kernel-ro"))
    g.call("movd", rdi=g.entry(49), xmm0=0x8000_0000)
    yield g.trace()

    g = guest("rep-stos-to-the-page-end", paging, 64, rng,
              "REP STOSQ reaching the end of the page: the iterations inside it, one record "
              "per entry; then the same downwards from the start of the page")
    g.entries = {i: v.pte() for i in (0, 1, 2, 509, 510, 511)}
    g.blob("rep", "f3 48 ab c3")                  # rep stosq
    g.blob("rep_down", "fd f3 48 ab fc c3")       # std; rep stosq; cld
    g.call("rep", rdi=g.entry(509), rcx=3, rax=0)
    g.call("rep_down", rdi=g.entry(2), rcx=3, rax=v.pte("kernel-ro"))
    yield g.trace()


SYNTHETIC_5LEVEL = frozenset({
    "mov-register-1-2-4-8-bytes", "cmpxchg-match-and-mismatch", "cmpxchg8b-cmpxchg16b",
    "and-or-xor", "bts-btr-btc-immediate", "addressing-rip-relative-and-absolute",
    "segment-override-fs-gs", "accessed-bit-set-by-cpu-between-events",
    "lock-and-byte-hvmi", "stos-without-rep-df0-df1"})
"""The 64-bit snippets also captured under 5-level paging (the kernel functions
cover the rest there)."""


def synthetic_compat(rng: random.Random) -> Iterator[Trace]:
    """32-bit code in compatibility mode under 4-level paging."""
    v = Values("4level", rng)
    gpa = 0x0456_7000
    g = guest("compat32-mov-and-cmpxchg8b", "4level", 32, rng,
              "32-bit code in IA-32e compatibility mode: two MOV halves and CMPXCHG8B",
              table_gpa=gpa, table_gla=gpa, code_base=0x0100_1000)
    g.entries = {i: v.pte() for i in (4, 5)}
    g.blob("halves", "89 48 04 89 10 c3")          # mov [eax+4], ecx; mov [eax], edx
    g.blob("c8b", "f0 0f c7 0e c3")               # lock cmpxchg8b [esi]
    new = v.pte("user-rw")
    g.call("halves", rax=g.entry(4), rcx=new >> 32, rdx=new & 0xFFFF_FFFF)
    e5 = g.entries[5]
    g.call("c8b", rsi=g.entry(5), rax=e5 & 0xFFFF_FFFF, rdx=e5 >> 32, rbx=0x0123_4025, rcx=0)
    yield g.trace()


# --------------------------------------------------------------------------------------
# Synthetic traces: 32-bit and 16-bit code (PAE and legacy paging)
# --------------------------------------------------------------------------------------


def synthetic_pae(rng: random.Random) -> Iterator[Trace]:
    paging = "pae"
    v = Values(paging, rng)

    def halves(value: int) -> dict[str, Any]:
        return {"rcx": value >> 32, "rdx": value & 0xFFFF_FFFF}

    g = guest("two-halves-high-then-low-coalesced", paging, 32, rng,
              "native_set_pte's order (high half, then low half): one coalesced event")
    g.entries = {i: v.pte() for i in range(6)}
    g.blob("set", "89 48 04 89 10 c3")           # mov [eax+4], ecx; mov [eax], edx
    for index in range(6):
        g.call("set", rax=g.entry(index), **halves(v.pte()))
    yield g.trace()

    g = guest("two-halves-low-then-high-coalesced", paging, 32, rng,
              "native_pte_clear's order (low half, then high half): one coalesced event")
    g.entries = {i: v.pte() for i in range(10, 14)}
    g.blob("set", "89 10 89 48 04 c3")           # mov [eax], edx; mov [eax+4], ecx
    g.blob("clear", "c7 00 00 00 00 00 c7 40 04 00 00 00 00 c3")
    for index in (10, 11):
        g.call("set", rax=g.entry(index), **halves(v.pte()))
    for index in (12, 13):
        g.call("clear", rax=g.entry(index))
    yield g.trace()

    g = guest("xchg-low-then-mov-high", paging, 32, rng,
              "native_ptep_get_and_clear's order: XCHG the low half, MOV the high half "
              "(coalesced: the XCHG's store is 4 of the entry's 8 bytes)")
    g.entries = {i: v.pte() for i in range(20, 23)}
    g.blob("gac", "87 10 89 48 04 c3")           # xchg [eax], edx; mov [eax+4], ecx
    for index in range(20, 23):
        g.call("gac", rax=g.entry(index), rcx=0, rdx=0)
    yield g.trace()

    g = guest("two-halves-in-separate-exits", paging, 32, rng,
              "an instruction between the halves: two events, partial then complete")
    g.entries = {i: v.pte() for i in range(30, 33)}
    g.blob("set", "89 48 04 8d 00 89 10 c3")     # mov [eax+4], ecx; lea eax,[eax]; mov [eax], edx
    for index in range(30, 33):
        g.call("set", rax=g.entry(index), **halves(v.pte()))
    yield g.trace()

    g = guest("cmpxchg8b-match-and-mismatch", paging, 32, rng,
              "LOCK CMPXCHG8B (set_64bit loop and single shots), match and mismatch")
    g.entries = {i: v.pte() for i in range(40, 44)}
    g.blob("loop", "8b 06 8b 56 04 f0 0f c7 0e 75 fa c3")   # load; 1: lock cmpxchg8b; jne 1b
    g.blob("once", "f0 0f c7 0e c3")
    new = v.pte("user-rw")
    g.call("loop", rsi=g.entry(40), rbx=new & 0xFFFF_FFFF, rcx=new >> 32)
    e41 = g.entries[41]
    g.call("once", rsi=g.entry(41), rax=e41 & 0xFFFF_FFFF, rdx=e41 >> 32, rbx=0, rcx=0)
    g.call("once", rsi=g.entry(42), rax=0xFFFF_FFFF, rdx=0, rbx=0x1234_5063, rcx=0)
    yield g.trace()

    g = guest("cmpxchg-one-half", paging, 32, rng,
              "LOCK CMPXCHG on one 4-byte half, match and mismatch")
    g.entries = {i: v.pte() for i in range(44, 46)}
    g.blob("c4", "f0 0f b1 08 c3")               # lock cmpxchg [eax], ecx
    g.blob("c4_hi", "f0 0f b1 48 04 c3")         # lock cmpxchg [eax+4], ecx
    low44 = g.entries[44] & 0xFFFF_FFFF
    g.call("c4", rax=g.entry(44), rcx=low44 & ~RW)
    g.call("c4", rax=g.entry(45), rcx=0)
    g.call("c4_hi", rax=g.entry(45), rcx=0)
    yield g.trace()

    g = guest("logic-and-bit-ops", paging, 32, rng,
              "AND/OR/XOR and BTS/BTR/BTC (imm and reg) on PAE entries")
    g.entries = {i: v.pte("user-rw") for i in range(50, 57)}
    g.blob("and", "f0 83 20 fd c3")              # lock and dword [eax], ~2
    g.blob("or", "80 08 20 c3")                  # or byte [eax], 0x20
    g.blob("xor_hi", "31 48 04 c3")              # xor [eax+4], ecx
    g.blob("bts_nx", "f0 0f ba 68 04 1f c3")     # lock bts dword [eax+4], 31
    g.blob("btr_rw", "f0 0f ba 30 01 c3")        # lock btr dword [eax], 1
    g.blob("btc_reg", "0f bb 10 c3")             # btc [eax], edx
    g.call("and", rax=g.entry(50))
    g.call("or", rax=g.entry(51))
    g.call("xor_hi", rax=g.entry(52), rcx=0x8000_0000)
    g.call("bts_nx", rax=g.entry(53))
    g.call("btr_rw", rax=g.entry(54))
    g.call("btc_reg", rax=g.entry(55), rdx=6)
    yield g.trace()

    g = guest("addressing-32bit-forms", paging, 32, rng,
              "SIB+disp8, disp32 alone, base+disp32, FS and GS overrides with non-zero bases")
    g.entries = {i: v.pte() for i in (4, 8, 9, 256, 300)}
    assert g.table_gla is not None
    fs_base = 0x0160_0000
    g.segments = {"fs_base": fs_base, "gs_base": g.table_gla}
    g.blob("sib", "89 4c f3 04 c3")              # mov [ebx+esi*8+4], ecx
    g.blob("abs", "89 0d " + g.entry(8).to_bytes(4, "little").hex(" ") + " c3")
    g.blob("base32", "89 8b 00 08 00 00 c3")     # mov [ebx+0x800], ecx
    g.blob("fs", "64 89 08 c3")                  # mov fs:[eax], ecx
    g.blob("gs", "65 89 0d 48 00 00 00 c3")      # mov gs:[0x48], ecx
    g.call("sib", rbx=g.entry(0), rsi=4, rcx=0x8000_0000)
    g.call("abs", rcx=v.pte() & 0xFFFF_FFFF)
    g.call("base32", rbx=g.entry(0), rcx=v.pte() & 0xFFFF_FFFF)
    g.call("fs", rax=g.entry(300) - fs_base, rcx=v.pte() & 0xFFFF_FFFF)
    g.call("gs", rcx=0)
    yield g.trace()

    g = guest("address-size-16bit-in-32bit-code", paging, 32, rng,
              "0x67 in 32-bit code: 16-bit addressing [bx+si] and [bx+si+disp8] with a "
              "DS base; coalesced halves")
    g.entries = {3: v.pte()}
    assert g.table_gla is not None
    g.segments = {"ds_base": g.table_gla - 0x4000}
    g.blob("set", "67 89 10 67 89 48 04 c3")     # mov [bx+si], edx; mov [bx+si+4], ecx
    new = v.pte()
    g.call("set", rbx=0x4000, rsi=0x18, rcx=new >> 32, rdx=new & 0xFFFF_FFFF)
    yield g.trace()

    g = guest("operand-size-16bit-stores", paging, 32, rng, "0x66: 2-byte stores in 32-bit code")
    g.entries = {i: v.pte() for i in (60, 61)}
    g.blob("w", "66 89 08 c3")                   # mov word [eax], cx
    g.blob("w_hi", "66 c7 40 06 00 80 c3")       # mov word [eax+6], 0x8000
    g.call("w", rax=g.entry(60), rcx=0x0163)
    g.call("w_hi", rax=g.entry(61))
    yield g.trace()

    for policy in ("hvmi", "strict"):
        g = guest(f"duplicate-delivery-{policy}", paging, 32, rng,
                  f"the same EPT exit delivered twice (as Xen can): policy {policy} reports "
                  "the second one as a duplicate", policy=policy)
        g.entries = {70: v.pte()}
        g.blob("hi", "89 48 04 c3")              # mov [eax+4], ecx
        g.blob("lo", "89 10 c3")                 # mov [eax], edx
        new = v.pte("kernel-rw")
        g.call("hi", rax=g.entry(70), rcx=new >> 32, twice=[0])
        g.call("lo", rax=g.entry(70), rdx=new & 0xFFFF_FFFF)
        yield g.trace()

    for policy in ("strict", "hvmi"):
        g = guest(f"lock-and-byte-{policy}", paging, 32, rng,
                  f"1-byte LOCK AND clearing RW of an 8-byte entry under policy {policy}",
                  policy=policy)
        g.entries = {80: v.pte("user-rw"), 81: v.pte("user-rw")}
        g.blob("wrprotect", "f0 80 20 fd c3")    # lock and byte [eax], 0xfd
        g.blob("set", "89 48 04 89 10 c3")
        g.call("wrprotect", rax=g.entry(80))
        new = v.pte("user-ro")
        g.call("set", rax=g.entry(80), rcx=new >> 32, rdx=new & 0xFFFF_FFFF)
        g.call("wrprotect", rax=g.entry(81))
        yield g.trace()

    g = guest("accessed-bit-set-by-cpu-between-events", paging, 32, rng,
              "the CPU sets A between the halves' event and a later BTR (memory patch)")
    g.entries = {90: 0}
    g.blob("set", "89 48 04 89 10 c3")
    g.blob("wrprotect", "f0 0f ba 30 01 c3")     # lock btr dword [eax], 1
    new = v.frame() | P | RW | US | NX
    g.call("set", rax=g.entry(90), rcx=new >> 32, rdx=new & 0xFFFF_FFFF)
    g.call("wrprotect", rax=g.entry(90), memory=[patch(g.entry_gpa(90), (new | A) & 0xFF, 1)])
    yield g.trace()

    g = guest("code16-addressing", paging, 16, rng,
              "16-bit code: [bx+si+disp8], [bp+di] (SS), [disp16], [si]; XCHG, CMPXCHG, "
              "CMPXCHG8B; coalesced 32-bit halves", code_base=0x0000_9000)
    g.entries = {i: v.pte() for i in range(8)}
    assert g.table_gla is not None
    base = g.table_gla - 0x4000
    g.segments = {"ds_base": base, "ss_base": base, "cs_base": 0}
    g.blob("bxsi", "66 89 40 04 c3")             # mov [bx+si+4], eax
    g.blob("bpdi", "66 89 03 c3")                # mov [bp+di], eax
    g.blob("direct", "66 89 0e 10 40 c3")        # mov [0x4010], ecx
    g.blob("xchg", "66 87 04 c3")                # xchg [si], eax
    g.blob("cmpxchg", "f0 66 0f b1 0c c3")       # lock cmpxchg [si], ecx
    g.blob("c8b", "f0 0f c7 0c c3")              # lock cmpxchg8b [si]
    g.blob("pair", "66 89 04 66 89 44 04 c3")    # mov [si], eax; mov [si+4], eax
    g.call("bxsi", rbx=0x4000, rsi=0x00, rax=0x8000_0000)
    g.call("bpdi", rbp=0x4000, rdi=0x08, rax=v.pte() & 0xFFFF_FFFF)
    g.call("direct", rcx=0x0123_4067)
    g.call("xchg", rsi=0x4018, rax=0)
    e4 = g.entries[4]
    g.call("cmpxchg", rsi=0x4020, rax=e4 & 0xFFFF_FFFF, rcx=(e4 & 0xFFFF_FFFF) | D)
    e5 = g.entries[5]
    g.call("c8b", rsi=0x4028, rax=e5 & 0xFFFF_FFFF, rdx=e5 >> 32, rbx=0, rcx=0)
    g.call("pair", rsi=0x4030, rax=0)
    yield g.trace()


def synthetic_legacy(rng: random.Random) -> Iterator[Trace]:
    paging = "legacy"
    v = Values(paging, rng)

    g = guest("mov-sizes-and-immediates", paging, 32, rng,
              "MOV reg and imm, 4/2/1 bytes, on 4-byte entries")
    g.entries = {i: v.pte() for i in range(8)}
    g.blob("m4", "89 10 c3")                     # mov [eax], edx
    g.blob("m2", "66 89 10 c3")                  # mov [eax], dx
    g.blob("m1", "88 10 c3")                     # mov [eax], dl
    g.blob("i4", "c7 00 67 30 23 01 c3")         # mov dword [eax], 0x1233067
    g.call("m4", rax=g.entry(0), rdx=v.pte())
    g.call("m2", rax=g.entry(1), rdx=0x0025)
    g.call("m1", rax=g.entry(2), rdx=0x65)
    g.call("i4", rax=g.entry(3))
    g.call("m4", rax=g.entry(4), rdx=v.pte("not-present-swap"))
    yield g.trace()

    g = guest("stos-without-rep-df0-df1", paging, 32, rng, "STOSD/STOSB, DF=0 and DF=1")
    g.entries = {i: v.pte() for i in range(8, 12)}
    g.blob("sd", "ab c3")
    g.blob("sd_down", "fd ab fc c3")
    g.blob("sb", "aa c3")
    g.call("sd", rdi=g.entry(8), rax=v.pte())
    g.call("sd_down", rdi=g.entry(9), rax=v.pte())
    g.call("sb", rdi=g.entry(10), rax=0x61)
    yield g.trace()

    g = guest("xchg-cmpxchg-cmpxchg8b", paging, 32, rng,
              "XCHG 4/1, CMPXCHG match/mismatch, CMPXCHG8B over two 4-byte entries "
              "match/mismatch")
    g.entries = {i: v.pte() for i in range(12, 22)}
    g.blob("x4", "87 10 c3")                     # xchg [eax], edx
    g.blob("x1", "86 10 c3")                     # xchg [eax], dl
    g.blob("c4", "f0 0f b1 0e c3")               # lock cmpxchg [esi], ecx
    g.blob("c8b", "f0 0f c7 0e c3")              # lock cmpxchg8b [esi]
    g.call("x4", rax=g.entry(12), rdx=0)
    g.call("x1", rax=g.entry(13), rdx=0x25)
    g.call("c4", rsi=g.entry(14), rax=g.entries[14], rcx=v.pte())
    g.call("c4", rsi=g.entry(15), rax=g.entries[15] ^ A, rcx=v.pte())
    g.call("c8b", rsi=g.entry(16), rax=g.entries[16], rdx=g.entries[17], rbx=v.pte(),
           rcx=v.pte())
    g.call("c8b", rsi=g.entry(18), rax=g.entries[18], rdx=g.entries[19] ^ D, rbx=0, rcx=0)
    yield g.trace()

    g = guest("logic-and-bit-ops", paging, 32, rng, "AND/OR/XOR, BTS imm, BTR reg")
    g.entries = {i: v.pte("user-rw") for i in range(20, 26)}
    g.blob("andb", "f0 80 20 fd c3")             # lock and byte [eax], 0xfd
    g.blob("or", "83 08 20 c3")                  # or dword [eax], 0x20
    g.blob("xor", "31 10 c3")                    # xor [eax], edx
    g.blob("bts", "f0 0f ba 28 01 c3")           # lock bts dword [eax], 1
    g.blob("btr", "0f b3 10 c3")                 # btr [eax], edx
    g.call("andb", rax=g.entry(20))
    g.call("or", rax=g.entry(21))
    g.call("xor", rax=g.entry(22), rdx=PCD | PWT)
    g.call("bts", rax=g.entry(23))
    g.call("btr", rax=g.entry(24), rdx=5)
    yield g.trace()

    g = guest("addressing-and-fs-override", paging, 32, rng,
              "SIB+disp8, disp32 alone, FS override with a per-CPU base")
    g.entries = {i: v.pte() for i in (5, 9, 700)}
    g.segments = {"fs_base": 0x0180_0000}
    g.blob("sib", "89 4c b3 04 c3")              # mov [ebx+esi*4+4], ecx
    g.blob("abs", "89 0d " + g.entry(9).to_bytes(4, "little").hex(" ") + " c3")
    g.blob("fs", "64 89 08 c3")                  # mov fs:[eax], ecx
    g.call("sib", rbx=g.entry(0), rsi=4, rcx=v.pte())
    g.call("abs", rcx=0)
    g.call("fs", rax=g.entry(700) - 0x0180_0000, rcx=v.pte())
    yield g.trace()

    g = guest("code16-addressing", paging, 16, rng,
              "16-bit code under legacy paging: [bx+di+disp8], [bp+si] (SS), STOSD",
              code_base=0x0000_7000)
    g.entries = {i: v.pte() for i in range(6)}
    assert g.table_gla is not None
    base = g.table_gla - 0x2000
    g.segments = {"ds_base": base, "ss_base": base, "es_base": base, "cs_base": 0}
    g.blob("bxdi", "66 89 41 08 c3")             # mov [bx+di+8], eax
    g.blob("bpsi", "66 89 02 c3")                # mov [bp+si], eax
    g.blob("stosd", "66 ab c3")                  # stosd (ES:DI)
    g.call("bxdi", rbx=0x2000, rdi=0x0, rax=v.pte())
    g.call("bpsi", rbp=0x2000, rsi=0x0C, rax=v.pte())
    g.call("stosd", rdi=0x2010, rax=v.pte())
    yield g.trace()

    g = guest("duplicate-delivery-hvmi", paging, 32, rng,
              "the same EPT exit delivered twice: hvmi's same-RIP rule reports a duplicate",
              policy="hvmi")
    g.entries = {100: v.pte()}
    g.blob("set", "89 10 c3")
    g.call("set", rax=g.entry(100), rdx=v.pte(), twice=[0])
    yield g.trace()



# --------------------------------------------------------------------------------------
# Hand-written events: what a capture cannot record
# --------------------------------------------------------------------------------------


def handwritten(rng: random.Random) -> Iterator[Trace]:
    v = Values("4level", rng)
    g = guest("rejected-store-misses-faulting-gla", "4level", 64, rng,
              "hand-written from a captured MOV: the event names another entry than the "
              "one the instruction stores to, so no store covers the faulting GLA")
    g.entries = {2: v.pte(), 9: v.pte()}
    g.blob("set", "48 89 37 c3")
    g.call("set", rdi=g.entry(2), rsi=v.pte())
    fixture = capture_description(g.description())
    event = fixture["events"][0]
    event["gpa"] = h(g.entry_gpa(9))
    event["gla"] = h(g.entry(9))
    _refuse(fixture, "rejected")
    yield Trace(fixture["name"], fixture=fixture)

    g = guest("rejected-store-on-another-page", "pae", 32, rng,
              "hand-written from a captured MOV: the event's page differs from the page the "
              "instruction stores to")
    v = Values("pae", rng)
    g.entries = {4: v.pte()}
    g.blob("set", "89 10 c3")
    g.call("set", rax=g.entry(4), rdx=0x1234_5067)
    fixture = capture_description(g.description())
    event = fixture["events"][0]
    event["gpa"] = h(g.entry_gpa(4) + 0x1000)
    event["gla"] = h(g.entry(4) + 0x1000)
    _refuse(fixture, "rejected")
    yield Trace(fixture["name"], fixture=fixture)

    v = Values("4level", rng)
    for name, code, what in (
            ("unsupported-nop", "90 c3", "NOP"),
            ("unsupported-load", "8b 07 c3", "MOV EAX, [RDI] (a load)")):
        g = guest(name, "4level", 64, rng,
                  f"hand-written from a captured MOV's registers: {what} at RIP stores "
                  "nothing, so there is nothing to emulate")
        g.entries = {3: v.pte()}
        g.blob("set", "48 89 37 c3")
        g.call("set", rdi=g.entry(3), rsi=v.pte())
        fixture = capture_description(g.description())
        fixture["events"][0]["code"] = code
        _refuse(fixture, "unsupported")
        yield Trace(fixture["name"], fixture=fixture)

    g = guest("unsupported-load", "legacy", 32, rng,
              "hand-written from a captured MOV's registers: MOV EDX, [EAX] stores nothing")
    v = Values("legacy", rng)
    g.entries = {3: v.pte()}
    g.blob("set", "89 10 c3")
    g.call("set", rax=g.entry(3), rdx=v.pte())
    fixture = capture_description(g.description())
    fixture["events"][0]["code"] = "8b 10 c3"
    _refuse(fixture, "unsupported")
    yield Trace(fixture["name"], fixture=fixture)


def _refuse(fixture: Json, status: str) -> None:
    """Turn a captured single-event fixture into a refused one: nothing changes."""
    assert len(fixture["events"]) == 1
    event = fixture["events"][0]
    event["expect"] = {"status": status, "writes": [], "entries": [], "regs": {}}
    event.pop("captured", None)
    fixture["capture"]["hand_written"] = (
        f"event edited by tools/corpus/build_corpus.py: expect {status}, nothing written")


# --------------------------------------------------------------------------------------
# Kernel functions
# --------------------------------------------------------------------------------------


KERNEL_RFLAGS = 0x202
"""RFLAGS at a kernel function's entry: interrupts enabled (IF), bit 1 set."""

FLAVOUR_PAGING = {"amd64": ("4level", "5level"), "686-pae": ("pae",), "686": ("legacy",)}
"""Which paging modes each Debian kernel flavour's functions run under."""

KERNEL_TEXT_MAP = {64: 0xFFFF_FFFF_8000_0000, 32: 0xC000_0000}
"""__START_KERNEL_map (x86-64) / PAGE_OFFSET (i386): kernel image gla = base + gpa."""

STUBBED_CALLEES = frozenset({"flush_tlb_mm_range", "flush_tlb_one_kernel",
                             "flush_tlb_one_user", "_printk"})
"""Callees replaced by a bare ``ret``: TLB flushes and printk neither read nor write
the page tables and their return values are unused, so the stub changes no store
the fixture records. Functions that call anything else are not captured."""


def kernel_globals(paging: str) -> dict[str, int]:
    """Boot-time values of the kernel variables the captured functions read."""
    return {
        # CONFIG_DYNAMIC_PHYSICAL_MASK: (1 << __PHYSICAL_MASK_SHIFT) - 1, no SME/TDX.
        "physical_mask": (1 << 52) - 1,
        "page_offset_base": DIRECT_MAP[paging],
        "__pgtable_l5_enabled": int(paging == "5level"),
        "pgdir_shift": 48 if paging == "5level" else 39,
        "ptrs_per_p4d": 512 if paging == "5level" else 1,
    }


@dataclass(frozen=True)
class Param:
    """One parameter of a kernel function, from its prototype."""

    name: str
    ctype: str
    pointer: bool

    @property
    def level(self) -> str | None:
        """``pte``/``pmd``/``pud``/``p4d``/``pgd`` for page-table types."""
        match = re.fullmatch(r"(pte|pmd|pud|p4d|pgd)_t", self.ctype)
        return match.group(1) if match else None


def parse_params(record: Json) -> list[Param]:
    prototype = record["prototype"]
    if prototype.startswith("asm:"):
        # Hand-written assembly: the record names the arguments.
        kinds = {"v": Param("v", "atomic64_t", True), "new": Param("new", "s64", False)}
        return [kinds.get(name, Param(name, "unsigned long", False))
                for name in record["arg_names"]]
    inside = prototype[prototype.index("(") + 1:prototype.rindex(")")]
    params = []
    for text in inside.split(","):
        text = text.strip()
        match = re.fullmatch(r"(.*?)(\**)\s*(\w+)", text)
        if not match:
            raise SystemExit(f"build_corpus: cannot parse parameter {text!r} of {prototype!r}")
        ctype = " ".join(match.group(1).replace("const", "").split())
        params.append(Param(match.group(3), ctype, bool(match.group(2))))
    return params


def runtime_profile(record: Json, paging: str) -> Json | None:
    profile: Json
    for profile in record.get("runtime", []):
        if paging in profile["paging_modes"]:
            return profile
    return None


LEVEL_SHIFT = {"legacy": {"pte": 12, "pmd": 22, "pud": 22, "p4d": 22, "pgd": 22},
               "pae": {"pte": 12, "pmd": 21, "pud": 30, "p4d": 30, "pgd": 30},
               "4level": {"pte": 12, "pmd": 21, "pud": 30, "p4d": 39, "pgd": 39},
               "5level": {"pte": 12, "pmd": 21, "pud": 30, "p4d": 39, "pgd": 48}}
"""Linear-address shift of the region one entry maps, per Linux level and mode
(levels Linux folds share their parent's)."""


class KernelValues(Values):
    """Values for one Linux page-table level (PTE, PMD, PUD, P4D, PGD)."""

    def present(self, level: str) -> int:
        if level == "pte":
            return self.pte(self.rng.choice(["kernel-rw", "kernel-ro", "kernel-rx", "user-rw",
                                             "user-ro", "user-rx", "user-clean", "wc-pat",
                                             "uncached"]))
        if level == "pmd":
            return self.rng.choice([self.pde_large, self.table])()
        if level == "pud" and self.paging == "pae":
            return self.frame() | P            # a PDPTE: P only (SDM Table 4-8)
        if level == "pud" and self.paging != "legacy":
            return self.rng.choice([self.pud_large, self.table])()
        return self.table()

    def large(self, level: str) -> int:
        if level == "pud" and self.paging in ("4level", "5level"):
            return self.pud_large()
        return self.pde_large()

    def any(self, level: str) -> int:
        if level == "pte" and self.rng.random() < 0.3:
            return self.pte(self.rng.choice(["not-present-swap", "protnone", "zero"]))
        return self.present(level)


def _function_role(name: str) -> str:
    for role in ("test_and_clear_young", "clear_flush_young", "set_access_flags",
                 "invalidate", "huge_clear_flush", "clear_flush", "modify_prot_start",
                 "populate", "clear", "xchg", "set"):
        if role in name:
            return role
    return "set"


def kernel_traces(path: Path) -> list[Trace]:
    """Traces of the Debian kernels' page-table writers (see the module docstring)."""
    if not path.exists():
        raise SystemExit(f"build_corpus: {path} is missing: run "
                         "tools/corpus/extract_kernel_writers.py first")
    records = json.loads(path.read_text(encoding="utf-8"))
    traces: list[Trace] = []
    skipped: list[str] = []
    for record in records:
        for paging in FLAVOUR_PAGING[record["flavour"]]:
            for variant in range(_variants(record)):
                trace_rng = random.Random(f"{SEED}-{record['flavour']}-{record['function']}-"
                                          f"{paging}-{variant}")
                try:
                    trace = kernel_trace(record, paging, variant, trace_rng)
                except SkipFunction as reason:
                    skipped.append(f"{record['flavour']} {record['function']} ({paging}): "
                                   f"{reason}")
                    break
                traces.append(trace)
    for line in skipped:
        print(f"build_corpus: skipped {line}", file=sys.stderr)
    return traces


def _variants(record: Json) -> int:
    """How many traces one function gets (the simple setters get two)."""
    return 2 if record["function"].startswith("native_set_") else 1


class SkipFunction(Exception):
    """This function cannot be captured faithfully (the reason says why)."""


def kernel_trace(record: Json, paging: str, variant: int, rng: random.Random) -> Trace:
    profile = runtime_profile(record, paging)
    if profile is None:
        raise SkipFunction("no runtime profile for this paging mode")
    code_bits = 64 if paging in ("4level", "5level") else 32
    function = record["function"]
    address = int(record["address"], 16)
    code = bytes.fromhex(profile["bytes"])
    blobs: list[Json] = [{"label": function, "gla": h(address), "bytes": code.hex(" "),
                          "gpa": h(address - KERNEL_TEXT_MAP[code_bits])}]
    stubs: list[str] = []
    for site in [*profile.get("calls", []), *profile.get("external_jumps", [])]:
        if site["target"] not in STUBBED_CALLEES:
            raise SkipFunction(f"calls {site['target']}, which the corpus does not stub")
        offset = site["offset"]
        opcode = code[offset]
        if opcode not in (0xE8, 0xE9):
            raise SkipFunction(f"call site +{offset:#x} is not a rel32 call/jmp")
        rel = int.from_bytes(code[offset + 1:offset + 5], "little", signed=True)
        target = (address + offset + 5 + rel) & ((1 << 64) - 1)
        if all(blob["gla"] != h(target) for blob in blobs):
            blobs.append({"label": f"stub {site['target']}", "gla": h(target), "bytes": "c3",
                          "gpa": h(target - KERNEL_TEXT_MAP[code_bits])})
            stubs.append(site["target"])
    data_pages = _kernel_data_pages(record, profile, paging, code_bits)

    v = KernelValues(paging, rng)
    params = parse_params(record)
    role = _function_role(function)
    level = next((p.level for p in params if p.pointer and p.level), None) or "pte"
    entry_size = ENTRY_SIZE[paging]
    top = 0x3000_0000 if code_bits == 32 else 0x8_0000_0000
    table_gpa = rng.randrange(0x1000_0000, top, 0x1000)
    table_gla = direct(paging, table_gpa)
    struct_gpa = rng.randrange(0x1000_0000, top, 0x1000)
    while struct_gpa == table_gpa:
        struct_gpa += 0x1000
    struct_gla = direct(paging, struct_gpa)
    word = code_bits // 8
    vma_gla, mm_gla = struct_gla, struct_gla + 0x800
    struct_page = bytearray(0x1000)
    struct_page[2 * word:3 * word] = mm_gla.to_bytes(word, "little")   # vma->vm_mm
    data_pages.append({"gpa": h(struct_gpa), "gla": h(struct_gla),
                       "data": bytes(struct_page[:0x40]).hex()})

    vaddr_of: Callable[[int], int] | None = None
    if function == "set_pte_vaddr":
        vaddr_of = _fixmap_walk(profile, paging, table_gpa, data_pages, rng)
    entries: dict[int, int] = {}
    count = entry_size and (0x1000 // entry_size)
    for index in rng.sample(range(count), 12):
        entries[index] = v.any(level)
    calls: list[Json] = []
    targets = rng.sample(sorted(entries), 6)
    for index in targets:
        before, args = _scenario(role, level, v, rng, entries[index], variant)
        entries[index] = before
        regs, stack = _place_args(record, params, args, index, level, paging,
                                  table_gla, entry_size, vma_gla, mm_gla, v, rng, vaddr_of)
        regs["rflags"] = KERNEL_RFLAGS
        call: Json = {"entry": function, "regs": {k: h(x) for k, x in regs.items()}}
        if stack:
            call["stack"] = [h(x) for x in stack]
        calls.append(call)
    if role in ("set", "xchg", "populate"):
        # A second call on an entry already written: the entry changes twice.
        again = targets[0]
        _, args = _scenario(role, level, v, rng, entries[again], variant + 1)
        regs, stack = _place_args(record, params, args, again, level, paging, table_gla,
                                  entry_size, vma_gla, mm_gla, v, rng, vaddr_of)
        regs["rflags"] = KERNEL_RFLAGS
        calls.append({"entry": function, "regs": {k: h(x) for k, x in regs.items()},
                      **({"stack": [h(x) for x in stack]} if stack else {})})

    suffix = "" if _variants(record) == 1 else ("-kernel" if variant == 0 else "-user")
    source = (f"Debian {record['package']} {record['version']} ({record['kernel_release']}), "
              f"function {function} at {record['address']}: the bytes the running kernel "
              f"executes under {paging} paging (runtime profile '{profile['profile']}': ftrace "
              "site NOPed, return thunks patched, boot-time alternatives applied), from "
              f"tools/corpus/kernel_writers.json; called with {role}-style arguments")
    if stubs:
        source += f"; {', '.join(sorted(set(stubs)))} stubbed with ret"
    globals_read = sorted({page["symbol"] for page in data_pages if "symbol" in page})
    if globals_read:
        source += f"; kernel variables at their boot values: {', '.join(globals_read)}"
    for page in data_pages:
        page.pop("symbol", None)
    description: Json = {
        "name": f"{paging}/{function}{suffix}",
        "source": source,
        "paging": paging,
        "code_bits": code_bits,
        "code": blobs,
        "page_tables": [{"gpa": h(table_gpa), "gla": h(table_gla),
                         "entries": {str(i): h(x) for i, x in sorted(entries.items())}}],
        "data_pages": data_pages,
        "calls": calls,
    }
    try:
        fixture = capture_description(description)
    except Exception as error:  # noqa: BLE001 - reported as a skip with its reason
        raise SkipFunction(f"capture failed: {error}") from None
    if not fixture["events"]:
        raise SkipFunction("no call stored to the page table")
    return Trace(description["name"], fixture=fixture)


def _scenario(role: str, level: str, v: KernelValues, rng: random.Random, current: int,
              variant: int) -> tuple[int, dict[str, int]]:
    """The entry before the call, and the value arguments, for one call."""
    user = variant % 2 == 1
    if role == "set":
        value = v.pte("user-rw" if user else "kernel-rw") if level == "pte" and rng.random() < .3 \
            else v.any(level)
        return current, {"entry": value}
    if role in ("test_and_clear_young", "clear_flush_young"):
        before = v.present(level) | A
        return before, {}
    if role == "set_access_flags":
        before = v.present(level) & ~(A | D)
        if level == "pud":
            # i386's pudp_set_access_flags compares only the frame and P/PWT/PCD
            # (mask 0xfffffe19): give it a new frame so that it stores.
            return before, {"entry": v.present(level), "dirty": 1}
        return before, {"entry": before | A | D | RW, "dirty": 1}
    if role == "invalidate":
        return v.large(level) if level != "pte" else v.present(level), {}
    if role == "populate":
        return 0, {}
    if role == "xchg":
        return current, {"entry": v.any(level)}
    # clear, clear_flush, huge_clear_flush, modify_prot_start: a present entry goes away.
    before = v.large(level) if role == "huge_clear_flush" else v.present(level)
    return before, {}


def _place_args(record: Json, params: list[Param], args: dict[str, int], index: int,
                level: str, paging: str, table_gla: int, entry_size: int, vma_gla: int,
                mm_gla: int, v: KernelValues, rng: random.Random,
                vaddr_of: Callable[[int], int] | None = None,
                ) -> tuple[dict[str, int], list[int]]:
    """Registers and stack words for the call (the record's argument locations)."""
    regs: dict[str, int] = {}
    stack: dict[int, int] = {}
    shift = LEVEL_SHIFT[paging][level]
    user_base = 0x7F00_0000_0000 if paging in ("4level", "5level") else 0x0800_0000
    pointer_done = False
    for param, location in zip(params, record["args"]):
        if param.pointer and (param.level or param.ctype == "atomic64_t") and not pointer_done:
            value = table_gla + index * entry_size
            pointer_done = True
        elif param.pointer and param.level:
            # A page-table page (pud_populate's pmd): a direct-map (lowmem) address.
            value = direct(paging, rng.randrange(0x0100_0000, 0x3000_0000, 0x1000))
        elif param.level or param.ctype in ("s64", "pgprot_t"):
            value = args.get("entry", v.any(param.level or level))
        elif "vm_area_struct" in param.ctype:
            value = vma_gla
        elif "mm_struct" in param.ctype:
            value = mm_gla
        elif param.ctype == "int":
            value = args.get("dirty", 1)
        elif param.ctype == "phys_addr_t":
            value = v.frame(1 << shift)
        elif vaddr_of is not None:
            value = vaddr_of(index)
        else:
            value = (user_base + (index << shift)) & ((1 << (64 if paging in ("4level",
                                                                             "5level") else 32)) - 1)
        _store_arg(location, value, regs, stack)
    if record["function"].startswith("atomic64_"):
        # The caller's EDX:EAX is whatever it held: the first CMPXCHG8B usually fails.
        regs.setdefault("rax", rng.randrange(1 << 32))
        regs.setdefault("rdx", rng.randrange(1 << 32))
    return regs, [stack.get(offset, 0) for offset in range(4, 4 + 4 * len(stack), 4)] \
        if stack else []


_REG64 = {"e" + name[1:]: name for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp")}


def _store_arg(location: str, value: int, regs: dict[str, int], stack: dict[int, int]) -> None:
    """Put `value` where the calling convention says (``rdi``, ``ecx:edx``, ``[esp+4]``)."""
    parts = location.split(":")
    if len(parts) == 2:
        high, low = parts
        _store_arg(low, value & 0xFFFF_FFFF, regs, stack)
        _store_arg(high, value >> 32, regs, stack)
        return
    match = re.fullmatch(r"\[esp\+(\d+)\]", location)
    if match:
        stack[int(match.group(1))] = value & 0xFFFF_FFFF
        return
    name = _REG64.get(location, location)
    regs[name] = value


FIXMAP_BASE = 0xFF80_0000
"""i386 set_pte_vaddr is used for fixmap addresses near the top of the address
space; the corpus uses 0xff800000 + index * 4 KiB (one PTE page's worth)."""


def _fixmap_walk(profile: Json, paging: str, pte_page_gpa: int, data_pages: list[Json],
                 rng: random.Random) -> Callable[[int], int]:
    """The tables set_pte_vaddr walks to reach the monitored PTE page.

    It reads swapper_pg_dir (found in the profile's ``data_refs``: the PAE
    PDPT, or the 2-level page directory), then (PAE) the PMD page through the
    direct map, then writes the PTE through the direct map. The corpus fills
    those entries so that every fixmap address lands on the monitored page.
    """
    refs = [ref for ref in profile.get("data_refs", []) if ref["symbol"] == "swapper_pg_dir"]
    if not refs:
        raise SkipFunction("its runtime profile names no swapper_pg_dir read")
    pgdir = int(refs[0]["address"], 16)
    pgdir_page = pgdir & ~0xFFF
    directory = bytearray(0x1000)
    offset = pgdir - pgdir_page
    if paging == "pae":
        pmd_gpa = rng.randrange(0x0100_0000, 0x3000_0000, 0x1000)
        pdpte = (pmd_gpa | P).to_bytes(8, "little")
        index = FIXMAP_BASE >> 30
        directory[offset + 8 * index:offset + 8 * index + 8] = pdpte
        pmd = bytearray(0x1000)
        pmd_index = (FIXMAP_BASE >> 21) & 0x1FF
        pmd[8 * pmd_index:8 * pmd_index + 8] = (pte_page_gpa | P | RW | A | D).to_bytes(8, "little")
        data_pages.append({"gpa": h(pmd_gpa), "gla": h(direct(paging, pmd_gpa)),
                           "data": bytes(pmd[:8 * pmd_index + 8]).hex(),
                           "symbol": "swapper_pg_dir's fixmap PMD page"})
    else:
        index = FIXMAP_BASE >> 22
        pde = (pte_page_gpa | P | RW | A | D).to_bytes(4, "little")
        directory[offset + 4 * index:offset + 4 * index + 4] = pde
    end = max(i for i, b in enumerate(directory) if b) + 1
    data_pages.append({"gpa": h(pgdir_page - 0xC000_0000), "gla": h(pgdir_page),
                       "data": bytes(directory[:end]).hex(), "symbol": "swapper_pg_dir"})
    return lambda entry_index: FIXMAP_BASE + (entry_index << 12)


def _kernel_data_pages(record: Json, profile: Json, paging: str, code_bits: int) -> list[Json]:
    """Pages holding the kernel variables the function reads (the profile's
    ``data_refs``), at their kernel-image addresses, with their boot values.

    Indexed tables (``swapper_pg_dir[i]``) are left to the function's recipe.
    """
    values = kernel_globals(paging)
    pages: dict[int, bytearray] = {}
    symbols: dict[int, set[str]] = {}
    for ref in profile.get("data_refs", []):
        if ref.get("indexed"):
            continue
        symbol, _, plus = ref["symbol"].partition("+")
        if symbol not in values:
            raise SkipFunction(f"reads kernel variable {symbol}, whose boot value the corpus "
                               "does not know")
        target = int(ref["address"], 16)
        start = int(plus, 16) if plus else 0
        value = values[symbol].to_bytes(8, "little")[start:start + ref["size"]]
        page = target & ~0xFFF
        content = pages.setdefault(page, bytearray(0x1000))
        content[target - page:target - page + len(value)] = value
        symbols.setdefault(page, set()).add(symbol)
    out = []
    for page, content in sorted(pages.items()):
        last = max((i for i, b in enumerate(content) if b), default=7) + 1
        out.append({"gpa": h(page - KERNEL_TEXT_MAP[code_bits]), "gla": h(page),
                    "data": bytes(content[:last]).hex(),
                    "symbol": ", ".join(sorted(symbols[page]))})
    return out


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------


def all_traces(kernel_writers: Path) -> list[Trace]:
    rng = random.Random(SEED)
    traces: list[Trace] = []
    traces += kernel_traces(kernel_writers)
    traces += synthetic_64("4level", random.Random(f"{SEED}-4level"))
    traces += [trace for trace in synthetic_64("5level", random.Random(f"{SEED}-5level"))
               if trace.name.split("/")[1] in SYNTHETIC_5LEVEL]
    traces += synthetic_compat(random.Random(f"{SEED}-compat"))
    traces += synthetic_pae(random.Random(f"{SEED}-pae"))
    traces += synthetic_legacy(random.Random(f"{SEED}-legacy"))
    traces += handwritten(rng)
    return traces


def render(trace: Trace) -> str:
    fixture = trace.fixture
    if fixture is None:
        assert trace.description is not None
        fixture = capture_description(trace.description)
    return dump_fixture(fixture)


def fixture_path(name: str) -> Path:
    if not re.fullmatch(r"(legacy|pae|4level|5level)/[A-Za-z0-9_.+-]+", name):
        raise SystemExit(f"build_corpus: trace name {name!r} is not '<paging>/<slug>'")
    return CORPUS / f"{name}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel-writers", type=Path, default=KERNEL_WRITERS,
                        help="the extracted kernel functions (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="build in memory and report files that would change; write nothing")
    args = parser.parse_args(argv)
    traces = all_traces(args.kernel_writers)
    names = [trace.name for trace in traces]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SystemExit(f"build_corpus: duplicate trace names: {', '.join(duplicates)}")
    rendered = {fixture_path(trace.name): render(trace) for trace in traces}
    if args.check:
        existing = {path for path in CORPUS.rglob("*.json")}
        changed = [p for p, text in rendered.items()
                   if not p.exists() or p.read_text(encoding="utf-8") != text]
        stale = existing - set(rendered)
        for path in sorted(changed):
            print(f"would write {path.relative_to(ROOT)}")
        for path in sorted(stale):
            print(f"would delete {path.relative_to(ROOT)}")
        if not changed and not stale:
            print(f"{CORPUS.relative_to(ROOT)} is up to date ({len(rendered)} traces)")
        return 1 if changed or stale else 0
    for old in CORPUS.rglob("*.json"):
        old.unlink()
    for path, text in rendered.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    events = sum(text.count('"expect"') for text in rendered.values())
    by_mode: dict[str, int] = {}
    for trace in traces:
        mode = trace.name.split("/")[0]
        by_mode[mode] = by_mode.get(mode, 0) + 1
    summary = ", ".join(f"{mode} {count}" for mode, count in sorted(by_mode.items()))
    print(f"wrote {len(rendered)} traces ({events} events) to {CORPUS.relative_to(ROOT)}: "
          f"{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
