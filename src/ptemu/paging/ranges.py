"""Which linear addresses an entry of a page-table page controls.

A table at some level maps one aligned region of linear-address space; entry
`i` of it controls the `i`-th slice of ``1 << level.shift`` bytes. Given where a
table sits (its level and the lowest linear address it maps, as a walk step
records them in `WalkStep.table_gla`), this module says what each entry maps,
so a write to the table can be reported as "this range now maps that frame".
In 4-/5-level paging the upper half of the root table maps the sign-extended
(canonical) addresses: PML4 entry 256 starts at 0xffff800000000000.

>>> from ptemu.paging.modes import paging_mode
>>> mode = paging_mode("4level")
>>> r = entry_range(mode, mode.level(4), 0, 256)
>>> hex(r.gla), hex(r.size)
('0xffff800000000000', '0x8000000000')
"""

from __future__ import annotations

from dataclasses import dataclass

from ptemu.errors import UsageError
from ptemu.paging.modes import Level, PagingMode


@dataclass(frozen=True, slots=True)
class EntryRange:
    """The linear-address range one entry controls."""

    level: Level
    index: int
    gla: int
    """Lowest linear address of the range (canonical in 4-/5-level paging)."""
    size: int
    """Bytes in the range: ``1 << level.shift``."""

    @property
    def last_gla(self) -> int:
        """Highest linear address of the range."""
        return self.gla + self.size - 1


def _table_base(mode: PagingMode, level: Level, table_gla: int) -> int:
    """Validate `table_gla` and return it truncated to the linear-address width."""
    if level not in mode.levels:
        raise UsageError(f"level {level.name} is not a level of paging mode {mode.name}")
    if isinstance(table_gla, bool) or not 0 <= table_gla < mode.address_limit:
        raise UsageError(f"table base {table_gla!r} is not a linear address of {mode.name}")
    if not mode.is_canonical(table_gla):
        raise UsageError(f"table base {table_gla:#x} is not canonical in {mode.name}")
    base = table_gla & ((1 << mode.linear_address_bits) - 1)
    if base & (level.table_span - 1):
        raise UsageError(
            f"table base {table_gla:#x} is not aligned to the {level.table_span:#x}-byte "
            f"region a {level.name} table maps")
    return base


def entry_range(mode: PagingMode, level: Level, table_gla: int, index: int) -> EntryRange:
    """The range entry `index` of a `level` table that maps from `table_gla` controls.

    Raises `UsageError` for an index outside the table or a base that is not
    a canonical, suitably aligned linear address.
    """
    base = _table_base(mode, level, table_gla)
    if isinstance(index, bool) or not 0 <= index < level.entries:
        raise UsageError(f"{level.name} index {index!r} out of range (0..{level.entries - 1})")
    return EntryRange(level=level, index=index,
                      gla=mode.canonical(base + (index << level.shift)), size=level.entry_span)


def entry_ranges(mode: PagingMode, level: Level, table_gla: int) -> tuple[EntryRange, ...]:
    """The ranges of every entry of a `level` table that maps from `table_gla`."""
    base = _table_base(mode, level, table_gla)
    return tuple(
        EntryRange(level=level, index=index, gla=mode.canonical(base + (index << level.shift)),
                   size=level.entry_span)
        for index in range(level.entries)
    )


def written_ranges(mode: PagingMode, level: Level, table_gpa: int, table_gla: int,
                   gpa: int, size: int | None = None) -> tuple[EntryRange, ...]:
    """The ranges whose entries a write of `size` bytes at `gpa` touches.

    `table_gpa` is where the table starts (a walk step's `table_gpa`); `size`
    defaults to one entry. Every entry the write covers, even partly, is
    listed. Raises `UsageError` when the write is not inside the table.
    """
    written = mode.entry_size if size is None else size
    table_bytes = level.entries * mode.entry_size
    if written <= 0 or not table_gpa <= gpa or gpa + written > table_gpa + table_bytes:
        raise UsageError(
            f"write of {written} bytes at {gpa:#x} is not inside the {level.name} table "
            f"at {table_gpa:#x} ({table_bytes} bytes)")
    first = (gpa - table_gpa) // mode.entry_size
    last = (gpa + written - 1 - table_gpa) // mode.entry_size
    return tuple(entry_range(mode, level, table_gla, index) for index in range(first, last + 1))
