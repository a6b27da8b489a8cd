#!/usr/bin/env python3
"""Extract the instruction bytes of Linux's out-of-line page-table writers from Debian kernels.

What it produces
    A small JSON file (``kernel_writers.json``) listing, for each Debian kernel flavour
    (``amd64`` = 4-level paging, ``686-pae`` = PAE paging, ``686`` = legacy 2-level paging),
    every function of a fixed candidate list (``CANDIDATES`` below) that exists *out of line*
    in that kernel and stores to a page-table entry: its address, size, raw bytes, a Capstone
    listing, its calling convention and argument registers, and the places a capture must
    treat specially (ftrace ``__fentry__`` sites, return-thunk jumps, boot-time alternatives,
    paravirt indirect calls, calls to other functions).  Only function bytes are written:
    never a kernel image.

Steps (each one cached under ``--work-dir``, default ``/tmp/kernel-work``)
    1. Pick the kernel ABI (e.g. ``6.1.0-50``): the newest ABI named by the metapackages
       ``linux-image-amd64``, ``linux-image-686-pae:i386`` and ``linux-image-686:i386`` for which
       every flavour has both an image package (``-unsigned`` preferred, else the signed one)
       and a ``-dbg`` package; or the ABI given with ``--abi``.
    2. ``apt-get download`` the image and ``-dbg`` packages into ``<work-dir>/debs``.
       Debian's image package ships only a stub ``/boot/System.map`` ("The real System.map is
       in the linux-image-<version>-dbg package"), so the ``-dbg`` package is needed: it holds
       ``/usr/lib/debug/boot/System.map-<ver>`` and the unstripped ``vmlinux-<ver>`` whose ELF
       symbol table gives exact function sizes.
    3. Stream the packages' data tarballs (``dpkg-deb --fsys-tarfile``) and extract only
       ``boot/vmlinuz-<ver>``, ``boot/config-<ver>``, the real ``System.map`` and the debug
       ``vmlinux``.
    4. Decompress the vmlinuz the way ``scripts/extract-vmlinux`` does, but precisely: read the
       bzImage setup header (``setup_sects``, ``payload_offset``, ``payload_length``), identify
       the compressor by its magic (xz, gzip, lzma, zstd, lz4, bzip2) and decompress it with the
       Python standard library (Debian 12 kernels use xz; zstd would need the ``zstandard``
       module, lz4 the ``lz4`` module; the script says so if it meets one).  The result is the
       ELF ``vmlinux`` that boots.
    5. Map each symbol address to a file offset through the ELF program headers (a small
       ``struct``-based ELF reader; no pyelftools), take the function size from the debug
       ``vmlinux`` symbol table (falling back to the distance to the next ``System.map``
       symbol), read the bytes from the booted image, and check they equal the debug image's.
    6. Disassemble with Capstone, check the boundary (last instruction is a return, a jump to
       the return thunk, a tail jump or ``ud2``; what follows up to the next symbol is padding),
       and record the special sites (from ``__mcount_loc``, ``.altinstructions``,
       ``.parainstructions`` and the jump targets).
    7. Write the JSON.

What it needs
    Debian (or a derivative with Debian's kernel packages in its apt sources), root (for
    ``dpkg --add-architecture i386`` and ``apt-get update``; downloads themselves do not need
    root), network access to the Debian archive, ``dpkg-deb``, Python >= 3.10 with
    ``capstone`` 5.x.  About 2.6 GB of downloads (the three ``-dbg`` packages are ~800 MB each)
    and ~2.5 GB of disk under ``--work-dir``; a re-run reuses what is there.

Usage
    python tools/corpus/extract_kernel_writers.py --out tools/corpus/kernel_writers.json
    python tools/corpus/extract_kernel_writers.py --abi 6.1.0-50 --flavour amd64 --out x.json
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import lzma
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCRIPT_NAME = "tools/corpus/extract_kernel_writers.py"
DEFAULT_WORK_DIR = Path("/tmp/kernel-work")
DEFAULT_MAX_SIZE = 512


class ExtractError(Exception):
    """A step failed in a way the user can act on; the message says which step and why."""


# --------------------------------------------------------------------------------------
# Flavours and candidate functions
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Flavour:
    """One Debian kernel flavour and the paging mode its kernel uses."""

    name: str  # Debian flavour suffix: amd64, 686-pae, 686
    arch: str  # Debian architecture of the package: amd64, i386
    paging: str  # ptemu paging name: 4level, pae, legacy
    code_bits: int  # 64 or 32

    @property
    def meta_package(self) -> str:
        """The metapackage that depends on the current image of this flavour."""
        return apt_name(f"linux-image-{self.name}", self.arch)


FLAVOURS: tuple[Flavour, ...] = (
    Flavour("amd64", "amd64", "4level", 64),
    Flavour("686-pae", "i386", "pae", 32),
    Flavour("686", "i386", "legacy", 32),
)

# Sizes of the C types that appear in the prototypes, per paging mode (bytes).
# pte_t/pmd_t/... and pgprot_t/phys_addr_t are 64-bit with PAE (CONFIG_X86_PAE selects
# CONFIG_PHYS_ADDR_T_64BIT), 32-bit on legacy i386, 64-bit on x86-64.
_TYPE_SIZES: dict[str, dict[str, int]] = {
    "4level": {"ptr": 8, "ulong": 8, "int": 4, "entry": 8, "phys": 8, "pgprot": 8},
    "pae": {"ptr": 4, "ulong": 4, "int": 4, "entry": 8, "phys": 8, "pgprot": 8},
    "legacy": {"ptr": 4, "ulong": 4, "int": 4, "entry": 4, "phys": 4, "pgprot": 4},
}


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    """One C parameter: its name and its kind (a key of ``_TYPE_SIZES``)."""

    name: str
    kind: str


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A function that may exist out of line and writes a page-table entry."""

    name: str
    prototype: str  # the Linux 6.1 C prototype, for the reader
    params: tuple[Param, ...]
    what: str  # what it stores, in one line
    flavours: tuple[str, ...] = ()  # only these flavours (empty: all)
    registers: tuple[str, ...] = ()  # argument locations when not the C convention
    convention: str = ""  # calling convention when not the C one
    notes: tuple[str, ...] = ()


def _c(name: str, prototype: str, params: str, what: str, **extra: Any) -> Candidate:
    """Build a Candidate from ``"name:kind name:kind"`` shorthand."""
    parsed = tuple(Param(*p.split(":")) for p in params.split())
    return Candidate(name, prototype, parsed, what, **extra)


