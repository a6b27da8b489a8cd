"""Differential test: `emulate_fast` against the Unicorn path, bit for bit.

Each example draws one guest state (every general register, RFLAGS with any
bits set, RIP, the destination's bytes, where in the page it sits) and runs
every handled form of that code size on it twice: through
`ptemu.emulator.UnicornEmulator` on a copy of the page that holds the
destination, and through `emulate_fast` on the destination's bytes. The bytes
stored and the changed registers, RFLAGS whole (no flag is masked, undefined
ones included), must be equal.

One difference is expected and checked as such: a 32-bit CMPXCHG in 64-bit
code whose compare succeeds. The SDM leaves RAX alone (the fast path does);
Unicorn 2.1 zero-extends EAX into RAX anyway (unicorn-engine/unicorn#2332).
"""

from __future__ import annotations

from typing import Any

from fastpath_helpers import decode
from hypothesis import given, settings
from hypothesis import strategies as st

from ptemu.decoder.model import DecodedStore, destination_address
from ptemu.emulator import UnicornEmulator
from ptemu.fastpath import emulate_fast
from ptemu.registers import GENERAL_REGISTERS
from ptemu.values import PAGE_SIZE, page_base

PAGE = 0x7FFF_8000_0000  # the linear page the destination lies in (64-bit addressing)
PAGE32 = 0x4000_0000  # with 32-bit addressing; DS and ES base in 16/32-bit code

