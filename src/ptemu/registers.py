"""The register vocabulary of events: names, widths and defaults.

Registers travel as a plain ``dict[str, int]`` keyed by these lower-case
names (the fixture format's names). `validate_registers` is the one place that
rejects an unknown name, so a typo raises instead of silently reading zero.
"""

from __future__ import annotations

from collections.abc import Mapping

from ptemu.errors import UsageError

GENERAL_REGISTERS: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
SELECTORS: tuple[str, ...] = ("cs", "ds", "es", "fs", "gs", "ss")
SEGMENT_BASES: tuple[str, ...] = tuple(f"{s}_base" for s in SELECTORS)
CONTROL_REGISTERS: tuple[str, ...] = ("cr0", "cr3", "cr4", "efer")
XMM_REGISTERS: tuple[str, ...] = tuple(f"xmm{i}" for i in range(16))
YMM_REGISTERS: tuple[str, ...] = tuple(f"ymm{i}" for i in range(16))

REGISTER_WIDTH_BITS: dict[str, int] = {
    **{name: 64 for name in GENERAL_REGISTERS},
    "rip": 64,
    "rflags": 64,
    **{name: 16 for name in SELECTORS},
    **{name: 64 for name in SEGMENT_BASES},
    **{name: 64 for name in CONTROL_REGISTERS},
    **{name: 128 for name in XMM_REGISTERS},
    **{name: 256 for name in YMM_REGISTERS},
}
"""Every register name an event may carry, with its width in bits."""

REGISTER_NAMES: frozenset[str] = frozenset(REGISTER_WIDTH_BITS)

RFLAGS_RESERVED_ONE = 0x2
"""Bit 1 of RFLAGS always reads as 1 (SDM vol. 1, 3.4.3)."""

REGISTER_DEFAULTS: dict[str, int] = {"rflags": RFLAGS_RESERVED_ONE}
"""Values of registers an event leaves out (every other one is 0)."""


def validate_registers(registers: Mapping[str, int], *, require_rip: bool = True) -> dict[str, int]:
    """Check names and ranges; return a new dict. Raises `UsageError`.

    A ``ymmN`` and its ``xmmN`` given together must agree on the low 128 bits.
    """
    out: dict[str, int] = {}
    for name, value in registers.items():
        width = REGISTER_WIDTH_BITS.get(name)
        if width is None:
            raise UsageError(f"unknown register name {name!r}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"register {name}: expected an int, got {type(value).__name__}")
        if value < 0 or value >> width:
            raise UsageError(f"register {name}: value {value:#x} does not fit in {width} bits")
        out[name] = value
    if require_rip and "rip" not in out:
        raise UsageError("registers: 'rip' is required")
    for name, ymm in out.items():
        if name.startswith("ymm"):
            xmm = out.get("x" + name[1:])
            if xmm is not None and ymm & ((1 << 128) - 1) != xmm:
                raise UsageError(f"registers: {'x' + name[1:]} and the low half of {name} differ")
    return out


def register_value(registers: Mapping[str, int], name: str) -> int:
    """The value of `name` in an event's registers, applying the defaults."""
    value = registers.get(name)
    if value is not None:
        return value
    if name.startswith("xmm"):
        return registers.get("y" + name[1:], 0) & ((1 << 128) - 1)
    return REGISTER_DEFAULTS.get(name, 0)
