"""`ptemu entry` and `ptemu walk`: decode one entry, translate one address.

``ptemu entry --paging MODE --level N VALUE`` prints every field the SDM
defines for VALUE as an entry of level N (1 = PTE, 2 = PDE, 3 = PDPTE,
4 = PML4E, 5 = PML5E). ``ptemu walk FIXTURE.json --cr3 X GLA`` translates GLA
through the guest-physical memory a fixture file gives (read with
`ptemu.fixtures.load_fixture`; a fixture whose ``events`` list is empty is a
memory image kept for walking). ``ptemu walk --image FILE --base GPA --paging
MODE --cr3 X GLA`` walks a raw dump of guest-physical memory whose first byte
is at GPA. Both print text, one field per line, or JSON with ``--json``
(integers as hex strings). The keys are the same in both: ``ps`` is the PS flag
of an entry, ``page_bytes`` the size of the page it maps. Domain logic lives in
`ptemu.paging`; this module parses arguments and formats output.
"""

from __future__ import annotations

import argparse
import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptemu.cli.options import count, hex_number
from ptemu.errors import UsageError
from ptemu.fixtures import Fixture, load_fixture
from ptemu.memory import InMemoryGuestMemory
from ptemu.paging import (
    MODE_NAMES,
    DecodedEntry,
    PagingMode,
    Permissions,
    Walk,
    decode_entry,
    paging_mode,
    walk,
)
from ptemu.values import escaped, hex_int, mask_bits, parse_hex_arg, shown

_KEY_NAMES = {"page_size": "ps"}
"""Field names shown under another key: ``page_size`` of `DecodedEntry` is the
PS flag (bit 7), called ``ps`` so that it is not read as a size
(``page_bytes`` is the size, in `ptemu entry` and `ptemu walk` alike)."""

_HEX_FIELDS = frozenset({"value", "address", "page_bytes", "software_bits", "reserved_bits"})
_LEVEL_HELP = "level counted from the leaf: 1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E, 5 = PML5E"


