"""Differential test: the handler against the host CPU itself.

Each case runs one instruction natively (tests/native/cpu_oracle.c, on this
x86-64 machine) with random operands against a user-space page, and through
the handler with the same registers over the same bytes. Stored bytes, every
general register, RIP and the flags the SDM defines must agree; the flags the
SDM leaves undefined (the family table's `undefined_flags`, which the handler
reports per event) are masked.

REP string instructions run natively until they fault at the end of the page
(the next page is unmapped): RCX/RDI/RSI and RIP are then exactly where the
handler must leave them when it cuts the REP at the page end.

Not run natively: 16-bit code and segment bases in 32-bit code (the native
helper cannot); those forms are covered by the independent-Unicorn
differential test and hand-derived tests.
"""

from __future__ import annotations

from cpu_oracle import Outcome, run_native
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.status import Status
from ptemu.vcpu import Vcpu

PAGE = 0x10000000        # the page-table page, same GLA and GPA for both runs
SOURCE = 0x10002000      # a MOVS source page
CODE = 0x20000000
FLAGS = 0xCD5
GPRS64 = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11")
GPRS32 = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi")

# Every family; the destination is [rdi] (rDI is set into the page).
FORMS64 = [
    # seed's set
    "48 89 37", "89 37", "66 89 37", "40 88 37", "88 27", "48 c7 07 67 50 34 92", "c6 07 80",
    "48 ab", "ab", "66 ab", "aa", "48 87 37", "87 37", "f0 48 0f b1 37", "0f b1 37",
    "f0 66 0f b1 37", "f0 0f b0 37", "f0 0f c7 0f", "f0 48 21 37", "48 09 37", "31 37",
    "f0 80 27 fd", "80 0f 02", "f0 48 0f ba 2f 01", "48 0f ba 37 3f", "f0 48 0f ba 3f 07",
    "48 0f ab 37", "f0 48 0f b3 37", "48 0f bb 37", "0f ab 37", "66 0f b3 37",
    # wider coverage
    "f0 48 0f c1 37", "0f c1 37", "f0 48 01 37", "48 29 37", "48 11 37", "48 19 37",
    "f0 48 ff 07", "48 ff 0f", "fe 07", "f0 48 f7 17", "48 f7 1f", "f6 1f", "48 0f c3 37",
    "f0 48 83 07 20", "48 81 2f 00 10 00 00", "80 17 01", "48 83 1f ff",
    "f3 48 ab", "f3 ab", "f3 66 ab", "f3 aa", "f3 48 a5", "f3 a4", "48 a5",
    "f0 48 0f c7 0f", "0f 11 37", "0f 29 37", "66 0f 7f 37", "f3 0f 7f 37", "66 0f e7 37",
    "66 0f d6 37", "66 48 0f 7e 37", "66 0f 7e 37", "f2 0f 11 37", "0f 13 37",
    "c5 fe 7f 37", "c5 fa 7f 37", "c5 fd 7f 37", "c5 fc 11 37",
    # MOV moffs (PAGE + 0x800): 64-bit address, 66, REX.W, REX.WR, 67 (32-bit address)
    "48 a3 00 08 00 10 00 00 00 00", "a3 00 08 00 10 00 00 00 00",
    "66 a3 02 08 00 10 00 00 00 00", "a2 07 08 00 10 00 00 00 00",
    "4c a3 00 08 00 10 00 00 00 00", "67 48 a3 00 08 00 10", "67 66 a3 06 08 00 10",
    # Classes of issue 11: LOCK NEG flags, REX.R on MOV imm, word BT*/CMPXCHG under F2/F3
    "f0 48 f7 1f", "f0 f6 1f", "4c c6 07 01", "4c c7 07 67 50 34 92", "66 f3 0f ba 2f 17",
    "f2 f0 66 0f b1 37", "f3 66 0f ab 37", "66 f3 f0 0f c1 37",
]
FORMS32 = [
    "89 37", "66 89 37", "88 37", "c7 07 67 50 34 12", "ab", "aa", "87 37", "f0 0f b1 37",
    "f0 0f c7 0f", "f0 21 37", "09 37", "31 37", "f0 80 27 fd", "f0 0f ba 2f 01", "0f ab 37",
    "0f b3 37", "0f bb 37", "f0 0f c1 37", "01 37", "f0 ff 07", "f7 1f", "19 37",
    "f3 ab", "f3 aa", "f3 a5", "0f c3 37", "0f 11 37", "66 0f d6 37",
    "a3 00 08 00 10", "66 a3 02 08 00 10", "a2 07 08 00 10", "f0 f7 1f", "f2 f0 66 0f b1 37",
    "66 f3 0f ba 2f 17",
]


