"""Synthetic traces of 64-bit code (4-level and 5-level paging) and of 32-bit code
in compatibility mode: short snippets written here, one per instruction family,
addressing form and write-state case the handler must cover."""

from __future__ import annotations

import random
from collections.abc import Iterator

from .entries import NX, RW, TEXT, US, A, D, P, Values, direct, h
from .guest import Trace, guest, patch


def _le(value: int, size: int) -> str:
    """`value` as `size` little-endian bytes in hex (an immediate or moffs)."""
    return value.to_bytes(size, "little").hex(" ")


def synthetic_64(paging: str, rng: random.Random) -> Iterator[Trace]:
    v = Values(paging, rng)

    g = guest("mov-register-1-2-4-8-bytes", paging, 64, rng, "MOV r/m, reg of every size")
    g.entries = {i: v.pte() for i in range(2, 8)}
    g.blob("m8", "48 89 37 c3")        # mov [rdi], rsi
    g.blob("m4", "89 77 04 c3")        # mov [rdi+4], esi
    g.blob("m4lo", "89 37 c3")         # mov [rdi], esi
    g.blob("m2", "66 89 37 c3")        # mov [rdi], si
    g.blob("m1", "40 88 37 c3")        # mov [rdi], sil
    g.call("m8", rdi=g.entry(2), rsi=v.pte("user-rw"))
    g.call("m4", rdi=g.entry(3), rsi=0x8000_0000)       # high half: NX on
    g.call("m4lo", rdi=g.entry(3), rsi=v.pte("kernel-rx") & 0xFFFF_FFFF)
    g.call("m2", rdi=g.entry(4), rsi=0x0067)
    g.call("m1", rdi=g.entry(5), rsi=0x65)
    g.call("m8", rdi=g.entry(6), rsi=v.pte("not-present-swap"))
    yield g.trace()

    g = guest("mov-immediate-1-2-4-8-bytes", paging, 64, rng, "MOV r/m, imm of every size")
    g.entries = {i: v.pte() for i in range(6)}
    g.blob("i8", "48 c7 07 00 00 00 00 c3")       # mov qword [rdi], 0
    g.blob("i8s", "48 c7 07 63 30 34 12 c3")      # mov qword [rdi], 0x12343063
    g.blob("i4", "c7 47 04 00 00 00 80 c3")       # mov dword [rdi+4], 0x80000000
    g.blob("i2", "66 c7 07 67 00 c3")             # mov word [rdi], 0x67
    g.blob("i1", "c6 07 63 c3")                   # mov byte [rdi], 0x63
    g.call("i8", rdi=g.entry(0))
    g.call("i8s", rdi=g.entry(1))
    g.call("i4", rdi=g.entry(2))
    g.call("i2", rdi=g.entry(3))
    g.call("i1", rdi=g.entry(4))
    yield g.trace()

    g = guest("stos-without-rep-df0-df1", paging, 64, rng,
              "STOSQ/STOSD/STOSB without REP, DF=0 and DF=1 (RDI moves)")
    g.entries = {i: v.pte() for i in range(8, 16)}
    g.blob("sq", "48 ab c3")                      # stosq
    g.blob("sq_down", "fd 48 ab fc c3")           # std; stosq; cld
    g.blob("sd", "ab c3")                         # stosd
    g.blob("sb_down", "fd aa fc c3")              # std; stosb; cld
    g.call("sq", rdi=g.entry(8), rax=v.pte("kernel-rw"))
    g.call("sq_down", rdi=g.entry(9), rax=v.pte("user-ro"))
    g.call("sd", rdi=g.entry(10), rax=0x1234_5067)
    g.call("sd", rdi=g.entry(10) + 4, rax=0x8000_0000)
    g.call("sb_down", rdi=g.entry(11), rax=0x25)
    yield g.trace()

    g = guest("rep-stosq-clear-entries", paging, 64, rng,
              "REP STOSQ clearing a run of entries (clear_page-style), DF=0 and DF=1")
    g.entries = {i: v.pte() for i in range(32, 48)}
    g.blob("rep", "f3 48 ab c3")                  # rep stosq
    g.blob("rep_down", "fd f3 48 ab fc c3")       # std; rep stosq; cld
    g.call("rep", rdi=g.entry(32), rcx=4, rax=0)
    g.call("rep_down", rdi=g.entry(43), rcx=3, rax=v.pte("kernel-ro"))
    yield g.trace()

    g = guest("xchg-forms", paging, 64, rng, "XCHG with memory: 8/4/1 bytes, LOCK, other bases")
    g.entries = {i: v.pte() for i in range(16, 24)}
    g.blob("x8", "48 87 37 c3")                   # xchg [rdi], rsi
    g.blob("x8_lock", "f0 48 87 37 c3")           # lock xchg [rdi], rsi
    g.blob("x4", "87 37 c3")                      # xchg [rdi], esi
    g.blob("x1", "86 1f c3")                      # xchg [rdi], bl
    g.blob("x8_rsi", "48 87 3e c3")               # xchg [rsi], rdi
    g.call("x8", rdi=g.entry(16), rsi=0)
    g.call("x8_lock", rdi=g.entry(17), rsi=v.pte("user-rw"))
    g.call("x4", rdi=g.entry(18), rsi=0xDEAD_BEEF_0000_0025)
    g.call("x1", rdi=g.entry(19), rbx=0x61)
    g.call("x8_rsi", rsi=g.entry(20), rdi=v.pte("kernel-rw"))
    yield g.trace()

    g = guest("cmpxchg-match-and-mismatch", paging, 64, rng,
              "CMPXCHG 8/1 bytes, locked and not, compare matching and failing")
    g.entries = {i: v.pte() for i in range(24, 28)}
    g.blob("c8_lock", "f0 48 0f b1 37 c3")        # lock cmpxchg [rdi], rsi
    g.blob("c8", "48 0f b1 37 c3")                # cmpxchg [rdi], rsi
    g.blob("c1_lock", "f0 40 0f b0 37 c3")        # lock cmpxchg [rdi], sil
    g.call("c8_lock", rdi=g.entry(24), rax=g.entries[24], rsi=v.pte("user-ro"))
    g.call("c8_lock", rdi=g.entry(25), rax=g.entries[25] ^ A, rsi=v.pte("user-rw"))
    g.call("c8", rdi=g.entry(26), rax=g.entries[26], rsi=0)
    g.call("c8", rdi=g.entry(27), rax=0x1234, rsi=0)
    g.call("c1_lock", rdi=g.entry(26), rax=0, rsi=0x67)
    yield g.trace()

    g = guest("cmpxchg-32bit-accumulator", paging, 64, rng,
              "CMPXCHG r/m32 in 64-bit code: on mismatch EAX is loaded and RAX[63:32] "
              "cleared; on match RAX is left alone (SDM CMPXCHG)")
    g.entries = {i: v.pte() for i in range(28, 32)}
    g.blob("c4_lock", "f0 0f b1 37 c3")           # lock cmpxchg [rdi], esi
    low28 = g.entries[28] & 0xFFFF_FFFF
    g.call("c4_lock", rdi=g.entry(28), rax=0xFFFF_FFFF_0000_0000 | low28, rsi=low28 | D)
    g.call("c4_lock", rdi=g.entry(29), rax=0xFFFF_FFFF_FFFF_FFFF, rsi=0x1234_5067)
    yield g.trace()

    g = guest("cmpxchg8b-cmpxchg16b", paging, 64, rng,
              "LOCK CMPXCHG8B and CMPXCHG16B (two entries), match and mismatch")
    g.entries = {i: v.pte() for i in range(40, 46)}
    g.blob("c8b", "f0 0f c7 0f c3")               # lock cmpxchg8b [rdi]
    g.blob("c16b", "f0 48 0f c7 0f c3")           # lock cmpxchg16b [rdi]
    e40 = g.entries[40]
    g.call("c8b", rdi=g.entry(40), rax=e40 & 0xFFFF_FFFF, rdx=e40 >> 32,
           rbx=0x1111_1063, rcx=0x8000_0000)
    g.call("c8b", rdi=g.entry(41), rax=0, rdx=0, rbx=0x2222_2063, rcx=0)
    e42, e43 = g.entries[42], g.entries[43]
    g.call("c16b", rdi=g.entry(42), rax=e42, rdx=e43, rbx=v.pte("kernel-rw"),
           rcx=v.pte("kernel-rw"))
    g.call("c16b", rdi=g.entry(44), rax=1, rdx=2, rbx=0, rcx=0)
    yield g.trace()

    g = guest("and-or-xor", paging, 64, rng,
              "AND/OR/XOR with memory destination, LOCK and not, 1/2/4/8 bytes")
    g.entries = {i: v.pte("user-rw") for i in range(48, 56)}
    g.blob("andb", "f0 80 27 fd c3")              # lock and byte [rdi], 0xfd (clear RW)
    g.blob("andq", "f0 48 21 37 c3")              # lock and [rdi], rsi
    g.blob("orq_imm", "48 83 0f 20 c3")           # or qword [rdi], 0x20 (set A)
    g.blob("orq", "f0 48 09 37 c3")               # lock or [rdi], rsi
    g.blob("xorq", "48 31 37 c3")                 # xor [rdi], rsi
    g.blob("andd_hi", "81 67 04 ff ff ff 7f c3")  # and dword [rdi+4], 0x7fffffff (clear NX)
    g.blob("orw", "66 83 0f 40 c3")               # or word [rdi], 0x40 (set D)
    g.call("andb", rdi=g.entry(48))
    g.call("andq", rdi=g.entry(49), rsi=~(RW | D) & ((1 << 64) - 1))
    g.call("orq_imm", rdi=g.entry(50))
    g.call("orq", rdi=g.entry(51), rsi=NX)
    g.call("xorq", rdi=g.entry(52), rsi=P)
    g.call("andd_hi", rdi=g.entry(53))
    g.call("orw", rdi=g.entry(54))
    yield g.trace()

    g = guest("bts-btr-btc-immediate", paging, 64, rng,
              "BTS/BTR/BTC with an immediate bit offset, LOCK and not")
    g.entries = {i: v.pte("user-rw") for i in range(56, 62)}
    g.blob("bts63", "f0 48 0f ba 2f 3f c3")       # lock bts qword [rdi], 63 (set NX)
    g.blob("btr1", "f0 48 0f ba 37 01 c3")        # lock btr qword [rdi], 1 (clear RW)
    g.blob("btc5", "48 0f ba 3f 05 c3")           # btc qword [rdi], 5 (toggle A)
    g.blob("btr5d", "f0 0f ba 37 05 c3")          # lock btr dword [rdi], 5 (clear young)
    g.call("bts63", rdi=g.entry(56))
    g.call("btr1", rdi=g.entry(57))
    g.call("btc5", rdi=g.entry(58))
    g.call("btr5d", rdi=g.entry(59))
    g.call("btr5d", rdi=g.entry(59))
    yield g.trace()

    g = guest("bts-btr-btc-register", paging, 64, rng,
              "BTS/BTR/BTC with a register bit offset inside the operand")
    g.entries = {i: v.pte("kernel-rw") for i in range(62, 66)}
    g.blob("btsr", "f0 48 0f ab 37 c3")           # lock bts [rdi], rsi
    g.blob("btrr", "48 0f b3 37 c3")              # btr [rdi], rsi
    g.blob("btcr", "f0 0f bb 37 c3")              # lock btc dword [rdi], esi
    g.call("btsr", rdi=g.entry(62), rsi=63)
    g.call("btrr", rdi=g.entry(63), rsi=8)
    g.call("btcr", rdi=g.entry(64), rsi=6)
    yield g.trace()

    g = guest("addressing-sib-disp8-disp32", paging, 64, rng,
              "base+index*scale+disp8/disp32 and base+disp32 destinations")
    g.entries = {i: v.pte() for i in (2, 130, 260, 511)}
    g.blob("sib8", "48 89 74 cf 10 c3")           # mov [rdi+rcx*8+0x10], rsi
    g.blob("sib32", "48 89 b4 cf 00 08 00 00 c3")  # mov [rdi+rcx*8+0x800], rsi
    g.blob("sib2", "48 89 34 4f c3")              # mov [rdi+rcx*2], rsi
    g.blob("disp32", "48 89 b3 f8 0f 00 00 c3")   # mov [rbx+0xff8], rsi
    g.call("sib8", rdi=g.entry(0), rcx=0, rsi=v.pte())
    g.call("sib32", rdi=g.entry(0), rcx=4, rsi=v.pte())
    g.call("sib2", rdi=g.entry(0), rcx=130 * 4, rsi=v.pte())
    g.call("disp32", rbx=g.entry(0), rsi=v.pte())
    yield g.trace()

    # A page table in the kernel image (like init_top_pgt / level2_kernel_pgt):
    # reachable by RIP-relative and 32-bit absolute (sign-extended) addressing.
    image_gpa = 0x0234_5000
    image_gla = 0xFFFF_FFFF_8000_0000 + image_gpa
    g = guest("addressing-rip-relative-and-absolute", paging, 64, rng,
              "RIP-relative and disp32-only destinations on a page table in the kernel "
              "image", table_gpa=image_gpa, table_gla=image_gla)
    g.entries = {2: v.table(), 3: v.table(), 511: v.table()}
    absolute = (image_gla + 0x10) & 0xFFFF_FFFF
    g.blob("abs", "48 89 34 25 " + absolute.to_bytes(4, "little").hex(" ") + " c3")
    rip_code = TEXT[paging] + 0x2000
    target = image_gla + 0x18
    disp = (target - (rip_code + 7)) & 0xFFFF_FFFF
    g.blob("riprel", "48 89 35 " + disp.to_bytes(4, "little").hex(" ") + " c3", gla=rip_code)
    g.call("abs", rsi=v.table())
    g.call("riprel", rsi=v.table())
    yield g.trace()

    g = guest("segment-override-fs-gs", paging, 64, rng,
              "FS and GS overrides with non-zero bases (per-CPU style)")
    g.entries = {i: v.pte() for i in (2, 3)}
    assert g.table_gla is not None
    g.segments = {"gs_base": g.table_gla - 0x5000, "fs_base": g.table_gla}
    g.blob("gs", "65 48 89 37 c3")                         # mov gs:[rdi], rsi
    g.blob("fs", "64 48 89 34 25 18 00 00 00 c3")          # mov fs:[0x18], rsi
    g.call("gs", rdi=0x5010, rsi=v.pte())
    g.call("fs", rsi=v.pte())
    yield g.trace()

    low_gpa = 0x0345_6000
    g = guest("address-size-and-operand-size-prefixes", paging, 64, rng,
              "0x67 (32-bit address: EDI, upper RDI ignored) and 0x66 prefixes",
              table_gpa=low_gpa, table_gla=low_gpa)
    g.entries = {i: v.pte() for i in (2, 3)}
    g.blob("a67", "67 48 89 37 c3")        # mov [edi], rsi
    g.blob("a67w", "67 66 89 37 c3")       # mov [edi], si
    g.call("a67", rdi=0xDEAD_0000_0000_0000 | g.entry(2), rsi=v.pte())
    g.call("a67w", rdi=0xBEEF_0000_0000_0000 | g.entry(3), rsi=0x0027)
    yield g.trace()

    g = guest("accessed-bit-set-by-cpu-between-events", paging, 64, rng,
              "the CPU sets A then D between the guest's writes (memory patches)")
    g.entries = {5: 0}
    g.blob("set", "48 89 37 c3")                  # mov [rdi], rsi
    g.blob("wrprotect", "f0 80 27 fd c3")         # lock and byte [rdi], 0xfd
    g.blob("get_and_clear", "31 c0 48 87 07 c3")  # xor eax, eax; xchg [rdi], rax
    fresh = v.frame() | P | RW | US | NX
    g.call("set", rdi=g.entry(5), rsi=fresh)
    g.call("wrprotect", rdi=g.entry(5), memory=[patch(g.entry_gpa(5), (fresh | A) & 0xFF, 1)])
    g.call("get_and_clear", rdi=g.entry(5),
           memory=[patch(g.entry_gpa(5), (fresh | A | D) & ~RW & 0xFF, 1)])
    yield g.trace()

    for policy in ("strict", "hvmi"):
        g = guest(f"lock-and-byte-{policy}", paging, 64, rng,
                  f"1-byte LOCK AND clearing RW (ptep_set_wrprotect) under policy {policy}: "
                  "strict completes the entry, hvmi leaves it partial until a later write",
                  policy=policy)
        g.entries = {7: v.pte("user-rw"), 8: v.pte("user-rw")}
        g.blob("wrprotect", "f0 80 27 fd c3")
        g.blob("set", "48 89 37 c3")
        g.call("wrprotect", rdi=g.entry(7))
        g.call("set", rdi=g.entry(7), rsi=v.pte("user-ro"))
        g.call("wrprotect", rdi=g.entry(8))
        yield g.trace()

    g = guest("vector-store-two-entries", paging, 64, rng,
              "MOVDQU xmmword store covering two entries")
    g.entries = {i: v.pte() for i in (20, 21)}
    g.blob("movdqu", "f3 0f 7f 07 c3")            # movdqu [rdi], xmm0
    g.call("movdqu", rdi=g.entry(20), xmm0=v.pte("kernel-rw") | v.pte("user-ro") << 64)
    yield g.trace()


    g = guest("rep-movsq-copy-entries", paging, 64, rng,
              "REP MOVSQ copying entries from another page (the source found through the "
              "guest's own page tables, which the fixture carries), DF=0 and DF=1")
    g.entries = {i: v.pte() for i in range(60, 72)}
    source_gpa = rng.randrange(0x0100_0000, 0x2000_0000, 0x1000)
    source = b"".join(v.pte().to_bytes(8, "little") for _ in range(16)) + bytes(4096 - 128)
    g.data_pages.append({"gpa": h(source_gpa), "gla": h(direct(paging, source_gpa)),
                         "data": source.hex()})
    g.blob("movs", "f3 48 a5 c3")                 # rep movsq
    g.blob("movs_down", "fd f3 48 a5 fc c3")      # std; rep movsq; cld
    g.call("movs", rdi=g.entry(60), rsi=direct(paging, source_gpa), rcx=4)
    g.call("movs_down", rdi=g.entry(71), rsi=direct(paging, source_gpa) + 0x70, rcx=3)
    yield g.trace()

    g = guest("arithmetic-read-modify-write", paging, 64, rng,
              "XADD, ADD, SUB, ADC, SBB, INC, DEC, NOT, NEG on entries, with and without LOCK")
    g.entries = {i: v.pte() for i in range(24, 34)}
    g.blob("xadd", "f0 48 0f c1 37 c3")           # lock xadd [rdi], rsi
    g.blob("add8", "f0 48 83 07 20 c3")           # lock add qword [rdi], 0x20
    g.blob("sub", "48 29 37 c3")                  # sub [rdi], rsi
    g.blob("adc", "f9 48 11 37 c3")               # stc; adc [rdi], rsi
    g.blob("sbb", "f9 f0 48 19 37 c3")            # stc; lock sbb [rdi], rsi
    g.blob("inc", "f0 48 ff 07 c3")               # lock inc qword [rdi]
    g.blob("dec", "48 ff 0f c3")                  # dec qword [rdi]
    g.blob("not", "f0 48 f7 17 c3")               # lock not qword [rdi]
    g.blob("neg", "48 f7 1f c3")                  # neg qword [rdi]
    g.blob("add1", "80 07 40 c3")                 # add byte [rdi], 0x40 (sets D)
    g.call("xadd", rdi=g.entry(24), rsi=0x1000)
    g.call("add8", rdi=g.entry(25))
    g.call("sub", rdi=g.entry(26), rsi=0x20)
    g.call("adc", rdi=g.entry(27), rsi=0x1)
    g.call("sbb", rdi=g.entry(28), rsi=0x1)
    g.call("inc", rdi=g.entry(29))
    g.call("dec", rdi=g.entry(30))
    g.call("not", rdi=g.entry(31))
    g.call("neg", rdi=g.entry(32))
    g.call("add1", rdi=g.entry(33))
    yield g.trace()

    g = guest("movnti-and-sse-stores", paging, 64, rng,
              "MOVNTI and SSE stores (MOVUPS, MOVDQA, MOVNTDQ, MOVQ, MOVD) over entries")
    g.entries = {i: v.pte() for i in range(40, 52)}
    g.blob("movnti", "48 0f c3 37 c3")            # movnti [rdi], rsi
    g.blob("movups", "0f 11 07 c3")               # movups [rdi], xmm0
    g.blob("movdqa", "66 0f 7f 07 c3")            # movdqa [rdi], xmm0
    g.blob("movntdq", "66 0f e7 07 c3")           # movntdq [rdi], xmm0
    g.blob("movq", "66 0f d6 07 c3")              # movq [rdi], xmm0
    g.blob("movd", "66 0f 7e 47 04 c3")           # movd [rdi+4], xmm0
    pair = v.pte("kernel-rw") | v.pte("user-ro") << 64
    g.call("movnti", rdi=g.entry(40), rsi=v.pte("user-rw"))
    g.call("movups", rdi=g.entry(41), xmm0=pair)
    g.call("movdqa", rdi=g.entry(44), xmm0=pair)
    g.call("movntdq", rdi=g.entry(46), xmm0=pair)
    g.call("movq", rdi=g.entry(48), xmm0=v.pte("kernel-ro"))
    g.call("movd", rdi=g.entry(49), xmm0=0x8000_0000)
    yield g.trace()

    g = guest("rep-stos-to-the-page-end", paging, 64, rng,
              "REP STOSQ reaching the end of the page: the iterations inside it, one record "
              "per entry; then the same downwards from the start of the page")
    g.entries = {i: v.pte() for i in (0, 1, 2, 509, 510, 511)}
    g.blob("rep", "f3 48 ab c3")                  # rep stosq
    g.blob("rep_down", "fd f3 48 ab fc c3")       # std; rep stosq; cld
    g.call("rep", rdi=g.entry(509), rcx=3, rax=0)
    g.call("rep_down", rdi=g.entry(2), rcx=3, rax=v.pte("kernel-ro"))
    yield g.trace()

    # MOV moffs last, with fixed addresses and values and no draw from `rng` (the
    # traces above keep their values). The expected stores are worked out by hand
    # in tests/corpus_tools/test_moffs_traces.py.
    table_gpa = 0x1234_5000
    g = guest("mov-moffs-absolute", paging, 64, rng,
              "MOV moffs (A2/A3, movabs): 64-bit absolute addresses with REX.W, 66, 1 byte "
              "and a GS override", table_gpa=table_gpa, code_base=TEXT[paging])
    g.entries = {1: 0, 2: 0x8000_0000_0000_0063, 3: 0, 4: 0}
    g.segments = {"gs_base": direct(paging, 0)}
    g.blob("abs", "48 a3 " + _le(g.entry(1), 8) + " c3")      # mov [moffs64], rax
    g.blob("absw", "66 a3 " + _le(g.entry(2), 8) + " c3")     # mov [moffs64], ax
    g.blob("absb", "a2 " + _le(g.entry(3), 8) + " c3")        # mov [moffs64], al
    g.blob("gs", "65 48 a3 " + _le(table_gpa + 8 * 4, 8) + " c3")  # mov gs:[moffs64], rax
    g.call("abs", rax=0x8000_0000_1234_5067)
    g.call("absw", rax=0x1234)
    g.call("absb", rax=0x25)
    g.call("gs", rax=0x67)
    yield g.trace()

    g = guest("mov-moffs-32bit-address", paging, 64, rng,
              "67 A3: a 4-byte moffs in 64-bit code, zero-extended (bit 31 set, so a "
              "sign-extended address would be another page)", table_gpa=0x0234_5000,
              table_gla=0x9234_5000, code_base=TEXT[paging])
    g.entries = {1: 0, 2: 0}
    g.blob("a67", "67 a3 " + _le(g.entry(1), 4) + " c3")       # mov [moffs32], eax
    g.blob("a67q", "67 48 a3 " + _le(g.entry(2), 4) + " c3")   # mov [moffs32], rax
    g.call("a67", rax=0xFFFF_FFFF_1234_5067)
    g.call("a67q", rax=0x8000_0000_1234_5067)
    yield g.trace()