_VMA3 = "vma:ptr address:ulong"
CANDIDATES: tuple[Candidate, ...] = (
    # The paravirt "native" setters (out of line only where pv_ops points at them:
    # CONFIG_PARAVIRT_XXL, i.e. the amd64 kernel, which supports Xen PV).
    _c("native_set_pte", "void native_set_pte(pte_t *ptep, pte_t pte)",
       "ptep:ptr pte:entry", "PTE = pte"),
    _c("native_set_pte_atomic", "void native_set_pte_atomic(pte_t *ptep, pte_t pte)",
       "ptep:ptr pte:entry", "PTE = pte, one atomic 64-bit store"),
    _c("native_set_pmd", "void native_set_pmd(pmd_t *pmdp, pmd_t pmd)",
       "pmdp:ptr pmd:entry", "PDE = pmd"),
    _c("native_set_pud", "void native_set_pud(pud_t *pudp, pud_t pud)",
       "pudp:ptr pud:entry", "PDPTE = pud"),
    _c("native_set_p4d", "void native_set_p4d(p4d_t *p4dp, p4d_t p4d)",
       "p4dp:ptr p4d:entry", "PML4E = p4d (and the PTI user copy in 4-level mode)",
       notes=(("5-level relevant: `if (pgtable_l5_enabled() || !PTI) WRITE_ONCE(*p4dp, "
               "p4d)`; pgtable_l5_enabled() is an alternative on X86_FEATURE_LA57, so the "
               "runtime code differs: with LA57 the p4d is a real level and the store is "
               "direct (profile 5level); without it the p4d is the top level (the PML4 "
               "itself) and the value goes through pti_set_user_pgtbl (a PTI alternative, "
               "patched out here) before the store (profile 4level)"),)),
    _c("native_set_pgd", "void native_set_pgd(pgd_t *pgdp, pgd_t pgd)",
       "pgdp:ptr pgd:entry", "PML5E = pgd (and the PTI user copy)",
       notes=(("5-level relevant: its callers (pgd_populate, pgd_clear) return early unless "
               "pgtable_l5_enabled(), so it only runs with LA57 on and then writes PML5Es; "
               "with 4-level paging the top level is written by native_set_p4d"),)),
    _c("native_ptep_get_and_clear", "pte_t native_ptep_get_and_clear(pte_t *ptep)",
       "ptep:ptr", "PTE = 0, returns the old PTE"),
    _c("native_pte_clear",
       "void native_pte_clear(struct mm_struct *mm, unsigned long addr, pte_t *ptep)",
       "mm:ptr addr:ulong ptep:ptr", "PTE = 0"),
    _c("native_pmd_clear", "void native_pmd_clear(pmd_t *pmdp)", "pmdp:ptr", "PDE = 0"),
    _c("native_pud_clear", "void native_pud_clear(pud_t *pudp)", "pudp:ptr", "PDPTE = 0"),
    _c("native_p4d_clear", "void native_p4d_clear(p4d_t *p4dp)", "p4dp:ptr", "P4D = 0"),
    _c("native_pgd_clear", "void native_pgd_clear(pgd_t *pgdp)", "pgdp:ptr", "PGD = 0"),
    _c("native_pmdp_get_and_clear", "pmd_t native_pmdp_get_and_clear(pmd_t *pmdp)",
       "pmdp:ptr", "PDE = 0, returns the old PDE"),
    _c("native_pudp_get_and_clear", "pud_t native_pudp_get_and_clear(pud_t *pudp)",
       "pudp:ptr", "PDPTE = 0, returns the old PDPTE"),
    _c("ptep_set_wrprotect",
       "void ptep_set_wrprotect(struct mm_struct *mm, unsigned long addr, pte_t *ptep)",
       "mm:ptr addr:ulong ptep:ptr", "clear PTE.RW (locked bit op)"),
    _c("pmdp_set_wrprotect",
       "void pmdp_set_wrprotect(struct mm_struct *mm, unsigned long addr, pmd_t *pmdp)",
       "mm:ptr addr:ulong pmdp:ptr", "clear PDE.RW (locked bit op)"),
    _c("pte_clear", "void pte_clear(struct mm_struct *mm, unsigned long addr, pte_t *ptep)",
       "mm:ptr addr:ulong ptep:ptr", "PTE = 0"),
    _c("pmd_clear", "void pmd_clear(pmd_t *pmdp)", "pmdp:ptr", "PDE = 0"),
    _c("pud_clear", "void pud_clear(pud_t *pudp)", "pudp:ptr", "PDPTE = 0"),
    _c("p4d_clear", "void p4d_clear(p4d_t *p4dp)", "p4dp:ptr", "P4D = 0"),
    _c("pgd_clear", "void pgd_clear(pgd_t *pgdp)", "pgdp:ptr", "PGD = 0"),
    # Out-of-line functions of arch/x86/mm/pgtable.c and mm/pgtable-generic.c.
    _c("ptep_set_access_flags",
       "int ptep_set_access_flags(struct vm_area_struct *vma, unsigned long address, "
       "pte_t *ptep, pte_t entry, int dirty)",
       f"{_VMA3} ptep:ptr entry:entry dirty:int", "PTE = entry when it differs"),
    _c("pmdp_set_access_flags",
       "int pmdp_set_access_flags(struct vm_area_struct *vma, unsigned long address, "
       "pmd_t *pmdp, pmd_t entry, int dirty)",
       f"{_VMA3} pmdp:ptr entry:entry dirty:int", "PDE = entry when it differs"),
    _c("pudp_set_access_flags",
       "int pudp_set_access_flags(struct vm_area_struct *vma, unsigned long address, "
       "pud_t *pudp, pud_t entry, int dirty)",
       f"{_VMA3} pudp:ptr entry:entry dirty:int", "PDPTE = entry when it differs"),
    _c("ptep_test_and_clear_young",
       "int ptep_test_and_clear_young(struct vm_area_struct *vma, unsigned long addr, "
       "pte_t *ptep)",
       f"{_VMA3} ptep:ptr", "clear PTE.A (locked btr)"),
    _c("pmdp_test_and_clear_young",
       "int pmdp_test_and_clear_young(struct vm_area_struct *vma, unsigned long addr, "
       "pmd_t *pmdp)",
       f"{_VMA3} pmdp:ptr", "clear PDE.A (locked btr)"),
    _c("pudp_test_and_clear_young",
       "int pudp_test_and_clear_young(struct vm_area_struct *vma, unsigned long addr, "
       "pud_t *pudp)",
       f"{_VMA3} pudp:ptr", "clear PDPTE.A (locked btr)"),
    _c("ptep_clear_flush_young",
       "int ptep_clear_flush_young(struct vm_area_struct *vma, unsigned long address, "
       "pte_t *ptep)",
       f"{_VMA3} ptep:ptr", "clear PTE.A (locked btr), no flush on x86"),
    _c("pmdp_clear_flush_young",
       "int pmdp_clear_flush_young(struct vm_area_struct *vma, unsigned long address, "
       "pmd_t *pmdp)",
       f"{_VMA3} pmdp:ptr", "clear PDE.A (locked btr), then flush_tlb_range"),
    _c("pmdp_invalidate_ad",
       "pmd_t pmdp_invalidate_ad(struct vm_area_struct *vma, unsigned long address, "
       "pmd_t *pmdp)",
       f"{_VMA3} pmdp:ptr", "PDE = PDE without P (xchg / cmpxchg8b), returns old PDE"),
    _c("pmdp_invalidate",
       "pmd_t pmdp_invalidate(struct vm_area_struct *vma, unsigned long address, "
       "pmd_t *pmdp)",
       f"{_VMA3} pmdp:ptr", "PDE = PDE without P, then flush_tlb_range"),
    _c("ptep_clear_flush",
       "pte_t ptep_clear_flush(struct vm_area_struct *vma, unsigned long address, "
       "pte_t *ptep)",
       f"{_VMA3} ptep:ptr", "PTE = 0 (xchg), then flush_tlb_mm_range if it was accessed"),
    _c("pmdp_huge_clear_flush",
       "pmd_t pmdp_huge_clear_flush(struct vm_area_struct *vma, unsigned long address, "
       "pmd_t *pmdp)",
       f"{_VMA3} pmdp:ptr", "PDE = 0 (xchg), then flush_tlb_range"),
    _c("pudp_huge_clear_flush",
       "pud_t pudp_huge_clear_flush(struct vm_area_struct *vma, unsigned long address, "
       "pud_t *pudp)",
       f"{_VMA3} pudp:ptr", "PDPTE = 0 (xchg), then flush_tlb_range"),
    _c("pmd_set_huge", "int pmd_set_huge(pmd_t *pmd, phys_addr_t addr, pgprot_t prot)",
       "pmd:ptr addr:phys prot:pgprot", "PDE = 2 MiB/4 MiB leaf, after an MTRR check"),
    _c("pud_set_huge", "int pud_set_huge(pud_t *pud, phys_addr_t addr, pgprot_t prot)",
       "pud:ptr addr:phys prot:pgprot", "PDPTE = 1 GiB leaf, after an MTRR check"),
    _c("p4d_set_huge", "int p4d_set_huge(p4d_t *p4d, phys_addr_t addr, pgprot_t prot)",
       "p4d:ptr addr:phys prot:pgprot", "nothing on x86 (returns 0)"),
    _c("pmd_clear_huge", "int pmd_clear_huge(pmd_t *pmd)", "pmd:ptr",
       "PDE = 0 when it maps a large page"),
    _c("pud_clear_huge", "int pud_clear_huge(pud_t *pud)", "pud:ptr",
       "PDPTE = 0 when it maps a large page"),
    _c("p4d_clear_huge", "void p4d_clear_huge(p4d_t *p4d)", "p4d:ptr", "nothing on x86"),
    _c("pgd_clear_bad", "void pgd_clear_bad(pgd_t *pgd)", "pgd:ptr",
       "report the bad PGD (printk), then PGD = 0"),
    _c("p4d_clear_bad", "void p4d_clear_bad(p4d_t *p4d)", "p4d:ptr",
       "report the bad P4D (printk), then P4D = 0"),
    _c("pud_clear_bad", "void pud_clear_bad(pud_t *pud)", "pud:ptr",
       "report the bad PUD (printk), then PUD = 0"),
    _c("pmd_clear_bad", "void pmd_clear_bad(pmd_t *pmd)", "pmd:ptr",
       "report the bad PMD (printk), then PMD = 0"),
    _c("__ptep_modify_prot_start",
       "pte_t __ptep_modify_prot_start(struct vm_area_struct *vma, unsigned long addr, "
       "pte_t *ptep)",
       f"{_VMA3} ptep:ptr", "PTE = 0 (xchg), returns old PTE (pv_ops.mmu target)"),
    _c("__ptep_modify_prot_commit",
       "void __ptep_modify_prot_commit(struct vm_area_struct *vma, unsigned long addr, "
       "pte_t *ptep, pte_t pte)",
       f"{_VMA3} ptep:ptr pte:entry", "PTE = pte via set_pte (pv_ops.mmu target)"),
    _c("pud_populate", "void pud_populate(struct mm_struct *mm, pud_t *pudp, pmd_t *pmd)",
       "mm:ptr pudp:ptr pmd:ptr", "PDPTE = __pa(pmd) | P, then reload CR3 (PAE)"),
    _c("set_pte_vaddr", "void set_pte_vaddr(unsigned long vaddr, pte_t pteval)",
       "vaddr:ulong pteval:entry", "kernel PTE for vaddr = pteval, then flush that page"),
    _c("__native_set_fixmap", "void __native_set_fixmap(enum fixed_addresses idx, pte_t pte)",
       "idx:int pte:entry", "fixmap PTE = pte (through set_pte_vaddr)"),
    _c("native_set_fixmap",
       "void native_set_fixmap(unsigned idx, phys_addr_t phys, pgprot_t flags)",
       "idx:int phys:phys flags:pgprot", "fixmap PTE (through set_pte_vaddr)"),
    # The PAE kernel's 64-bit exchange: native_ptep_get_and_clear() and friends call it
    # (arch_atomic64_xchg with CONFIG_X86_CMPXCHG64), so it is the out-of-line PTE writer.
    _c("atomic64_xchg_cx8", "asm: atomic64_xchg_cx8 (arch/x86/lib/atomic64_cx8_32.S)",
       "v:ptr new:entry", "*v = ecx:ebx with a lock cmpxchg8b loop, returns old in edx:eax",
       flavours=("686-pae",), registers=("esi", "ecx:ebx"),
       convention="asm helper: esi = pointer, ecx:ebx = new value, edx:eax = scratch "
                  "(expected old value; any value works, the loop retries); returns the old "
                  "value in edx:eax",
       notes=(("the first cmpxchg8b usually fails when edx:eax is not the current entry: it "
               "still writes the unchanged value back (SDM CMPXCHG8B: the destination gets a "
               "write cycle whatever the comparison), then the loop retries with the value "
               "it read"),)),
    _c("atomic64_set_cx8", "asm: atomic64_set_cx8 (arch/x86/lib/atomic64_cx8_32.S)",
       "v:ptr new:entry", "*v = ecx:ebx with a cmpxchg8b loop (no lock prefix)",
       flavours=("686-pae",), registers=("esi", "ecx:ebx"),
       convention="asm helper: esi = pointer, ecx:ebx = new value, edx:eax = scratch",
       notes=("used by arch_atomic64_set; listed for its unlocked cmpxchg8b store",)),
)


