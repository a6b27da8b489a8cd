"""Prefix-combination differential fuzzing: every family under random prefixes.

Each example takes one base form of a family ptemu emulates and puts in front
of it a random sequence of legacy prefixes (66, 67, F2, F3, F0 and the six
segment overrides) and, in 64-bit code, a random REX byte (usually right
before the opcode, sometimes before a legacy prefix, where the CPU ignores
it). The same bytes then run

* on the host CPU (tests/native: 64- and 32-bit code), the oracle we trust;
* in a Unicorn set up here independently (16-bit code, which the native
  helper cannot run: real mode, segment bases = selector * 16);
* through the handler, once with each engine (``auto`` and ``unicorn``).

The rules, whatever the prefixes:

1. where the oracle raises an exception (#UD for LOCK on a non-RMW form or a
   register destination, #GP for a misaligned CMPXCHG16B...), the handler
   refuses (a status other than EMULATED) and changes no memory;
2. where the handler emulates, the oracle completed, and the memory, every
   general register, RIP and the flags the SDM defines are the oracle's.

A refusal where the CPU succeeds is allowed (ptemu may refuse what it does not
emulate); `test_common_prefix_combinations_are_emulated` checks that the usual
combinations are emulated, so that the fuzzing cannot pass by refusing.

The expected destination (the faulting GLA given to the handler) is computed
here from the SDM, not by ptemu: operand size from REX.W and 66 (F2/F3 never
change it), address size from 67 and the code size, bit-base addressing for
BT* with a register offset, the segment base of FS/GS (in 64-bit code the
others have none).

Known Unicorn 2.1 discrepancies with the CPU (SDM and host), accounted for
where the independent Unicorn is the oracle (16-bit code only):

* LOCK NEG computes SF and PF from the operand instead of the result: the
  expected SF/PF are taken from the result in memory (the host-CPU cases check
  the handler's flags without this correction);
* LOCK on instructions that cannot be locked runs instead of raising #UD: a
  handler refusal is accepted there (the CPU would fault).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import unicorn
from cpu_oracle import MIN_ADDRESS, Outcome, get_oracle
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from unicorn import x86_const as ux

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.status import Status
from ptemu.vcpu import Vcpu

PAGE = 0x8000 if MIN_ADDRESS <= 0x8000 else 0x1000_0000
"""The written page. Below 64 KiB when Linux lets us map there, so that 16-bit
addresses (67 in 32-bit code) reach it on the host CPU too."""
SEGMENT_SHIFT = 0x2000
"""FS/GS base in 64-bit and 16-bit code: a segment-overridden store lands 8 KiB up."""
SOURCE = PAGE + 0x4000
"""MOVS source (and SOURCE + SEGMENT_SHIFT under an FS/GS override)."""
CODE = 0x2000_0000
CODE16 = 0x10000
FLAGS = 0xCD5
LEGACY = (0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)
GPRS64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
GPRS32 = GPRS64[:8]
AF, PF, SF, OF = 0x10, 0x4, 0x80, 0x800
BT_UNDEFINED = OF | SF | AF | PF


@dataclass(frozen=True)
class Form:
    """A base form: its bytes after the prefixes, with placeholders.

    ``I8`` an imm8, ``IZ`` an immediate of the operand size (at most 4
    bytes), ``MO`` a moffs address of the address size. The memory operand is
    [rDI] (ModRM rm=7; [BX] under 16-bit addressing) unless ``moffs``.
    """

    hex: str
    byte: bool = False
    undefined: int = 0
    string: bool = False
    bit_register: bool = False
    moffs: bool = False
    vector: bool = False
    compare: bool = False


FORMS = [
    Form("89 37"), Form("88 37", byte=True), Form("c7 07 IZ"), Form("c6 07 I8", byte=True),
    Form("a3 MO", moffs=True), Form("a2 MO", byte=True, moffs=True),
    Form("ab", string=True), Form("aa", byte=True, string=True),
    Form("a5", string=True), Form("a4", byte=True, string=True),
    Form("87 37"), Form("86 37", byte=True),
    Form("0f b1 37", compare=True), Form("0f b0 37", byte=True, compare=True),
    Form("0f c7 0f", compare=True),
    Form("21 37", undefined=AF), Form("09 37", undefined=AF), Form("31 37", undefined=AF),
    Form("80 27 I8", byte=True, undefined=AF), Form("83 0f I8", undefined=AF),
    Form("81 37 IZ", undefined=AF),
    Form("0f ab 37", undefined=BT_UNDEFINED, bit_register=True),
    Form("0f b3 37", undefined=BT_UNDEFINED, bit_register=True),
    Form("0f bb 37", undefined=BT_UNDEFINED, bit_register=True),
    Form("0f ba 2f I8", undefined=BT_UNDEFINED), Form("0f ba 37 I8", undefined=BT_UNDEFINED),
    Form("0f ba 3f I8", undefined=BT_UNDEFINED),
    Form("01 37"), Form("29 37"), Form("11 37"), Form("19 37"), Form("0f c1 37"),
    Form("0f c0 37", byte=True), Form("83 07 I8"), Form("f7 1f"), Form("f6 1f", byte=True),
    Form("ff 07"), Form("fe 0f", byte=True), Form("f7 17"), Form("f6 17", byte=True),
    Form("0f c3 37"), Form("0f 11 37", vector=True), Form("0f 29 37", vector=True),
    Form("0f 7f 37", vector=True), Form("0f d6 37", vector=True),
]


@dataclass(frozen=True)
class Case:
    code: bytes
    form: Form
    bits: int
    operand: int
    """Operand size in bytes per the SDM (REX.W, 66, code size; 1 for byte forms)."""
    address: int
    """Address size in bits (67 and the code size)."""
    segment: int | None
    """The last segment override byte, if any."""
    rex: int


def _sizes(bits: int, prefixes: bytes, rex: int, form: Form) -> tuple[int, int]:
    """Operand bytes and address bits, from the SDM (vol. 1, 3.6; vol. 2, 2.2.1.2)."""
    if form.byte:
        operand = 1
    elif rex & 8:
        operand = 8
    else:
        sixteen = (bits == 16) != (0x66 in prefixes)
        operand = 2 if sixteen else 4
    toggled = 0x67 in prefixes
    address = {64: 32 if toggled else 64, 32: 16 if toggled else 32,
               16: 32 if toggled else 16}[bits]
    return operand, address


@st.composite
def cases(draw: st.DrawFn, bits: int, segments: tuple[int, ...]) -> Case:
    form = draw(st.sampled_from(FORMS))
    pool = tuple(p for p in LEGACY if p not in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)
                 or p in segments)
    # Each kind of prefix about half the time (so that pairs such as 66 with F3
    # are frequent), in a random order, sometimes with repeats or a second
    # segment override.
    chosen = [p for p, wanted in zip(
        (0x66, 0x67, draw(st.sampled_from((0xF2, 0xF3))), 0xF0,
         draw(st.sampled_from(segments or (0x66,)))),
        draw(st.lists(st.booleans(), min_size=5, max_size=5))) if wanted]
    chosen += draw(st.lists(st.sampled_from(pool), max_size=2))
    prefixes = bytes(draw(st.permutations(chosen)))
    rex = 0
    rex_byte = b""
    code_prefixes = prefixes
    if bits == 64 and draw(st.booleans()):
        rex_byte = bytes([draw(st.integers(0x40, 0x4F))])
        if prefixes and draw(st.integers(0, 4)) == 0:
            # REX before a legacy prefix: not a REX prefix of this instruction.
            cut = draw(st.integers(0, len(prefixes) - 1))
            code_prefixes = prefixes[:cut] + rex_byte + prefixes[cut:]
        else:
            code_prefixes = prefixes + rex_byte
            rex = rex_byte[0]
    operand, address = _sizes(bits, prefixes, rex, form)
    body = bytearray()
    for token in form.hex.split():
        if token == "I8":
            body.append(draw(st.integers(0, 255)))
        elif token == "IZ":
            body += draw(st.integers(0, 2**(8 * min(operand, 4)) - 1)).to_bytes(
                min(operand, 4), "little")
        elif token == "MO":
            offset = draw(st.integers(0, 0x1FF)) * 8
            body += (PAGE + offset).to_bytes(address // 8, "little")
        else:
            body.append(int(token, 16))
    # The last override counts; in 64-bit code ES/CS/SS/DS overrides are null
    # prefixes (SDM vol. 1, 3.3.7.1), so an FS/GS override counts whatever follows.
    counted = (0x64, 0x65) if bits == 64 else (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)
    overrides = [p for p in prefixes if p in counted]
    return Case(code_prefixes + bytes(body), form, bits, operand, address,
                overrides[-1] if overrides else None, rex)


def _segment_base(case: Case) -> int:
    """FS/GS carry SEGMENT_SHIFT; so does CS in 16-bit code (real mode, code
    at CODE16 = CS * 16); every other segment has base 0."""
    if case.segment in (0x64, 0x65):
        return SEGMENT_SHIFT
    if case.segment == 0x2E and case.bits == 16:
        return CODE16
    return 0


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _destination(case: Case, regs: dict[str, int]) -> int:
    """The linear address of the first byte written, from the SDM."""
    mask = (1 << case.address) - 1
    if case.form.moffs:
        width = case.address // 8
        moffs = int.from_bytes(case.code[-width:], "little")
        return moffs + _segment_base(case)
    base = "rdi" if case.form.string or case.address != 16 else "rbx"
    if case.bits == 64 and case.rex & 1 and not case.form.string:
        base = "r15"
    offset = regs[base]
    if case.form.bit_register:
        bit_register = "r14" if case.rex & 4 else "rsi"
        bits = 8 * case.operand
        offset += case.operand * (_signed(regs[bit_register], bits) // bits)
    offset &= mask
    return offset if case.form.string else offset + _segment_base(case)


def _tables(memory: InMemoryGuestMemory, bits: int) -> int:
    """Identity page tables for the low 2 MiB (so the handler finds a MOVS
    source); they live at 0x1000..0x4fff, under PAGE."""
    def put(address: int, value: int) -> None:
        memory.write(address, value.to_bytes(8, "little"))
    if bits == 64:
        put(0x1000, 0x2003)
        put(0x2000, 0x3003)
        put(0x3000, 0x4003)
    else:
        put(0x1000, 0x3001)  # PAE PDPTE 0 -> the page directory at 0x3000
        put(0x3000, 0x4003)
    for page in range(PAGE, PAGE + 0x8000, 0x1000):
        put(0x4000 + (page >> 12) * 8, page | 3)
    return 0x1000


def _registers(case: Case, values: list[int], offset: int, flags: int,
               page: bytes) -> dict[str, int]:
    names = GPRS64 if case.bits == 64 else GPRS32
    width = 64 if case.bits == 64 else 32
    regs = {name: value & ((1 << width) - 1) for name, value in zip(names, values)}
    regs["rsp"] = PAGE + 0x7000  # unused; kept mapped-looking for the engines
    for name in ("rdi", "rbx", "r15"):
        if name in regs:
            regs[name] = PAGE + offset
    regs["rsi"] = SOURCE + offset if case.form.string else regs["rsi"]
    if case.form.bit_register:
        regs["rsi"] = (values[6] % 200 - 80) & ((1 << width) - 1)
        if "r14" in regs:
            regs["r14"] = regs["rsi"]
    if case.form.string:
        regs["rcx"] = values[1] % 4 + 1
    if case.form.compare and values[0] & 1:
        current = int.from_bytes(page[offset:offset + 16], "little")
        regs["rax"] = current & ((1 << width) - 1)
        regs["rdx"] = (current >> (64 if case.rex & 8 else 32)) & ((1 << width) - 1)
    regs["rflags"] = 0x2 | (flags & 0x8D5) | (0x400 if flags & 0x1000 else 0)
    return regs


def _handler_runs(case: Case, regs: dict[str, int], pages: dict[int, bytes], gla: int,
                  rip: int, segment_bases: dict[str, int]):
    """The handler's result and memory afterwards, once per engine."""
    for engine in ("auto", "unicorn"):
        memory = InMemoryGuestMemory(list(pages.items()))
        cr3 = _tables(memory, case.bits)
        handler = PtWriteHandler(memory, "4level" if case.bits == 64 else "pae",
                                 coalesce=False, engine=engine)
        vcpu = Vcpu()
        vcpu.begin_exit()
        event_regs = {**regs, **segment_bases, "rip": rip, "cr3": cr3}
        result = handler.handle_ept_write(vcpu, WriteEvent(gla, gla, event_regs, case.code,
                                                           case.bits))
        yield engine, result, memory


