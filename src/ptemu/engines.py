"""Which engine emulates an instruction: the handler's one setting of that kind."""

from __future__ import annotations

from enum import StrEnum


class Engine(StrEnum):
    """The handler's emulation engine."""

    AUTO = "auto"
    """ptemu's pure-Python engine where it applies (MOV, STOS, XCHG, CMPXCHG,
    CMPXCHG8B, logic, bit-test and arithmetic forms), Unicorn for the rest.
    Both agree bit for bit on registers, flags and stores (tested)."""
    UNICORN = "unicorn"
    """Every instruction in Unicorn."""


DEFAULT_ENGINE = Engine.AUTO
ENGINES: tuple[str, ...] = tuple(engine.value for engine in Engine)
