"""`ptemu entry` and `ptemu walk`: decode one entry, translate one address.

``ptemu entry --paging MODE --level N VALUE`` prints every field the SDM
defines for VALUE as an entry of level N (1 = PTE, 2 = PDE, 3 = PDPTE,
4 = PML4E, 5 = PML5E). ``ptemu walk FIXTURE.json --cr3 X GLA`` translates GLA
through the guest-physical memory a fixture file gives (read with
`ptemu.fixtures.load_fixture`, so the file must be a valid fixture). Both print text, one
field per line, or JSON with ``--json`` (integers as hex strings). Domain logic
lives in `ptemu.paging`; this module parses arguments and formats output.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

from ptemu.errors import UsageError
from ptemu.fixtures import load_fixture
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
from ptemu.values import hex_int, parse_int

_HEX_FIELDS = frozenset({"value", "address", "page_bytes", "software_bits", "reserved_bits"})
_LEVEL_HELP = "level counted from the leaf: 1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E, 5 = PML5E"


def _size_text(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def _mode_from_args(name: str, maxphyaddr: str | None) -> PagingMode:
    width = None if maxphyaddr is None else parse_int(maxphyaddr, "--maxphyaddr")
    return paging_mode(name, width)


def _entry_json(entry: DecodedEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"level_number": entry.level.number}
    for name, value in entry.fields():
        out[name] = hex_int(value) if name in _HEX_FIELDS and isinstance(value, int) else value
    return out


def _entry_lines(entry: DecodedEntry) -> list[str]:
    lines = []
    for name, value in entry.fields():
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
    mode = _mode_from_args(args.paging, args.maxphyaddr)
    level = mode.level(args.level)
    value = parse_int(args.value, "VALUE")
    entry = decode_entry(mode, level, value, nxe=not args.no_nxe, pse=not args.no_pse)
    if args.json:
        document = {"paging": mode.name.value, "maxphyaddr": mode.maxphyaddr,
                    **_entry_json(entry)}
        print(json.dumps(document, indent=2))
    else:
        print(f"paging: {mode.name} (MAXPHYADDR {mode.maxphyaddr})")
        print("\n".join(_entry_lines(entry)))
    return 0


def _covers(regions: Iterable[tuple[int, bytes]], start: int, size: int) -> bool:
    return any(gpa < start + size and start < gpa + len(data) for gpa, data in regions)


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
        "page_size": None if result.page_size is None else hex_int(result.page_size),
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


def run_walk(args: argparse.Namespace) -> int:
    """Translate one linear address through a fixture's memory and print the walk."""
    fixture = load_fixture(args.fixture)
    regions = fixture.memory_regions
    mode = _mode_from_args(fixture.paging, args.maxphyaddr)
    cr3 = parse_int(args.cr3, "--cr3")
    gla = parse_int(args.gla, "GLA")
    root = mode.root_table_gpa(cr3)
    if not _covers(regions, root, mode.root_table_size):
        raise UsageError(
            f"cr3 {hex_int(cr3)}: the root table at {hex_int(root)} ({mode.root.name}s) is "
            f"outside the memory {args.fixture} gives")
    result = walk(mode, cr3, gla, InMemoryGuestMemory(regions), cr0_wp=not args.no_wp,
                  nxe=not args.no_nxe, pse=not args.no_pse, smep=args.smep, smap=args.smap)
    if args.json:
        print(json.dumps(_walk_json(result), indent=2))
    else:
        print("\n".join(_walk_lines(result)))
    return 0


def _add_cpu_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--maxphyaddr", metavar="N",
                        help="physical-address width, 32..52 (default 52)")
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
                    "the given level. " + _LEVEL_HELP + ".")
    entry.add_argument("--paging", required=True, metavar="MODE",
                       help=f"paging mode: {', '.join(MODE_NAMES)}")
    entry.add_argument("--level", required=True, type=int, metavar="N", help=_LEVEL_HELP)
    entry.add_argument("value", metavar="VALUE", help="the entry, e.g. 0x8000000012345067")
    _add_cpu_options(entry)
    entry.set_defaults(run=run_entry)

    walker = subparsers.add_parser(
        "walk", help="translate a linear address through a fixture's memory",
        description="Walk the paging structures CR3 locates in the guest-physical memory "
                    "of FIXTURE (its 'paging' and 'memory' keys) and print every entry read.")
    walker.add_argument("fixture", metavar="FIXTURE.json")
    walker.add_argument("--cr3", required=True, metavar="X", help="CR3 value, e.g. 0x1000")
    walker.add_argument("gla", metavar="GLA", help="linear address to translate")
    walker.add_argument("--no-wp", action="store_true",
                        help="CR0.WP=0: supervisor writes ignore R/W")
    walker.add_argument("--smep", action="store_true", help="CR4.SMEP=1")
    walker.add_argument("--smap", action="store_true", help="CR4.SMAP=1 (RFLAGS.AC=0)")
    _add_cpu_options(walker)
    walker.set_defaults(run=run_walk)