def _compare(case: Case, regs: dict[str, int], names: tuple[str, ...], pages: dict[int, bytes],
             gla: int, rip: int, segment_bases: dict[str, int], oracle_faulted: bool,
             oracle_pages: dict[int, bytes], oracle_regs: dict[str, int],
             oracle_flags: int) -> None:
    for engine, result, memory in _handler_runs(case, regs, pages, gla, rip, segment_bases):
        label = (engine, case.code.hex(" "), case.bits)
        if oracle_faulted:
            assert result.status is not Status.EMULATED, label
            for address, contents in pages.items():
                assert memory.read(address, len(contents)) == contents, label
            event("oracle faulted, handler refused")
            continue
        if result.status is not Status.EMULATED:
            event(f"handler refused: {result.status.value}")
            continue
        for address, contents in oracle_pages.items():
            assert memory.read(address, len(contents)) == contents, label
        for name in names:
            ours = result.regs.get(name, regs[name])
            assert ours == oracle_regs[name], (*label, name, hex(ours), hex(oracle_regs[name]))
        assert result.regs.get("rip", rip) == oracle_regs["rip"], label
        defined = FLAGS & ~case.form.undefined
        ours = result.regs.get("rflags", regs["rflags"])
        assert ours & defined == oracle_flags & defined, (*label, hex(ours), hex(oracle_flags))
        event("compared")


