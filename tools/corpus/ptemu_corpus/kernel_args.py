"""The arguments a kernel writer is called with, placed where its calling
convention puts them.

The parameters (names, C types, locations such as ``rdi``, ``ecx:edx`` or
``[esp+4]``) are read by `ptemu.kvm.kernel.record_parameters`, the same reader
``ptemu kvm run --program kernel`` uses; this module picks the values (an
entry pointer into the monitored page, entry values, the vma and mm, a linear
address) and lays them out in registers and stack words.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ptemu.kvm.kernel import Parameter, argument_slots, record_parameters

from .entries import LEVEL_SHIFT, KernelValues, direct

Json = dict[str, Any]


@dataclass(frozen=True)
class Param:
    """One parameter of a kernel function: name, C type without ``*`` and
    ``const``, whether it is a pointer, and where it is at entry."""

    name: str
    ctype: str
    pointer: bool
    location: str

    @property
    def level(self) -> str | None:
        """``pte``/``pmd``/``pud``/``p4d``/``pgd`` for page-table types."""
        match = re.fullmatch(r"(pte|pmd|pud|p4d|pgd)_t", self.ctype)
        return match.group(1) if match else None

    @classmethod
    def of(cls, parameter: Parameter) -> Param:
        """The corpus's view of a `ptemu.kvm.kernel.Parameter`."""
        ctype = " ".join(parameter.type.replace("*", " ").replace("const", " ").split())
        return cls(parameter.name, ctype, parameter.is_pointer, parameter.location)


def parse_params(record: Json) -> list[Param]:
    """The record's parameters, in C order."""
    return [Param.of(parameter) for parameter in record_parameters(record)]


@dataclass(frozen=True)
class CallTarget:
    """What one call works on: the monitored page and the structures it passes."""

    paging: str
    level: str
    """The Linux level the function writes (``pte``, ``pmd``...)."""
    table_gla: int
    entry_size: int
    vma_gla: int
    mm_gla: int
    vaddr_of: Callable[[int], int] | None = None
    """The linear address whose entry is `index` (set_pte_vaddr's fixmap), if any."""


def place_args(record: Json, params: list[Param], args: dict[str, int], index: int,
               target: CallTarget, v: KernelValues, rng: random.Random,
               ) -> tuple[dict[str, int], list[int]]:
    """Registers and stack words for one call on entry `index`; `args` holds
    the scenario's values (``entry``, ``dirty``)."""
    regs: dict[str, int] = {}
    stack: dict[int, int] = {}
    paging, level = target.paging, target.level
    shift = LEVEL_SHIFT[paging][level]
    wide = paging in ("4level", "5level")
    user_base = 0x7F00_0000_0000 if wide else 0x0800_0000
    pointer_done = False
    for param in params:
        if param.pointer and (param.level or param.ctype == "atomic64_t") and not pointer_done:
            value = target.table_gla + index * target.entry_size
            pointer_done = True
        elif param.pointer and param.level:
            # A page-table page (pud_populate's pmd): a direct-map (lowmem) address.
            value = direct(paging, rng.randrange(0x0100_0000, 0x3000_0000, 0x1000))
        elif param.level or param.ctype in ("s64", "u64", "pgprot_t"):
            value = args.get("entry", v.any(param.level or level))
        elif "vm_area_struct" in param.ctype:
            value = target.vma_gla
        elif "mm_struct" in param.ctype:
            value = target.mm_gla
        elif param.ctype == "int":
            value = args.get("dirty", 1)
        elif param.ctype == "phys_addr_t":
            value = v.frame(1 << shift)
        elif target.vaddr_of is not None:
            value = target.vaddr_of(index)
        else:
            value = (user_base + (index << shift)) & ((1 << (64 if wide else 32)) - 1)
        _store_arg(param, value, regs, stack)
    if record["function"].startswith("atomic64_"):
        # The caller's EDX:EAX is whatever it held: the first CMPXCHG8B usually fails.
        regs.setdefault("rax", rng.randrange(1 << 32))
        regs.setdefault("rdx", rng.randrange(1 << 32))
    words = [stack.get(offset, 0) for offset in range(4, 4 + 4 * len(stack), 4)]
    return regs, words


_REG64 = {"e" + name[1:]: name for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp")}
_STACK_SLOT = re.compile(r"\[esp\+(\d+)\]")


def _store_arg(param: Param, value: int, regs: dict[str, int], stack: dict[int, int]) -> None:
    """Put `value` where the calling convention says (``rdi``, ``ecx:edx``, ``[esp+4]``)."""
    kvm_param = Parameter(param.name, param.ctype, param.location)
    for location, part in argument_slots(kvm_param, value):
        slot = _STACK_SLOT.fullmatch(location)
        if slot:
            stack[int(slot.group(1))] = part & 0xFFFF_FFFF
        else:
            regs[_REG64.get(location, location)] = part
