"""The guest program of a monitored KVM run: a guest that edits its page tables.

`monitor_program` builds straight-line guest code that does, cycle after
cycle, what kernels do to page tables: it builds a page table as ordinary data,
links it into a page directory, maps, remaps and changes rights in it (with
MOV, XCHG, LOCK CMPXCHG/CMPXCHG8B, LOCK AND/OR/BTS/BTR, and hostile partial
stores: one byte that sets R/W on a present entry, two 4-byte halves), splits
a large page into a table of the same frames and merges it back, unlinks the
table and then writes data into the freed page, swaps a page directory for
another under its PDPTE and back (writing the unlinked one meanwhile), links
and unlinks a PDPT under the PML4 (4-level), writes a kernel table that two
address spaces share, and writes the page tables of the live hierarchy that
the vCPU itself runs on.

None of these mappings is ever used by the guest (it only writes the tables,
through the direct map), so the CPU's own page walks never depend on what the
monitor is watching. The tables live in the RAM area the program's heap
occupies; two "processes" (roots the guest never loads into CR3) and the
running hierarchy's window are watched.

Alongside the code, the generator keeps its own model: each page table's bytes
as every instruction leaves them, and which pages are linked tables when each
instruction runs. From that model, and not from the monitor, come the
expectations a run is checked against: the GPA of every write that must exit
(a write to a linked table) in order, every other write not exiting (a table
being built, a freed table reused as data, an unlinked directory), and every
page's final bytes. The probe addresses (where the run compares the monitor's
view with a walk of memory) are the linear addresses each written entry maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ptemu.errors import UsageError
from ptemu.kvm.asm import RAX, RBX, RCX, RDI, RDX, Assembler
from ptemu.kvm.layout import PAGE, GuestLayout
from ptemu.kvm.programs import GuestProgram
from ptemu.paging.modes import ModeName

if TYPE_CHECKING:
    from ptemu.monitor import TranslationMonitor

P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX_BIT = 63
LEAF = P | RW | US | A | D
POINTER = P | RW | US | A
POOL_GPA = 0x40000
"""The program's tables and their data pages live from here (the heap area)."""
KERNEL_BASE = {ModeName.LEVEL4: 0xFFFF800000000000, ModeName.PAE: 0xC0000000}
MONITOR_MODES = (ModeName.LEVEL4, ModeName.PAE)
PWT_PCD = 0x18
DIRECTORY_ENTRY_WRITTEN_UNLINKED = 300
"""The entry of the swapped-out page directory the program writes while it is unlinked."""
CYCLE_CODE_BYTES = 1200
"""Generous code bytes one cycle takes (for the iteration bound)."""


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """One watch the run sets up: a whole space or a half of it, or one range."""

    cr3: int
    ranges: str | tuple[tuple[int, int], ...]
    """``"all"``/``"kernel"`` for `watch_space`, or ``((gla, size),)`` for `watch`."""
    kernel_base: int | None = None

    def install(self, monitor: TranslationMonitor) -> None:
        """Set this watch up on `monitor` (what every monitored run of the program does)."""
        if isinstance(self.ranges, str):
            monitor.watch_space(self.cr3, ranges=self.ranges,  # type: ignore[arg-type]
                                kernel_base=self.kernel_base)
        else:
            for gla, size in self.ranges:
                monitor.watch(self.cr3, gla, size)


@dataclass(frozen=True, slots=True)
class MonitorScenario:
    """A monitored run's program and what the run must observe."""

    program: GuestProgram
    watches: tuple[WatchSpec, ...]
    probes: Mapping[int, tuple[int, ...]]
    """Per watched root: linear addresses whose translation is checked after every exit."""
    exit_gpas: tuple[int, ...]
    """The GPA of every guest write that must exit, in order (a table write)."""
    silent_writes: int
    """Guest instructions that write memory and must not exit (tables not linked
    yet or any more, freed tables reused as data)."""
    final_pages: Mapping[int, bytes]
    """Every page the program writes, as it must be at the end."""
    cycles: int


@dataclass
class _Table:
    """Where a table sits: the spaces that reach it, its base GLA and its level."""

    roots: tuple[int, ...]
    base: int
    level: int