SYNTHETIC_5LEVEL = frozenset({
    "mov-register-1-2-4-8-bytes", "cmpxchg-match-and-mismatch", "cmpxchg8b-cmpxchg16b",
    "and-or-xor", "bts-btr-btc-immediate", "addressing-rip-relative-and-absolute",
    "segment-override-fs-gs", "accessed-bit-set-by-cpu-between-events", "mov-moffs-absolute",
    "lock-and-byte-hvmi", "stos-without-rep-df0-df1"})
"""The 64-bit snippets also captured under 5-level paging (the kernel functions
cover the rest there)."""

def synthetic_compat(rng: random.Random) -> Iterator[Trace]:
    """32-bit code in compatibility mode under 4-level paging."""
    v = Values("4level", rng)
    gpa = 0x0456_7000
    g = guest("compat32-mov-and-cmpxchg8b", "4level", 32, rng,
              "32-bit code in IA-32e compatibility mode: two MOV halves and CMPXCHG8B",
              table_gpa=gpa, table_gla=gpa, code_base=0x0100_1000)
    g.entries = {i: v.pte() for i in (4, 5)}
    g.blob("halves", "89 48 04 89 10 c3")          # mov [eax+4], ecx; mov [eax], edx
    g.blob("c8b", "f0 0f c7 0e c3")               # lock cmpxchg8b [esi]
    new = v.pte("user-rw")
    g.call("halves", rax=g.entry(4), rcx=new >> 32, rdx=new & 0xFFFF_FFFF)
    e5 = g.entries[5]
    g.call("c8b", rsi=g.entry(5), rax=e5 & 0xFFFF_FFFF, rdx=e5 >> 32, rbx=0x0123_4025, rcx=0)
    yield g.trace()
