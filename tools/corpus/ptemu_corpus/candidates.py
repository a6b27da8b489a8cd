"""The Linux functions the extraction looks for, and where their arguments are.

``CANDIDATES`` lists every function that may exist out of line in a Debian
kernel and stores to a page-table entry, with its Linux 6.1 prototype; the
calling-convention helpers say where each argument is at entry (x86-64 SysV,
or the i386 kernel's ``-mregparm=3``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .debian import Flavour

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
