"""Linux's own page-table writers, run under KVM at their linked addresses.

The function bytes come from the kernel-writer records shipped in
``ptemu/kvm/data/kernel_writers.json`` (extracted by the corpus tools from
Debian kernel packages, tools/corpus/README.md, so no kernel image is needed
here): each record has the function's linked address,
its prototype, where each argument lives at entry, and ``runtime`` variants
with the bytes as the booted kernel has them (ftrace's ``call __fentry__``
patched to a NOP, return-thunk jumps to ``ret``, alternatives applied).

`kernel_program` places every usable writer at its own address (an extra
4 KiB mapping of its page), maps the page of any kernel global it reads
(only globals whose boot value is known), and builds a driver loop that
calls the writers round-robin from a table of argument sets drawn by a seeded
generator: entry pointers into the monitored pages and many different entry
values. A writer that calls or jumps out of itself, or reads kernel data of
unknown value, is left out with its reason (`KernelWriterSet.skipped`).
"""

from __future__ import annotations

import json
import random
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from ptemu.errors import UsageError
from ptemu.kvm.asm import RAX, RBP, RBX, RCX, RDX, RSP, Assembler
from ptemu.kvm.layout import PAGE, GuestLayout
from ptemu.kvm.programs import GuestProgram, initial_entries
from ptemu.paging.modes import ModeName

KNOWN_GLOBALS: dict[str, tuple[int, int]] = {
    # arch/x86/include/asm/page_types.h: physical_mask = (1 << __PHYSICAL_MASK_SHIFT) - 1,
    # and __PHYSICAL_MASK_SHIFT is 52 on x86-64 (no memory encryption at boot here).
    "physical_mask": ((1 << 52) - 1, 8),
}
"""Kernel globals a writer may read, with their boot-time value and size."""

SYSV_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
REGPARM_REGISTERS = ("eax", "edx", "ecx", "ebx", "esi", "edi")
STACK_SLOTS = 4
_LINE = re.compile(r"^\+0x([0-9a-f]+): ((?:[0-9a-f]{2} )+)\s*(.*?)\s*(?:;\s*(.*))?$")
_RIP = re.compile(r"\[rip ([+-]) 0x([0-9a-f]+)\]")
_ABSOLUTE = re.compile(r"\[0x([0-9a-f]+)\]|[ds]s:0x|\b[fg]s:")
_ENTRY_TYPES = ("pte_t", "pmd_t", "pud_t", "p4d_t", "pgd_t", "atomic64_t", "u64", "long long")


@dataclass(frozen=True, slots=True)
class Parameter:
    """One parameter of a writer's prototype and where it is at entry."""

    name: str
    type: str
    location: str
    """``rdi``, ``ecx:edx`` (high:low), ``[esp+4]``, ``[esp+8]:[esp+4]``."""

    @property
    def is_pointer(self) -> bool:
        return "*" in self.type

    @property
    def points_to_entry(self) -> bool:
        """A pointer the writer stores through (not a vma or an mm)."""
        return self.is_pointer and "struct" not in self.type


@dataclass(frozen=True, slots=True)
class KernelWriter:
    """One runtime variant of one kernel function, ready to run."""

    function: str
    kernel: str
    """Debian kernel release and flavour, e.g. ``6.1.0-50-amd64``."""
    paging: str
    """The paging mode that kernel runs in."""
    code_bits: int
    profile: str
    address: int
    code: bytes
    parameters: tuple[Parameter, ...]
    globals_read: tuple[tuple[int, str], ...]
    """(address, name) of each kernel global the code reads."""


@dataclass(frozen=True, slots=True)
class KernelWriterSet:
    """The writers usable in one layout, and the others with the reason."""

    writers: tuple[KernelWriter, ...]
    skipped: tuple[tuple[str, str], ...]
    """(``function (kernel, profile)``, reason) of every variant left out."""


