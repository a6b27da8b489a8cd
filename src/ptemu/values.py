"""Address types, page arithmetic and hex parsing shared by every layer.

`Gpa` (guest-physical) and `Gla` (guest-linear) are distinct `NewType`s so that
the two address spaces are never mixed silently in typed code.
"""

from __future__ import annotations

from typing import NewType

from ptemu.errors import UsageError

Gpa = NewType("Gpa", int)
Gla = NewType("Gla", int)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_OFFSET_MASK = PAGE_SIZE - 1
U64_MASK = (1 << 64) - 1


def page_base(address: int) -> int:
    """The address of the 4 KiB page that holds `address`."""
    return address & ~PAGE_OFFSET_MASK


def page_offset(address: int) -> int:
    """The offset of `address` inside its 4 KiB page."""
    return address & PAGE_OFFSET_MASK


def mask_bits(bits: int) -> int:
    """A mask of the low `bits` bits, e.g. ``mask_bits(32) == 0xffffffff``."""
    return (1 << bits) - 1


def parse_int(value: object, what: str) -> int:
    """Read an integer given as a JSON number or a hex string such as ``"0x1f"``.

    Hex strings are how fixtures carry 64-bit values (JSON numbers above 2**53
    lose precision in many tools). Raises `UsageError` naming `what`.
    """
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected an integer or hex string, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{what}: negative value {value}")
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        if text.startswith("0x") and len(text) > 2:
            try:
                return int(text, 16)
            except ValueError:
                pass
        elif text.isdigit():
            return int(text)
        raise UsageError(f"{what}: not a hex integer: {value!r}")
    raise UsageError(f"{what}: expected an integer or hex string, got {type(value).__name__}")


def parse_hex_bytes(value: object, what: str) -> bytes:
    """Read bytes written as hex, spaces allowed: ``"89 48 04"`` or ``"894804"``."""
    if not isinstance(value, str):
        raise UsageError(f"{what}: expected a hex byte string, got {type(value).__name__}")
    text = "".join(value.split())
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{what}: not hex bytes: {value!r}") from None


def hex_int(value: int) -> str:
    """The hex spelling ptemu prints for addresses, values and registers."""
    return f"{value:#x}"