def _page_contents(fill: bytes) -> bytes:
    return (fill * (4096 // len(fill)))[:4096]


def _native_case(bits: int, case: Case, values: list[int], offset: int, flags: int,
                 fill: bytes, vector: int) -> None:
    oracle = get_oracle(bits)
    page = _page_contents(fill)
    regs = _registers(case, values, offset, flags, page)
    if case.form.vector:
        regs["xmm6"] = vector
        if bits == 64:
            regs["xmm14"] = vector ^ ((1 << 128) - 1)
    segment_bases = {}
    if bits == 64:
        segment_bases = {"fs_base": SEGMENT_SHIFT, "gs_base": SEGMENT_SHIFT}
    pages = {address: page for address in
             (PAGE, PAGE + SEGMENT_SHIFT, SOURCE, SOURCE + SEGMENT_SHIFT)}
    gla = _destination(case, regs)
    if not PAGE <= gla < PAGE + SEGMENT_SHIFT + 0x1000 or (gla & 0xFFF) > 0xFF0:
        event("destination off the pages")
        return
    native = oracle.run(case.code, {**regs, **segment_bases}, pages, rip=CODE)
    names = GPRS64 if bits == 64 else GPRS32
    faulted = native.outcome is not Outcome.COMPLETED
    if faulted and case.form.string and native.fault is not None and \
            native.fault.trapno == 14:
        event("string left the pages")
        return
    _compare(case, regs, names, pages, gla, CODE, segment_bases, faulted, native.pages,
             native.regs, native.rflags)


values = st.lists(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 255)),
                  min_size=16, max_size=16)
