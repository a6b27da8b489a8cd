"""The walker against Unicorn's MMU on random page-table trees, all four modes.

Each example builds one translation path for a random linear address: at
every level the test picks a not-present entry, a reserved-bit entry, a table
pointer or (where the level allows one) a page, with random attribute bits,
and knows from that construction where the walk must stop or which physical
address it must reach. Three things are compared:

- the walker's result with the construction (stop reason, entries read, GPA);
- Unicorn with real paging (CR0.PG, CR4.PAE/PSE/LA57/SMEP/SMAP, EFER.LME/NXE)
  loading, storing and fetching at the address: it must load the marker the
  construction put at the GPA, or fault (#PF, #GP for non-canonical) exactly
  when the walker says the access is not allowed;
- for a reserved-bit stop, the same tree with the bit cleared: Unicorn must
  then translate, so the bit the walker calls reserved is what made the CPU
  fault.

MAXPHYADDR is 40 here, the width QEMU's TCG uses (see `paging_oracle`). The
reserved-bit lists below are read from the SDM tables by hand, not taken from
ptemu. PAE PDPTE bits 2:1 and 8:5 are left out: QEMU does not check them (a
real CPU raises #GP when CR3 loads them); `test_paging_entry` covers them.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from ptemu.memory import InMemoryGuestMemory
from ptemu.paging import StopReason, paging_mode, walk

pytest.importorskip("unicorn", reason="the walker oracle needs the unicorn package")

from paging_oracle import (
    PAGE,
    QEMU_MAXPHYADDR,
    SHAPES,
    SYSTEM_PAGES,
    SYSTEM_PHYS,
    Access,
    CpuState,
    Outcome,
    run_access,
    system_slot,
)

LINEAR_BITS = {"legacy": 32, "pae": 32, "4level": 48, "5level": 57}
LONG = ("4level", "5level")


def canonical(mode: str, linear: int) -> int:
    width = LINEAR_BITS[mode]
    linear &= (1 << width) - 1
    if mode in LONG and linear >> (width - 1):
        linear |= ((1 << 64) - 1) ^ ((1 << width) - 1)
    return linear


def may_map_page(mode: str, number: int, pse: bool) -> bool:
    """SDM: PTEs map 4 KiB; 32-bit PDEs 4 MiB with CR4.PSE; PAE PDEs 2 MiB;
    4-/5-level PDEs 2 MiB and PDPTEs 1 GiB."""
    if number == 1:
        return True
    if mode == "legacy":
        return number == 2 and pse
    if mode == "pae":
        return number == 2
    return number in (2, 3)


def reserved_bits(mode: str, number: int, shift: int, maps_large: bool,
                  nxe: bool) -> list[list[int]]:
    """Reserved bits with M = 40, read off SDM vol. 3A Tables 4-4..4-20, in groups
    (drawn group first, so that small groups are tried as often as big ones)."""
    if mode == "legacy":
        return [[21]] if maps_large else []               # Table 4-4: 21:(M-19)
    if mode == "pae" and number == 3:
        return [list(range(40, 64))]                      # Table 4-8: 63:M
    groups = [list(range(40, 63 if mode == "pae" else 52))]   # PAE 62:M, 4/5-level 51:M
    if not nxe:
        groups.append([63])                               # XD reserved when NXE=0
    if mode in LONG and number >= 4:
        groups.append([7])                                # PML4E/PML5E: PS must be 0
    if maps_large:
        groups.append(list(range(13, shift)))             # 2M: 20:13, 1G: 29:13
    return groups


def attribute_bits(mode: str, number: int, maps_page: bool, nxe: bool, pse: bool) -> list[int]:
    """Bits the test may set freely: flags, ignored bits, PK, XD (SDM Tables 4-4..4-20)."""
    if mode == "pae" and number == 3:
        return [3, 4, 9, 10, 11]                          # Table 4-8: PWT, PCD, ignored
    out = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    if maps_page:
        out.append(7 if number == 1 else 12)              # PAT
    elif mode == "legacy" and not pse:
        out.append(7)                                     # ignored without CR4.PSE
    if mode in LONG:
        out.extend(range(52, 63))                         # ignored / protection key
    if mode != "legacy" and nxe:
        out.append(63)
    return out


class Scenario:
    """One constructed translation path and what it must do."""

    def __init__(self, mode: str, state: CpuState, cr3: int, gla: int,
                 stop: StopReason | None = None) -> None:
        self.mode, self.state, self.cr3, self.gla, self.stop = mode, state, cr3, gla, stop
        self.pages: dict[int, bytearray] = {}
        self.entry_gpas: list[int] = []
        self.pa: int | None = None
        self.page_size: int | None = None
        self.marker = 0
        self.cleared: tuple[int, int] | None = None
        """(entry gpa, value without the reserved bit) for a reserved-bit stop."""

    def __repr__(self) -> str:
        entries = ", ".join(
            f"{gpa:#x}: {int.from_bytes(self.image()[gpa & ~(PAGE - 1)][gpa & (PAGE - 1):(gpa & (PAGE - 1)) + SHAPES[self.mode][0]], 'little'):#x}"
            for gpa in self.entry_gpas)
        return (f"Scenario({self.mode}, {self.state}, cr3={self.cr3:#x}, gla={self.gla:#x}, "
                f"entries={{{entries}}}, stop={self.stop}, pa={self.pa and hex(self.pa)}, "
                f"size={self.page_size}, marker={self.marker:#x}, cleared={self.cleared})")

    def put(self, gpa: int, value: int, size: int) -> None:
        page = self.pages.setdefault(gpa & ~(PAGE - 1), bytearray(PAGE))
        offset = gpa & (PAGE - 1)
        page[offset:offset + size] = value.to_bytes(size, "little")

    def image(self, patch: tuple[int, int] | None = None) -> dict[int, bytes]:
        out = {gpa: bytes(data) for gpa, data in self.pages.items()}
        if patch is not None:
            gpa, value = patch
            size = SHAPES[self.mode][0]
            page = bytearray(out[gpa & ~(PAGE - 1)])
            page[gpa & (PAGE - 1):(gpa & (PAGE - 1)) + size] = value.to_bytes(size, "little")
            out[gpa & ~(PAGE - 1)] = bytes(page)
        return out


@st.composite
def scenarios(draw: st.DrawFn, mode: str) -> Scenario:
    entry_size, shape = SHAPES[mode]
    width = 8 * entry_size
    nxe = draw(st.booleans())
    pse = draw(st.booleans()) if mode == "legacy" else True
    state = CpuState(mode, nxe=nxe, wp=draw(st.booleans()), pse=pse,
                     smep=draw(st.booleans()), smap=draw(st.booleans()))
    permissive = draw(st.booleans())     # RW=US=1 everywhere: reach user pages often
    align = 4 if mode in ("legacy", "pae") else 8
    # Physical pages: below 4 GiB for 32-bit entries and the PAE CR3, anywhere
    # below 2**40 otherwise.
    below_4g = (1 << 20) - 1
    page_limit = below_4g if mode == "legacy" else (1 << (QEMU_MAXPHYADDR - 12)) - 1
    used = {SYSTEM_PHYS + i * PAGE for i in range(SYSTEM_PAGES)}

    def new_page(limit: int = page_limit) -> int:
        page = draw(st.integers(0x100, limit)) << 12
        assume(page not in used)
        used.add(page)
        return page

    root = new_page(below_4g if mode == "pae" else page_limit)
    if mode == "pae":
        cr3 = root + 32 * draw(st.integers(0, 127)) + draw(st.integers(0, 31))
    else:
        cr3 = root | draw(st.integers(0, 0xFFF))          # PCD/PWT and ignored bits
    if mode in LONG and draw(st.integers(0, 9)) == 0:
        gla = canonical(mode, draw(st.integers(0, (1 << LINEAR_BITS[mode]) - 1)))
        gla = (gla ^ (1 << draw(st.integers(LINEAR_BITS[mode], 63)))) & ~(align - 1)
        scenario = Scenario(mode, state, cr3, gla, stop=StopReason.NON_CANONICAL)
        scenario.pages[root] = bytearray(PAGE)
        return scenario
    gla = canonical(mode, draw(st.integers(0, (1 << LINEAR_BITS[mode]) - 1))) & ~(align - 1)
    scenario = Scenario(mode, state, cr3, gla)
    scenario.pages[root] = bytearray(PAGE)
    table = (cr3 & ~0x1F) if mode == "pae" else root
    # Decide the shape first, so that every depth and page size is drawn often:
    # the level that maps the page, and where (if anywhere) the walk must stop.
    top = len(shape)
    leaf = draw(st.sampled_from([n for n in range(1, top + 1) if may_map_page(mode, n, pse)]))
    fault = draw(st.sampled_from([None, "absent", "reserved"]))
    fault_at = draw(st.integers(leaf, top))
    for depth, (shift, index_bits) in enumerate(shape):
        number = top - depth
        entry_gpa = table + ((gla >> shift) & ((1 << index_bits) - 1)) * entry_size
        scenario.entry_gpas.append(entry_gpa)
        maps_page = number == leaf
        if fault == "absent" and number == fault_at:
            scenario.put(entry_gpa, draw(st.integers(0, (1 << width) - 1)) & ~1, entry_size)
            scenario.stop = StopReason.NOT_PRESENT
            return scenario
        reserved_bit = None
        if fault == "reserved" and number == fault_at:
            groups = reserved_bits(mode, number, shift, maps_page and number > 1, nxe)
            if groups:
                group = draw(st.sampled_from(groups))
                # The ends of each range as often as the rest: they are where
                # off-by-one errors live.
                reserved_bit = draw(st.one_of(st.sampled_from([group[0], group[-1]]),
                                              st.sampled_from(group)))
        flags = draw(st.sets(st.sampled_from(attribute_bits(mode, number, maps_page, nxe, pse))))
        value = 1 | sum(1 << bit for bit in flags)
        if permissive and not (mode == "pae" and number == 3):
            value |= 0b110
        if not maps_page:
            table = new_page()
            value |= table
        else:
            size = 1 << shift
            frame_limit = 32 if (mode == "legacy" and number == 1) else QEMU_MAXPHYADDR
            frame = draw(st.integers(0, (1 << (frame_limit - shift)) - 1)) << shift
            if draw(st.booleans()):
                frame |= 1 << (frame_limit - 1)            # the top physical-address bit
            if number > 1:
                value |= 1 << 7                            # PS
            if mode == "legacy" and number == 2:           # Table 4-4, PSE-36
                value |= (frame & 0xFFC0_0000) | ((frame >> 32) << 13)
            else:
                value |= frame
            pa = frame + (gla & (size - 1))
            assume(pa & ~(PAGE - 1) not in used)
            scenario.pa, scenario.page_size = pa, size
            scenario.marker = draw(st.integers(1, (1 << (8 * align)) - 1))
            scenario.put(pa, scenario.marker, align)
        if reserved_bit is not None:
            scenario.put(entry_gpa, value | (1 << reserved_bit), entry_size)
            scenario.cleared = (entry_gpa, value)
            scenario.stop = StopReason.RESERVED_BIT
        else:
            scenario.put(entry_gpa, value, entry_size)
        if maps_page:
            break
    if scenario.cleared is not None:
        # The walk stops at the reserved entry; the rest of the path is there for
        # the cleared-bit check only. (A level without reserved bits for its kind,
        # such as a 32-bit PTE, simply translates.)
        scenario.entry_gpas = scenario.entry_gpas[:scenario.entry_gpas.index(scenario.cleared[0]) + 1]
    return scenario


def check(scenario: Scenario) -> None:
    mode = paging_mode(scenario.mode, QEMU_MAXPHYADDR)
    state = scenario.state
    assert system_slot(scenario.mode, scenario.gla) is not None
    image = scenario.image()
    memory = InMemoryGuestMemory(image.items())
    result = walk(mode, scenario.cr3, scenario.gla, memory, cr0_wp=state.wp, nxe=state.nxe,
                  pse=state.pse, smep=state.smep, smap=state.smap)

    event(f"stop={scenario.stop}, page={scenario.page_size}, steps={len(scenario.entry_gpas)}")
    # 1. The walker against the construction.
    assert result.stop == scenario.stop
    assert [step.entry_gpa for step in result.steps] == scenario.entry_gpas
    if scenario.stop is None:
        assert result.gpa == scenario.pa
        assert result.page_size == scenario.page_size
    else:
        assert result.gpa is None

    # 2. Unicorn: load, store and fetch at the address.
    read = run_access(state, image, scenario.cr3, scenario.gla, Access.READ)
    write = run_access(state, image, scenario.cr3, scenario.gla, Access.WRITE)
    # Fetch from "jmp $": QEMU 5.0 translates a whole block before running it, so
    # bytes after the first instruction could fault on the next page.
    fetch_image = dict(image)
    if scenario.pa is not None and scenario.stop is None:
        page = bytearray(fetch_image[scenario.pa & ~(PAGE - 1)])
        page[scenario.pa & (PAGE - 1):(scenario.pa & (PAGE - 1)) + 2] = b"\xeb\xfe"
        fetch_image[scenario.pa & ~(PAGE - 1)] = bytes(page)
    fetch = run_access(state, fetch_image, scenario.cr3, scenario.gla, Access.FETCH)
    if scenario.stop is StopReason.NON_CANONICAL:
        assert read.outcome is write.outcome is fetch.outcome is Outcome.GENERAL_PROTECTION
        return
    if result.permissions is None:
        for outcome in (read, write, fetch):
            assert outcome.outcome is Outcome.PAGE_FAULT, outcome
            assert outcome.cr2 == scenario.gla
    else:
        permissions = result.permissions
        event(f"read={read.outcome.value} write={write.outcome.value} "
              f"fetch={fetch.outcome.value}")
        for outcome, allowed in ((read, permissions.supervisor_read),
                                 (write, permissions.supervisor_write),
                                 (fetch, permissions.supervisor_execute)):
            expected = Outcome.OK if allowed else Outcome.PAGE_FAULT
            assert outcome.outcome is expected, (outcome, permissions)
        if permissions.supervisor_read:
            assert read.value == scenario.marker

    # 3. A reserved-bit stop is caused by that bit: without it the CPU translates.
    if scenario.cleared is not None:
        fixed = scenario.image(scenario.cleared)
        plain = CpuState(scenario.mode, nxe=state.nxe, wp=state.wp, pse=state.pse)
        again = run_access(plain, fixed, scenario.cr3, scenario.gla, Access.READ)
        assert again.outcome is Outcome.OK and again.value == scenario.marker
        redo = walk(mode, scenario.cr3, scenario.gla, InMemoryGuestMemory(fixed.items()),
                    nxe=state.nxe, pse=state.pse)
        assert redo.gpa == scenario.pa


ORACLE_SETTINGS = settings(max_examples=60, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("mode", ["legacy", "pae", "4level", "5level"])
@ORACLE_SETTINGS
@given(data=st.data())
def test_walk_matches_unicorn(mode: str, data: st.DataObject) -> None:
    check(data.draw(scenarios(mode)))


def test_unicorn_does_5level_paging() -> None:
    """LA57 is real in Unicorn 2.1: an address only 5-level paging can translate."""
    gla = 0x00AB_7FFF_1234_5678   # bits 63:48 are not a sign extension: #GP under 4-level
    pml5, pml4, pdpt, pd, pt, data = (0x10_0000 + i * PAGE for i in range(6))
    scenario = Scenario("5level", CpuState("5level"), pml5, gla)
    for table, next_table, shift in ((pml5, pml4, 48), (pml4, pdpt, 39), (pdpt, pd, 30),
                                     (pd, pt, 21), (pt, data, 12)):
        scenario.put(table + ((gla >> shift) & 511) * 8, next_table | 0x3, 8)
    scenario.put(data + (gla & 0xFFF), 0x0123_4567_89AB_CDEF, 8)
    read = run_access(scenario.state, scenario.image(), pml5, gla, Access.READ)
    assert read.outcome is Outcome.OK and read.value == 0x0123_4567_89AB_CDEF
    result = walk(paging_mode("5level"), pml5, gla, InMemoryGuestMemory(scenario.image().items()))
    assert result.gpa == data + 0x678


def _fixed_gla(mode: str) -> int:
    return {"legacy": 0xC034_5678, "pae": 0xC034_5678, "4level": 0xFFFF_8123_4567_89A8,
            "5level": 0xFF12_3456_789A_BCD8}[mode]


def _reserved_cases() -> list[tuple[str, int, int, int]]:
    """(mode, leaf level, level carrying the bit, bit): both ends of every reserved range
    of every level, for every page size, with IA32_EFER.NXE=0 so that bit 63 counts."""
    cases = []
    for mode, (_, shape) in SHAPES.items():
        top = len(shape)
        for leaf in (n for n in range(1, top + 1) if may_map_page(mode, n, True)):
            for number in range(leaf, top + 1):
                shift = shape[top - number][0]
                for group in reserved_bits(mode, number, shift, number == leaf and number > 1,
                                           nxe=False):
                    for bit in sorted({group[0], group[-1]}):
                        cases.append((mode, leaf, number, bit))
    return cases


def _path(mode: str, leaf: int, marked: int, bit: int) -> Scenario:
    """A fixed translation path with `bit` set in the entry at level `marked`."""
    entry_size, shape = SHAPES[mode]
    gla = _fixed_gla(mode)
    scenario = Scenario(mode, CpuState(mode, nxe=False), 0x10_0000, gla,
                        stop=StopReason.RESERVED_BIT)
    table = 0x10_0000
    scenario.pages[table] = bytearray(PAGE)
    for depth, (shift, index_bits) in enumerate(shape):
        number = len(shape) - depth
        entry_gpa = table + ((gla >> shift) & ((1 << index_bits) - 1)) * entry_size
        value = 0x1 if (mode == "pae" and number == 3) else 0x3
        if number == leaf:
            frame = 0x8000_0000 if mode == "legacy" and leaf == 1 else 0x80_0000_0000 >> 1
            frame &= ~((1 << shift) - 1)
            if number > 1:
                value |= 1 << 7
            if mode == "legacy" and number == 2:
                value |= (frame & 0xFFC0_0000) | ((frame >> 32) << 13)
            else:
                value |= frame
            scenario.pa, scenario.page_size = frame + (gla & ((1 << shift) - 1)), 1 << shift
            scenario.marker = 0x5A5A_5A5A
            scenario.put(scenario.pa, scenario.marker, 4)
        else:
            table = 0x10_0000 + (depth + 1) * PAGE
            value |= table
        if number == marked:
            scenario.cleared = (entry_gpa, value)
            value |= 1 << bit
            scenario.entry_gpas = []
        scenario.put(entry_gpa, value, entry_size)
        if number == leaf:
            break
    return scenario


@pytest.mark.parametrize(("mode", "leaf", "marked", "bit"), _reserved_cases())
def test_each_reserved_range_end_faults_in_unicorn(mode: str, leaf: int, marked: int,
                                                     bit: int) -> None:
    """Every reserved range the walker knows ends where the CPU's does."""
    scenario = _path(mode, leaf, marked, bit)
    assert scenario.cleared is not None
    result = walk(paging_mode(mode, QEMU_MAXPHYADDR), scenario.cr3, scenario.gla,
                  InMemoryGuestMemory(scenario.image().items()), nxe=False)
    assert result.stop is StopReason.RESERVED_BIT
    assert result.steps[-1].entry_gpa == scenario.cleared[0]
    faulted = run_access(scenario.state, scenario.image(), scenario.cr3, scenario.gla,
                         Access.READ)
    assert faulted.outcome is Outcome.PAGE_FAULT and faulted.cr2 == scenario.gla
    fixed = scenario.image(scenario.cleared)
    again = run_access(scenario.state, fixed, scenario.cr3, scenario.gla, Access.READ)
    assert again.outcome is Outcome.OK and again.value is not None
    assert again.value & 0xFFFF_FFFF == scenario.marker
    redo = walk(paging_mode(mode, QEMU_MAXPHYADDR), scenario.cr3, scenario.gla,
                InMemoryGuestMemory(fixed.items()), nxe=False)
    assert redo.gpa == scenario.pa