def _parameters(prototype: str, locations: Sequence[str],
                arg_names: Sequence[str] = ()) -> tuple[Parameter, ...]:
    if prototype.startswith("asm:"):
        # An assembly helper (atomic64_*_cx8): its first argument is the
        # atomic64_t it stores to, the rest are 64-bit values.
        if len(arg_names) != len(locations):
            raise UsageError(f"{prototype!r}: {len(arg_names)} argument names but "
                             f"{len(locations)} argument locations")
        return tuple(Parameter(name, "atomic64_t *" if index == 0 else "u64", location)
                     for index, (name, location) in enumerate(zip(arg_names, locations,
                                                                  strict=True)))
    inside = prototype[prototype.index("(") + 1:prototype.rindex(")")].strip()
    if inside in ("", "void"):
        declarations: list[str] = []
    else:
        declarations = [part.strip() for part in inside.split(",")]
    if len(declarations) != len(locations):
        raise UsageError(f"prototype {prototype!r} has {len(declarations)} parameters but "
                         f"{len(locations)} argument locations")
    out = []
    for declaration, location in zip(declarations, locations, strict=True):
        match = re.match(r"^(.*?)(\w+)$", declaration)
        if match is None:
            raise UsageError(f"cannot read parameter {declaration!r} of {prototype!r}")
        out.append(Parameter(match.group(2), match.group(1).strip(), location))
    return tuple(out)


def record_parameters(record: dict[str, Any]) -> tuple[Parameter, ...]:
    """The parameters of a kernel-writer record: names and C types from its
    ``prototype`` (the ``arg_names`` of an assembly helper), locations from its
    ``args``. Raises `UsageError` when they do not line up."""
    return _parameters(record["prototype"], record["args"], record.get("arg_names", ()))


def argument_slots(parameter: Parameter, value: int) -> list[tuple[str, int]]:
    """Where `value` goes for `parameter`: one (location, value) pair, or two for
    a ``high:low`` pair (the high 32 bits first)."""
    return _slots(parameter, value)


def _globals_read(address: int, lines: Iterable[str]) -> tuple[list[tuple[int, str]], str]:
    """Kernel data the listing reads, or the reason it cannot be provided."""
    found: list[tuple[int, str]] = []
    for line in lines:
        match = _LINE.match(line)
        if match is None or "(unreachable)" in (match.group(4) or ""):
            continue
        offset, encoded, text = int(match.group(1), 16), match.group(2), match.group(3)
        rip = _RIP.search(text)
        if rip is not None:
            disp = int(rip.group(2), 16) * (1 if rip.group(1) == "+" else -1)
            target = address + offset + len(encoded.split()) + disp
            name = (match.group(4) or "").split()[0] if match.group(4) else f"{target:#x}"
            if name not in KNOWN_GLOBALS:
                return [], f"reads kernel data {name} whose boot value is not known here"
            found.append((target, name))
        elif _ABSOLUTE.search(text):
            return [], f"uses an absolute or per-CPU memory operand ({text})"
    return found, ""


def load_kernel_writers(path: str | Path | Traversable) -> list[dict[str, Any]]:
    """The records of a ``kernel_writers.json`` file (a path, or the resource
    installed with the package); raises `UsageError` naming it."""
    target = Path(path) if isinstance(path, str) else path
    try:
        records = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{target}: cannot read kernel writers: {error}") from None
    if not isinstance(records, list):
        raise UsageError(f"{target}: expected a list of kernel-writer records")
    return records


