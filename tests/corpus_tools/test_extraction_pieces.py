"""Pieces of the extraction that run without Debian's packages: argument
locations (SysV and i386 regparm(3), hand-derived), the bzImage payload and
its decompression, and the branch encodings the boot-time patcher writes
(SDM vol. 2: CALL E8 cd, JMP E9 cd, CALL/JMP r/m64 FF /2, FF /4)."""

from __future__ import annotations

import gzip
import lzma
import struct

import pytest
from ptemu_corpus.candidates import CANDIDATES, Candidate, Param, argument_locations
from ptemu_corpus.debian import FLAVOURS
from ptemu_corpus.errors import ExtractError
from ptemu_corpus.patching import _indirect_branch, _rel32
from ptemu_corpus.vmlinuz import bzimage_payload, decompress_payload

FLAVOUR = {f.name: f for f in FLAVOURS}
CANDIDATE = {c.name: c for c in CANDIDATES}


@pytest.mark.parametrize(("function", "flavour", "expected"), [
    # x86-64 SysV: integer arguments in rdi, rsi, rdx, rcx, r8, r9.
    ("ptep_set_access_flags", "amd64", ["rdi", "rsi", "rdx", "rcx", "r8"]),
    # regparm(3): eax, edx, ecx; the 8-byte PAE entry no longer fits, so it and
    # every later argument go on the stack above the return address.
    ("ptep_set_access_flags", "686-pae", ["eax", "edx", "ecx", "[esp+8]:[esp+4]", "[esp+12]"]),
    ("ptep_set_access_flags", "686", ["eax", "edx", "ecx", "[esp+4]", "[esp+8]"]),
    # An 8-byte value in two registers: low half in the first (edx), high in ecx.
    ("set_pte_vaddr", "686-pae", ["eax", "ecx:edx"]),
    ("set_pte_vaddr", "686", ["eax", "edx"]),
    ("pmd_set_huge", "686-pae", ["eax", "ecx:edx", "[esp+8]:[esp+4]"]),
    ("native_set_pte", "amd64", ["rdi", "rsi"]),
])
def test_argument_locations(function: str, flavour: str, expected: list[str]) -> None:
    assert argument_locations(CANDIDATE[function], FLAVOUR[flavour]) == expected


def test_a_pair_that_does_not_fit_closes_the_registers() -> None:
    # (ulong, ulong, 8-byte, ulong) on PAE: only ecx is left for the 8-byte
    # value, so it goes on the stack, and so does the last argument (ecx unused).
    odd = Candidate("odd", "", (Param("a", "ulong"), Param("b", "ulong"),
                                Param("c", "entry"), Param("d", "ulong")), "")
    assert argument_locations(odd, FLAVOUR["686-pae"]) == [
        "eax", "edx", "[esp+8]:[esp+4]", "[esp+12]"]


def _bzimage(payload: bytes, setup_sects: int = 3, payload_offset: int = 0x40) -> bytes:
    """A bzImage with boot protocol 2.15's header fields the extraction reads."""
    image = bytearray((setup_sects + 1) * 512 + payload_offset)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, payload_offset, len(payload))
    return bytes(image) + payload + b"\x00" * 16          # trailing bytes are not payload


@pytest.mark.parametrize(("kind", "compress"), [
    ("xz", lambda data: lzma.compress(data, format=lzma.FORMAT_XZ)),
    ("gzip", gzip.compress),
])
def test_bzimage_payload_decompresses_to_the_elf(kind: str, compress) -> None:  # type: ignore[no-untyped-def]
    vmlinux = b"\x7fELF" + bytes(range(256)) * 8
    payload = compress(vmlinux)
    assert bzimage_payload(_bzimage(payload)) == payload
    assert decompress_payload(payload) == (kind, vmlinux)


def test_setup_sects_zero_means_four() -> None:
    payload = lzma.compress(b"\x7fELF", format=lzma.FORMAT_XZ)
    image = bytearray(_bzimage(payload, setup_sects=4))
    image[0x1F1] = 0
    assert bzimage_payload(bytes(image)) == payload


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(ExtractError, match="unknown kernel compression"):
        decompress_payload(b"\x00\x01\x02\x03garbage")


def test_branch_encodings() -> None:
    # call rel32 from 0xffffffff81000000 to 0xffffffff81000100: disp = 0x100 - 5.
    assert _rel32(0xE8, 0xFFFFFFFF81000000, 0xFFFFFFFF81000100, (1 << 64) - 1) == \
        bytes.fromhex("e8fb000000")
    # jmp rel32 backwards in 32-bit code: 0xc1000100 -> 0xc1000000, disp = -0x105.
    assert _rel32(0xE9, 0xC1000100, 0xC1000000, 0xFFFFFFFF) == bytes.fromhex("e9fbfeffff")
    assert _indirect_branch("call", "rax") == bytes.fromhex("ffd0")      # FF /2, rm=000
    assert _indirect_branch("jmp", "r11") == bytes.fromhex("41ffe3")     # REX.B, FF /4
    assert _indirect_branch("call", "edi") == bytes.fromhex("ffd7")