# --------------------------------------------------------------------------------------
# Calling conventions
# --------------------------------------------------------------------------------------

SYSV_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
REGPARM3_ARG_REGS = ("eax", "edx", "ecx")


def argument_locations(candidate: Candidate, flavour: Flavour) -> list[str]:
    """Where each argument is at function entry.

    x86-64 kernels use the SysV ABI: integer arguments (all of ours fit in 8 bytes, and the
    pte_t-style one-member structs are class INTEGER) go in rdi, rsi, rdx, rcx, r8, r9.

    i386 kernels are built with ``-mregparm=3``: arguments take eax, edx, ecx in order; a
    64-bit argument takes two consecutive registers (low half first, written ``high:low``);
    once an argument does not fit in the registers left, it and every later argument go on
    the stack (GCC's ``function_arg_advance_32``), at ``[esp+4]`` upwards on entry.
    """
    sizes = _TYPE_SIZES[flavour.paging]
    if flavour.code_bits == 64:
        return [SYSV_ARG_REGS[i] for i in range(len(candidate.params))]
    locations: list[str] = []
    next_reg = 0
    regs_open = True
    stack = 4
    for param in candidate.params:
        words = (sizes[param.kind] + 3) // 4
        if regs_open and next_reg + words <= len(REGPARM3_ARG_REGS):
            regs = REGPARM3_ARG_REGS[next_reg:next_reg + words]
            locations.append(":".join(reversed(regs)))
            next_reg += words
            if next_reg == len(REGPARM3_ARG_REGS):
                regs_open = False
            continue
        regs_open = False
        if words == 1:
            locations.append(f"[esp+{stack}]")
        else:
            locations.append(f"[esp+{stack + 4}]:[esp+{stack}]")
        stack += 4 * words
    return locations


def calling_convention(flavour: Flavour) -> str:
    """A one-line description of the kernel's calling convention for this flavour."""
    if flavour.code_bits == 64:
        return "x86-64 SysV (rdi, rsi, rdx, rcx, r8, r9; return in rax)"
    return ("i386 kernel regparm(3) (eax, edx, ecx, then stack; 64-bit values in register "
            "pairs high:low; return in eax or edx:eax)")


# --------------------------------------------------------------------------------------
# apt / dpkg
# --------------------------------------------------------------------------------------


def apt_name(package: str, arch: str) -> str:
    """The apt spelling of a package of a given architecture (``pkg:i386`` when foreign)."""
    return package if arch == native_arch() else f"{package}:{arch}"


_NATIVE_ARCH: list[str] = []


def native_arch() -> str:
    """dpkg's native architecture (cached)."""
    if not _NATIVE_ARCH:
        _NATIVE_ARCH.append(run(["dpkg", "--print-architecture"]).strip())
    return _NATIVE_ARCH[0]


