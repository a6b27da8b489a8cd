"""Synthetic traces of 32-bit and 16-bit code under PAE and legacy paging: PAE
halves (coalesced or not), CMPXCHG8B, 16-bit addressing, duplicate delivery,
one snippet per instruction family and addressing form."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from .entries import NX, PCD, PWT, RW, US, A, D, P, Values
from .guest import Trace, guest, patch


def _le(value: int, size: int) -> str:
    """`value` as `size` little-endian bytes in hex (an immediate or moffs)."""
    return value.to_bytes(size, "little").hex(" ")


def synthetic_pae(rng: random.Random) -> Iterator[Trace]:
    paging = "pae"
    v = Values(paging, rng)

    def halves(value: int) -> dict[str, Any]:
        return {"rcx": value >> 32, "rdx": value & 0xFFFF_FFFF}

    g = guest("two-halves-high-then-low-coalesced", paging, 32, rng,
              "native_set_pte's order (high half, then low half): one coalesced event")
    g.entries = {i: v.pte() for i in range(6)}
    g.blob("set", "89 48 04 89 10 c3")           # mov [eax+4], ecx; mov [eax], edx
    for index in range(6):
        g.call("set", rax=g.entry(index), **halves(v.pte()))
    yield g.trace()

    g = guest("two-halves-low-then-high-coalesced", paging, 32, rng,
              "native_pte_clear's order (low half, then high half): one coalesced event")
    g.entries = {i: v.pte() for i in range(10, 14)}
    g.blob("set", "89 10 89 48 04 c3")           # mov [eax], edx; mov [eax+4], ecx
    g.blob("clear", "c7 00 00 00 00 00 c7 40 04 00 00 00 00 c3")
    for index in (10, 11):
        g.call("set", rax=g.entry(index), **halves(v.pte()))
    for index in (12, 13):
        g.call("clear", rax=g.entry(index))
    yield g.trace()

    g = guest("xchg-low-then-mov-high", paging, 32, rng,
              "native_ptep_get_and_clear's order: XCHG the low half, MOV the high half "
              "(coalesced: the XCHG's store is 4 of the entry's 8 bytes)")
    g.entries = {i: v.pte() for i in range(20, 23)}
    g.blob("gac", "87 10 89 48 04 c3")           # xchg [eax], edx; mov [eax+4], ecx
    for index in range(20, 23):
        g.call("gac", rax=g.entry(index), rcx=0, rdx=0)
    yield g.trace()

    g = guest("two-halves-in-separate-exits", paging, 32, rng,
              "an instruction between the halves: two events, partial then complete")
    g.entries = {i: v.pte() for i in range(30, 33)}
    g.blob("set", "89 48 04 8d 00 89 10 c3")     # mov [eax+4], ecx; lea eax,[eax]; mov [eax], edx
    for index in range(30, 33):
        g.call("set", rax=g.entry(index), **halves(v.pte()))
    yield g.trace()

    g = guest("cmpxchg8b-match-and-mismatch", paging, 32, rng,
              "LOCK CMPXCHG8B (set_64bit loop and single shots), match and mismatch")
    g.entries = {i: v.pte() for i in range(40, 44)}
    g.blob("loop", "8b 06 8b 56 04 f0 0f c7 0e 75 fa c3")   # load; 1: lock cmpxchg8b; jne 1b
    g.blob("once", "f0 0f c7 0e c3")
    new = v.pte("user-rw")
    g.call("loop", rsi=g.entry(40), rbx=new & 0xFFFF_FFFF, rcx=new >> 32)
    e41 = g.entries[41]
    g.call("once", rsi=g.entry(41), rax=e41 & 0xFFFF_FFFF, rdx=e41 >> 32, rbx=0, rcx=0)
    g.call("once", rsi=g.entry(42), rax=0xFFFF_FFFF, rdx=0, rbx=0x1234_5063, rcx=0)
    yield g.trace()

    g = guest("cmpxchg-one-half", paging, 32, rng,
              "LOCK CMPXCHG on one 4-byte half, match and mismatch")
    g.entries = {i: v.pte() for i in range(44, 46)}
    g.blob("c4", "f0 0f b1 08 c3")               # lock cmpxchg [eax], ecx
    g.blob("c4_hi", "f0 0f b1 48 04 c3")         # lock cmpxchg [eax+4], ecx
    low44 = g.entries[44] & 0xFFFF_FFFF
    g.call("c4", rax=g.entry(44), rcx=low44 & ~RW)
    g.call("c4", rax=g.entry(45), rcx=0)
    g.call("c4_hi", rax=g.entry(45), rcx=0)
    yield g.trace()

    g = guest("logic-and-bit-ops", paging, 32, rng,
              "AND/OR/XOR and BTS/BTR/BTC (imm and reg) on PAE entries")
    g.entries = {i: v.pte("user-rw") for i in range(50, 57)}
    g.blob("and", "f0 83 20 fd c3")              # lock and dword [eax], ~2
    g.blob("or", "80 08 20 c3")                  # or byte [eax], 0x20
    g.blob("xor_hi", "31 48 04 c3")              # xor [eax+4], ecx
    g.blob("bts_nx", "f0 0f ba 68 04 1f c3")     # lock bts dword [eax+4], 31
    g.blob("btr_rw", "f0 0f ba 30 01 c3")        # lock btr dword [eax], 1
    g.blob("btc_reg", "0f bb 10 c3")             # btc [eax], edx
    g.call("and", rax=g.entry(50))
    g.call("or", rax=g.entry(51))
    g.call("xor_hi", rax=g.entry(52), rcx=0x8000_0000)
    g.call("bts_nx", rax=g.entry(53))
    g.call("btr_rw", rax=g.entry(54))
    g.call("btc_reg", rax=g.entry(55), rdx=6)
    yield g.trace()

    g = guest("addressing-32bit-forms", paging, 32, rng,
              "SIB+disp8, disp32 alone, base+disp32, FS and GS overrides with non-zero bases")
    g.entries = {i: v.pte() for i in (4, 8, 9, 256, 300)}
    assert g.table_gla is not None
    fs_base = 0x0160_0000
    g.segments = {"fs_base": fs_base, "gs_base": g.table_gla}
    g.blob("sib", "89 4c f3 04 c3")              # mov [ebx+esi*8+4], ecx
    g.blob("abs", "89 0d " + g.entry(8).to_bytes(4, "little").hex(" ") + " c3")
    g.blob("base32", "89 8b 00 08 00 00 c3")     # mov [ebx+0x800], ecx
    g.blob("fs", "64 89 08 c3")                  # mov fs:[eax], ecx
    g.blob("gs", "65 89 0d 48 00 00 00 c3")      # mov gs:[0x48], ecx
    g.call("sib", rbx=g.entry(0), rsi=4, rcx=0x8000_0000)
    g.call("abs", rcx=v.pte() & 0xFFFF_FFFF)
    g.call("base32", rbx=g.entry(0), rcx=v.pte() & 0xFFFF_FFFF)
    g.call("fs", rax=g.entry(300) - fs_base, rcx=v.pte() & 0xFFFF_FFFF)
    g.call("gs", rcx=0)
    yield g.trace()

    g = guest("address-size-16bit-in-32bit-code", paging, 32, rng,
              "0x67 in 32-bit code: 16-bit addressing [bx+si] and [bx+si+disp8] with a "
              "DS base; coalesced halves")
    g.entries = {3: v.pte()}
    assert g.table_gla is not None
    g.segments = {"ds_base": g.table_gla - 0x4000}
    g.blob("set", "67 89 10 67 89 48 04 c3")     # mov [bx+si], edx; mov [bx+si+4], ecx
    new = v.pte()
    g.call("set", rbx=0x4000, rsi=0x18, rcx=new >> 32, rdx=new & 0xFFFF_FFFF)
    yield g.trace()

    g = guest("operand-size-16bit-stores", paging, 32, rng, "0x66: 2-byte stores in 32-bit code")
    g.entries = {i: v.pte() for i in (60, 61)}
    g.blob("w", "66 89 08 c3")                   # mov word [eax], cx
    g.blob("w_hi", "66 c7 40 06 00 80 c3")       # mov word [eax+6], 0x8000
    g.call("w", rax=g.entry(60), rcx=0x0163)
    g.call("w_hi", rax=g.entry(61))
    yield g.trace()

    for policy in ("hvmi", "strict"):
        g = guest(f"duplicate-delivery-{policy}", paging, 32, rng,
                  f"the same EPT exit delivered twice (as Xen can): policy {policy} reports "
                  "the second one as a duplicate", policy=policy)
        g.entries = {70: v.pte()}
        g.blob("hi", "89 48 04 c3")              # mov [eax+4], ecx
        g.blob("lo", "89 10 c3")                 # mov [eax], edx
        new = v.pte("kernel-rw")
        g.call("hi", rax=g.entry(70), rcx=new >> 32, twice=[0])
        g.call("lo", rax=g.entry(70), rdx=new & 0xFFFF_FFFF)
        yield g.trace()

    for policy in ("strict", "hvmi"):
        g = guest(f"lock-and-byte-{policy}", paging, 32, rng,
                  f"1-byte LOCK AND clearing RW of an 8-byte entry under policy {policy}",
                  policy=policy)
        g.entries = {80: v.pte("user-rw"), 81: v.pte("user-rw")}
        g.blob("wrprotect", "f0 80 20 fd c3")    # lock and byte [eax], 0xfd
        g.blob("set", "89 48 04 89 10 c3")
        g.call("wrprotect", rax=g.entry(80))
        new = v.pte("user-ro")
        g.call("set", rax=g.entry(80), rcx=new >> 32, rdx=new & 0xFFFF_FFFF)
        g.call("wrprotect", rax=g.entry(81))
        yield g.trace()

    g = guest("accessed-bit-set-by-cpu-between-events", paging, 32, rng,
              "the CPU sets A between the halves' event and a later BTR (memory patch)")
    g.entries = {90: 0}
    g.blob("set", "89 48 04 89 10 c3")
    g.blob("wrprotect", "f0 0f ba 30 01 c3")     # lock btr dword [eax], 1
    new = v.frame() | P | RW | US | NX
    g.call("set", rax=g.entry(90), rcx=new >> 32, rdx=new & 0xFFFF_FFFF)
    g.call("wrprotect", rax=g.entry(90), memory=[patch(g.entry_gpa(90), (new | A) & 0xFF, 1)])
    yield g.trace()

    g = guest("code16-addressing", paging, 16, rng,
              "16-bit code: [bx+si+disp8], [bp+di] (SS), [disp16], [si]; XCHG, CMPXCHG, "
              "CMPXCHG8B; coalesced 32-bit halves", code_base=0x0000_9000)
    g.entries = {i: v.pte() for i in range(8)}
    assert g.table_gla is not None
    base = g.table_gla - 0x4000
    g.segments = {"ds_base": base, "ss_base": base, "cs_base": 0}
    g.blob("bxsi", "66 89 40 04 c3")             # mov [bx+si+4], eax
    g.blob("bpdi", "66 89 03 c3")                # mov [bp+di], eax
    g.blob("direct", "66 89 0e 10 40 c3")        # mov [0x4010], ecx
    g.blob("xchg", "66 87 04 c3")                # xchg [si], eax
    g.blob("cmpxchg", "f0 66 0f b1 0c c3")       # lock cmpxchg [si], ecx
    g.blob("c8b", "f0 0f c7 0c c3")              # lock cmpxchg8b [si]
    g.blob("pair", "66 89 04 66 89 44 04 c3")    # mov [si], eax; mov [si+4], eax
    g.call("bxsi", rbx=0x4000, rsi=0x00, rax=0x8000_0000)
    g.call("bpdi", rbp=0x4000, rdi=0x08, rax=v.pte() & 0xFFFF_FFFF)
    g.call("direct", rcx=0x0123_4067)
    g.call("xchg", rsi=0x4018, rax=0)
    e4 = g.entries[4]
    g.call("cmpxchg", rsi=0x4020, rax=e4 & 0xFFFF_FFFF, rcx=(e4 & 0xFFFF_FFFF) | D)
    e5 = g.entries[5]
    g.call("c8b", rsi=0x4028, rax=e5 & 0xFFFF_FFFF, rdx=e5 >> 32, rbx=0, rcx=0)
    g.call("pair", rsi=0x4030, rax=0)
    yield g.trace()

    # MOV moffs last, with fixed addresses and values and no draw from `rng` (the
    # traces above keep their values). The expected stores are worked out by hand
    # in tests/corpus_tools/test_moffs_traces.py.
    fs_base = 0xF000_0000
    g = guest("mov-moffs", paging, 32, rng,
              "MOV moffs (A2/A3) in 32-bit code: 4, 2 and 1 bytes, and an FS override whose "
              "base + offset wraps at 4 GiB", table_gpa=0x0134_5000)
    g.entries = {1: 0x8000_0000_0000_0000, 2: 0, 3: 0}
    g.segments = {"fs_base": fs_base}
    g.blob("abs", "a3 " + _le(g.entry(1), 4) + " c3")              # mov [moffs32], eax
    g.blob("absw", "66 a3 " + _le(g.entry(1) + 4, 4) + " c3")      # mov [moffs32], ax
    g.blob("absb", "a2 " + _le(g.entry(2), 4) + " c3")             # mov [moffs32], al
    wrapped = (g.entry(3) - fs_base) & 0xFFFF_FFFF
    g.blob("fs", "64 a3 " + _le(wrapped, 4) + " c3")               # mov fs:[moffs32], eax
    g.call("abs", rax=0x1234_5067)
    g.call("absw", rax=0x1234)
    g.call("absb", rax=0x63)
    g.call("fs", rax=0x67)
    yield g.trace()

    g = guest("mov-moffs-code16", paging, 16, rng,
              "MOV moffs (A3) in 16-bit code: 67 (a 4-byte moffs) with 66 (EAX) through a "
              "DS base, and a 2-byte moffs through an ES override", table_gpa=0x0234_5000,
              table_gla=0x2234_5000, code_base=0x0001_0100)
    g.entries = {1: 0, 2: 0}
    g.segments = {"cs_base": 0x0001_0000, "ds_base": 0x1000_0000, "es_base": 0x2234_0000}
    g.blob("a67", "67 66 a3 08 50 34 12 c3")     # mov [dword 0x12345008], eax
    g.blob("es", "26 a3 10 50 c3")               # mov es:[0x5010], ax
    g.call("a67", rax=0x1234_5067)
    g.call("es", rax=0x8025)
    yield g.trace()

def synthetic_legacy(rng: random.Random) -> Iterator[Trace]:
    paging = "legacy"
    v = Values(paging, rng)

    g = guest("mov-sizes-and-immediates", paging, 32, rng,
              "MOV reg and imm, 4/2/1 bytes, on 4-byte entries")
    g.entries = {i: v.pte() for i in range(8)}
    g.blob("m4", "89 10 c3")                     # mov [eax], edx
    g.blob("m2", "66 89 10 c3")                  # mov [eax], dx
    g.blob("m1", "88 10 c3")                     # mov [eax], dl
    g.blob("i4", "c7 00 67 30 23 01 c3")         # mov dword [eax], 0x1233067
    g.call("m4", rax=g.entry(0), rdx=v.pte())
    g.call("m2", rax=g.entry(1), rdx=0x0025)
    g.call("m1", rax=g.entry(2), rdx=0x65)
    g.call("i4", rax=g.entry(3))
    g.call("m4", rax=g.entry(4), rdx=v.pte("not-present-swap"))
    yield g.trace()

    g = guest("stos-without-rep-df0-df1", paging, 32, rng, "STOSD/STOSB, DF=0 and DF=1")
    g.entries = {i: v.pte() for i in range(8, 12)}
    g.blob("sd", "ab c3")
    g.blob("sd_down", "fd ab fc c3")
    g.blob("sb", "aa c3")
    g.call("sd", rdi=g.entry(8), rax=v.pte())
    g.call("sd_down", rdi=g.entry(9), rax=v.pte())
    g.call("sb", rdi=g.entry(10), rax=0x61)
    yield g.trace()

    g = guest("xchg-cmpxchg-cmpxchg8b", paging, 32, rng,
              "XCHG 4/1, CMPXCHG match/mismatch, CMPXCHG8B over two 4-byte entries "
              "match/mismatch")
    g.entries = {i: v.pte() for i in range(12, 22)}
    g.blob("x4", "87 10 c3")                     # xchg [eax], edx
    g.blob("x1", "86 10 c3")                     # xchg [eax], dl
    g.blob("c4", "f0 0f b1 0e c3")               # lock cmpxchg [esi], ecx
    g.blob("c8b", "f0 0f c7 0e c3")              # lock cmpxchg8b [esi]
    g.call("x4", rax=g.entry(12), rdx=0)
    g.call("x1", rax=g.entry(13), rdx=0x25)
    g.call("c4", rsi=g.entry(14), rax=g.entries[14], rcx=v.pte())
    g.call("c4", rsi=g.entry(15), rax=g.entries[15] ^ A, rcx=v.pte())
    g.call("c8b", rsi=g.entry(16), rax=g.entries[16], rdx=g.entries[17], rbx=v.pte(),
           rcx=v.pte())
    g.call("c8b", rsi=g.entry(18), rax=g.entries[18], rdx=g.entries[19] ^ D, rbx=0, rcx=0)
    yield g.trace()

    g = guest("logic-and-bit-ops", paging, 32, rng, "AND/OR/XOR, BTS imm, BTR reg")
    g.entries = {i: v.pte("user-rw") for i in range(20, 26)}
    g.blob("andb", "f0 80 20 fd c3")             # lock and byte [eax], 0xfd
    g.blob("or", "83 08 20 c3")                  # or dword [eax], 0x20
    g.blob("xor", "31 10 c3")                    # xor [eax], edx
    g.blob("bts", "f0 0f ba 28 01 c3")           # lock bts dword [eax], 1
    g.blob("btr", "0f b3 10 c3")                 # btr [eax], edx
    g.call("andb", rax=g.entry(20))
    g.call("or", rax=g.entry(21))
    g.call("xor", rax=g.entry(22), rdx=PCD | PWT)
    g.call("bts", rax=g.entry(23))
    g.call("btr", rax=g.entry(24), rdx=5)
    yield g.trace()

    g = guest("addressing-and-fs-override", paging, 32, rng,
              "SIB+disp8, disp32 alone, FS override with a per-CPU base")
    g.entries = {i: v.pte() for i in (5, 9, 700)}
    g.segments = {"fs_base": 0x0180_0000}
    g.blob("sib", "89 4c b3 04 c3")              # mov [ebx+esi*4+4], ecx
    g.blob("abs", "89 0d " + g.entry(9).to_bytes(4, "little").hex(" ") + " c3")
    g.blob("fs", "64 89 08 c3")                  # mov fs:[eax], ecx
    g.call("sib", rbx=g.entry(0), rsi=4, rcx=v.pte())
    g.call("abs", rcx=0)
    g.call("fs", rax=g.entry(700) - 0x0180_0000, rcx=v.pte())
    yield g.trace()

    g = guest("code16-addressing", paging, 16, rng,
              "16-bit code under legacy paging: [bx+di+disp8], [bp+si] (SS), STOSD",
              code_base=0x0000_7000)
    g.entries = {i: v.pte() for i in range(6)}
    assert g.table_gla is not None
    base = g.table_gla - 0x2000
    g.segments = {"ds_base": base, "ss_base": base, "es_base": base, "cs_base": 0}
    g.blob("bxdi", "66 89 41 08 c3")             # mov [bx+di+8], eax
    g.blob("bpsi", "66 89 02 c3")                # mov [bp+si], eax
    g.blob("stosd", "66 ab c3")                  # stosd (ES:DI)
    g.call("bxdi", rbx=0x2000, rdi=0x0, rax=v.pte())
    g.call("bpsi", rbp=0x2000, rsi=0x0C, rax=v.pte())
    g.call("stosd", rdi=0x2010, rax=v.pte())
    yield g.trace()

    g = guest("duplicate-delivery-hvmi", paging, 32, rng,
              "the same EPT exit delivered twice: hvmi's same-RIP rule reports a duplicate",
              policy="hvmi")
    g.entries = {100: v.pte()}
    g.blob("set", "89 10 c3")
    g.call("set", rax=g.entry(100), rdx=v.pte(), twice=[0])
    yield g.trace()

    g = guest("mov-moffs", paging, 32, rng,
              "MOV moffs (A2/A3) in 32-bit code: an FS override whose base + offset wraps at "
              "4 GiB, and 1 byte", table_gpa=0x0234_5000, table_gla=0x0234_5000)
    g.entries = {2: 0, 3: 0x0123_4067}
    g.segments = {"fs_base": 0xF000_0000}
    g.blob("fs", "64 a3 08 50 34 12 c3")         # mov fs:[0x12345008], eax
    g.blob("absb", "a2 0c 50 34 02 c3")          # mov [0x0234500c], al
    g.call("fs", rax=0x67)
    g.call("absb", rax=0x25)
    yield g.trace()