@dataclass
class _Model:
    """The generator's own account of the guest's tables (independent of ptemu)."""

    layout: GuestLayout
    pages: dict[int, bytearray] = field(default_factory=dict)
    linked: set[int] = field(default_factory=set)
    tables: dict[int, _Table] = field(default_factory=dict)
    probes: dict[int, dict[int, None]] = field(default_factory=dict)

    @property
    def entry_size(self) -> int:
        return self.layout.mode.entry_size

    def page(self, gpa: int) -> bytearray:
        return self.pages.setdefault(gpa & ~(PAGE - 1), bytearray(PAGE))

    def read(self, gpa: int, size: int) -> int:
        offset = gpa & (PAGE - 1)
        return int.from_bytes(self.page(gpa)[offset:offset + size], "little")

    def write(self, gpa: int, value: int, size: int) -> None:
        offset = gpa & (PAGE - 1)
        self.page(gpa)[offset:offset + size] = value.to_bytes(size, "little")

    def span(self, level: int) -> int:
        return self.layout.mode.level(level).entry_span

    def probe_entry(self, entry_gpa: int) -> None:
        """Probe the first, middle and last page the entry at `entry_gpa` maps."""
        table = self.tables.get(entry_gpa & ~(PAGE - 1))
        if table is None:
            return
        span = self.span(table.level)
        start = table.base + (entry_gpa & (PAGE - 1)) // self.entry_size * span
        for root in table.roots:
            probes = self.probes.setdefault(root, {})
            for gla in (start, start + span // 2 // PAGE * PAGE, start + span - PAGE):
                probes[self.layout.mode.canonical(gla)] = None


class _Emitter:
    """Turns guest writes into instructions, applying each to the model."""

    def __init__(self, model: _Model) -> None:
        self.model = model
        self.layout = model.layout
        self.bits = model.layout.code_bits
        self.asm = Assembler(self.bits)
        self.exits: list[int] = []
        self.silent = 0
        self._labels = 0

    def _gla(self, gpa: int) -> int:
        return self.layout.gla_of(gpa)

    def _wrote(self, gpa: int, exits: bool = True) -> None:
        if exits and gpa & ~(PAGE - 1) in self.model.linked:
            self.exits.append(gpa)
        else:
            self.silent += 1

    def entry(self, gpa: int, new: int, how: str = "mov") -> None:
        """Write a whole entry: MOV, XCHG or LOCK CMPXCHG (CMPXCHG8B in 32-bit code)."""
        model, a, size = self.model, self.asm, self.model.entry_size
        cur = model.read(gpa, size)
        a.mov_imm(RDI, self._gla(gpa))
        if self.bits == 32 and size == 8:
            a.mov_imm(RAX, cur & 0xFFFFFFFF)
            a.mov_imm(RDX, cur >> 32)
            a.mov_imm(RBX, new & 0xFFFFFFFF)
            a.mov_imm(RCX, new >> 32)
            a.cmpxchg8b(RDI, 0)
        elif how == "cmpxchg":
            a.mov_imm(RAX, cur)
            a.mov_imm(RCX, new)
            a.cmpxchg(size, RCX, RDI, 0)
        else:
            a.mov_imm(RAX, new)
            if how == "xchg":
                a.xchg(size, RAX, RDI, 0)
            else:
                a.mov_store(size, RAX, RDI, 0)
        model.write(gpa, new, size)
        self._wrote(gpa)
        model.probe_entry(gpa)

    def logic(self, op: str, gpa: int, mask: int) -> None:
        """LOCK AND/OR of an entry with `mask` (32-bit code: the one dword it touches)."""
        model, a = self.model, self.asm
        size = model.entry_size if self.bits == 64 else 4
        offset = 0
        if size < model.entry_size:
            full = (1 << (8 * model.entry_size)) - 1
            changed = (~mask if op == "and" else mask) & full
            if changed >> 32 and changed & 0xFFFFFFFF:
                raise AssertionError("a 32-bit AND/OR changes one half of an entry")
            offset = 4 if changed >> 32 else 0
            mask = (mask >> (8 * offset)) & 0xFFFFFFFF
        a.mov_imm(RDI, self._gla(gpa))
        a.mov_imm(RAX, mask)
        a.logic(op, size, RAX, RDI, offset)
        old = model.read(gpa + offset, size)
        model.write(gpa + offset, old & mask if op == "and" else old | mask, size)
        self._wrote(gpa + offset)
        model.probe_entry(gpa)

    def bit(self, op: str, gpa: int, bit: int) -> None:
        """LOCK BTS/BTR of one bit of an entry."""
        model, a = self.model, self.asm
        size = model.entry_size if self.bits == 64 else 4
        offset = (bit // 32) * 4 if size == 4 else 0
        bit_in = bit - 8 * offset
        a.mov_imm(RDI, self._gla(gpa))
        a.bit_imm(op, size, RDI, offset, bit_in)
        old = model.read(gpa + offset, size)
        new = old | (1 << bit_in) if op == "bts" else old & ~(1 << bit_in)
        model.write(gpa + offset, new, size)
        self._wrote(gpa + offset)
        model.probe_entry(gpa)

    def part(self, gpa: int, value: int, size: int) -> None:
        """A plain MOV of `size` (1 or 4) bytes into part of an entry."""
        model, a = self.model, self.asm
        a.mov_imm(RDI, self._gla(gpa))
        if size == 1:
            a.mov_store_imm(1, RDI, 0, value)
        else:
            a.mov_imm(RAX, value)
            a.mov_store(size, RAX, RDI, 0)
        model.write(gpa, value, size)
        entry = gpa - gpa % model.entry_size
        self._wrote(gpa)
        model.probe_entry(entry)

    def fill(self, page: int, pattern: int) -> None:
        """REP STOS over a whole page that is not a linked table (no exit)."""
        model, a = self.model, self.asm
        if page in model.linked:
            raise AssertionError(f"fill of linked table {page:#x}")
        a.mov_imm(RDI, self._gla(page))
        unit = 8 if self.bits == 64 else 4
        a.mov_imm(RCX, PAGE // unit)
        a.mov_imm(RAX, pattern)
        a.raw(b"\xf3")
        a.stos(unit)
        value = pattern & ((1 << (8 * unit)) - 1)
        model.pages[page] = bytearray(value.to_bytes(unit, "little") * (PAGE // unit))
        self.silent += 1

    def series(self, gpa: int, first: int, count: int, step: int) -> None:
        """A loop of plain stores: entry i gets ``first + i*step`` (a table being built)."""
        model, a, size = self.model, self.asm, self.model.entry_size
        if gpa & ~(PAGE - 1) in model.linked:
            raise AssertionError(f"series into linked table {gpa:#x}")
        if (first & 0xFFFFFFFF) + step * count >= 1 << 32:
            raise AssertionError("series carries into the high half")
        self._labels += 1
        label = f"series{self._labels}"
        a.mov_imm(RDI, self._gla(gpa))
        a.mov_imm(RAX, first & 0xFFFFFFFF if self.bits == 32 else first)
        a.mov_imm(RDX, first >> 32)
        a.mov_imm(RCX, count)
        a.label(label)
        if self.bits == 64:
            a.store(RAX, RDI, 0, w=True)
        else:
            a.store(RAX, RDI, 0)
            if size == 8:
                a.store(RDX, RDI, 4)
        a.alu_ri("add", RAX, step, w=self.bits == 64)
        a.alu_ri("add", RDI, size, w=self.bits == 64)
        a.alu_ri("sub", RCX, 1, w=self.bits == 64)
        a.jnz(label)
        for index in range(count):
            model.write(gpa + index * size, first + index * step, size)
        stores_per_entry = 2 if self.bits == 32 and size == 8 else 1
        self.silent += count * stores_per_entry


class _Pool:
    """Pages for tables and their data: freed pages are reused first (oldest first)."""

    def __init__(self) -> None:
        self._next = POOL_GPA
        self._free: list[int] = []

    def take(self) -> int:
        if self._free:
            return self._free.pop(0)
        page, self._next = self._next, self._next + PAGE
        return page

    def give_back(self, page: int) -> None:
        self._free.append(page)


def _pointer(mode_name: ModeName, level: int, table: int) -> int:
    # A PAE PDPTE has no R/W, U/S or A bits (SDM 4.4.1): P alone.
    if mode_name is ModeName.PAE and level == 3:
        return table | P
    return table | POINTER


def monitor_program(layout: GuestLayout, iterations: int) -> MonitorScenario:
    """The monitored-run program for `layout` (4-level with 64-bit code, or PAE)."""
    mode = layout.mode
    if mode.name not in MONITOR_MODES or (mode.name is ModeName.LEVEL4 and
                                          layout.code_bits != 64):
        raise UsageError("the monitor program runs in 4level paging with 64-bit code or in "
                         f"pae paging, not {mode.name} with {layout.code_bits}-bit code")
    limit = (layout.code_end - layout.code_gpa - 4096) // CYCLE_CODE_BYTES
    if not 1 <= iterations <= limit:
        raise UsageError(f"iterations: {iterations} is not in 1..{limit} (the monitor "
                         "program's code grows with each cycle)")
    model = _Model(layout)
    emit = _Emitter(model)
    pool = _Pool()
    level4 = mode.name is ModeName.LEVEL4
    size = mode.entry_size
    window_root = layout.tables_gpa
    """The running hierarchy's root (`TableBuilder` allocates it first)."""

    def at(table: int, index: int) -> int:
        return table + index * size

    def place(table: int, roots: tuple[int, ...], base: int, level: int) -> None:
        model.tables[table] = _Table(roots, base, level)

    def initial(gpa: int, value: int) -> None:
        model.write(gpa, value, size)
        model.probe_entry(gpa)

    # -- the initial hierarchies (in the image: no instruction writes them) ----------
    root, root2 = pool.take(), pool.take()
    place(root, (root,), 0, mode.levels[0].number)
    place(root2, (root2,), 0, mode.levels[0].number)
    kernel = KERNEL_BASE[mode.name]
    directory_a, table_a, directory_b, table_b = (pool.take() for _ in range(4))
    if level4:
        pdpt_a, pdpt_k, pdpt_c = pool.take(), pool.take(), pool.take()
        place(pdpt_a, (root,), 0, 3)
        initial(at(root, 0), _pointer(mode.name, 4, pdpt_a))
        upper, upper_index = pdpt_a, 0
        place(pdpt_k, (root, root2), kernel, 3)
        directory_k = pool.take()
        initial(at(pdpt_a, 1), 0x40000000 | LEAF | PS)        # a 1 GiB page
    else:
        upper, upper_index = root, 0
        directory_k = pool.take()
    place(directory_a, (root,), 0, 2)
    initial(at(upper, upper_index), _pointer(mode.name, 3, directory_a))
    place(table_a, (root,), 0, 1)
    initial(at(directory_a, 0), _pointer(mode.name, 2, table_a))
    for index in range(8):
        initial(at(table_a, index), (0x10000000 + index * PAGE) | LEAF)
    large_index = 511
    initial(at(directory_a, large_index), 0x60000000 | LEAF | PS)
    # The spare directory and its table: linked by the guest in each cycle.
    place(directory_b, (root,), 0, 2)
    place(table_b, (root,), 0, 1)
    model.write(at(directory_b, 0), _pointer(mode.name, 2, table_b), size)
    model.write(at(directory_b, 5), 0x20000000 | LEAF | PS, size)
    for index in range(4):
        model.write(at(table_b, index), (0x30000000 + index * PAGE) | LEAF, size)
    # The kernel half, shared by both processes.
    table_k = pool.take()
    place(directory_k, (root, root2), kernel, 2)
    place(table_k, (root, root2), kernel, 1)
    if level4:
        for space in (root, root2):
            initial(at(space, 256), _pointer(mode.name, 4, pdpt_k))
        initial(at(pdpt_k, 0), _pointer(mode.name, 3, directory_k))
        place(pdpt_c, (root,), 1 << 39, 3)
        model.write(at(pdpt_c, 0), 0x80000000 | LEAF | PS, size)
    else:
        for space in (root, root2):
            initial(at(space, 3), _pointer(mode.name, 3, directory_k))
    initial(at(directory_k, 0), _pointer(mode.name, 2, table_k))
    for index in range(4):
        initial(at(table_k, index), (0x50000000 + index * PAGE) | LEAF)
    linked = {root, root2, directory_a, table_a, directory_k, table_k}
    if level4:
        linked |= {pdpt_a, pdpt_k}
    model.linked = set(linked)
    heap = bytearray(pool._next - POOL_GPA)
    for page, content in model.pages.items():
        heap[page - POOL_GPA:page - POOL_GPA + PAGE] = content

    # -- the running hierarchy's window: its PTs are the layout's monitored pages ------
    window_pts = [layout.monitored_gpa + index * PAGE for index in range(layout.monitored_pages)]
    pde_span = mode.level(2).entry_span
    for index, page in enumerate(window_pts):
        place(page, (window_root,), layout.window + index * pde_span, 1)
        for entry in range(4):
            initial(at(page, entry), (0x70000000 + (index * 4 + entry) * PAGE) | LEAF)
    monitored = b"".join(bytes(model.page(page)) for page in window_pts)
    model.linked |= set(window_pts)     # and the window's upper tables, never written

    # -- the cycles ------------------------------------------------------------------
    for cycle in range(iterations):
        _cycle(emit, pool, cycle, at=at, place=place, root=root, directory_a=directory_a,
               directory_b=directory_b, table_b=table_b, upper=upper, upper_index=upper_index,
               large_index=large_index, level4=level4,
               root_pdpt_c=(root, pdpt_c) if level4 else None, table_k=table_k,
               window_pts=window_pts)
    emit.asm.hlt()
    code = emit.asm.assemble()
    if len(code) > layout.code_end - layout.code_gpa:
        raise UsageError(f"iterations: {iterations} cycles need {len(code)} bytes of code, "
                         "more than the code area holds: use fewer")

    probes = {space: tuple(sorted(points)) for space, points in model.probes.items()}
    watches = (WatchSpec(root, "all"),
               WatchSpec(root2, "kernel", kernel_base=None if level4 else kernel),
               WatchSpec(window_root, ((layout.window, layout.monitored_pages * pde_span),)))
    probes = {root: probes.get(root, ()),
              root2: tuple(p for p in probes.get(root2, ())
                           if p >= model.layout.mode.canonical(kernel)),
              window_root: probes.get(window_root, ())}
    final = {page: bytes(content) for page, content in model.pages.items()}
    program = GuestProgram(
        name="monitor", code=code, heap=bytes(heap), monitored=monitored,
        description=(f"{iterations} cycles of: build a PT as data, link it, map/remap/"
                     "protect in it (MOV, XCHG, CMPXCHG, AND, OR, BTS, BTR, a hostile byte, "
                     "two halves), split a large page and merge it back, free the PT and "
                     "write data into it, swap a page directory and back, "
                     + ("link/unlink a PDPT, " if level4 else "")
                     + "write a shared kernel PT and the running hierarchy's window PTs"))
    return MonitorScenario(program=program, watches=watches, probes=probes,
                           exit_gpas=tuple(emit.exits), silent_writes=emit.silent,
                           final_pages=final, cycles=iterations)


_At = Callable[[int, int], int]
_Place = Callable[[int, tuple[int, ...], int, int], None]


def _cycle(emit: _Emitter, pool: _Pool, cycle: int, *, at: _At, place: _Place, root: int,
           directory_a: int, directory_b: int, table_b: int, upper: int, upper_index: int,
           large_index: int, level4: bool, root_pdpt_c: tuple[int, int] | None,
           table_k: int, window_pts: list[int]) -> None:
    """One cycle of table edits (see the module docstring)."""
    model = emit.model
    mode_name = model.layout.mode.name
    span2 = model.span(2)
    frame = 0x08000000 + cycle * 0x100000
    nx = 1 << NX_BIT

    # Build a PT as data and link it.
    table = pool.take()
    slot = 1 + cycle % 200
    place(table, (root,), slot * span2, 1)
    emit.fill(table, 0)
    emit.series(at(table, 0), frame | LEAF, 4, PAGE)
    emit.entry(at(directory_a, slot), _pointer(mode_name, 2, table), "mov")
    model.linked.add(table)
    for index in range(4):
        model.probe_entry(at(table, index))
    # Map, remove rights, hostile partial stores, unmap.
    emit.entry(at(table, 10), (frame + 0x10 * PAGE) | LEAF, "cmpxchg")
    emit.logic("and", at(table, 0), ~RW & ((1 << 64) - 1))
    emit.bit("bts", at(table, 1), NX_BIT)
    emit.part(at(table, 0), (frame | LEAF) & 0xFF, 1)        # sets R/W again: one byte
    high = ((frame + 0x20 * PAGE) | LEAF | nx) >> 32
    emit.part(at(table, 20) + 4, high, 4)                    # not present: no change yet
    emit.part(at(table, 20), ((frame + 0x20 * PAGE) | LEAF) & 0xFFFFFFFF, 4)
    emit.bit("btr", at(table, 2), 0)
    emit.logic("or", at(table, 3), PWT_PCD)
    # Split the large page into a table of the same frames, change one, merge back.
    split = pool.take()
    large = model.read(at(directory_a, large_index), model.entry_size)
    place(split, (root,), large_index * span2, 1)
    emit.fill(split, 0)
    emit.series(at(split, 0), (large & ~PS & ~(span2 - 1) & ((1 << 52) - 1)) | LEAF, 512, PAGE)
    emit.entry(at(directory_a, large_index), _pointer(mode_name, 2, split), "xchg")
    model.linked.add(split)
    which = cycle % 512
    emit.bit("btr", at(split, which), 1)
    emit.entry(at(directory_a, large_index), large, "mov")
    model.linked.discard(split)
    # Free the PT, then use both pages as data: no exit.
    emit.entry(at(directory_a, slot), 0, "xchg")
    model.linked.discard(table)
    emit.fill(table, 0x5A5A5A5A5A5A5A5A)
    emit.fill(split, 0xA5A5A5A5A5A5A5A5)
    pool.give_back(table)
    pool.give_back(split)
    # Swap the page directory for another and back; write the unlinked one meanwhile.
    emit.entry(at(upper, upper_index), _pointer(mode_name, 3, directory_b),
               "xchg" if level4 else "mov")
    model.linked -= {directory_a, model.read(at(directory_a, 0), model.entry_size) & ~0xFFF}
    model.linked |= {directory_b, table_b}
    emit.entry(at(table_b, 4 + cycle % 4), (0x31000000 + cycle * PAGE) | LEAF, "mov")
    emit.entry(at(directory_a, DIRECTORY_ENTRY_WRITTEN_UNLINKED), (0x40000000 + cycle * span2) % (1 << 32) | LEAF | PS,
               "mov")                                         # unlinked: no exit
    emit.entry(at(upper, upper_index), _pointer(mode_name, 3, directory_a),
               "cmpxchg" if level4 else "mov")
    model.linked -= {directory_b, table_b}
    model.linked |= {directory_a, model.read(at(directory_a, 0), model.entry_size) & ~0xFFF}
    emit.entry(at(directory_a, DIRECTORY_ENTRY_WRITTEN_UNLINKED), 0, "mov")
    # Link and unlink a PDPT under the PML4 (a 1 GiB page at 512 GiB).
    if root_pdpt_c is not None:
        space, pdpt_c = root_pdpt_c
        emit.entry(at(space, 1), _pointer(mode_name, 4, pdpt_c), "cmpxchg")
        model.linked.add(pdpt_c)
        model.probe_entry(at(pdpt_c, 0))
        emit.entry(at(space, 1), 0, "mov")
        model.linked.discard(pdpt_c)
    # A kernel PT both processes share, and a PT of the running hierarchy.
    emit.entry(at(table_k, cycle % 4), (0x51000000 + cycle * PAGE) | LEAF, "xchg")
    window = window_pts[cycle % len(window_pts)]
    emit.entry(at(window, 8 + cycle % 64), (0x71000000 + cycle * PAGE) | LEAF, "mov")