def run(cmd: Sequence[str], *, cwd: Path | None = None, check: bool = True) -> str:
    """Run a command, return its stdout; raise ExtractError naming the command on failure."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ExtractError(f"{cmd[0]} not found: this script needs Debian's apt and dpkg") \
            from exc
    if check and proc.returncode != 0:
        raise ExtractError(f"`{' '.join(cmd)}` failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout


def prepare_apt(skip_update: bool, need_i386: bool) -> None:
    """Enable i386 packages and refresh the package lists (needs root)."""
    if skip_update:
        return
    if os.geteuid() != 0:
        raise ExtractError("apt-get update and dpkg --add-architecture need root "
                           "(or pass --no-update if the lists are already current)")
    if need_i386 and "i386" not in run(["dpkg", "--print-foreign-architectures"]).split() \
            and native_arch() != "i386":
        run(["dpkg", "--add-architecture", "i386"])
    # A partially failing update (e.g. a mirror mid-sync for one index) still leaves usable
    # lists; the ABI choice below only uses packages apt can actually see.
    proc = subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"warning: apt-get update reported errors:\n{proc.stderr.strip()}",
              file=sys.stderr)


def package_version(package: str) -> str | None:
    """The candidate version apt would download for ``package``, or None if unknown."""
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    match = re.search(r"^Version: (\S+)$", proc.stdout, re.MULTILINE)
    return match.group(1) if match else None


@dataclasses.dataclass(frozen=True, slots=True)
class KernelPackages:
    """The two packages used for one flavour."""

    flavour: Flavour
    abi: str  # e.g. 6.1.0-50
    image: str  # package name without :arch
    dbg: str
    version: str  # Debian version of both, e.g. 6.1.176-1

    @property
    def release(self) -> str:
        """The kernel release string (``uname -r``), e.g. ``6.1.0-50-amd64``."""
        return f"{self.abi}-{self.flavour.name}"


def packages_for(flavour: Flavour, abi: str) -> KernelPackages | None:
    """The image (unsigned preferred) and -dbg packages of ``abi``, if apt knows both."""
    dbg = f"linux-image-{abi}-{flavour.name}-dbg"
    dbg_version = package_version(apt_name(dbg, flavour.arch))
    if dbg_version is None:
        return None
    for image in (f"linux-image-{abi}-{flavour.name}-unsigned",
                  f"linux-image-{abi}-{flavour.name}"):
        version = package_version(apt_name(image, flavour.arch))
        if version == dbg_version:
            return KernelPackages(flavour, abi, image, dbg, version)
    return None


def _abi_key(abi: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", abi))


def choose_abi(flavours: Sequence[Flavour], requested: str | None) -> list[KernelPackages]:
    """Resolve the packages for every flavour (see step 1 of the module docstring)."""
    if requested is not None:
        candidates = [requested]
    else:
        found: set[str] = set()
        for flavour in flavours:
            out = run(["apt-cache", "depends", flavour.meta_package], check=False)
            found.update(re.findall(rf"Depends: linux-image-(\S+)-{re.escape(flavour.name)}"
                                    rf"(?::\S+)?$", out, re.MULTILINE))
        if not found:
            raise ExtractError("apt knows no linux-image-<flavour> metapackage; is a Debian "
                               "archive in the apt sources and `apt-get update` done?")
        candidates = sorted(found, key=_abi_key, reverse=True)
    for abi in candidates:
        resolved = [packages_for(f, abi) for f in flavours]
        if all(r is not None for r in resolved):
            return [r for r in resolved if r is not None]
        missing = [f.name for f, r in zip(flavours, resolved) if r is None]
        if requested is None:
            print(f"note: ABI {abi} lacks image or -dbg packages for {', '.join(missing)}; "
                  "trying an older one", file=sys.stderr)
    raise ExtractError(f"no kernel ABI among {candidates} has image and -dbg packages for "
                       f"every flavour ({', '.join(f.name for f in flavours)})")


def download(packages: KernelPackages, debs: Path) -> tuple[Path, Path]:
    """``apt-get download`` both packages into ``debs`` (reused when already there)."""
    debs.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in (packages.image, packages.dbg):
        filename = f"{name}_{packages.version.replace(':', '%3a')}_{packages.flavour.arch}.deb"
        path = debs / filename
        if not path.exists():
            print(f"downloading {name} {packages.version} ...", file=sys.stderr)
            spec = f"{apt_name(name, packages.flavour.arch)}={packages.version}"
            run(["apt-get", "download", spec], cwd=debs)
            if not path.exists():
                raise ExtractError(f"apt-get download did not produce {path}")
        paths.append(path)
    return paths[0], paths[1]


def extract_members(deb: Path, wanted: dict[str, Path]) -> None:
    """Stream ``deb``'s data tarball and write the members named in ``wanted`` (cached).

    Members are matched by path without the leading ``./``.  The tar stream is abandoned as
    soon as every wanted member has been written, so the huge -dbg packages are only read up
    to the files needed (they come first in Debian's -dbg data tarball).
    """
    todo = {name: dest for name, dest in wanted.items() if not dest.exists()}
    if not todo:
        return
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in todo or not member.isfile():
                    continue
                dest = todo.pop(name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                partial = dest.with_suffix(dest.suffix + ".part")
                with open(partial, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                partial.rename(dest)
                if not todo:
                    break
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if todo:
        raise ExtractError(f"{deb.name} has no member(s) {', '.join(sorted(todo))}")


# --------------------------------------------------------------------------------------
# vmlinuz -> vmlinux
# --------------------------------------------------------------------------------------

_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
)


def bzimage_payload(image: bytes) -> bytes:
    """The compressed kernel inside a bzImage, located through its setup header.

    Boot protocol >= 2.08: the protected-mode part starts at ``(setup_sects + 1) * 512``
    (``setup_sects`` 0 means 4) and the payload is at ``payload_offset`` from there, for
    ``payload_length`` bytes.  Falls back to scanning for a compression magic (what
    ``scripts/extract-vmlinux`` does) when the header is not there.
    """
    if len(image) > 0x250 and image[0x202:0x206] == b"HdrS":
        (version,) = struct.unpack_from("<H", image, 0x206)
        if version >= 0x208:
            setup_sects = image[0x1F1] or 4
            payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
            start = (setup_sects + 1) * 512 + payload_offset
            return image[start:start + payload_length]
    for _, magic in _MAGICS:
        at = image.find(magic)
        if at >= 0:
            return image[at:]
    raise ExtractError("no bzImage header and no known compression magic in the vmlinuz")


def decompress_payload(payload: bytes) -> tuple[str, bytes]:
    """Decompress a kernel payload; return (format name, data)."""
    kind = next((k for k, magic in _MAGICS if payload.startswith(magic)), None)
    if kind == "xz":
        return kind, lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if kind == "lzma":
        return kind, lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if kind == "gzip":
        # wbits=31: a gzip member; the kernel's trailing size word is left as unused data.
        return kind, zlib.decompressobj(wbits=31).decompress(payload)
    if kind == "bzip2":
        import bz2

        return kind, bz2.BZ2Decompressor().decompress(payload)
    if kind == "zstd":
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ExtractError("this vmlinuz is zstd-compressed: pip install zstandard") \
                from exc
        return kind, zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    if kind == "lz4":
        raise ExtractError("this vmlinuz is lz4-compressed (legacy frame); decompress it with "
                           "Debian's lz4 package (`lz4 -dc`) and pass --vmlinux-dir")
    raise ExtractError(f"unknown kernel compression (payload starts {payload[:8].hex()})")


def extract_vmlinux(vmlinuz: Path, dest: Path) -> str:
    """Write the ELF vmlinux inside ``vmlinuz`` to ``dest``; return the compression name."""
    kind_file = dest.with_suffix(".compression")
    if dest.exists() and kind_file.exists():
        return kind_file.read_text().strip()
    kind, data = decompress_payload(bzimage_payload(vmlinuz.read_bytes()))
    if not data.startswith(b"\x7fELF"):
        raise ExtractError(f"{vmlinuz.name}: the decompressed payload is not an ELF file")
    dest.write_bytes(data)
    kind_file.write_text(kind + "\n")
    return kind


# --------------------------------------------------------------------------------------
# A small ELF reader (32- and 64-bit little-endian)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """A PT_LOAD program header."""

    vaddr: int
    offset: int
    filesz: int


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    """A section header with its name resolved."""

    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


@dataclasses.dataclass(frozen=True, slots=True)
class Symbol:
    """An ELF symbol (only the fields we use)."""

    name: str
    value: int
    size: int
    type: int  # STT_*


STT_FUNC = 2
SHT_SYMTAB = 2
SHT_NOBITS = 8
PT_LOAD = 1


class Elf:
    """Read-only view of an ELF file: segments, sections, symbols, bytes at an address."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - kept open for the mmap's lifetime
        self.data = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        if self.data[:4] != b"\x7fELF" or self.data[5] != 1:
            raise ExtractError(f"{path}: not a little-endian ELF file")
        self.bits = {1: 32, 2: 64}[self.data[4]]
        if self.bits == 64:
            (_, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
             shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", self.data, 16)
        else:
            (_, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
             shstrndx) = struct.unpack_from("<HHIIIIIHHHHHH", self.data, 16)
        self.segments = [s for s in (self._segment(phoff + i * phentsize) for i in range(phnum))
                         if s is not None]
        raw = [self._section_header(shoff + i * shentsize) for i in range(shnum)]
        names = raw[shstrndx] if shnum else None
        self.sections = [
            Section(self._cstr(names[3] + h[0]) if names else "", *h[1:]) for h in raw
        ]

    def close(self) -> None:
        """Release the mapping and the file."""
        self.data.close()
        self._file.close()

    def _segment(self, at: int) -> Segment | None:
        if self.bits == 64:
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ",
                                                                            self.data, at)
        else:
            p_type, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIIII", self.data, at)
        return Segment(p_vaddr, p_offset, p_filesz) if p_type == PT_LOAD else None

    def _section_header(self, at: int) -> tuple[int, int, int, int, int, int, int]:
        if self.bits == 64:
            name, typ, _, addr, off, size, link, _, _, entsize = struct.unpack_from(
                "<IIQQQQIIQQ", self.data, at)
        else:
            name, typ, _, addr, off, size, link, _, _, entsize = struct.unpack_from(
                "<IIIIIIIIII", self.data, at)
        return name, typ, addr, off, size, link, entsize

    def _cstr(self, at: int) -> str:
        end = self.data.find(b"\x00", at)
        return self.data[at:end].decode("ascii", "replace")

    def section(self, name: str) -> Section | None:
        """The first section called ``name``, if any."""
        return next((s for s in self.sections if s.name == name), None)

    def offset_of(self, vaddr: int, size: int = 1) -> int:
        """File offset of ``vaddr`` through the PT_LOAD segments; raise if not file-backed."""
        for seg in self.segments:
            if seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + seg.filesz:
                return seg.offset + (vaddr - seg.vaddr)
        raise ExtractError(f"{self.path.name}: address {vaddr:#x} (+{size}) is in no PT_LOAD "
                           "segment")

    def read(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes at virtual address ``vaddr``."""
        at = self.offset_of(vaddr, size)
        return bytes(self.data[at:at + size])

    def read_pointer(self, vaddr: int) -> int:
        """A pointer-sized little-endian value at ``vaddr``."""
        fmt = "<Q" if self.bits == 64 else "<I"
        (value,) = struct.unpack(fmt, self.read(vaddr, self.bits // 8))
        return int(value)

    def symbols(self) -> list[Symbol]:
        """Every named symbol of ``.symtab`` (empty when the file is stripped)."""
        symtab = next((s for s in self.sections if s.type == SHT_SYMTAB), None)
        if symtab is None:
            return []
        strtab = self.sections[symtab.link]
        out = []
        if self.bits == 64:
            fmt, entsize = "<IBBHQQ", 24
        else:
            fmt, entsize = "<IIIBBH", 16
        for at in range(symtab.offset, symtab.offset + symtab.size, entsize):
            if self.bits == 64:
                name, info, _, _, value, size = struct.unpack_from(fmt, self.data, at)
            else:
                name, value, size, info, _, _ = struct.unpack_from(fmt, self.data, at)
            if name:
                out.append(Symbol(self._cstr(strtab.offset + name), value, size, info & 0xF))
        return out


# --------------------------------------------------------------------------------------
# System.map
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class MapSymbol:
    """One line of System.map."""

    address: int
    kind: str
    name: str


class SymbolMap:
    """System.map, searchable by name and by address."""

    def __init__(self, path: Path) -> None:
        entries = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                entries.append(MapSymbol(int(parts[0], 16), parts[1], parts[2]))
        if len(entries) < 1000:
            raise ExtractError(f"{path} has {len(entries)} symbols: not a real System.map "
                               "(Debian's image package ships a stub; use the -dbg one)")
        entries.sort(key=lambda e: e.address)
        self.entries = entries
        self._addresses = [e.address for e in entries]
        self.by_name: dict[str, list[MapSymbol]] = {}
        for e in entries:
            self.by_name.setdefault(e.name, []).append(e)

    def unique(self, name: str) -> MapSymbol | None:
        """The one symbol called ``name``; None if absent or ambiguous (several locals)."""
        found = self.by_name.get(name, [])
        return found[0] if len(found) == 1 else None

    def address(self, name: str) -> int:
        """Address of a symbol that must exist once."""
        sym = self.unique(name)
        if sym is None:
            raise ExtractError(f"System.map has no unique symbol {name}")
        return sym.address

    def next_address(self, address: int) -> int | None:
        """The first symbol address strictly above ``address``."""
        i = bisect.bisect_right(self._addresses, address)
        return self._addresses[i] if i < len(self._addresses) else None

    def describe(self, address: int) -> str:
        """``name`` or ``name+0xoff`` of the closest text/data symbol at or below."""
        i = bisect.bisect_right(self._addresses, address) - 1
        if i < 0:
            return f"{address:#x}"
        # Prefer a real name over section markers at the same address.
        best = self.entries[i]
        j = i
        while j >= 0 and self.entries[j].address == best.address:
            if self.entries[j].kind.lower() in "tdbrw":
                best = self.entries[j]
                break
            j -= 1
        off = address - best.address
        return best.name if off == 0 else f"{best.name}+{off:#x}"


# --------------------------------------------------------------------------------------
# Kernel special sites: __mcount_loc, .altinstructions, .parainstructions, x86_nops
# --------------------------------------------------------------------------------------

# Feature numbers (word * 32 + bit) of arch/x86/include/asm/cpufeatures.h in Linux 6.1, for the
# features whose alternatives appear in page-table code.  An alternative on a feature not in
# this table stops the script (a runtime variant cannot be built without deciding it).
X86_FEATURES: dict[int, str] = {
    0 * 32 + 8: "X86_FEATURE_CX8",
    0 * 32 + 15: "X86_FEATURE_CMOV",
    0 * 32 + 25: "X86_FEATURE_XMM",
    0 * 32 + 26: "X86_FEATURE_XMM2",
    3 * 32 + 21: "X86_FEATURE_ALWAYS",
    7 * 32 + 11: "X86_FEATURE_PTI",
    7 * 32 + 12: "X86_FEATURE_RETPOLINE",
    7 * 32 + 13: "X86_FEATURE_RETPOLINE_LFENCE",
    8 * 32 + 16: "X86_FEATURE_XENPV",
    9 * 32 + 20: "X86_FEATURE_SMAP",
    11 * 32 + 14: "X86_FEATURE_RETHUNK",
    16 * 32 + 16: "X86_FEATURE_LA57",
}

# The CPU the runtime variants assume: bare metal (or HVM, not Xen PV), no Meltdown (so no
# PTI), eIBRS-class (no retpolines, no return thunk), every baseline feature of a 686.
# LA57 is added for the 5-level variant only.
BASE_FEATURES = frozenset({"X86_FEATURE_ALWAYS", "X86_FEATURE_CX8", "X86_FEATURE_CMOV",
                           "X86_FEATURE_XMM", "X86_FEATURE_XMM2"})
LA57 = "X86_FEATURE_LA57"

_RETURN_THUNKS = frozenset({"__x86_return_thunk", "retbleed_return_thunk",
                            "srso_return_thunk", "srso_alias_return_thunk"})
_THUNK_PREFIX = "__x86_indirect_thunk_"
_GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_GPR32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")


@dataclasses.dataclass(frozen=True, slots=True)
class Alternative:
    """One ``.altinstructions`` entry."""

    orig: int
    repl: int
    feature: int
    negated: bool  # ALTINSTR_FLAG_INV: patch when the feature is absent
    instrlen: int
    repllen: int

    @property
    def feature_name(self) -> str:
        """The X86_FEATURE_* name, or ``word*32+bit`` when unknown."""
        return X86_FEATURES.get(self.feature, f"{self.feature // 32}*32+{self.feature % 32}")


@dataclasses.dataclass(frozen=True, slots=True)
class ParavirtSite:
    """One ``.parainstructions`` entry: an indirect call through a pv_ops slot."""

    instr: int
    slot: int
    length: int
    target: int  # the slot's initial (native) value in the image


class KernelImage:
    """The booted vmlinux plus its System.map: bytes, symbols and boot-time patch tables."""

    def __init__(self, vmlinux: Elf, symbols: SymbolMap) -> None:
        self.elf = vmlinux
        self.map = symbols
        self.pointer_size = vmlinux.bits // 8
        self.code_bits = vmlinux.bits
        self._mask = (1 << vmlinux.bits) - 1
        self.text_start = symbols.address("_text")
        self.mcount_sites = self._mcount_sites()
        self.nops = {n: self._x86_nop(n) for n in range(1, 9)}
        self.alternatives = self._alternatives()
        self.paravirt = self._paravirt_sites()

    # -- tables ------------------------------------------------------------------------

    def _table(self, start: str, stop: str) -> tuple[int, bytes]:
        begin, end = self.map.address(start), self.map.address(stop)
        return begin, self.elf.read(begin, end - begin)

    def _mcount_sites(self) -> frozenset[int]:
        """Addresses of every ftrace ``__fentry__`` call site (``__mcount_loc``)."""
        _, raw = self._table("__start_mcount_loc", "__stop_mcount_loc")
        fmt = "<Q" if self.pointer_size == 8 else "<I"
        return frozenset(v for (v,) in struct.iter_unpack(fmt, raw))

    def _x86_nop(self, length: int) -> bytes:
        """The kernel's own ``x86_nops[length]`` (ftrace and the patchers pad with these)."""
        table = self.map.address("x86_nops")
        pointer = self.elf.read_pointer(table + length * self.pointer_size)
        return self.elf.read(pointer, length)

    def nop_fill(self, length: int) -> bytes:
        """``length`` bytes of the kernel's NOPs, longest first (like ``add_nops``)."""
        out = b""
        while length > 0:
            step = min(length, 8)
            out += self.nops[step]
            length -= step
        return out

    def _mapped(self, vaddr: int, size: int) -> bool:
        try:
            self.elf.offset_of(vaddr, max(size, 1))
        except ExtractError:
            return False
        return True

    def _alternatives(self) -> list[Alternative]:
        """Decode ``.altinstructions``.

        Linux 6.1 (Debian 12) packs ``struct alt_instr`` in 12 bytes: s32 instr_offset, s32
        repl_offset (each relative to its own field), u16 cpuid (bit 15 = ALTINSTR_FLAG_INV,
        "patch when the feature is absent"), u8 instrlen, u8 replacementlen.  Later kernels
        widen cpuid to a u32 ``ft_flags`` (14 bytes, flags in the high half).  The layout is
        the one that decodes every entry to addresses inside the image.
        """
        base, raw = self._table("__alt_instructions", "__alt_instructions_end")
        for entsize in (12, 14):
            if len(raw) % entsize:
                continue
            entries = []
            for i in range(0, len(raw), entsize):
                if entsize == 12:
                    instr_off, repl_off, cpuid, ilen, rlen = struct.unpack_from("<iiHBB", raw, i)
                    feature, negated = cpuid & 0x7FFF, bool(cpuid & 0x8000)
                else:
                    instr_off, repl_off, ft, ilen, rlen = struct.unpack_from("<iiIBB", raw, i)
                    feature, negated = ft & 0xFFFF, bool((ft >> 16) & 1)
                entries.append(Alternative((base + i + instr_off) & self._mask,
                                           (base + i + 4 + repl_off) & self._mask,
                                           feature, negated, ilen, rlen))
            if all(self._mapped(a.orig, a.instrlen) and self._mapped(a.repl, a.repllen)
                   and a.repllen <= a.instrlen for a in entries):
                return entries
        raise ExtractError(f".altinstructions ({len(raw)} bytes) decodes as neither the 12- nor "
                           "the 14-byte struct alt_instr")

    def _paravirt_sites(self) -> list[ParavirtSite]:
        """Decode ``.parainstructions`` (``struct paravirt_patch_site``: pointer instr,
        u8 type = pv_ops slot index, u8 len; padded to two pointers)."""
        if self.map.unique("__parainstructions") is None:
            return []
        _, raw = self._table("__parainstructions", "__parainstructions_end")
        entsize = 2 * self.pointer_size
        fmt = "<QBB" if self.pointer_size == 8 else "<IBB"
        pv_ops = self.map.address("pv_ops")
        sites = []
        for i in range(0, len(raw) - entsize + 1, entsize):
            instr, slot, length = struct.unpack_from(fmt, raw, i)
            target = self.elf.read_pointer(pv_ops + slot * self.pointer_size)
            sites.append(ParavirtSite(instr, slot, length, target))
        return sites

    def describe(self, address: int) -> str:
        """A symbolic name for ``address``; code in ``.altinstr_aux`` (the out-of-line
        ``static_cpu_has`` tests that unpatched alternatives jump to) is named as such."""
        for section in self.elf.sections:
            if section.name in (".altinstr_aux", ".altinstr_replacement") and \
                    section.addr <= address < section.addr + section.size:
                return f"{section.name}+{address - section.addr:#x}"
        return self.map.describe(address)

    def alternatives_in(self, start: int, end: int) -> list[Alternative]:
        """Alternatives whose original instruction lies in [start, end), in table order."""
        return [a for a in self.alternatives if start <= a.orig < end]

    def paravirt_in(self, start: int, end: int) -> list[ParavirtSite]:
        """Paravirt call sites in [start, end)."""
        return [p for p in self.paravirt if start <= p.instr < end]

    # -- boot-time patching ------------------------------------------------------------

    def runtime_code(self, start: int, code: bytes, features: frozenset[str],
                     md: Any) -> bytes:
        """The function as it runs after boot on a CPU with ``features``.

        Replays, in the kernel's order (``alternative_instructions`` then ``ftrace_init``):
        paravirt call sites become direct calls of the native pv_ops target
        (``paravirt_patch``); calls/jumps to ``__x86_indirect_thunk_<reg>`` become
        ``call/jmp *%reg`` (``patch_retpoline``, no X86_FEATURE_RETPOLINE); jumps to the
        return thunk become ``ret; int3...`` (``patch_return``, no X86_FEATURE_RETHUNK);
        alternatives are applied in table order with the relative jump/call of a replacement
        re-targeted (``apply_alternatives``/``recompute_jump``); ``call __fentry__`` becomes
        ``x86_nops[5]`` (``ftrace_make_nop``).  Padding uses the image's own ``x86_nops``;
        the kernel may split long NOP runs differently, which changes no behaviour.
        """
        buf = bytearray(code)
        end = start + len(code)

        def put(at: int, data: bytes) -> None:
            buf[at - start:at - start + len(data)] = data

        for site in self.paravirt_in(start, end):
            if self.map.describe(site.target) == "_paravirt_nop":
                put(site.instr, self.nop_fill(site.length))
            else:
                put(site.instr, _rel32(0xE8, site.instr, site.target, self._mask)
                    + self.nop_fill(site.length - 5))
        for insn in md.disasm(bytes(buf), start):
            target = _branch_target(insn, self._mask)
            if target is None or insn.mnemonic not in ("call", "jmp"):
                continue
            name = self.map.describe(target)
            if name.startswith(_THUNK_PREFIX):
                put(insn.address, _indirect_branch(insn.mnemonic, name[len(_THUNK_PREFIX):])
                    .ljust(insn.size, b"\x90"))
            elif insn.mnemonic == "jmp" and name in _RETURN_THUNKS:
                put(insn.address, b"\xc3".ljust(insn.size, b"\xcc"))
        for alt in self.alternatives_in(start, end):
            if alt.feature not in X86_FEATURES:
                raise ExtractError(f"alternative at {alt.orig:#x} depends on unknown feature "
                                   f"{alt.feature_name}; add it to X86_FEATURES")
            present = alt.feature_name in features
            if present == alt.negated:
                continue
            put(alt.orig, self._replacement(alt, md))
        for at in self.mcount_sites:
            if start <= at < end and buf[at - start] == 0xE8:
                put(at, self.nops[5])
        return bytes(buf)

    def _replacement(self, alt: Alternative, md: Any) -> bytes:
        """What ``apply_alternatives`` writes at ``alt.orig`` (Linux 6.1 rules)."""
        repl = self.elf.read(alt.repl, alt.repllen)
        insns = list(md.disasm(repl, alt.repl))
        if sum(i.size for i in insns) != len(repl):
            raise ExtractError(f"replacement at {alt.repl:#x} does not decode")
        for n, insn in enumerate(insns):
            relative = _branch_target(insn, self._mask) is not None or _rip_relative(insn)
            if relative and not (n == 0 and len(repl) == 5 and repl[0] in (0xE8, 0xE9)):
                raise ExtractError(f"replacement at {alt.repl:#x} has a relative operand the "
                                   "6.1 patcher would not fix up: not supported")
        out = repl
        if len(repl) == 5 and repl[0] == 0xE8:
            target = _branch_target(insns[0], self._mask)
            assert target is not None
            out = _rel32(0xE8, alt.orig, target, self._mask)
        elif len(repl) == 5 and repl[0] == 0xE9:
            target = _branch_target(insns[0], self._mask)
            assert target is not None
            displacement = target - alt.orig
            if 0 <= displacement and displacement - 2 <= 127:  # recompute_jump's test
                out = bytes([0xEB, displacement - 2])
            else:
                out = _rel32(0xE9, alt.orig, target, self._mask)
        return out + self.nop_fill(alt.instrlen - len(out))


def _rel32(opcode: int, at: int, target: int, mask: int) -> bytes:
    """A 5-byte call/jmp rel32 at ``at`` to ``target``."""
    displacement = ((target - (at + 5)) & mask)
    if displacement >= 1 << 63 or (mask == 0xFFFFFFFF and displacement >= 1 << 31):
        displacement -= mask + 1
    return bytes([opcode]) + struct.pack("<i", displacement)


def _indirect_branch(mnemonic: str, register: str) -> bytes:
    """``call *%reg`` / ``jmp *%reg`` (FF /2, FF /4)."""
    regs = _GPR64 if register in _GPR64 else _GPR32
    number = regs.index(register)
    modrm = (0xD0 if mnemonic == "call" else 0xE0) | (number & 7)
    return (b"\x41" if number >= 8 else b"") + bytes([0xFF, modrm])


def _branch_target(insn: Any, mask: int) -> int | None:
    """The target of a direct (immediate) call/jump, else None."""
    import capstone
    from capstone import x86_const as x86

    groups = set(insn.groups)
    if (capstone.CS_GRP_CALL in groups or capstone.CS_GRP_JUMP in groups) and \
            len(insn.operands) == 1 and insn.operands[0].type == x86.X86_OP_IMM:
        return int(insn.operands[0].imm) & mask
    return None


def _rip_relative(insn: Any) -> bool:
    from capstone import x86_const as x86

    return any(op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP
               for op in insn.operands)


# --------------------------------------------------------------------------------------
# Disassembly and per-function analysis
# --------------------------------------------------------------------------------------


def _capstone(code_bits: int) -> Any:
    try:
        import capstone
    except ImportError as exc:
        raise ExtractError("capstone is not installed: pip install 'capstone>=5,<6'") from exc
    md = capstone.Cs(capstone.CS_ARCH_X86,
                     capstone.CS_MODE_64 if code_bits == 64 else capstone.CS_MODE_32)
    md.detail = True
    return md


@dataclasses.dataclass(slots=True)
class Listing:
    """What the disassembly of one byte string says.

    Offsets in ``calls``, ``external_jumps``, ``entry_stores`` and ``returns`` are those of
    instructions reachable from the entry (following fall-through and direct jumps inside the
    function; a call is assumed to return), so code patched into dead ends at boot drops out.
    """

    lines: list[str]
    decoded_all: bool
    fentry_calls: list[int]  # offsets of `call __fentry__`
    return_thunk_jumps: list[int]
    returns: list[int]
    calls: list[dict[str, Any]]  # direct and indirect calls (not __fentry__)
    external_jumps: list[dict[str, Any]]  # jumps leaving the function (tail calls, .cold)
    entry_stores: list[int]  # stores that may hit a page-table entry (see _entry_store)
    data_refs: list[dict[str, Any]]  # kernel globals read or written (absolute / RIP-relative)
    segment_refs: list[int]  # %fs/%gs-relative accesses (per-CPU data, stack canary)
    ends_cleanly: bool
    bad_targets: list[int] = dataclasses.field(default_factory=list)  # mid-instruction jumps


_STOPS = frozenset({"ret", "jmp", "ud2", "int3", "hlt"})


def _reachable(insns: Sequence[Any], address: int, end: int, mask: int) -> set[int]:
    """Addresses of the instructions reachable from ``address`` (recursive descent)."""
    by_address = {i.address: i for i in insns}
    seen: set[int] = set()
    todo = [address]
    while todo:
        at = todo.pop()
        while at in by_address and at not in seen:
            seen.add(at)
            insn = by_address[at]
            target = _branch_target(insn, mask)
            if target is not None and address <= target < end and insn.mnemonic != "call":
                todo.append(target)
            if _base_mnemonic(insn) in _STOPS:
                break
            at += insn.size
    return seen


def disassemble(code: bytes, address: int, image: KernelImage, md: Any,
                frame_pointer: bool, reachability: bool = True) -> Listing:
    """Disassemble ``code`` at ``address`` and classify its instructions.

    ``reachability=False`` treats every instruction as live: right for the unpatched image,
    whose alternative sites still jump to ``.altinstr_aux`` outside the function.
    """
    import capstone
    from capstone import x86_const as x86

    mask = (1 << image.code_bits) - 1
    out = Listing([], False, [], [], [], [], [], [], [], [], False)
    end = address + len(code)
    insns = list(md.disasm(code, address))
    reachable = (_reachable(insns, address, end, mask) if reachability
                 else {i.address for i in insns})
    starts = {i.address for i in insns}
    out.bad_targets = sorted(
        t - address for i in insns if i.address in reachable
        for t in [_branch_target(i, mask)] if t is not None and address <= t < end
        and t not in starts)
    last = ""
    for insn in insns:
        off = insn.address - address
        live = insn.address in reachable
        target = _branch_target(insn, mask)
        outside = target is not None and not address <= target < end
        groups = set(insn.groups)
        comment = ""
        if outside:
            assert target is not None
            comment = image.describe(target)
        else:
            mem = next((op.mem for op in insn.operands if op.type == x86.X86_OP_MEM), None)
            if mem is not None and mem.base == x86.X86_REG_RIP:
                comment = image.map.describe((insn.address + insn.size + mem.disp) & mask)
            elif mem is not None and mem.base == 0 and mem.index == 0 and \
                    insn.mnemonic in ("call", "jmp"):
                comment = image.map.describe(mem.disp & mask)
        is_call = capstone.CS_GRP_CALL in groups
        mnemonic = _base_mnemonic(insn)
        if is_call and insn.address in image.mcount_sites:
            out.fentry_calls.append(off)
            comment = "__fentry__: ftrace writes x86_nops[5] here at boot"
        elif is_call and live:
            out.calls.append({"offset": off, "target": comment or insn.op_str})
        if mnemonic == "jmp" and outside and comment in _RETURN_THUNKS:
            out.return_thunk_jumps.append(off)
            comment += " (return thunk: acts as ret)"
        elif capstone.CS_GRP_JUMP in groups and outside and live:
            out.external_jumps.append({"offset": off, "target": comment})
        if mnemonic == "ret" and live:
            out.returns.append(off)
        if live and _entry_store(insn, frame_pointer):
            out.entry_stores.append(off)
        if live and not is_call and capstone.CS_GRP_JUMP not in groups:
            _data_refs(insn, off, image, mask, out)
        if not live:
            comment = f"(unreachable) {comment}".strip()
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        out.lines.append(f"+{off:#05x}: {insn.bytes.hex(' ')}  {text}"
                         + (f"  ; {comment}" if comment else ""))
        last = "tailjmp" if mnemonic == "jmp" and outside else mnemonic
    out.decoded_all = sum(i.size for i in insns) == len(code)
    if last == "call" and insns and image.map.describe(
            _branch_target(insns[-1], mask) or 0) in _NORETURN:
        last = "ud2"
    out.ends_cleanly = out.decoded_all and last in ("ret", "tailjmp", "jmp", "ud2", "int3")
    return out


_NORETURN = frozenset({"__stack_chk_fail", "BUG_func", "__ubsan_handle_builtin_unreachable"})


def _data_refs(insn: Any, off: int, image: KernelImage, mask: int, out: Listing) -> None:
    """Record the kernel globals an instruction touches (a capture must map them)."""
    from capstone import x86_const as x86

    for op in insn.operands:
        if op.type != x86.X86_OP_MEM:
            continue
        mem = op.mem
        if mem.segment in (x86.X86_REG_FS, x86.X86_REG_GS):
            out.segment_refs.append(off)
            continue
        if mem.base == x86.X86_REG_RIP:
            address = (insn.address + insn.size + mem.disp) & mask
        elif mem.base == 0 and (mem.disp & mask) >= image.text_start:
            address = mem.disp & mask
        else:
            continue
        ref: dict[str, Any] = {"offset": off, "address": f"{address:#x}",
                               "symbol": image.map.describe(address), "size": op.size}
        if mem.index == 0 and op.size in (1, 2, 4, 8):
            try:
                value = int.from_bytes(image.elf.read(address, op.size), "little")
                ref["image_value"] = f"{value:#x}"
            except ExtractError:
                ref["image_value"] = None  # .bss: zero-filled, set at run time
        else:
            ref["indexed"] = True
        out.data_refs.append(ref)


def _base_mnemonic(insn: Any) -> str:
    """The mnemonic without prefixes (Capstone writes ``lock cmpxchg8b``, ``rep stosb``)."""
    return str(insn.mnemonic).split()[-1]


# Capstone 5 marks the memory operand of these as read-only; they write it (SDM).
_RMW_MISSED = frozenset({"cmpxchg", "cmpxchg8b", "cmpxchg16b"})


def _entry_store(insn: Any, frame_pointer: bool) -> bool:
    """True for a store that may target a page-table entry.

    Excluded: stack pushes and calls; stores based on the stack pointer (and on ebp/rbp in a
    frame-pointer build, where it only addresses the frame); RIP-relative and absolute stores
    (globals); %fs/%gs-relative stores (per-CPU data).
    """
    from capstone import CS_AC_WRITE
    from capstone import x86_const as x86

    mnemonic = _base_mnemonic(insn)
    if mnemonic.startswith(("push", "call")):
        return False
    frame = {x86.X86_REG_RSP, x86.X86_REG_ESP}
    if frame_pointer:
        frame |= {x86.X86_REG_RBP, x86.X86_REG_EBP}
    for n, op in enumerate(insn.operands):
        writes = bool(op.access & CS_AC_WRITE) or (n == 0 and mnemonic in _RMW_MISSED)
        if op.type != x86.X86_OP_MEM or not writes:
            continue
        mem = op.mem
        if mem.segment in (x86.X86_REG_FS, x86.X86_REG_GS):
            continue
        if mem.base in frame or mem.base == x86.X86_REG_RIP:
            continue
        if mem.base == 0 and mem.index == 0:
            continue
        return True
    return False


def padding_is_nops(data: bytes, address: int, md: Any) -> bool:
    """True when ``data`` (the bytes up to the next symbol) is only alignment padding."""
    decoded = 0
    for insn in md.disasm(data, address):
        decoded += insn.size
        text = f"{insn.mnemonic} {insn.op_str}"
        if insn.mnemonic in ("nop", "int3", "xchg ax, ax"):
            continue
        # GAS 32-bit padding: lea esi, [esi + eiz*1 + 0] / mov esi, esi / lea edi, [edi] ...
        match = re.fullmatch(r"(lea|mov) (\w+), (?:\w+ ptr )?(?:\w+:)?\[?(\w+)(?: \+ eiz)?\]?",
                             text)
        if match and match.group(2) == match.group(3):
            continue
        return False
    return decoded == len(data)


# --------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FlavourFiles:
    """The files extracted for one flavour."""

    vmlinuz: Path
    config: Path
    system_map: Path
    debug_vmlinux: Path
    vmlinux: Path


def fetch(packages: KernelPackages, work: Path) -> FlavourFiles:
    """Download, extract and decompress everything one flavour needs."""
    image_deb, dbg_deb = download(packages, work / "debs")
    out = work / packages.release
    files = FlavourFiles(
        vmlinuz=out / f"vmlinuz-{packages.release}",
        config=out / f"config-{packages.release}",
        system_map=out / f"System.map-{packages.release}",
        debug_vmlinux=out / f"vmlinux-{packages.release}.debug",
        vmlinux=out / f"vmlinux-{packages.release}",
    )
    extract_members(image_deb, {f"boot/vmlinuz-{packages.release}": files.vmlinuz,
                                f"boot/config-{packages.release}": files.config})
    if not (files.system_map.exists() and files.debug_vmlinux.exists()):
        print(f"extracting System.map and debug vmlinux of {packages.release} ...",
              file=sys.stderr)
    extract_members(dbg_deb, {
        f"usr/lib/debug/boot/System.map-{packages.release}": files.system_map,
        f"usr/lib/debug/boot/vmlinux-{packages.release}": files.debug_vmlinux,
    })
    kind = extract_vmlinux(files.vmlinuz, files.vmlinux)
    print(f"{files.vmlinuz.name}: {kind}-compressed -> {files.vmlinux}", file=sys.stderr)
    return files


def config_options(config: Path) -> dict[str, str]:
    """``CONFIG_X=value`` lines of a kernel config."""
    out = {}
    for line in config.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


CONFIG_KEYS = ("CONFIG_PGTABLE_LEVELS", "CONFIG_X86_5LEVEL", "CONFIG_X86_PAE",
               "CONFIG_PARAVIRT", "CONFIG_PARAVIRT_XXL", "CONFIG_PAGE_TABLE_ISOLATION",
               "CONFIG_RETPOLINE", "CONFIG_RETHUNK", "CONFIG_SLS", "CONFIG_DYNAMIC_FTRACE",
               "CONFIG_FRAME_POINTER", "CONFIG_X86_KERNEL_IBT", "CONFIG_KERNEL_XZ")


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """A CPU the runtime bytes are built for, and the paging modes it stands for."""

    name: str
    features: frozenset[str]
    paging_modes: tuple[str, ...]


def profiles_for(flavour: Flavour, alternatives: Sequence[Alternative]) -> list[Profile]:
    """One profile, or two on amd64 when the code depends on LA57 (4- vs 5-level paging)."""
    if flavour.paging != "4level":
        return [Profile(flavour.paging, BASE_FEATURES, (flavour.paging,))]
    if any(a.feature_name == LA57 for a in alternatives):
        return [Profile("4level", BASE_FEATURES, ("4level",)),
                Profile("5level", BASE_FEATURES | {LA57}, ("5level",))]
    return [Profile("4level+5level", BASE_FEATURES, ("4level", "5level"))]


def describe_flavour(packages: KernelPackages, files: FlavourFiles, max_size: int,
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Analyse every candidate in one flavour; return (records, summary)."""
    flavour = packages.flavour
    symbols = SymbolMap(files.system_map)
    booted = Elf(files.vmlinux)
    debug = Elf(files.debug_vmlinux)
    try:
        if booted.bits != flavour.code_bits:
            raise ExtractError(f"{files.vmlinux.name} is ELF{booted.bits}, expected "
                               f"ELF{flavour.code_bits}")
        elf_functions: dict[tuple[str, int], int] = {
            (s.name, s.value): s.size for s in debug.symbols() if s.type == STT_FUNC}
        image = KernelImage(booted, symbols)
        md = _capstone(flavour.code_bits)
        config = config_options(files.config)
        frame_pointer = config.get("CONFIG_FRAME_POINTER") == "y" and flavour.code_bits == 32
        summary: dict[str, Any] = {
            "flavour": flavour.name, "package": packages.image, "dbg_package": packages.dbg,
            "version": packages.version, "release": packages.release,
            "config": {k: config.get(k, "n") for k in CONFIG_KEYS},
            "nop5": image.nops[5].hex(), "functions": {}, "absent": [], "skipped": {}}
        records: list[dict[str, Any]] = []
        for cand in CANDIDATES:
            if cand.flavours and flavour.name not in cand.flavours:
                continue
            record, why = describe_function(cand, packages, image, debug, elf_functions, md,
                                            frame_pointer, max_size)
            if record is not None:
                records.append(record)
                summary["functions"][cand.name] = record["size"]
            elif why == "absent":
                summary["absent"].append(cand.name)
            else:
                summary["skipped"][cand.name] = why
        return records, summary
    finally:
        booted.close()
        debug.close()


def describe_function(cand: Candidate, packages: KernelPackages, image: KernelImage,
                      debug: Elf, elf_functions: dict[tuple[str, int], int], md: Any,
                      frame_pointer: bool, max_size: int) -> tuple[dict[str, Any] | None, str]:
    """The JSON record of one candidate, or (None, why it is left out)."""
    flavour = packages.flavour
    map_syms = image.map.by_name.get(cand.name, [])
    if not map_syms:
        return None, "absent"
    if len(map_syms) > 1:
        return None, f"{len(map_syms)} local symbols share the name"
    address = map_syms[0].address
    next_address = image.map.next_address(address)
    gap = next_address - address if next_address is not None else None
    size = elf_functions.get((cand.name, address)) or gap
    if not size:
        return None, "size unknown"
    if size > max_size:
        return None, f"{size} bytes > --max-size {max_size}"
    code = image.elf.read(address, size)
    if debug.read(address, size) != code:
        raise ExtractError(f"{cand.name}: bytes differ between the vmlinuz and the -dbg "
                           "vmlinux of the same package version")
    listing = disassemble(code, address, image, md, frame_pointer, reachability=False)
    alternatives = image.alternatives_in(address, address + size)
    paravirt = image.paravirt_in(address, address + size)
    variants: list[dict[str, Any]] = []
    for profile in profiles_for(flavour, alternatives):
        runtime = image.runtime_code(address, code, profile.features, md)
        run_listing = disassemble(runtime, address, image, md, frame_pointer)
        variants.append({
            "profile": profile.name,
            "paging_modes": list(profile.paging_modes),
            "cpu_features": sorted(profile.features),
            "bytes": runtime.hex(),
            "disassembly": run_listing.lines,
            "entry_store_offsets": run_listing.entry_stores,
            "ret_offsets": run_listing.returns,
            "calls": run_listing.calls,
            "external_jumps": run_listing.external_jumps,
            "data_refs": run_listing.data_refs,
            "segment_ref_offsets": run_listing.segment_refs,
            "bad_branch_targets": run_listing.bad_targets,
        })
    if not any(v["entry_store_offsets"] for v in variants):
        calls = sorted({c["target"] for v in variants for c in v["calls"] + v["external_jumps"]})
        if calls:
            return None, "no page-table store of its own; calls " + ", ".join(calls)
        return None, "no page-table store"
    padding = image.elf.read(address + size, gap - size) if gap and gap > size else b""
    notes = function_notes(cand, listing, variants, image, padding, md, address + size)
    record = {
        "package": packages.image,
        "dbg_package": packages.dbg,
        "version": packages.version,
        "arch": flavour.arch,
        "flavour": flavour.name,
        "kernel_release": packages.release,
        "paging": flavour.paging,
        "code_bits": flavour.code_bits,
        "function": cand.name,
        "prototype": cand.prototype,
        "effect": cand.what,
        "address": f"{address:#x}",
        "size": size,
        "size_source": ("ELF symbol table of the -dbg vmlinux"
                        if (cand.name, address) in elf_functions else "next System.map symbol"),
        "bytes": code.hex(),
        "disassembly": listing.lines,
        "calling_convention": cand.convention or calling_convention(flavour),
        "args": list(cand.registers) if cand.registers else argument_locations(cand, flavour),
        "arg_names": [p.name for p in cand.params],
        "fentry_call_offsets": listing.fentry_calls,
        "nop5": image.nops[5].hex(),
        "return_thunk_jump_offsets": listing.return_thunk_jumps,
        "alternatives": [{
            "offset": a.orig - address, "length": a.instrlen, "feature": a.feature_name,
            "patch_when": "feature absent" if a.negated else "feature present",
            "original": image.elf.read(a.orig, a.instrlen).hex(),
            "replacement": image.elf.read(a.repl, a.repllen).hex(),
            "replacement_address": f"{a.repl:#x}"} for a in alternatives],
        "paravirt_calls": [{
            "offset": p.instr - address, "length": p.length, "pv_ops_slot": p.slot,
            "native_target": image.map.describe(p.target)} for p in paravirt],
        "runtime": variants,
        "notes": notes,
    }
    return record, ""


def function_notes(cand: Candidate, listing: Listing, variants: Sequence[dict[str, Any]],
                   image: KernelImage, padding: bytes, md: Any, end: int) -> list[str]:
    """Human-readable remarks for one function."""
    notes = list(cand.notes)
    if listing.fentry_calls:
        notes.append(f"call __fentry__ at offset(s) {listing.fentry_calls}: replace the 5 "
                     f"bytes with x86_nops[5] = {image.nops[5].hex()} (ftrace does at boot; "
                     "done in 'runtime')")
    if listing.return_thunk_jumps:
        notes.append(f"jmp __x86_return_thunk at offset(s) {listing.return_thunk_jumps}: acts "
                     "as ret (patched to ret; int3 x4 at boot when no return thunk is needed; "
                     "done in 'runtime')")
    for variant in variants:
        extra = variant["calls"] + variant["external_jumps"]
        if extra:
            notes.append(f"runtime {variant['profile']}: leaves the function through "
                         + ", ".join(f"+{c['offset']:#x} {c['target']}" for c in extra)
                         + " (a capture must stub these)")
    for variant in variants:
        if variant["bad_branch_targets"]:
            notes.append(f"WARNING: runtime {variant['profile']} jumps into the middle of an "
                         f"instruction at {variant['bad_branch_targets']}")
    if not listing.ends_cleanly:
        notes.append("WARNING: the listing does not end in ret/jmp/ud2; check the boundary")
    if padding and not padding_is_nops(padding, end, md):
        notes.append(f"WARNING: non-padding bytes before the next symbol: {padding.hex()}")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog=SCRIPT_NAME,
        description="Extract the out-of-line page-table writer functions of Debian's kernels "
                    "(amd64, 686-pae, 686) into a small JSON file. Needs root for apt and "
                    "network access to Debian's archive; ~2.6 GB of downloads.",
        epilog="Downloads and extracted images stay under --work-dir; only function bytes go "
               "into --out.")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help=f"scratch directory for .deb files and images "
                             f"(default {DEFAULT_WORK_DIR}); must be outside the repository")
    parser.add_argument("--abi", help="kernel ABI to use, e.g. 6.1.0-50 (default: the newest "
                        "one every flavour has image and -dbg packages for)")
    parser.add_argument("--flavour", action="append", choices=[f.name for f in FLAVOURS],
                        help="flavour(s) to extract (repeatable; default all three)")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE,
                        help=f"skip functions larger than this many bytes "
                             f"(default {DEFAULT_MAX_SIZE})")
    parser.add_argument("--no-update", action="store_true",
                        help="do not run dpkg --add-architecture / apt-get update")
    args = parser.parse_args(argv)
    flavours = [f for f in FLAVOURS if not args.flavour or f.name in args.flavour]
    try:
        work = args.work_dir.resolve()
        if _inside_git_repo(work):
            raise ExtractError(f"--work-dir {work} is inside a git repository; kernel images "
                               "must not go into a repository")
        prepare_apt(args.no_update, any(f.arch == "i386" for f in flavours))
        resolved = choose_abi(flavours, args.abi)
        all_records: list[dict[str, Any]] = []
        summaries = []
        for packages in resolved:
            files = fetch(packages, work)
            records, summary = describe_flavour(packages, files, args.max_size)
            all_records.extend(records)
            summaries.append(summary)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(all_records, indent=1) + "\n")
    except ExtractError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for s in summaries:
        print(f"{s['flavour']}: {s['package']} + {s['dbg_package']} {s['version']}; "
              f"x86_nops[5] = {s['nop5']}")
        print("  config: " + " ".join(f"{k.removeprefix('CONFIG_')}={v}"
                                      for k, v in s["config"].items()))
        print("  written: " + ", ".join(f"{n} ({sz} B)" for n, sz in s["functions"].items()))
        for name, why in s["skipped"].items():
            print(f"  left out: {name}: {why}")
        print(f"  not out of line (inlined or absent): {', '.join(s['absent'])}")
    print(f"wrote {len(all_records)} functions to {args.out}")
    return 0


def _inside_git_repo(path: Path) -> bool:
    for parent in (path, *path.parents):
        if (parent / ".git").exists():
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