def select_writers(records: Iterable[dict[str, Any]], layout: GuestLayout) -> KernelWriterSet:
    """The runtime variants that can run in `layout`, and why the others cannot.

    A variant runs when its profile covers the layout's paging mode and its code
    size matches, or, for 32-bit PAE kernels, in compatibility mode under
    4-level paging (same 8-byte entries; for hosts that cannot run PAE paging).
    """
    mode = str(layout.mode.name)
    writers: list[KernelWriter] = []
    skipped: list[tuple[str, str]] = []
    for record in records:
        for variant in record.get("runtime", ()):
            label = f"{record['function']} ({record['kernel_release']}, {variant['profile']})"
            modes = set(variant.get("paging_modes", ()))
            native = mode in modes and record["code_bits"] == layout.code_bits
            compat = ("pae" in modes and layout.mode.name is ModeName.LEVEL4
                      and layout.code_bits == 32 and record["code_bits"] == 32)
            if not (native or compat):
                continue
            reason = ""
            if variant["calls"] or variant["external_jumps"]:
                targets = [c["target"] for c in variant["calls"] + variant["external_jumps"]]
                reason = "leaves the function: " + ", ".join(targets)
            address = int(record["address"], 16)
            data, data_reason = _globals_read(address, variant["disassembly"])
            reason = reason or data_reason
            try:
                parameters = _parameters(record["prototype"], record["args"],
                                         record.get("arg_names", ()))
            except UsageError as error:
                reason = reason or str(error)
                parameters = ()
            for parameter in parameters:
                if not _location_ok(parameter.location, layout.code_bits):
                    reason = reason or f"argument {parameter.name} in {parameter.location}"
            if reason:
                skipped.append((label, reason))
                continue
            writers.append(KernelWriter(
                function=record["function"], kernel=record["kernel_release"],
                paging=record["paging"], code_bits=record["code_bits"],
                profile=variant["profile"], address=address,
                code=bytes.fromhex(variant["bytes"]), parameters=parameters,
                globals_read=tuple(data)))
    return KernelWriterSet(tuple(writers), tuple(skipped))


def _location_ok(location: str, code_bits: int) -> bool:
    for part in location.split(":"):
        if part.startswith("[esp+"):
            slot = (int(part[5:-1]) - 4) // 4
            if code_bits != 32 or not 0 <= slot < STACK_SLOTS:
                return False
        elif part not in (SYSV_REGISTERS if code_bits == 64 else REGPARM_REGISTERS):
            return False
    return True


def _value(generator: random.Random, parameter: Parameter, layout: GuestLayout,
           dummy: int) -> int:
    """An argument value: entry pointers into the monitored pages, varied entries."""
    if parameter.points_to_entry:
        entries = layout.monitored_size // 8
        return layout.monitored_gla + generator.randrange(entries) * 8
    if parameter.is_pointer:
        return dummy
    if parameter.name == "dirty":
        return generator.randrange(2)
    if any(kind in parameter.type for kind in _ENTRY_TYPES) or parameter.type in (
            "pgprot_t", "phys_addr_t"):
        shape = generator.randrange(4)
        if shape == 0:
            return 0
        if shape == 1:
            return generator.getrandbits(64)
        flags = generator.choice((0x63, 0x67, 0x25, 0x27, 0x61, 0x163, 0xE3, 0x8000000000000063))
        return (generator.getrandbits(28) << 12) | flags
    return generator.getrandbits(64 if layout.code_bits == 64 else 32)


def _slots(parameter: Parameter, value: int) -> list[tuple[str, int]]:
    parts = parameter.location.split(":")
    if len(parts) == 1:
        return [(parts[0], value)]
    return [(parts[0], value >> 32 & 0xFFFFFFFF), (parts[1], value & 0xFFFFFFFF)]


# Table records the driver loops over (one per call), by code size.
_RECORD64 = ("rdi", "rsi", "rdx", "rcx", "r8", "r9", "target")
_RECORD32 = ("eax", "edx", "ecx", "target", "s0", "s1", "s2", "s3", "ebx", "esi", "edi", "pad")