def _size_text(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def _fields(entry: DecodedEntry) -> list[tuple[str, Any]]:
    """The entry's fields under the command line's key names."""
    return [(_KEY_NAMES.get(name, name), value) for name, value in entry.fields()]


def _entry_json(entry: DecodedEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"level_number": entry.level.number}
    for name, value in _fields(entry):
        out[name] = hex_int(value) if name in _HEX_FIELDS and isinstance(value, int) else value
    return out


def _entry_lines(entry: DecodedEntry) -> list[str]:
    lines = []
    for name, value in _fields(entry):
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif name == "level":
            text = f"{value} ({entry.level.number})"
        elif name == "page_bytes" and isinstance(value, int):
            text = f"{hex_int(value)} ({_size_text(value)})"
        elif name in _HEX_FIELDS and isinstance(value, int):
            text = hex_int(value)
        else:
            text = str(value)
        if name == "reserved_bits" and value:
            text += f" (set: the CPU raises {entry.reserved_fault})"
        lines.append(f"{name}: {text}")
    return lines


def run_entry(args: argparse.Namespace) -> int:
    """Decode one entry value and print its fields."""
    mode = paging_mode(args.paging, args.maxphyaddr)
    level = mode.level(args.level)
    value = args.value
    if value >> (8 * mode.entry_size):
        raise UsageError(f"VALUE: {hex_int(value)} does not fit in a {mode.entry_size}-byte "
                         f"{mode.name} entry (at most {hex_int(mask_bits(8 * mode.entry_size))})")
    entry = decode_entry(mode, level, value, nxe=not args.no_nxe, pse=not args.no_pse)
    if args.json:
        document = {"paging": mode.name.value, "maxphyaddr": mode.maxphyaddr,
                    **_entry_json(entry)}
        print(json.dumps(document, indent=2))
    else:
        print(f"paging: {mode.name} (MAXPHYADDR {mode.maxphyaddr})")
        print("\n".join(_entry_lines(entry)))
    return 0


def _permissions_json(permissions: Permissions) -> dict[str, bool]:
    return {name: getattr(permissions, name) for name in Permissions.__slots__}


def _walk_json(result: Walk) -> dict[str, Any]:
    return {
        "paging": result.mode.name.value,
        "maxphyaddr": result.mode.maxphyaddr,
        "cr3": hex_int(result.cr3),
        "gla": hex_int(result.gla),
        "steps": [
            {
                "level": step.level.name,
                "level_number": step.level.number,
                "table_gpa": hex_int(step.table_gpa),
                "table_gla": hex_int(step.table_gla),
                "index": step.index,
                "entry_gpa": hex_int(step.entry_gpa),
                "entry": hex_int(step.entry.value),
                "kind": step.entry.kind.value,
                "reserved_bits": hex_int(step.entry.reserved_bits),
            }
            for step in result.steps
        ],
        "stop": None if result.stop is None else result.stop.value,
        "gpa": None if result.gpa is None else hex_int(result.gpa),
        "page_bytes": None if result.page_size is None else hex_int(result.page_size),
        "permissions": (None if result.permissions is None
                        else _permissions_json(result.permissions)),
    }


def _walk_lines(result: Walk) -> list[str]:
    lines = [f"paging: {result.mode.name} (MAXPHYADDR {result.mode.maxphyaddr})",
             f"cr3: {hex_int(result.cr3)}", f"gla: {hex_int(result.gla)}"]
    for step in result.steps:
        entry = step.entry
        if entry.maps_page and entry.page_bytes is not None:
            meaning = f"maps {_size_text(entry.page_bytes)} page at {hex_int(entry.address)}"
        elif entry.points_to_table:
            meaning = f"table at {hex_int(entry.address)}"
        else:
            meaning = "not present"
        if entry.present and entry.reserved_bits:
            meaning += f", reserved bits {hex_int(entry.reserved_bits)} set"
        lines.append(f"{step.level.name}[{step.index}] at {hex_int(step.entry_gpa)} = "
                     f"{hex_int(entry.value)}: {meaning}")
    if result.stop is not None:
        lines.append(f"stop: {result.stop}")
    if result.gpa is not None and result.page_size is not None:
        lines.append(f"gpa: {hex_int(result.gpa)} ({_size_text(result.page_size)} page)")
    if result.permissions is not None:
        p = result.permissions
        lines.append(f"page: writable {_yes(p.writable)}, user {_yes(p.user)}, "
                     f"executable {_yes(p.executable)}")
        lines.append(f"supervisor: read {_yes(p.supervisor_read)}, write "
                     f"{_yes(p.supervisor_write)}, execute {_yes(p.supervisor_execute)}")
        lines.append(f"user: read {_yes(p.user_read)}, write {_yes(p.user_write)}, "
                     f"execute {_yes(p.user_execute)}")
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


class _RecordingMemory:
    """Guest memory for a walk that remembers which 4 KiB pages it was asked for.

    `known(gpa)` says whether the source holds that byte at all: a fixture
    holds the pages its ``memory`` regions touch (bytes it does not give read
    as zero, as the format says), an image holds its own span and nothing
    else. The walk reads zeros where the source knows nothing, and
    `run_walk` then says so instead of presenting a zero as the guest's entry.
    """

    __slots__ = ("_inner", "_pages", "unknown")

    def __init__(self, inner: InMemoryGuestMemory | _Image, pages: frozenset[int] | None) -> None:
        self._inner = inner
        self._pages = pages
        self.unknown: list[int] = []
        """GPAs of reads the source holds nothing for, in walk order."""

    def known(self, gpa: int, size: int) -> bool:
        if isinstance(self._inner, _Image):
            return self._inner.holds(gpa, size)
        assert self._pages is not None
        return all(page in self._pages
                   for page in range(gpa >> 12, ((gpa + size - 1) >> 12) + 1))

    def read(self, gpa: int, size: int) -> bytes:
        if not self.known(gpa, size):
            self.unknown.append(gpa)
            return bytes(size)
        return self._inner.read(gpa, size)


@dataclass(slots=True)
class _Image:
    """A raw dump of guest-physical memory: its bytes start at `base`."""

    path: Path
    base: int
    data: bytes | mmap.mmap

    def holds(self, gpa: int, size: int) -> bool:
        return self.base <= gpa and gpa + size <= self.base + len(self.data)

    def read(self, gpa: int, size: int) -> bytes:
        start = gpa - self.base
        return bytes(self.data[start:start + size])

    @property
    def last(self) -> int:
        return self.base + len(self.data) - 1


@dataclass(slots=True)
class _Source:
    """Where a walk reads memory, and how to name it in messages."""

    memory: _RecordingMemory
    paging: str
    described: str
    """``the memory of FILE`` or ``FILE (GPA a..b)``."""
    fixture: Fixture | None = None


def _open_image(path: Path, base: int) -> _Image:
    try:
        with path.open("rb") as file:
            size = path.stat().st_size
            if size == 0:
                raise UsageError(f"--image {escaped(str(path))}: the file is empty")
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise UsageError(f"--image {escaped(str(path))}: cannot read: "
                         f"{error.strerror or error}") from None
    if base + len(data) > 1 << 64:
        raise UsageError(f"--base {hex_int(base)}: the image ({hex_int(len(data))} bytes) runs "
                         "past the 64-bit guest-physical address space")
    return _Image(path=path, base=base, data=data)


def _source(args: argparse.Namespace) -> _Source:
    """The memory `args` names: a fixture file or a raw image, never both."""
    if not args.operands:
        raise UsageError("GLA: missing (give FIXTURE.json --cr3 X GLA, or --image FILE "
                         "--base GPA --paging MODE --cr3 X GLA)")
    if len(args.operands) > 2:
        raise UsageError(f"too many arguments: {shown(' '.join(args.operands))} (give "
                         "FIXTURE.json GLA, or GLA alone with --image)")
    if len(args.operands) == 1 and args.image is None and not args.operands[0].startswith("0x"):
        raise UsageError("GLA: missing (give FIXTURE.json --cr3 X GLA, or --image FILE "
                         "--base GPA --paging MODE --cr3 X GLA)")
    args.fixture = args.operands[0] if len(args.operands) == 2 else None
    args.gla = parse_hex_arg(args.operands[-1], "GLA")
    if args.image is None:
        if args.fixture is None:
            raise UsageError("give FIXTURE.json, or --image FILE --base GPA --paging MODE")
        if args.base is not None:
            raise UsageError("--base applies to --image only (a fixture's memory carries its "
                             "own addresses)")
        fixture = load_fixture(args.fixture)
        if args.paging is not None and args.paging != fixture.paging:
            raise UsageError(f"--paging {args.paging}: {escaped(args.fixture)} says paging "
                             f"{fixture.paging}")
        pages = frozenset(page for gpa, data in fixture.memory_regions if data
                          for page in range(gpa >> 12, ((gpa + len(data) - 1) >> 12) + 1))
        memory = _RecordingMemory(InMemoryGuestMemory(fixture.memory_regions), pages)
        return _Source(memory=memory, paging=fixture.paging, fixture=fixture,
                       described=f"the memory of {escaped(args.fixture)}")
    if args.fixture is not None:
        raise UsageError("give FIXTURE.json or --image FILE, not both")
    if args.base is None:
        raise UsageError("--image needs --base GPA: the guest-physical address of the "
                         "image's first byte (e.g. --base 0x0)")
    if args.paging is None:
        raise UsageError(f"--image needs --paging MODE ({', '.join(MODE_NAMES)})")
    image = _open_image(Path(args.image), args.base)
    return _Source(memory=_RecordingMemory(image, None), paging=args.paging,
                   described=f"{escaped(args.image)} (GPA {hex_int(image.base)}.."
                             f"{hex_int(image.last)})")


def _missing_root(source: _Source, cr3: int, root: int, mode: PagingMode) -> UsageError:
    """The error for a root table the source holds nothing of, saying what is missing."""
    where = (f"--cr3 {hex_int(cr3)}: the root table at {hex_int(root)} ({mode.root.name}s) "
             f"is not in {source.described}")
    fixture = source.fixture
    if fixture is None:
        return UsageError(f"{where}: the image holds no bytes there")
    if not fixture.memory_regions:
        return UsageError(f"{where}: the fixture has no memory at all")
    hint = ("the fixture holds no page tables there (a capture records them with "
            "include_page_tables)")
    given = sorted({event.regs["cr3"] for event in fixture.events if event.regs.get("cr3")})
    if given and cr3 not in given:
        hint += "; its events run with cr3 " + ", ".join(hex_int(value) for value in given[:4])
    return UsageError(f"{where}: {hint}")


def run_walk(args: argparse.Namespace) -> int:
    """Translate one linear address through a fixture's memory or a raw image."""
    source = _source(args)
    mode = paging_mode(source.paging, args.maxphyaddr)
    cr3, gla = args.cr3, args.gla
    if gla >= mode.address_limit:
        raise UsageError(f"GLA: {hex_int(gla)} does not fit {mode.name} paging's "
                         f"{mode.address_limit.bit_length() - 1}-bit linear addresses "
                         f"(at most {hex_int(mode.address_limit - 1)})")
    root = mode.root_table_gpa(cr3)
    memory = source.memory
    if not any(memory.known(gpa, 1) for gpa in
               range(root, root + mode.root_table_size, 8 if source.fixture is None else 4096)):
        raise _missing_root(source, cr3, root, mode)
    result = walk(mode, cr3, gla, memory, cr0_wp=not args.no_wp,
                  nxe=not args.no_nxe, pse=not args.no_pse, smep=args.smep, smap=args.smap)
    unknown = [step for step in result.steps if step.entry_gpa in memory.unknown]
    if unknown and source.fixture is None:
        step = unknown[0]
        raise UsageError(f"the {step.level.name} at {hex_int(step.entry_gpa)} (table at "
                         f"{hex_int(step.table_gpa)}) is not in {source.described}: the "
                         "image does not hold that table")
    notes = [f"{step.level.name} table at {hex_int(step.table_gpa)}: {source.described} "
             "gives no byte of its page, so its entries read as zero" for step in unknown]
    if args.json:
        document = _walk_json(result)
        document["notes"] = notes
        print(json.dumps(document, indent=2))
    else:
        print("\n".join(_walk_lines(result) + [f"note: {note}" for note in notes]))
    return 0


def _add_cpu_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--maxphyaddr", metavar="N", type=count(32, 52),
                        help="physical-address width in bits, decimal 32..52 (default 52)")
    parser.add_argument("--no-nxe", action="store_true",
                        help="IA32_EFER.NXE=0: bit 63 is reserved, not XD")
    parser.add_argument("--no-pse", action="store_true",
                        help="CR4.PSE=0: a 32-bit PDE never maps a 4 MiB page")
    parser.add_argument("--json", action="store_true", help="print JSON")