offsets = st.integers(0x10, 0x1F0).map(lambda n: n * 8)
fills = st.one_of(st.just(b"\0"), st.binary(min_size=16, max_size=16))
SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(case=cases(64, (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)), values=values, offset=offsets,
       flags=st.integers(0, 0x1FFF), fill=fills, vector=st.integers(0, 2**128 - 1))
def test_64bit_prefix_combinations_match_the_host_cpu(oracle64, case, values, offset, flags,
                                                      fill, vector):
    if not oracle64.capabilities.fsgsbase and case.segment in (0x64, 0x65):
        event("FS/GS override without FSGSBASE in the kernel: bases cannot be set natively")
        return
    _native_case(64, case, values, offset, flags, fill, vector)


@SETTINGS
@given(case=cases(32, (0x26, 0x2E, 0x36, 0x3E)), values=values, offset=offsets,
       flags=st.integers(0, 0x1FFF), fill=fills, vector=st.integers(0, 2**128 - 1))
def test_32bit_prefix_combinations_match_the_host_cpu(oracle32, case, values, offset, flags,
                                                      fill, vector):
    # FS/GS overrides are left out: 32-bit Linux gives GS a TLS base the helper
    # cannot set (segment bases in 32-bit code are covered by the Unicorn cases).
    if case.address == 16 and PAGE >= 0x10000:
        event("16-bit addresses need a page under 64 KiB, and vm.mmap_min_addr forbids it")
        return
    _native_case(32, case, values, offset, flags, fill, vector)


