"""The worked example of docs/monitor.md: a small 4-level trace with its page tables.

`example_fixture()` builds it; tests/monitor/data/monitor-example.json is this
document written out (a test keeps the two equal). Layout: CR3 = 0x1000 (PML4),
PDPT 0x2000, PD 0x3000, PT 0x4000; linear 0 maps 0x100000; PDE 1 maps a 2 MiB
page at 0x40000000; a PT at 0x5000, not yet linked, maps the same 512 frames.
"""

from __future__ import annotations

from pathlib import Path

P, RW, US, PS = 1, 2, 4, 128
TABLE = P | RW | US
DIRECT_MAP = 0xFFFF_8880_0000_0000
DATA_FILE = Path(__file__).parent / "data" / "monitor-example.json"


def _entry(gpa: int, value: int) -> dict[str, str]:
    return {"gpa": hex(gpa), "data": value.to_bytes(8, "little").hex()}


def _event(gpa: int, code: str, **regs: int) -> dict[str, object]:
    gla = DIRECT_MAP + gpa
    all_regs = {"rip": 0xFFFF_FFFF_8100_1000, "rdi": gla, "cr3": 0x1000, **regs}
    return {"gpa": hex(gpa), "gla": hex(gla), "code": code,
            "regs": {name: hex(value) for name, value in all_regs.items()}}


def example_fixture() -> dict[str, object]:
    """The trace as a fixture document."""
    memory = [_entry(0x1000, 0x2000 | TABLE), _entry(0x2000, 0x3000 | TABLE),
              _entry(0x3000, 0x4000 | TABLE), _entry(0x3008, 0x4000_0000 | PS | TABLE),
              _entry(0x4000, 0x10_0000 | TABLE)]
    memory += [_entry(0x5000 + 8 * i, (0x4000_0000 + i * 0x1000) | TABLE) for i in range(512)]
    events = [
        # 0: MOV qword [rdi], rax maps linear 0x1000 -> 0x200000.
        _event(0x4008, "48 89 07", rax=0x20_0000 | TABLE),
        # 1: LOCK AND qword [rdi], rax clears RW of the PTE that maps linear 0.
        _event(0x4000, "f0 48 21 07", rax=~RW & (1 << 64) - 1),
        # 2: XCHG [rdi], rax splits the 2 MiB page into the PT at 0x5000 (same frames).
        _event(0x3008, "48 87 07", rax=0x5000 | TABLE),
        # 3: MOV byte [rdi], al clears P of the PTE for linear 0x203000: a partial write.
        _event(0x5018, "88 07", rax=(0x4000_3000 | TABLE) & 0xFE),
        # 4: MOV qword [rdi], rax drops PDPTE 0: everything below 1 GiB goes.
        _event(0x2000, "48 89 07", rax=0),
    ]
    return {"ptemu_fixture": 1, "name": "monitor-example",
            "source": "hand-built for docs/monitor.md (tests/monitor/example_trace.py)",
            "paging": "4level", "code_bits": 64, "policy": "strict",
            "memory": memory, "events": events}
