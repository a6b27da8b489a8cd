"""Argument types every subcommand shares: one rule for numbers on the command line.

ptemu never guesses a base. Addresses and values (a CR3, a GLA, a GPA, an
entry) are hex and must be written with ``0x``; counts (iterations, pages,
vCPUs, a paging level, a physical-address width) are decimal ASCII digits.
Anything else is refused with one line naming the option, and echoed values
are escaped and cut (`ptemu.values.shown`).

The functions here are ``type=`` callables for argparse: they raise
`argparse.ArgumentTypeError`, which the dispatcher prints as
``ptemu SUBCOMMAND: OPTION: message`` with exit status 2.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from ptemu.errors import UsageError
from ptemu.values import MAX_NUMBER_CHARS, parse_count_arg, parse_hex_arg, shown

_DECIMAL_FRACTION = re.compile(r"[0-9]+(\.[0-9]+)?")


def hex_number(bits: int = 64) -> Callable[[str], int]:
    """An argparse type: ``0x`` and hex digits, fitting in `bits` bits."""

    def parse(text: str) -> int:
        try:
            return parse_hex_arg(text, "", bits=bits)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(": ")) from None

    parse.__name__ = "hex number"
    return parse


def count(minimum: int, maximum: int) -> Callable[[str], int]:
    """An argparse type: a decimal count in ``minimum..maximum``."""

    def parse(text: str) -> int:
        try:
            return parse_count_arg(text, "", minimum=minimum, maximum=maximum)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(": ")) from None

    parse.__name__ = "count"
    return parse


def seconds(maximum: float) -> Callable[[str], float]:
    """An argparse type: a decimal duration in seconds (``2``, ``0.5``), above 0."""

    def parse(text: str) -> float:
        if len(text) > MAX_NUMBER_CHARS or not _DECIMAL_FRACTION.fullmatch(text):
            raise argparse.ArgumentTypeError(
                f"{shown(text)} is not a number of seconds: write decimal digits 0-9, "
                "with one '.' at most (e.g. 2.5)")
        value = float(text)
        if not (0 < value <= maximum and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text} is not in (0, {maximum:g}] seconds")
        return value

    parse.__name__ = "seconds"
    return parse
