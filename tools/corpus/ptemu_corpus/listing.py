"""Disassemble one function and classify its instructions: reachable code,
calls and jumps out, returns, stores that may hit a page-table entry, kernel
globals read, per-CPU accesses, and whether what follows it is padding."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from ptemu.errors import UsageError

from .insn import base_mnemonic, branch_target
from .patching import RETURN_THUNKS, KernelImage


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
            target = branch_target(insn, mask)
            if target is not None and address <= target < end and insn.mnemonic != "call":
                todo.append(target)
            if base_mnemonic(insn) in _STOPS:
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
        for t in [branch_target(i, mask)] if t is not None and address <= t < end
        and t not in starts)
    last = ""
    for insn in insns:
        off = insn.address - address
        live = insn.address in reachable
        target = branch_target(insn, mask)
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
        mnemonic = base_mnemonic(insn)
        if is_call and insn.address in image.mcount_sites:
            out.fentry_calls.append(off)
            comment = "__fentry__: ftrace writes x86_nops[5] here at boot"
        elif is_call and live:
            out.calls.append({"offset": off, "target": comment or insn.op_str})
        if mnemonic == "jmp" and outside and comment in RETURN_THUNKS:
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
            branch_target(insns[-1], mask) or 0) in _NORETURN:
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
            except UsageError:
                ref["image_value"] = None  # .bss: zero-filled, set at run time
        else:
            ref["indexed"] = True
        out.data_refs.append(ref)

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

    mnemonic = base_mnemonic(insn)
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