# -- 16- and 32-bit code: an independent Unicorn ------------------------------------------

_REAL_SELECTORS = {"es": 0, "cs": CODE16 >> 4, "ss": 0, "ds": 0,
                   "fs": SEGMENT_SHIFT >> 4, "gs": SEGMENT_SHIFT >> 4}


def _unicorn(case: Case, regs: dict[str, int], pages: dict[int, bytes]):
    """Run the case in a plain Unicorn: 16-bit code in real mode (segment base =
    selector * 16, code at CS:0 = CODE16), 32-bit code flat (every base 0, code
    at CODE16). Returns None when it raises an exception."""
    mode = unicorn.UC_MODE_16 if case.bits == 16 else unicorn.UC_MODE_32
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
    uc.mem_map(0, 0x20000)
    uc.mem_write(CODE16, case.code)
    for address, contents in pages.items():
        uc.mem_write(address, contents)
    for name in GPRS32:
        uc.reg_write(getattr(ux, f"UC_X86_REG_E{name[1:].upper()}"), regs[name])
    if case.bits == 16:
        for name, selector in _REAL_SELECTORS.items():
            uc.reg_write(getattr(ux, f"UC_X86_REG_{name.upper()}"), selector)
    uc.reg_write(ux.UC_X86_REG_EFLAGS, regs["rflags"])
    begin = 0 if case.bits == 16 else CODE16
    try:
        # Until the next instruction (a linear address): REP runs to its end.
        uc.emu_start(begin, CODE16 + len(case.code))
    except unicorn.UcError:
        return None
    after = {name: uc.reg_read(getattr(ux, f"UC_X86_REG_E{name[1:].upper()}"))
             for name in GPRS32}
    after["rip"] = uc.reg_read(ux.UC_X86_REG_EIP)
    flags = uc.reg_read(ux.UC_X86_REG_EFLAGS) & FLAGS
    return after, flags, {address: bytes(uc.mem_read(address, 0x1000)) for address in pages}


def _unicorn_case(case: Case, values: list[int], offset: int, flags: int, fill: bytes) -> None:
    if case.form.vector:
        event("vector forms: host-CPU cases only")
        return
    page = _page_contents(fill)
    regs = _registers(case, values, offset, flags, page)
    if case.bits == 16 and (case.address == 32 or case.form.string):
        for name in ("rdi", "rbx", "rsi"):
            regs[name] &= 0xFFFF  # real mode: offsets past 64 KiB raise #GP there
    pages = {address: page for address in
             (PAGE, PAGE + SEGMENT_SHIFT, SOURCE, SOURCE + SEGMENT_SHIFT)}
    gla = _destination(case, regs)
    if not PAGE <= gla < PAGE + SEGMENT_SHIFT + 0x1000 or (gla & 0xFFF) > 0xFF0:
        event("destination off the pages")
        return
    ran = _unicorn(case, regs, pages)
    bases = {}
    rip = CODE16
    if case.bits == 16:
        bases = {f"{name}_base": selector << 4 for name, selector in _REAL_SELECTORS.items()}
        rip = 0
    if ran is None:
        _compare(case, regs, GPRS32, pages, gla, rip, bases, True, {}, {}, 0)
        return
    after, oracle_flags, oracle_pages = ran
    body = case.code.lstrip(bytes(LEGACY))
    lock = 0xF0 in case.code[:len(case.code) - len(body)]
    if lock and body[:1] in (b"\xf7", b"\xf6") and (body[1] >> 3) & 7 == 3:
        # Unicorn's LOCK NEG erratum: SF and PF from the result, as the CPU sets them.
        result = int.from_bytes(oracle_pages[gla & ~0xFFF][gla & 0xFFF:(gla & 0xFFF)
                                                            + case.operand], "little")
        oracle_flags &= ~(SF | PF)
        if result >> (8 * case.operand - 1):
            oracle_flags |= SF
        if not (result & 0xFF).bit_count() & 1:
            oracle_flags |= PF
    _compare(case, regs, GPRS32, pages, gla, rip, bases, False, oracle_pages, after,
             oracle_flags)


