"""A destination that is not canonical: the CPU raises #GP(0) (#SS(0) for a
stack-segment reference) before any access (SDM vol. 1, 3.3.7.1; vol. 3,
6.15), so no EPT exit can come from it; a crafted event gets `FAULT` with
that fault and changes nothing.

Canonical with N-bit linear addresses (48 under 4-level paging, 57 under
5-level): bits 63..N-1 all equal."""

from __future__ import annotations

import pytest

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.status import Status
from ptemu.vcpu import Vcpu

MOV_RDI = bytes.fromhex("48 89 07")        # mov [rdi], rax (DS)
MOV_RSP = bytes.fromhex("48 89 04 24")     # mov [rsp], rax (SS)


def _deliver(paging: str, code: bytes, address: int, base: str = "rdi"):
    memory = InMemoryGuestMemory([(0x5000, bytes(range(256)) * 16)])
    before = memory.copy()
    handler = PtWriteHandler(memory, paging)
    vcpu = Vcpu()
    event = WriteEvent(gpa=0x5000 | (address & 0xFFF), gla=address,
                       regs={"rip": 0x40_1000, base: address, "rax": 0x1234_5067},
                       code=code, code_bits=64)
    result = handler.handle_ept_write(vcpu, event)
    unchanged = memory == before and handler.pending() == () and not vcpu.pt_emu_buffer.valid
    return result, unchanged


@pytest.mark.parametrize(("paging", "address"), [
    ("4level", 0x0000_8000_0000_0008),     # bit 47 set, 63..48 clear
    ("4level", 0xFFFF_7FFF_FFFF_F008),     # bit 47 clear, 63..48 set
    ("4level", 0x0100_0000_0000_0008),     # a 57-bit address under 4-level paging
    ("5level", 0x0100_0000_0000_0008),     # bit 56 set, 63..57 clear
    ("5level", 0xFE00_0000_0000_0008),     # bit 56 clear, 63..57 set
])
def test_a_non_canonical_destination_faults_with_gp_and_changes_nothing(paging, address):
    result, unchanged = _deliver(paging, MOV_RDI, address)
    assert (result.status, result.fault) == (Status.FAULT, "#GP(0)"), result.reason
    assert "canonical" in result.reason
    assert unchanged and not result.regs and not result.writes


def test_a_non_canonical_stack_reference_faults_with_ss():
    result, unchanged = _deliver("4level", MOV_RSP, 0x0000_8000_0000_0008, base="rsp")
    assert (result.status, result.fault) == (Status.FAULT, "#SS(0)"), result.reason
    assert unchanged


def test_the_last_byte_counts_too():
    # 8 bytes from 0x7fff_ffff_fffc: the first four bytes are canonical, the
    # last four are not, so the store faults (the whole access must be canonical).
    result, unchanged = _deliver("4level", MOV_RDI, 0x0000_7FFF_FFFF_FFFC)
    assert (result.status, result.fault) == (Status.FAULT, "#GP(0)"), result.reason
    assert unchanged


@pytest.mark.parametrize(("paging", "address"), [
    ("4level", 0x0000_7FFF_FFFF_F008),     # highest canonical lower-half page
    ("4level", 0xFFFF_8000_0000_0008),     # lowest canonical upper-half page
    ("5level", 0x0000_8000_0000_0008),     # not canonical at 48 bits, canonical at 57
    ("5level", 0xFF00_0000_0000_0008),
])
def test_canonical_destinations_are_emulated(paging, address):
    result, _ = _deliver(paging, MOV_RDI, address)
    assert result.status is Status.EMULATED, result.reason
    assert result.writes[0].value == 0x1234_5067