def _identity_tables(memory: InMemoryGuestMemory, paging: str) -> int:
    """Page tables mapping SOURCE to itself, so the handler can find the MOVS source.
    Returns CR3. Tables live at 0x1000.. 0x5000, away from PAGE and SOURCE."""
    def put(address: int, value: int, size: int) -> None:
        memory.write(address, value.to_bytes(size, "little"))
    if paging == "4level":
        put(0x1000 + ((SOURCE >> 39) & 0x1FF) * 8, 0x2003, 8)
        put(0x2000 + ((SOURCE >> 30) & 0x1FF) * 8, 0x3003, 8)
        put(0x3000 + ((SOURCE >> 21) & 0x1FF) * 8, 0x4003, 8)
        put(0x4000 + ((SOURCE >> 12) & 0x1FF) * 8, SOURCE | 3, 8)
        return 0x1000
    put(0x1000 + ((SOURCE >> 30) & 0x3) * 8, 0x2001, 8)  # PAE PDPTE
    put(0x2000 + ((SOURCE >> 21) & 0x1FF) * 8, 0x3003, 8)
    put(0x3000 + ((SOURCE >> 12) & 0x1FF) * 8, SOURCE | 3, 8)
    return 0x1000


def _check(bits, form, values, offset, flags, page_bytes, source_bytes, vectors):
    code = bytes.fromhex(form.replace(" ", ""))
    names = GPRS64 if bits == 64 else GPRS32
    mask = (1 << bits) - 1
    regs = {name: value & mask for name, value in zip(names, values)}
    string = any(op in form.split() for op in ("ab", "aa", "a5", "a4")) and "0f" not in form
    regs["rdi"] = PAGE + offset
    if "a5" in form or "a4" in form:
        regs["rsi"] = SOURCE + offset
    if string and form.startswith("f3"):
        regs["rcx"] = regs["rcx"] % 700 + 1
    regs["rflags"] = 0x2 | (flags & 0x8D5) | (0x400 if flags & 0x1000 else 0)
    if "b1" in form or "b0" in form or "0f c7" in form:
        # Half of the compares should match: take the accumulator from memory.
        current = int.from_bytes(page_bytes[offset:offset + 16], "little")
        if values[0] & 1:
            regs["rax"] = current & mask
            regs["rdx"] = (current >> (64 if "48 0f c7" in form else 32)) & mask
            if bits == 64 and "48" not in form:
                # A narrow compare that matches must leave RAX's upper bits alone.
                regs["rax"] = (regs["rax"] & 0xFFFFFFFF) | (values[2] & ~0xFFFFFFFF & mask)
    if "0f ab" in form or "0f b3" in form or "0f bb" in form:
        regs["rsi"] = values[5] % 300 - 100  # bit-base: may address another entry
        regs["rsi"] &= mask
    vector_regs = {}
    if "c5" in form:
        vector_regs["ymm6"] = vectors
    elif "0f" in form and any(x in form for x in ("11", "29", "7f", "e7", "d6", "7e", "13")):
        vector_regs["xmm6"] = vectors & ((1 << 128) - 1)
    regs.update(vector_regs)

    native = run_native(code, regs, {PAGE: page_bytes, SOURCE: source_bytes}, rip=CODE,
                        bits=bits)
    memory = InMemoryGuestMemory([(PAGE, page_bytes), (SOURCE, source_bytes)])
    paging = "4level" if bits == 64 else "pae"
    cr3 = _identity_tables(memory, paging)
    handler = PtWriteHandler(memory, paging, coalesce=False)
    vcpu = Vcpu()
    vcpu.begin_exit()
    event_regs = {**regs, "rip": CODE, "cr3": cr3}
    if native.outcome is Outcome.FAULTED and (native.fault.trapno != 14 or not string):
        # The CPU raised #GP/#UD, or a store ran off the page (#PF on the unmapped
        # next page): the handler must not write either.
        gla = PAGE + offset
        result = handler.handle_ept_write(vcpu, WriteEvent(gla, gla, event_regs, code, bits))
        assert result.status is not Status.EMULATED
        assert memory.read(PAGE, 4096) == page_bytes
        event("cpu faulted, handler refused")
        return
    changed = [i for i in range(4096) if native.pages[PAGE][i] != page_bytes[i]]
    gla = PAGE + (changed[0] if changed else offset)
    if "0f ab" in form or "0f b3" in form or "0f bb" in form:
        operand = 8 if "48" in form else (2 if "66" in form else 4)
        bit = regs["rsi"] - (1 << bits) if regs["rsi"] >> (bits - 1) else regs["rsi"]
        gla = PAGE + offset + operand * (bit // (8 * operand))
        if not PAGE <= gla < PAGE + 4096:
            event("bit-base address off the page")
            return
    elif " a3 " in f" {form} " or " a2 " in f" {form} ":
        address_bytes = 4 if bits == 32 or "67" in form else 8
        gla = int.from_bytes(code[-address_bytes:], "little")  # the moffs
    elif string:
        gla = PAGE + offset  # the first store is at rDI (it may leave its bytes unchanged)
    result = handler.handle_ept_write(vcpu, WriteEvent(gla, gla, event_regs, code, bits))
    if native.outcome is Outcome.FAULTED:
        # A #PF: only the page-end of a REP string (or a read past the source).
        assert native.fault.trapno == 14 and string, native.fault
    assert result.status is Status.EMULATED, result.reason
    assert memory.read(PAGE, 4096) == native.pages[PAGE], form
    for name in names:
        ours = result.regs.get(name, regs[name])
        assert ours == native.regs[name], (form, name, hex(ours), hex(native.regs[name]))
    assert result.regs.get("rip", CODE) == native.regs["rip"], form
    defined = FLAGS & ~result.undefined_flags
    ours = result.regs.get("rflags", regs["rflags"])
    assert ours & defined == native.rflags & defined, (form, hex(ours), hex(native.rflags))
    event("compared" + (" (REP cut at the page end)" if native.outcome is Outcome.FAULTED
                        else ""))


values = st.lists(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 255)),
                  min_size=11, max_size=11)
offsets = st.integers(0, 0x1FF).map(lambda n: n * 8)
pages = st.binary(min_size=4096, max_size=4096)
small_pages = st.one_of(st.just(bytes(4096)), st.binary(min_size=64, max_size=64).map(
    lambda b: b * 64))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(form=st.sampled_from(FORMS64), values=values, offset=offsets,
       flags=st.integers(0, 0x1FFF), page=small_pages, source=small_pages,
       vectors=st.integers(0, 2**256 - 1))
def test_64bit_every_family_matches_the_host_cpu(oracle64, form, values, offset, flags, page,
                                                 source, vectors):
    _check(64, form, values, offset, flags, page, source, vectors)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(form=st.sampled_from(FORMS32), values=values, offset=offsets,
       flags=st.integers(0, 0x1FFF), page=small_pages, source=small_pages,
       vectors=st.integers(0, 2**128 - 1))
def test_32bit_every_family_matches_the_host_cpu(oracle32, form, values, offset, flags, page,
                                                 source, vectors):
    _check(32, form, values, offset, flags, page, source, vectors)
