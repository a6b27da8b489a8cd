"""Address types, page arithmetic and hex parsing shared by every layer.

`Gpa` (guest-physical) and `Gla` (guest-linear) are distinct `NewType`s so that
the two address spaces are never mixed silently in typed code.
"""

from __future__ import annotations

import re
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
        raise UsageError(f"{what}: not a hex integer: {shown(value)}")
    raise UsageError(f"{what}: expected an integer or hex string, got {type(value).__name__}")


_WHITESPACE = re.compile(r"\s+")
"""Whitespace as `str.split` sees it (``re``'s ``\\s`` uses the same Unicode table)."""


def hex_to_bytes(text: str) -> bytes | None:
    """`text` as bytes (pairs of hex digits, whitespace anywhere), or None if it is not.

    `bytes.fromhex` reads the common spellings (``"894804"``, ``"89 48 04"``)
    without any intermediate copy; only when it refuses (whitespace inside a
    pair, or non-ASCII whitespace) is the whitespace removed, in one new
    string. Memory stays proportional to the text: never a list of its pieces.
    """
    try:
        return bytes.fromhex(text)
    except ValueError:
        pass
    try:
        return bytes.fromhex(_WHITESPACE.sub("", text))
    except ValueError:
        return None


def parse_hex_bytes(value: object, what: str) -> bytes:
    """Read bytes written as hex, spaces allowed: ``"89 48 04"`` or ``"894804"``."""
    if not isinstance(value, str):
        raise UsageError(f"{what}: expected a hex byte string, got {type(value).__name__}")
    data = hex_to_bytes(value)
    if data is None:
        raise UsageError(f"{what}: not hex bytes: {shown(value)}")
    return data


def hex_int(value: int) -> str:
    """The hex spelling ptemu prints for addresses, values and registers."""
    return f"{value:#x}"


# -- numbers and text on the command line ------------------------------------------

MAX_NUMBER_CHARS = 66
"""Longest number the command line reads: ``0x`` and 64 hex digits (leading
zeros included). Anything longer is refused before it is converted, so a
pasted megabyte of digits costs nothing."""

SHOWN_CHARS = 80
"""Longest echo of a user's value in an error message (then ``...``)."""

_HEX_ARG = re.compile(r"0[xX][0-9a-fA-F]+")
_DECIMAL_ARG = re.compile(r"[0-9]+")


def escaped(text: str) -> str:
    """`text` with every non-printable character written as an escape.

    Newlines, ANSI escape sequences and lone surrogates (a JSON ``"\\ud800"``
    or an undecodable file name) become ``\\n``, ``\\x1b``, ``\\ud800``, so a
    name taken from a file can neither forge lines nor crash the output.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` quoted for a one-line message: escaped, cut to `limit` characters."""
    out = escaped(text[:limit + 1])
    if len(text) > limit or len(out) > limit:
        out = out[:limit] + "..."
    return f"'{out}'"


def parse_hex_arg(text: str, what: str, *, bits: int = 64) -> int:
    """An address or value typed on the command line: ``0x`` and hex digits.

    ptemu never guesses a base: ``1000`` could be 0x1000 or 0x3e8, so a
    number without ``0x`` is refused, and so are non-ASCII digits
    (``'\u00b2'``, ``'\u0661'``), signs, spaces and underscores. Raises
    `UsageError` naming `what` (e.g. ``--cr3``); values appear in hex.
    """
    if len(text) > MAX_NUMBER_CHARS:
        raise UsageError(f"{what}: {shown(text)} is too long for a number "
                         f"({len(text)} characters; a 64-bit value needs at most 18)")
    if _HEX_ARG.fullmatch(text):
        value = int(text, 16)
        if value >> bits:
            raise UsageError(f"{what}: {text.lower()} does not fit in {bits} bits "
                             f"(at most {hex_int(mask_bits(bits))})")
        return value
    if _DECIMAL_ARG.fullmatch(text):
        decimal = int(text)
        raise UsageError(f"{what}: {shown(text)} has no 0x: ptemu reads addresses and values "
                         f"only as hex (write 0x{text} for hex, or {hex_int(decimal)} for "
                         f"decimal {text})")
    raise UsageError(f"{what}: {shown(text)} is not a hex number (write 0x and the digits "
                     "0-9, a-f, e.g. 0x1000)")


def parse_count_arg(text: str, what: str, *, minimum: int, maximum: int) -> int:
    """A count typed on the command line (iterations, vCPUs, a level): decimal.

    Only ASCII digits: ``0x10``, ``'\u00b2'``, ``'\u0661\u0662'``, ``1_000``, ``+5``
    and ``-1`` are refused with a message naming `what`; so is a value outside
    ``minimum..maximum`` (both inclusive).
    """
    if len(text) > MAX_NUMBER_CHARS:
        raise UsageError(f"{what}: {shown(text)} is too long for a number "
                         f"({len(text)} characters)")
    if not _DECIMAL_ARG.fullmatch(text):
        hint = " (counts are decimal, without 0x)" if _HEX_ARG.fullmatch(text) else ""
        raise UsageError(f"{what}: {shown(text)} is not a count: write decimal digits 0-9"
                         f"{hint}")
    value = int(text)
    if not minimum <= value <= maximum:
        raise UsageError(f"{what}: {value} is not in {minimum}..{maximum}")
    return value