# Every form the fast path handles; the memory operand is [rdi] / [edi] / [di].
FORMS64 = [
    # MOV and MOVNTI
    "48 89 37", "89 37", "66 89 37", "88 37", "40 88 37", "88 27", "44 88 07", "4c 89 07",
    "48 c7 07 67 50 34 92", "c7 07 67 50 34 12", "66 c7 07 34 82", "c6 07 80", "67 89 37",
    "48 0f c3 37", "0f c3 37", "67 48 0f c3 37",
    # STOS (no REP), 64- and 32-bit addressing
    "aa", "66 ab", "ab", "48 ab", "67 48 ab", "67 aa",
    # XCHG, both written orders
    "48 87 37", "87 37", "66 87 37", "86 37", "86 27", "f0 87 37", "48 87 3f", "4c 87 07",
    # CMPXCHG, CMPXCHG8B
    "f0 48 0f b1 37", "0f b1 37", "f0 0f b1 37", "66 0f b1 37", "0f b0 37", "0f b0 07",
    "f0 0f b0 27", "f0 48 0f b1 07", "f0 0f c7 0f", "0f c7 0f",
    # AND / OR / XOR
    "f0 48 21 37", "48 09 37", "31 37", "66 21 37", "08 37", "f0 80 27 fd", "80 0f 02",
    "48 83 37 ff", "48 81 27 ff ff ff 7f", "66 81 0f 34 12", "f0 30 27",
    # BTS / BTR / BTC, immediate and register bit offsets
    "f0 48 0f ba 2f 01", "48 0f ba 37 3f", "f0 48 0f ba 3f 07", "0f ba 2f 25",
    "66 0f ba 37 13", "48 0f ba 2f c1", "48 0f ab 37", "f0 48 0f b3 37", "48 0f bb 37",
    "0f ab 37", "66 0f b3 37", "f0 0f bb 37",
    # ADD / SUB / ADC / SBB / XADD
    "f0 48 0f c1 37", "0f c0 37", "66 0f c1 37", "0f c1 37", "f0 48 01 37", "48 29 37",
    "48 11 37", "48 19 37", "00 37", "66 19 37", "f0 48 83 07 20", "83 2f 80", "80 17 ff",
    "80 1f 01", "11 37", "f0 19 37",
    # INC / DEC / NOT / NEG
    "f0 48 ff 07", "48 ff 0f", "fe 07", "66 ff 0f", "ff 07", "f0 fe 0f",
    "f0 48 f7 17", "48 f7 1f", "f6 17", "66 f7 1f", "f7 1f", "f6 1f",
    # Unicorn 2.1 errata the engine module corrects (`ptemu.emulator.engine_code`): LOCK NEG
    # (SF/PF from the operand), REX.R on MOV m, imm (#UD in Unicorn).
    "f0 48 f7 1f", "f0 f7 1f", "f0 66 f7 1f", "f0 f6 1f", "f0 4c f7 1f",
    "4c c6 07 80", "44 c7 07 67 50 34 92", "4c c7 07 67 50 34 92",
    # Operand size from the prefixes, not Capstone (F2/F3 change nothing).
    "66 f3 0f ba 2f 17", "f2 f0 66 0f b1 37", "f3 66 0f ab 37", "66 f3 f0 0f c1 37",
    # MOV moffs: 64-bit address, 67 (32-bit address), 66 and REX.W.
    "48 a3 00 08 00 80 ff 7f 00 00", "a2 07 08 00 80 ff 7f 00 00", "66 a3 02 08 00 80 ff 7f 00 00",
    "a3 04 08 00 80 ff 7f 00 00", "67 48 a3 00 08 00 40", "67 66 a3 02 08 00 40",
]
FORMS32 = [
    "89 37", "66 89 37", "88 37", "88 27", "c7 07 67 50 34 12", "66 c7 07 34 82", "c6 07 80",
    "67 89 35", "0f c3 37",
    "aa", "66 ab", "ab", "67 ab", "67 aa",
    "87 37", "66 87 37", "86 37", "86 27", "f0 87 37", "87 3f",
    "f0 0f b1 37", "0f b1 37", "66 0f b1 37", "0f b0 37", "0f b0 07", "f0 0f b0 27",
    "f0 0f c7 0f", "0f c7 0f", "67 f0 0f c7 0d",
    "f0 21 37", "09 37", "31 37", "66 21 37", "08 37", "f0 80 27 fd", "83 37 ff",
    "f0 0f ba 2f 01", "0f ba 37 3f", "66 0f ba 3f 13", "0f ab 37", "f0 0f b3 37",
    "0f bb 37", "66 0f ab 37",
    "f0 0f c1 37", "0f c0 37", "66 0f c1 37", "01 37", "29 37", "11 37", "f0 19 37", "00 37",
    "83 07 80", "80 17 ff", "80 1f 01",
    "f0 ff 07", "ff 0f", "fe 07", "66 ff 0f", "f7 17", "f7 1f", "f6 1f", "66 f7 17",
    "f0 f7 1f", "f0 66 f7 1f", "f0 f6 1f", "66 f3 0f ba 2f 17", "f2 f0 66 0f b1 37",
    # MOV moffs: the offset counts from DS base (PAGE32); 67: a 2-byte offset.
    "a3 00 08 00 00", "66 a3 02 08 00 00", "a2 07 08 00 00", "67 a3 04 08", "67 66 a3 06 08",
]
FORMS16 = [
    "89 35", "66 89 35", "88 35", "88 25", "c7 05 34 12", "66 c7 05 67 50 34 12", "c6 05 80",
    "67 89 37", "0f c3 35",  # not "66 0f c3 35": MOVNTI is NP 0F C3, 66 is #UD (refused)
    "aa", "ab", "66 ab", "67 ab", "67 66 ab",
    "87 35", "66 87 35", "86 25", "f0 87 35",
    "f0 0f b1 35", "66 0f b1 35", "0f b0 35", "0f b0 25", "f0 0f c7 0d",
    "21 35", "66 09 35", "31 35", "80 25 fd", "83 35 ff",
    "0f ba 2d 01", "66 0f ba 35 1f", "0f ab 35", "66 0f b3 35", "f0 0f bb 35",
    "0f c1 35", "66 0f c1 35", "01 35", "29 35", "11 35", "19 35", "83 05 80",
    "ff 05", "66 ff 0d", "f7 15", "f7 1d", "f6 1d",
    "f0 f7 1d", "f0 66 f7 1d", "f0 f6 1d", "f3 0f ba 2d 17", "f2 f0 0f b1 35",
    "a3 00 08", "66 a3 04 08", "a2 07 08", "67 a3 00 08 00 00", "67 66 a3 04 08 00 00",
]
BIT_OFFSET_FORMS = {"0f ab", "0f b3", "0f bb"}

