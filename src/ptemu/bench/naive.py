"""The naive pipeline: what a user writes by hand instead of ptemu.

Per event: decode with Capstone (details on), open a fresh Unicorn engine,
map the code page and the page-table page at their real linear addresses
(Unicorn's virtual-TLB mode, since it cannot map kernel addresses directly),
write the page and every register, run one instruction, read the page and the
registers back. Written plainly on purpose: this is the baseline ptemu is
measured against, not code ptemu uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import capstone
import unicorn as _unicorn
from unicorn import x86_const as ux

unicorn: Any = _unicorn  # its bindings are only partly typed

_REGISTERS64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
                "r11", "r12", "r13", "r14", "r15")
_REGISTERS32 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")


def naive_event(code_bits: int, regs: Mapping[str, int], code: bytes, page_gla: int,
                page: bytes) -> tuple[bytes, dict[str, int]]:
    """Emulate one event the naive way; returns the page after and the registers."""
    cs_mode = capstone.CS_MODE_64 if code_bits == 64 else capstone.CS_MODE_32
    decoder = capstone.Cs(capstone.CS_ARCH_X86, cs_mode)
    decoder.detail = True
    instruction = next(decoder.disasm(code, regs["rip"]))
    _ = [operand.type for operand in instruction.operands]  # what a user inspects

    uc_mode = unicorn.UC_MODE_64 if code_bits == 64 else unicorn.UC_MODE_32
    uc: Any = unicorn.Uc(unicorn.UC_ARCH_X86, uc_mode)
    uc.ctl_set_tlb_mode(unicorn.UC_TLB_VIRTUAL)
    uc.mem_map(0, 0x3000)
    code_page = regs["rip"] & ~0xFFF
    mapping = {code_page: 0x0, code_page + 0x1000: 0x1000, page_gla: 0x2000}

    def fill(uc: Any, address: int, access: int, entry: Any, data: Any) -> bool:
        physical = mapping.get(address & ~0xFFF)
        if physical is None:
            return False
        entry.paddr = physical
        entry.perms = unicorn.UC_PROT_ALL
        return True

    uc.hook_add(unicorn.UC_HOOK_TLB_FILL, fill)
    uc.mem_write(regs["rip"] & 0xFFF, code)
    uc.mem_write(0x2000, page)
    names = _REGISTERS64 if code_bits == 64 else _REGISTERS32
    prefix = "" if code_bits == 64 else "E"
    for name in names:
        register = name.upper() if code_bits == 64 else prefix + name[1:].upper()
        uc.reg_write(getattr(ux, f"UC_X86_REG_{register}"), regs.get(name, 0))
    uc.reg_write(ux.UC_X86_REG_EFLAGS, regs.get("rflags", 2))
    uc.emu_start(regs["rip"], 0, count=1)
    after = {}
    for name in names:
        register = name.upper() if code_bits == 64 else prefix + name[1:].upper()
        after[name] = uc.reg_read(getattr(ux, f"UC_X86_REG_{register}"))
    after["rip"] = uc.reg_read(ux.UC_X86_REG_RIP if code_bits == 64 else ux.UC_X86_REG_EIP)
    after["rflags"] = uc.reg_read(ux.UC_X86_REG_EFLAGS)
    return bytes(uc.mem_read(0x2000, 0x1000)), after
