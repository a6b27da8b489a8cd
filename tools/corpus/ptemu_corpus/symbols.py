"""``System.map``: a kernel's symbols by name and by address.

The ELF side (segments, sections, the debug vmlinux's symbol table, bytes at
an address) is `ptemu.capture.elf.ElfImage`, shared with ``ptemu capture``;
this module adds what only a kernel has: its System.map.
"""

from __future__ import annotations

import bisect
import dataclasses
from pathlib import Path

from .errors import ExtractError


@dataclasses.dataclass(frozen=True, slots=True)
class MapSymbol:
    """One line of System.map."""

    address: int
    kind: str
    name: str

class SymbolMap:
    """System.map, searchable by name and by address."""

    def __init__(self, path: Path) -> None:
        entries = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                entries.append(MapSymbol(int(parts[0], 16), parts[1], parts[2]))
        if len(entries) < 1000:
            raise ExtractError(f"{path} has {len(entries)} symbols: not a real System.map "
                               "(Debian's image package ships a stub; use the -dbg one)")
        entries.sort(key=lambda e: e.address)
        self.entries = entries
        self._addresses = [e.address for e in entries]
        self.by_name: dict[str, list[MapSymbol]] = {}
        for e in entries:
            self.by_name.setdefault(e.name, []).append(e)

    def unique(self, name: str) -> MapSymbol | None:
        """The one symbol called ``name``; None if absent or ambiguous (several locals)."""
        found = self.by_name.get(name, [])
        return found[0] if len(found) == 1 else None

    def address(self, name: str) -> int:
        """Address of a symbol that must exist once."""
        sym = self.unique(name)
        if sym is None:
            raise ExtractError(f"System.map has no unique symbol {name}")
        return sym.address

    def next_address(self, address: int) -> int | None:
        """The first symbol address strictly above ``address``."""
        i = bisect.bisect_right(self._addresses, address)
        return self._addresses[i] if i < len(self._addresses) else None

    def describe(self, address: int) -> str:
        """``name`` or ``name+0xoff`` of the closest text/data symbol at or below."""
        i = bisect.bisect_right(self._addresses, address) - 1
        if i < 0:
            return f"{address:#x}"
        # Prefer a real name over section markers at the same address.
        best = self.entries[i]
        j = i
        while j >= 0 and self.entries[j].address == best.address:
            if self.entries[j].kind.lower() in "tdbrw":
                best = self.entries[j]
                break
            j -= 1
        off = address - best.address
        return best.name if off == 0 else f"{best.name}+{off:#x}"
