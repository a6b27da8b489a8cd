"""A kernel image's boot-time patch sites, and the function bytes as they run.

`KernelImage` reads the booted vmlinux's tables (``__mcount_loc``,
``.altinstructions``, ``.parainstructions``, ``x86_nops``) and replays what
``alternative_instructions()`` and ``ftrace_init()`` do to one function, for a
CPU with a given feature set (`KernelImage.runtime_code`).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from ptemu.capture.elf import ElfImage

from .errors import ExtractError
from .insn import branch_target, rip_relative
from .symbols import SymbolMap

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

RETURN_THUNKS = frozenset({"__x86_return_thunk", "retbleed_return_thunk",
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

    def __init__(self, vmlinux: ElfImage, symbols: SymbolMap) -> None:
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
        return self.elf.maps(vaddr, max(size, 1))

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
                    section.address <= address < section.address + section.size:
                return f"{section.name}+{address - section.address:#x}"
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
            target = branch_target(insn, self._mask)
            if target is None or insn.mnemonic not in ("call", "jmp"):
                continue
            name = self.map.describe(target)
            if name.startswith(_THUNK_PREFIX):
                put(insn.address, _indirect_branch(insn.mnemonic, name[len(_THUNK_PREFIX):])
                    .ljust(insn.size, b"\x90"))
            elif insn.mnemonic == "jmp" and name in RETURN_THUNKS:
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
            relative = branch_target(insn, self._mask) is not None or rip_relative(insn)
            if relative and not (n == 0 and len(repl) == 5 and repl[0] in (0xE8, 0xE9)):
                raise ExtractError(f"replacement at {alt.repl:#x} has a relative operand the "
                                   "6.1 patcher would not fix up: not supported")
        out = repl
        if len(repl) == 5 and repl[0] == 0xE8:
            target = branch_target(insns[0], self._mask)
            assert target is not None
            out = _rel32(0xE8, alt.orig, target, self._mask)
        elif len(repl) == 5 and repl[0] == 0xE9:
            target = branch_target(insns[0], self._mask)
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