_emulator = UnicornEmulator()
_stores: dict[tuple[int, str], DecodedStore] = {}


def _store(code_bits: int, form: str) -> DecodedStore:
    key = (code_bits, form)
    if key not in _stores:
        _stores[key] = decode(form, code_bits)
    return _stores[key]


def _default(name: str) -> int:
    return 0x2 if name == "rflags" else 0


register_values = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(0, 0x200),
    st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
                     0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1, 0xFFFFFFFF_00000000]),
)
states = st.fixed_dictionaries({
    "gprs": st.lists(register_values, min_size=16, max_size=16),
    "rflags": st.one_of(st.integers(0, 0x3FFFFF), st.sampled_from([0x2, 0x8D7, 0x402, 0xCD7])),
    "offset": st.integers(0x10, 0xFE0),
    "entry": st.one_of(st.binary(min_size=16, max_size=16),
                       st.sampled_from([bytes(16), b"\xff" * 16,
                                        bytes.fromhex("67503412000000800000000000000080")])),
    "match": st.booleans(),
    "bit_offset": st.integers(-0x4000, 0x4000),
    "high": st.integers(0, 2**64 - 1),
    "rip": st.integers(0, 2**64 - 1),  # the low bits place the code (see _check_all)
    "missing": st.sets(st.sampled_from(["rax", "rsi", "rflags", "rdx"]), max_size=2),
})


def _registers(code_bits: int, store: DecodedStore, form: str, state: dict[str, Any],
               code_address: int) -> dict[str, int]:
    regs = dict(zip(GENERAL_REGISTERS, state["gprs"]))
    regs["rflags"] = state["rflags"]
    high = state["high"]
    offset = state["offset"] & ~(store.access_size - 1)
    if code_bits == 64:
        regs["rip"] = 0xFFFFFFFF_81000000 | (code_address & 0xFFFFFF)
        if store.destination.address_bits == 64:
            regs["rdi"] = PAGE + offset
        else:
            regs["rdi"] = (high & ~0xFFFFFFFF) | (PAGE32 + offset)
    else:
        # The caller's RIP may carry high bits; the engine keeps the low 32 (or, in
        # 16-bit code, any IP below 128 KiB: the code segment's limit is 4 GiB).
        low = code_address & (0x1FFFF if code_bits == 16 else 0xFFFFFF)
        low = low or 0x100  # the Unicorn path cannot start at RIP 0 (UC_ERR_EXCEPTION)
        regs["rip"] = (high & ~0xFFFFFFFF) | low
        regs["ds_base"] = regs["es_base"] = PAGE32
        address_mask = (1 << store.destination.address_bits) - 1
        regs["rdi"] = (high & ~address_mask) | offset
    if any(form.endswith(f"{opcode} {modrm}") for opcode in BIT_OFFSET_FORMS
           for modrm in ("37", "35")):
        bits = 8 * store.access_size
        regs["rsi"] = (high & ~((1 << bits) - 1)) | (state["bit_offset"] & ((1 << bits) - 1))
    name = store.mnemonic.split()[-1]
    if state["match"] and name == "cmpxchg":
        # Half the compares succeed: the accumulator's low bytes hold the destination's.
        size_mask = (1 << (8 * store.access_size)) - 1
        regs["rax"] = (regs["rax"] & ~size_mask) | (
            int.from_bytes(state["entry"][:store.access_size], "little"))
    if state["match"] and name == "cmpxchg8b":
        regs["rax"] = (regs["rax"] & ~0xFFFFFFFF) | int.from_bytes(state["entry"][:4], "little")
        regs["rdx"] = (regs["rdx"] & ~0xFFFFFFFF) | int.from_bytes(state["entry"][4:8], "little")
    for name in state["missing"]:
        regs.pop(name, None)
    return regs


