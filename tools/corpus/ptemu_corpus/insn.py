"""Capstone helpers shared by the patcher and the listing: a disassembler per
code size, direct branch targets, RIP-relative operands, bare mnemonics."""

from __future__ import annotations

from typing import Any

from .errors import ExtractError


def capstone_for(code_bits: int) -> Any:
    try:
        import capstone
    except ImportError as exc:
        raise ExtractError("capstone is not installed: pip install 'capstone>=5,<6'") from exc
    md = capstone.Cs(capstone.CS_ARCH_X86,
                     capstone.CS_MODE_64 if code_bits == 64 else capstone.CS_MODE_32)
    md.detail = True
    return md

def branch_target(insn: Any, mask: int) -> int | None:
    """The target of a direct (immediate) call/jump, else None."""
    import capstone
    from capstone import x86_const as x86

    groups = set(insn.groups)
    if (capstone.CS_GRP_CALL in groups or capstone.CS_GRP_JUMP in groups) and \
            len(insn.operands) == 1 and insn.operands[0].type == x86.X86_OP_IMM:
        return int(insn.operands[0].imm) & mask
    return None

def rip_relative(insn: Any) -> bool:
    from capstone import x86_const as x86

    return any(op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP
               for op in insn.operands)

def base_mnemonic(insn: Any) -> str:
    """The mnemonic without prefixes (Capstone writes ``lock cmpxchg8b``, ``rep stosb``)."""
    return str(insn.mnemonic).split()[-1]
