"""The capture description: what guest to build and which code to run.

A description is a small JSON object (docs/capture.md has the full format and
an example). `parse_description` checks every key and turns it into frozen
records; any problem raises `UsageError` with one line naming the key, e.g.
``capture description: page_tables[1].gla: 0xffff888012345800 is not page aligned``.

Nothing here runs code or imports an engine: the records are plain data that
`ptemu.capture.layout` lays out and `ptemu.capture.machine` executes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ptemu.capture.elf import read_function
from ptemu.errors import UsageError
from ptemu.registers import GENERAL_REGISTERS, XMM_REGISTERS
from ptemu.status import Policy
from ptemu.values import PAGE_OFFSET_MASK, PAGE_SIZE, parse_hex_bytes, parse_int

PAGING_MODES: tuple[str, ...] = ("legacy", "pae", "4level", "5level")
"""Paging modes a description may name (the fixture format's names)."""

ENTRY_SIZE: Mapping[str, int] = MappingProxyType(
    {"legacy": 4, "pae": 8, "4level": 8, "5level": 8})
"""Bytes per page-table entry in each paging mode."""

CODE_BITS: Mapping[str, frozenset[int]] = MappingProxyType({
    "legacy": frozenset({16, 32}),
    "pae": frozenset({16, 32}),
    # IA-32e mode runs 64-bit code and, in compatibility mode, 16/32-bit code.
    "4level": frozenset({16, 32, 64}),
    "5level": frozenset({16, 32, 64}),
})
"""Operating modes (``code_bits``) each paging mode can run."""

LINEAR_BITS: Mapping[str, int] = MappingProxyType(
    {"legacy": 32, "pae": 32, "4level": 48, "5level": 57})
"""Linear-address width per paging mode (4-/5-level addresses must be canonical)."""

PHYSICAL_LIMIT: Mapping[str, int] = MappingProxyType(
    {"legacy": 1 << 32, "pae": 1 << 40, "4level": 1 << 40, "5level": 1 << 40})
"""One past the highest GPA a description may use. 32-bit paging maps 4 KiB
pages below 4 GiB only; the others are held to 40 bits, the physical-address
width of Unicorn's default CPU (wider frames would be reserved bits to it)."""

SEGMENT_BASE_NAMES: tuple[str, ...] = ("cs_base", "ds_base", "es_base", "fs_base", "gs_base",
                                       "ss_base")
"""Segment bases a description may set (``cs_base`` only for 16/32-bit code;
in 64-bit code only ``fs_base`` and ``gs_base`` mean anything)."""

CALL_REGISTERS: frozenset[str] = frozenset(
    {name for name in GENERAL_REGISTERS if name != "rsp"} | {"rflags"} | set(XMM_REGISTERS))
"""Registers a call may set. ``rsp`` and ``rip`` are the capture's (it builds the
stack with the return address), segments come from ``segments``."""

DEFAULT_MAX_INSTRUCTIONS = 10_000
DEFAULT_CODE_WINDOW = 32
"""Bytes of code an event carries from RIP on (less at the end of the code)."""


@dataclass(frozen=True, slots=True)
class CodeBlob:
    """Guest code placed at its linear address."""

    gla: int
    data: bytes
    label: str | None = None
    gpa: int | None = None
    """Where the code lives physically (allocated by the capture when None)."""
    origin: str = "bytes"
    """``bytes`` or ``elf FILE:SYMBOL``: where `data` came from."""

    @property
    def end(self) -> int:
        return self.gla + len(self.data)


@dataclass(frozen=True, slots=True)
class MappedPage:
    """A 4 KiB guest page mapped at one linear address (a monitored page-table
    page or a data page)."""

    gpa: int
    gla: int
    data: bytes
    """The page's initial contents, exactly `PAGE_SIZE` bytes."""


@dataclass(frozen=True, slots=True)
class MemoryPatch:
    """Guest-physical bytes changed outside the monitor (the CPU's A/D bits...)."""

    gpa: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Call:
    """One run of the code: from `entry` until it returns to the capture."""

    entry: int
    """Linear address of the first instruction."""
    regs: Mapping[str, int]
    """Registers at entry; every other general register is 0, RFLAGS 0x2."""
    stack_args: tuple[int, ...] = ()
    """Words above the return address (the callee's stack arguments)."""
    memory: tuple[MemoryPatch, ...] = ()
    """Patches applied before the call; the call's first event carries them."""
    deliver_twice: frozenset[int] = frozenset()
    """Indexes (0-based, within this call) of instructions writing a monitored
    page whose event is delivered a second time: the capture restores the
    registers from before the instruction and executes it again."""


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """A whole, validated capture description."""

    name: str
    paging: str
    code_bits: int
    code: tuple[CodeBlob, ...]
    page_tables: tuple[MappedPage, ...]
    calls: tuple[Call, ...]
    source: str | None = None
    policy: Policy = Policy.STRICT
    coalesce: bool = True
    """Merge a PAE entry's second 4-byte half into the first half's event, as
    the handler does by default (semantics.md section 2)."""
    data_pages: tuple[MappedPage, ...] = ()
    segments: Mapping[str, int] = field(default_factory=dict)
    max_instructions: int = DEFAULT_MAX_INSTRUCTIONS
    """Bound on instructions executed per call (REP iterations count each)."""
    code_window: int = DEFAULT_CODE_WINDOW
    include_page_tables: bool = False
    """Put the capture's own paging structures (and every other page it built)
    in the fixture's memory, so that replay can walk them: a MOVS source is
    found through the guest's page tables, and `ptemu walk` works on the file."""

    @property
    def entry_size(self) -> int:
        return ENTRY_SIZE[self.paging]

    def blob_at(self, gla: int) -> CodeBlob | None:
        """The code blob holding linear address `gla`, if any."""
        for blob in self.code:
            if blob.gla <= gla < blob.end:
                return blob
        return None


def load_description(path: str | Path) -> CaptureSpec:
    """Read and validate a description file; ELF paths are relative to it."""
    location = Path(path)
    try:
        text = location.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{location}: cannot read: {error.strerror}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{location}: not JSON: {error.msg} at line {error.lineno}") from None
    return parse_description(document, base_dir=location.parent)


def parse_description(document: object, *, base_dir: Path | None = None) -> CaptureSpec:
    """Validate a description already parsed from JSON. Raises `UsageError`."""
    top = _mapping(document, "the description")
    name = _string(top, "name", required=True)
    assert name is not None
    paging = _string(top, "paging", required=True)
    if paging not in PAGING_MODES:
        raise _error(f"paging: unknown paging mode {paging!r} "
                     f"(expected one of {', '.join(PAGING_MODES)})")
    code_bits = _integer(top.get("code_bits"), "code_bits", required=True)
    if code_bits not in CODE_BITS[paging]:
        allowed = ", ".join(str(bits) for bits in sorted(CODE_BITS[paging]))
        raise _error(f"code_bits: {code_bits} is not possible with {paging} paging "
                     f"(expected {allowed})")
    policy_name = top.get("policy", "strict")
    try:
        policy = Policy(str(policy_name))
    except ValueError:
        raise _error(f"policy: unknown policy {policy_name!r} (expected strict or hvmi)") from None
    coalesce = top.get("coalesce", True)
    if not isinstance(coalesce, bool):
        raise _error("coalesce: expected true or false")
    include_page_tables = top.get("include_page_tables", False)
    if not isinstance(include_page_tables, bool):
        raise _error("include_page_tables: expected true or false")
    context = _Context(paging, code_bits, base_dir or Path("."))
    code = tuple(context.code_blob(item, f"code[{i}]")
                 for i, item in enumerate(_list(top, "code", required=True)))
    if not code:
        raise _error("code: at least one code blob is needed")
    page_tables = tuple(context.page(item, f"page_tables[{i}]", entries_allowed=True)
                        for i, item in enumerate(_list(top, "page_tables", required=True)))
    if not page_tables:
        raise _error("page_tables: at least one page to monitor is needed")
    data_pages = tuple(context.page(item, f"data_pages[{i}]", entries_allowed=False)
                       for i, item in enumerate(_list(top, "data_pages")))
    segments = context.segments(top.get("segments", {}))
    pages = page_tables + data_pages
    calls = tuple(context.call(item, f"calls[{i}]", code, pages)
                  for i, item in enumerate(_list(top, "calls", required=True)))
    if not calls:
        raise _error("calls: at least one call is needed")
    max_instructions = _integer(top.get("max_instructions", DEFAULT_MAX_INSTRUCTIONS),
                                "max_instructions")
    code_window = _integer(top.get("code_window", DEFAULT_CODE_WINDOW), "code_window")
    if max_instructions < 1 or code_window < 16:
        raise _error("max_instructions must be >= 1 and code_window >= 16")
    spec = CaptureSpec(name=name, paging=paging, code_bits=code_bits, code=code,
                       page_tables=page_tables, calls=calls,
                       source=_string(top, "source"), policy=policy, coalesce=coalesce,
                       data_pages=data_pages, segments=segments,
                       max_instructions=max_instructions, code_window=code_window,
                       include_page_tables=include_page_tables)
    _check_overlaps(spec)
    return spec


def _error(message: str) -> UsageError:
    return UsageError(f"capture description: {message}")


def _mapping(value: object, what: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise _error(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _list(top: Mapping[str, object], key: str, *, required: bool = False,
          prefix: str = "") -> Sequence[object]:
    value = top.get(key)
    if value is None:
        if required:
            raise _error(f"{prefix}{key}: missing key")
        return ()
    if not isinstance(value, list):
        raise _error(f"{prefix}{key}: expected a list, got {type(value).__name__}")
    return value


def _string(top: Mapping[str, object], key: str, *, required: bool = False,
            prefix: str = "") -> str | None:
    value = top.get(key)
    if value is None:
        if required:
            raise _error(f"{prefix}{key}: missing key")
        return None
    if not isinstance(value, str) or not value:
        raise _error(f"{prefix}{key}: expected a non-empty string")
    return value


def _integer(value: object, what: str, *, required: bool = False) -> int:
    if value is None and required:
        raise _error(f"{what}: missing key")
    try:
        return parse_int(value, what)
    except UsageError as error:
        raise _error(str(error)) from None


def _hex_bytes(value: object, what: str) -> bytes:
    try:
        return parse_hex_bytes(value, what)
    except UsageError as error:
        raise _error(str(error)) from None


class _Context:
    """Validation that depends on the paging mode and where the file lives."""

    def __init__(self, paging: str, code_bits: int, base_dir: Path) -> None:
        self.paging = paging
        self.code_bits = code_bits
        self.base_dir = base_dir
        self.entry_size = ENTRY_SIZE[paging]

    def linear(self, value: object, what: str) -> int:
        gla = _integer(value, what, required=True)
        bits = LINEAR_BITS[self.paging]
        if self.code_bits != 64 and gla >> 32:
            raise _error(f"{what}: {gla:#x} does not fit the 32-bit linear addresses "
                         f"{self.code_bits}-bit code can use")
        if bits == 32:
            if gla >> 32:
                raise _error(f"{what}: {gla:#x} does not fit a 32-bit linear address")
        else:
            top = gla >> (bits - 1)
            if gla >> 64 or top not in (0, (1 << (65 - bits)) - 1):
                raise _error(f"{what}: {gla:#x} is not canonical with {self.paging} paging "
                             f"(bits 63:{bits - 1} must be equal)")
        return gla

    def physical(self, value: object, what: str) -> int:
        gpa = _integer(value, what, required=True)
        if gpa >= PHYSICAL_LIMIT[self.paging]:
            raise _error(f"{what}: {gpa:#x} is beyond the guest-physical addresses "
                         f"{self.paging} paging can map here "
                         f"(< {PHYSICAL_LIMIT[self.paging]:#x})")
        return gpa

    def code_blob(self, item: object, what: str) -> CodeBlob:
        blob = _mapping(item, what)
        label = _string(blob, "label", prefix=f"{what}.")
        origin = "bytes"
        symbol_address: int | None = None
        if "bytes" in blob:
            if "elf" in blob:
                raise _error(f"{what}: give either 'bytes' or 'elf', not both")
            data = _hex_bytes(blob["bytes"], f"{what}.bytes")
        elif "elf" in blob:
            elf_name = _string(blob, "elf", prefix=f"{what}.")
            symbol = _string(blob, "symbol", required=True, prefix=f"{what}.")
            assert elf_name is not None and symbol is not None
            elf_path = Path(elf_name)
            if not elf_path.is_absolute():
                elf_path = self.base_dir / elf_path
            function = read_function(elf_path, symbol)
            data, symbol_address = function.code, function.address
            origin = f"elf {elf_path.name}:{symbol}"
            label = label or symbol
        else:
            raise _error(f"{what}: missing key 'bytes' (or 'elf' and 'symbol')")
        if not data:
            raise _error(f"{what}: the code is empty")
        for index, patch in enumerate(_list(blob, "patch", prefix=f"{what}.")):
            data = self._patched(data, patch, f"{what}.patch[{index}]")
        if "gla" in blob:
            gla = self.linear(blob["gla"], f"{what}.gla")
        elif symbol_address is not None:
            gla = self.linear(symbol_address, f"{what}.gla (the symbol's address)")
        else:
            raise _error(f"{what}.gla: missing key")
        self.linear(gla + len(data) - 1, f"{what}: end of the code")
        gpa = None
        if "gpa" in blob:
            gpa = self.physical(blob["gpa"], f"{what}.gpa")
            if (gpa ^ gla) & PAGE_OFFSET_MASK:
                raise _error(f"{what}.gpa: {gpa:#x} and gla {gla:#x} differ in the page offset")
        return CodeBlob(gla=gla, data=data, label=label, gpa=gpa, origin=origin)

    @staticmethod
    def _patched(data: bytes, patch: object, what: str) -> bytes:
        """Replace bytes in a blob (e.g. NOP a ``call __fentry__``, as the running
        kernel does)."""
        fields = _mapping(patch, what)
        offset = _integer(fields.get("offset"), f"{what}.offset", required=True)
        new = _hex_bytes(fields.get("bytes"), f"{what}.bytes")
        if offset + len(new) > len(data):
            raise _error(f"{what}: patch of {len(new)} bytes at {offset} runs past the code")
        return data[:offset] + new + data[offset + len(new):]

    def page(self, item: object, what: str, *, entries_allowed: bool) -> MappedPage:
        page = _mapping(item, what)
        gpa = self.physical(page.get("gpa"), f"{what}.gpa")
        gla = self.linear(page.get("gla"), f"{what}.gla")
        for name, address in (("gpa", gpa), ("gla", gla)):
            if address & PAGE_OFFSET_MASK:
                raise _error(f"{what}.{name}: {address:#x} is not page aligned")
        content = bytearray(PAGE_SIZE)
        if "data" in page:
            data = _hex_bytes(page["data"], f"{what}.data")
            if len(data) > PAGE_SIZE:
                raise _error(f"{what}.data: {len(data)} bytes do not fit a 4 KiB page")
            content[:len(data)] = data
        if "entries" in page:
            if not entries_allowed:
                raise _error(f"{what}.entries: only page_tables take 'entries' (use 'data')")
            self._fill_entries(content, page["entries"], f"{what}.entries")
        return MappedPage(gpa=gpa, gla=gla, data=bytes(content))

    def _fill_entries(self, content: bytearray, entries: object, what: str) -> None:
        """Entries as a list from index 0, or an object {index: value}."""
        count = PAGE_SIZE // self.entry_size
        if isinstance(entries, list):
            pairs: list[tuple[int, object]] = list(enumerate(entries))
        elif isinstance(entries, Mapping):
            pairs = [(_integer(key, f"{what} index {key!r}"), value)
                     for key, value in entries.items()]
        else:
            raise _error(f"{what}: expected a list of entry values or an object "
                         f"{{index: value}}")
        for index, raw in pairs:
            if index >= count:
                raise _error(f"{what}: index {index} is beyond the {count} entries of a page")
            value = _integer(raw, f"{what}[{index}]")
            if value >> (8 * self.entry_size):
                raise _error(f"{what}[{index}]: {value:#x} does not fit a "
                             f"{self.entry_size}-byte entry")
            start = index * self.entry_size
            content[start:start + self.entry_size] = value.to_bytes(self.entry_size, "little")

    def segments(self, value: object) -> Mapping[str, int]:
        fields = _mapping(value, "segments")
        out: dict[str, int] = {}
        for name, raw in fields.items():
            if name not in SEGMENT_BASE_NAMES:
                raise _error(f"segments.{name}: unknown segment base "
                             f"(expected one of {', '.join(SEGMENT_BASE_NAMES)})")
            base = _integer(raw, f"segments.{name}")
            if self.code_bits == 64:
                if name not in ("fs_base", "gs_base"):
                    raise _error(f"segments.{name}: 64-bit code ignores this base "
                                 "(only fs_base and gs_base apply)")
                self.linear(base, f"segments.{name}")
            elif base >> 32:
                raise _error(f"segments.{name}: {base:#x} does not fit 32 bits")
            out[name] = base
        return MappingProxyType(out)

    def call(self, item: object, what: str, code: tuple[CodeBlob, ...],
             pages: tuple[MappedPage, ...]) -> Call:
        fields = _mapping(item, what)
        entry_value = fields.get("entry")
        if entry_value is None:
            entry = code[0].gla
        elif isinstance(entry_value, str) and not entry_value.lower().startswith("0x"):
            labelled = [blob for blob in code if blob.label == entry_value]
            if not labelled:
                raise _error(f"{what}.entry: no code blob labelled {entry_value!r}")
            entry = labelled[0].gla
        else:
            entry = self.linear(entry_value, f"{what}.entry")
        if not any(blob.gla <= entry < blob.end for blob in code):
            raise _error(f"{what}.entry: {entry:#x} is not inside any code blob")
        regs = self.registers(fields.get("regs", {}), f"{what}.regs")
        word_bits = 64 if self.code_bits == 64 else 32 if self.code_bits == 32 else 16
        stack_args: list[int] = []
        for index, raw in enumerate(_list(fields, "stack", prefix=f"{what}.")):
            word = _integer(raw, f"{what}.stack[{index}]")
            if word >> word_bits:
                raise _error(f"{what}.stack[{index}]: {word:#x} does not fit {word_bits} bits")
            stack_args.append(word)
        patches: list[MemoryPatch] = []
        for index, raw_patch in enumerate(_list(fields, "memory", prefix=f"{what}.")):
            where = f"{what}.memory[{index}]"
            patch = _mapping(raw_patch, where)
            gpa = self.physical(patch.get("gpa"), f"{where}.gpa")
            data = _hex_bytes(patch.get("data"), f"{where}.data")
            if not data or not any(page.gpa <= gpa and gpa + len(data) <= page.gpa + PAGE_SIZE
                                   for page in pages):
                raise _error(f"{where}: {len(data)} bytes at {gpa:#x} are not inside one "
                             "page-table or data page")
            patches.append(MemoryPatch(gpa, data))
        twice: set[int] = set()
        for index, raw in enumerate(_list(fields, "deliver_twice", prefix=f"{what}.")):
            twice.add(_integer(raw, f"{what}.deliver_twice[{index}]"))
        return Call(entry=entry, regs=MappingProxyType(regs), stack_args=tuple(stack_args),
                    memory=tuple(patches), deliver_twice=frozenset(twice))

    def registers(self, value: object, what: str) -> dict[str, int]:
        fields = _mapping(value, what)
        out: dict[str, int] = {}
        for name, raw in fields.items():
            if name not in CALL_REGISTERS:
                raise _error(f"{what}.{name}: not a register a call may set (rsp, rip and "
                             "segments belong to the capture)")
            register = _integer(raw, f"{what}.{name}")
            if name.startswith("xmm"):
                if register >> 128:
                    raise _error(f"{what}.{name}: {register:#x} does not fit 128 bits")
                if self.code_bits != 64 and int(name[3:]) >= 8:
                    raise _error(f"{what}.{name}: 16/32-bit code has xmm0..xmm7 only")
            elif self.code_bits == 64:
                if register >> 64:
                    raise _error(f"{what}.{name}: {register:#x} does not fit 64 bits")
            else:
                if name[1:].rstrip("bdw").isdigit():
                    raise _error(f"{what}.{name}: 16/32-bit code has no {name}")
                if register >> 32:
                    raise _error(f"{what}.{name}: {register:#x} does not fit 32 bits")
            out[name] = register
        return out


def _check_overlaps(spec: CaptureSpec) -> None:
    """No two described pages may share a GPA or a GLA, and code may not sit on them."""
    seen_gpa: dict[int, str] = {}
    seen_gla: dict[int, str] = {}
    described = [(f"page_tables[{i}]", page) for i, page in enumerate(spec.page_tables)]
    described += [(f"data_pages[{i}]", page) for i, page in enumerate(spec.data_pages)]
    for what, page in described:
        for table, address, kind in ((seen_gpa, page.gpa, "gpa"), (seen_gla, page.gla, "gla")):
            if address in table:
                raise _error(f"{what}.{kind}: {address:#x} is also used by {table[address]}")
            table[address] = what
    for index, blob in enumerate(spec.code):
        first, last = blob.gla & ~PAGE_OFFSET_MASK, (blob.end - 1) & ~PAGE_OFFSET_MASK
        for page_gla in range(first, last + PAGE_SIZE, PAGE_SIZE):
            if page_gla in seen_gla:
                raise _error(f"code[{index}]: its page {page_gla:#x} is also "
                             f"{seen_gla[page_gla]}")
            if blob.gpa is not None:
                page_gpa = (blob.gpa & ~PAGE_OFFSET_MASK) + (page_gla - first)
                if page_gpa in seen_gpa:
                    raise _error(f"code[{index}].gpa: page {page_gpa:#x} is also "
                                 f"{seen_gpa[page_gpa]}")
