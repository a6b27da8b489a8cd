"""Shared helpers for the fast-path tests: decode hex with Capstone."""

from __future__ import annotations

from ptemu.decoder.capstone_adapter import CapstoneDecoder, DecodeRefusal
from ptemu.decoder.model import DecodedStore

DECODER = CapstoneDecoder()


def decode(code_hex: str, code_bits: int = 64) -> DecodedStore:
    """The `DecodedStore` of `code_hex` (spaces allowed); fails the test on a refusal."""
    decoded = DECODER.decode(code_bits, bytes.fromhex(code_hex.replace(" ", "")))
    assert not isinstance(decoded, DecodeRefusal), (code_hex, decoded.reason)
    return decoded