def _check(code_bits: int, form: str, state: dict[str, Any], code_address: int) -> bool:
    """Run one form both ways; False when the destination falls outside the page."""
    store = _store(code_bits, form)
    regs = _registers(code_bits, store, form, state, code_address)
    page_linear = PAGE if store.destination.address_bits == 64 else PAGE32
    rip = regs["rip"] & ((1 << 64) - 1 if code_bits == 64 else 0xFFFFFFFF)
    address = destination_address(store, regs, rip)
    size = store.access_size
    if page_base(address) != page_linear or page_base(address + size - 1) != page_linear:
        return False  # a bit offset that addresses another page
    at = address - page_linear
    page = bytearray(PAGE_SIZE)
    page[at:at + size] = state["entry"][:size]
    destination = bytes(page[at:at + size])

    code = bytes.fromhex(form.replace(" ", ""))
    run = _emulator.run(code_bits=code_bits, registers=regs, code=code,
                        data_pages=[(page_linear, bytes(page))])
    assert run.fault is None and run.refusal is None, (form, run.fault, run.refusal)
    fast = emulate_fast(store, regs, destination)
    assert fast is not None, form

    assert run.page[:at] == bytes(page[:at]) and run.page[at + size:] == bytes(
        page[at + size:]), form
    assert fast.stored == run.page[at:at + size], (form, fast.stored.hex(),
                                                   run.page[at:at + size].hex())
    expected = {name: value for name, value in run.registers.items()
                if value != regs.get(name, _default(name))}
    if code_bits == 64 and store.mnemonic.split()[-1] == "cmpxchg" and size == 4 and \
            run.registers["rflags"] & 0x40 and regs.get("rax", 0) >> 32:
        # unicorn-engine/unicorn#2332: Unicorn zero-extends EAX on a successful compare.
        assert expected.pop("rax") == regs["rax"] & 0xFFFFFFFF
    assert fast.registers == expected, (form, regs, fast.registers, expected)
    return True


def _check_all(code_bits: int, forms: list[str], batch: list[dict[str, Any]]) -> None:
    # Form by form over the batch, at one code address: the engine retranslates
    # whenever the code or its address changes (about 1 ms), while another run
    # of the same code costs about 50 us.
    code_address = batch[0]["rip"]
    for form in forms:
        checked = [_check(code_bits, form, state, code_address) for state in batch]
        if not any(form.endswith(f"{opcode} {modrm}") for opcode in BIT_OFFSET_FORMS
                   for modrm in ("37", "35")):
            assert all(checked), form  # only a bit offset may address another page


# 30 examples of 10 guest states each: every form runs on 300 states.
batches = st.lists(states, min_size=10, max_size=10)


@settings(max_examples=30, deadline=None)
@given(batch=batches)
def test_64bit_forms_match_unicorn(batch: list[dict[str, Any]]) -> None:
    _check_all(64, FORMS64, batch)


@settings(max_examples=30, deadline=None)
@given(batch=batches)
def test_32bit_forms_match_unicorn(batch: list[dict[str, Any]]) -> None:
    _check_all(32, FORMS32, batch)


@settings(max_examples=30, deadline=None)
@given(batch=batches)
def test_16bit_forms_match_unicorn(batch: list[dict[str, Any]]) -> None:
    _check_all(16, FORMS16, batch)


def test_every_form_decodes_to_the_family_it_tests() -> None:
    """The tables above cover every family the fast path handles, in each code size."""
    for code_bits, forms in ((64, FORMS64), (32, FORMS32), (16, FORMS16)):
        families = {_store(code_bits, form).family.name for form in forms}
        assert families == {"mov", "movnti", "stos", "xchg", "cmpxchg", "cmpxchg8b", "logic",
                            "bit-test", "arithmetic", "inc-dec", "not"}, code_bits
        names = {_store(code_bits, form).mnemonic.split()[-1] for form in forms}
        assert {"and", "or", "xor", "bts", "btr", "btc", "add", "sub", "adc", "sbb", "xadd",
                "inc", "dec", "not", "neg"} <= names, code_bits