@SETTINGS
@given(case=cases(16, (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)), values=values, offset=offsets,
       flags=st.integers(0, 0x1FFF), fill=fills)
def test_16bit_prefix_combinations_match_independent_unicorn(case, values, offset, flags, fill):
    _unicorn_case(case, values, offset, flags, fill)


@SETTINGS
@given(case=cases(32, (0x26, 0x2E, 0x36, 0x3E)), values=values, offset=offsets,
       flags=st.integers(0, 0x1FFF), fill=fills)
def test_32bit_prefix_combinations_match_independent_unicorn(case, values, offset, flags, fill):
    # Flat segments (FS/GS overrides with bases: tests/handler/test_moffs.py and
    # test_addressing.py); runs where the 32-bit native helper cannot be built.
    _unicorn_case(case, values, offset, flags, fill)


COMMON = [
    (64, "f2 f0 48", "0f b1 37"),    # XACQUIRE LOCK CMPXCHG (Linux on TSX hosts)
    (64, "f3 f0", "0f c1 37"),       # XRELEASE LOCK XADD
    (64, "66 f3", "0f ba 2f 07"),    # a word BTS under F3
    (64, "f0 66", "0f ab 37"),
    (64, "65 48", "89 37"),          # GS-relative store
    (64, "64 26 48", "89 37"),       # FS counts over a later null override
    (64, "67 48", "89 37"),          # 32-bit address in 64-bit code
    (64, "4c", "c6 07 01"),          # REX.R on a /0 store
    (64, "f0", "f7 1f"),             # LOCK NEG
    (64, "48", "a3 80 80 00 00 00 00 00 00"),
    (64, "67 66", "a3 80 80 00 00"),
    (32, "f2 f0", "0f b1 37"), (32, "67 66", "89 37"), (32, "66", "a3 80 80 00 00"),
    (32, "67", "a3 80 80"), (16, "f3", "0f ba 2f 07"), (16, "67 66", "a3 80 80 00 00"),
    (16, "", "a3 80 80"), (16, "f0", "f6 1f"),
]


def _form(body: str) -> Form:
    for form in FORMS:
        fixed = form.hex.split(" I")[0].split(" MO")[0]
        if body == fixed or (body.startswith(fixed + " ") and form.hex != fixed):
            return form
    raise AssertionError(f"no form for {body}")


@pytest.mark.parametrize(("bits", "prefixes", "body"), COMMON)
def test_common_prefix_combinations_are_emulated(bits, prefixes, body):
    """The fuzzing's rule 2 holds only where the handler emulates: these usual
    combinations must be emulated (by both engines), so that it cannot pass by
    refusing them."""
    form = _form(body)
    raw_prefixes = bytes.fromhex(prefixes.replace(" ", ""))
    rex = raw_prefixes[-1] if bits == 64 and raw_prefixes and raw_prefixes[-1] >> 4 == 4 else 0
    operand, address = _sizes(bits, raw_prefixes, rex, form)
    overrides = [p for p in raw_prefixes if p in ((0x64, 0x65) if bits == 64 else LEGACY[5:])]
    case = Case(raw_prefixes + bytes.fromhex(body.replace(" ", "")), form, bits, operand,
                address, overrides[-1] if overrides else None, rex)
    regs = _registers(case, [0x1234_5678_9ABC_DEF0] * 16, 0x80, 0x2, bytes(4096))
    bases = {"fs_base": SEGMENT_SHIFT, "gs_base": SEGMENT_SHIFT}
    gla = _destination(case, regs)
    pages = {PAGE: bytes(4096), PAGE + SEGMENT_SHIFT: bytes(4096)}
    for engine, result, _ in _handler_runs(case, regs, pages, gla, 0x1000, bases):
        assert result.status is Status.EMULATED, (engine, prefixes, body, result.reason)