def kernel_program(layout: GuestLayout, writer_set: KernelWriterSet, iterations: int,
                   seed: int = 1) -> GuestProgram:
    """Call every writer of `writer_set` `iterations` times with varied arguments."""
    writers = writer_set.writers
    if not writers:
        raise UsageError(f"no kernel writer can run in {layout.mode.name} paging with "
                         f"{layout.code_bits}-bit code")
    if not 1 <= iterations <= 100_000:
        raise UsageError(f"iterations: {iterations} is not in 1..100000")
    pages: dict[int, bytearray] = {}

    def place(address: int, content: bytes) -> None:
        for offset, byte in enumerate(content):
            page = pages.setdefault((address + offset) & ~(PAGE - 1), bytearray(PAGE))
            page[(address + offset) % PAGE] = byte

    for writer in writers:
        place(writer.address, writer.code)
        for address, name in writer.globals_read:
            value, size = KNOWN_GLOBALS[name]
            place(address, value.to_bytes(size, "little"))
    generator = random.Random(seed)
    dummy = layout.gla_of(layout.data_gpa + 0x800)
    names = _RECORD64 if layout.code_bits == 64 else _RECORD32
    width = 8 if layout.code_bits == 64 else 4
    table = bytearray()
    for _ in range(iterations):
        for writer in writers:
            record = dict.fromkeys(names, 0)
            record["target"] = writer.address
            for parameter in writer.parameters:
                for location, value in _slots(parameter, _value(generator, parameter, layout,
                                                                dummy)):
                    key = f"s{(int(location[5:-1]) - 4) // 4}" if location[0] == "[" else location
                    record[key] = value & ((1 << (8 * width)) - 1)
            table += b"".join(record[name].to_bytes(width, "little") for name in names)
    calls = iterations * len(writers)
    heap_gla = layout.gla_of(layout.heap_gpa)
    if layout.code_bits == 64:
        code, registers, data = _driver64(), {"rbx": heap_gla, "rbp": calls}, b""
    else:
        code, registers = _driver32(layout), {}
        data = struct.pack("<II", heap_gla, calls)
    kernels = sorted({w.kernel for w in writers})
    return GuestProgram(
        name=f"kernel-{layout.mode.name}-{layout.code_bits}", code=code, registers=registers,
        data=data, monitored=initial_entries(layout, seed), heap=bytes(table),
        pages={gla: bytes(page) for gla, page in pages.items()},
        description=(f"{len(writers)} page-table writers of Debian {', '.join(kernels)} "
                     f"({', '.join(sorted({w.function for w in writers}))}), "
                     f"{calls} calls"))


def _driver64() -> bytes:
    """rbx walks the table (7 qwords a call), rbp counts down: both callee-saved."""
    a = Assembler(64)
    a.label("top")
    for index, register in enumerate((7, 6, 2, 1, 8, 9)):  # rdi rsi rdx rcx r8 r9
        a.load(register, RBX, 8 * index, w=True)
    a.mem(b"\xff", 2, RBX, 8 * 6)                          # call qword ptr [rbx + 48]
    a.alu_ri("add", RBX, 8 * len(_RECORD64), w=True)
    a.regreg(b"\xff", 1, RBP, w=True)                      # dec rbp
    a.jnz("top")
    a.hlt()
    return a.assemble()


def _driver32(layout: GuestLayout) -> bytes:
    """Table pointer and count live in the data area (every register may be an argument)."""
    a = Assembler(32)
    pointer = layout.gla_of(layout.data_gpa)
    counter = pointer + 4
    a.label("top")
    a.raw(b"\x8b\x2d" + struct.pack("<I", pointer))        # mov ebp, [pointer]
    for slot in (7, 6, 5, 4):                              # push s3, s2, s1, s0
        a.mem(b"\xff", 6, RBP, 4 * slot)
    for index, register in ((0, RAX), (1, RDX), (2, RCX), (8, 3), (9, 6), (10, 7)):
        a.load(register, RBP, 4 * index)                  # eax edx ecx ebx esi edi
    a.mem(b"\xff", 2, RBP, 4 * 3)                          # call dword ptr [ebp + 12]
    a.alu_ri("add", RSP, 4 * STACK_SLOTS)
    a.raw(b"\x83\x05" + struct.pack("<I", pointer) + bytes([4 * len(_RECORD32)]))
    a.raw(b"\xff\x0d" + struct.pack("<I", counter))        # dec dword [counter]
    a.jnz("top")
    a.hlt()
    return a.assemble()