def register(subparsers: Any) -> None:
    """Add the `entry` and `walk` subcommands to the `ptemu` parser."""
    entry = subparsers.add_parser(
        "entry", help="decode one page-table entry",
        description="Print every field the Intel SDM defines for VALUE as an entry of "
                    "the given level. " + _LEVEL_HELP + ". VALUE is hex with 0x; 'ps' is "
                    "the PS flag, 'page_bytes' the size of the page the entry maps.")
    entry.add_argument("--paging", required=True, metavar="MODE", choices=MODE_NAMES,
                       help=f"paging mode: {', '.join(MODE_NAMES)}")
    entry.add_argument("--level", required=True, type=count(1, 5), metavar="N",
                       help=_LEVEL_HELP + " (decimal)")
    entry.add_argument("value", metavar="VALUE", type=hex_number(64),
                       help="the entry, hex with 0x, e.g. 0x8000000012345067")
    _add_cpu_options(entry)
    entry.set_defaults(run=run_entry)

    walker = subparsers.add_parser(
        "walk", usage="ptemu walk FIXTURE.json --cr3 X GLA [options]\n"
                      "       ptemu walk --image FILE --base GPA --paging MODE --cr3 X GLA "
                      "[options]", help="translate a linear address through a fixture's memory or a raw image",
        description="Walk the paging structures CR3 locates in the guest-physical memory "
                    "of FIXTURE (its 'paging' and 'memory' keys; its events may be empty) "
                    "or of a raw memory image (--image FILE --base GPA --paging MODE), and "
                    "print every entry read. Addresses are hex with 0x.")
    # One positional list: argparse cannot give an optional FIXTURE.json and
    # a required GLA their values when --cr3 stands between them; the
    # dispatcher appends the operands argparse leaves over (`more_operands`).
    walker.add_argument("operands", metavar="ARG", nargs="*",
                        help="FIXTURE.json GLA, or GLA alone with --image; GLA is the linear "
                             "address to translate, hex with 0x (e.g. 0xffff888012345ff8)")
    walker.add_argument("--image", metavar="FILE",
                        help="a raw dump of guest-physical memory instead of a fixture")
    walker.add_argument("--base", metavar="GPA", type=hex_number(64),
                        help="with --image: the guest-physical address of its first byte")
    walker.add_argument("--paging", metavar="MODE", choices=MODE_NAMES,
                        help=f"with --image: the paging mode ({', '.join(MODE_NAMES)}); "
                             "a fixture names its own")
    walker.add_argument("--cr3", required=True, metavar="X", type=hex_number(64),
                        help="CR3 value, e.g. 0x1000")
    walker.add_argument("--no-wp", action="store_true",
                        help="CR0.WP=0: supervisor writes ignore R/W")
    walker.add_argument("--smep", action="store_true", help="CR4.SMEP=1")
    walker.add_argument("--smap", action="store_true", help="CR4.SMAP=1 (RFLAGS.AC=0)")
    _add_cpu_options(walker)
    walker.set_defaults(run=run_walk, more_operands="operands")
