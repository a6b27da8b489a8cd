"""Entry values the corpus writes: Linux's common PTE/PMD/PUD kinds, drawn from
a seeded generator, and the address-space constants they live in."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ptemu.values import hex_int

h = hex_int
"""Hex spelling of descriptions and fixtures (``0x1f``): ptemu's own."""

SEED = 0x5EED_2024
"""The corpus's one seed: every generator is seeded from it and a fixed label."""

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
