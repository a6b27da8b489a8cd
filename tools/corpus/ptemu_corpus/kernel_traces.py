"""Traces of the Debian kernels' page-table writers.

Each record of ``kernel_writers.json`` runs with the bytes the booted kernel
executes (its ``runtime`` variant for the paging mode), at its linked address,
called with realistic arguments (`kernel_args`) on a page-table page in the
direct map; callees that only flush TLBs or print are stubbed with ``ret`` and
the kernel variables the code reads hold their boot values.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

from .entries import DIRECT_MAP, ENTRY_SIZE, RW, SEED, A, D, KernelValues, P, direct, h
from .guest import Json, Trace, capture_description
from .kernel_args import CallTarget, parse_params, place_args

KERNEL_RFLAGS = 0x202
"""RFLAGS at a kernel function's entry: interrupts enabled (IF), bit 1 set."""

FLAVOUR_PAGING = {"amd64": ("4level", "5level"), "686-pae": ("pae",), "686": ("legacy",)}
"""Which paging modes each Debian kernel flavour's functions run under."""

KERNEL_TEXT_MAP = {64: 0xFFFF_FFFF_8000_0000, 32: 0xC000_0000}
"""__START_KERNEL_map (x86-64) / PAGE_OFFSET (i386): kernel image gla = base + gpa."""

STUBBED_CALLEES = frozenset({"flush_tlb_mm_range", "flush_tlb_one_kernel",
                             "flush_tlb_one_user", "_printk"})
"""Callees replaced by a bare ``ret``: TLB flushes and printk neither read nor write
the page tables and their return values are unused, so the stub changes no store
the fixture records. Functions that call anything else are not captured."""

def kernel_globals(paging: str) -> dict[str, int]:
    """Boot-time values of the kernel variables the captured functions read."""
    return {
        # CONFIG_DYNAMIC_PHYSICAL_MASK: (1 << __PHYSICAL_MASK_SHIFT) - 1, no SME/TDX.
        "physical_mask": (1 << 52) - 1,
        "page_offset_base": DIRECT_MAP[paging],
        "__pgtable_l5_enabled": int(paging == "5level"),
        "pgdir_shift": 48 if paging == "5level" else 39,
        "ptrs_per_p4d": 512 if paging == "5level" else 1,
    }

def runtime_profile(record: Json, paging: str) -> Json | None:
    profile: Json
    for profile in record.get("runtime", []):
        if paging in profile["paging_modes"]:
            return profile
    return None

def _function_role(name: str) -> str:
    for role in ("test_and_clear_young", "clear_flush_young", "set_access_flags",
                 "invalidate", "huge_clear_flush", "clear_flush", "modify_prot_start",
                 "populate", "clear", "xchg", "set"):
        if role in name:
            return role
    return "set"

def kernel_traces(path: Path) -> list[Trace]:
    """Traces of the Debian kernels' page-table writers (see the module docstring)."""
    if not path.exists():
        raise SystemExit(f"build_corpus: {path} is missing: run "
                         "tools/corpus/extract_kernel_writers.py first")
    records = json.loads(path.read_text(encoding="utf-8"))
    traces: list[Trace] = []
    skipped: list[str] = []
    for record in records:
        for paging in FLAVOUR_PAGING[record["flavour"]]:
            for variant in range(_variants(record)):
                trace_rng = random.Random(f"{SEED}-{record['flavour']}-{record['function']}-"
                                          f"{paging}-{variant}")
                try:
                    trace = kernel_trace(record, paging, variant, trace_rng)
                except SkipFunction as reason:
                    skipped.append(f"{record['flavour']} {record['function']} ({paging}): "
                                   f"{reason}")
                    break
                traces.append(trace)
    for line in skipped:
        print(f"build_corpus: skipped {line}", file=sys.stderr)
    return traces

def _variants(record: Json) -> int:
    """How many traces one function gets (the simple setters get two)."""
    return 2 if record["function"].startswith("native_set_") else 1

class SkipFunction(Exception):
    """This function cannot be captured faithfully (the reason says why)."""

def kernel_trace(record: Json, paging: str, variant: int, rng: random.Random) -> Trace:
    profile = runtime_profile(record, paging)
    if profile is None:
        raise SkipFunction("no runtime profile for this paging mode")
    code_bits = 64 if paging in ("4level", "5level") else 32
    function = record["function"]
    address = int(record["address"], 16)
    code = bytes.fromhex(profile["bytes"])
    blobs: list[Json] = [{"label": function, "gla": h(address), "bytes": code.hex(" "),
                          "gpa": h(address - KERNEL_TEXT_MAP[code_bits])}]
    stubs: list[str] = []
    for site in [*profile.get("calls", []), *profile.get("external_jumps", [])]:
        if site["target"] not in STUBBED_CALLEES:
            raise SkipFunction(f"calls {site['target']}, which the corpus does not stub")
        offset = site["offset"]
        opcode = code[offset]
        if opcode not in (0xE8, 0xE9):
            raise SkipFunction(f"call site +{offset:#x} is not a rel32 call/jmp")
        rel = int.from_bytes(code[offset + 1:offset + 5], "little", signed=True)
        target = (address + offset + 5 + rel) & ((1 << 64) - 1)
        if all(blob["gla"] != h(target) for blob in blobs):
            blobs.append({"label": f"stub {site['target']}", "gla": h(target), "bytes": "c3",
                          "gpa": h(target - KERNEL_TEXT_MAP[code_bits])})
            stubs.append(site["target"])
    data_pages = _kernel_data_pages(record, profile, paging, code_bits)

    v = KernelValues(paging, rng)
    params = parse_params(record)
    role = _function_role(function)
    level = next((p.level for p in params if p.pointer and p.level), None) or "pte"
    entry_size = ENTRY_SIZE[paging]
    top = 0x3000_0000 if code_bits == 32 else 0x8_0000_0000
    table_gpa = rng.randrange(0x1000_0000, top, 0x1000)
    table_gla = direct(paging, table_gpa)
    struct_gpa = rng.randrange(0x1000_0000, top, 0x1000)
    while struct_gpa == table_gpa:
        struct_gpa += 0x1000
    struct_gla = direct(paging, struct_gpa)
    word = code_bits // 8
    vma_gla, mm_gla = struct_gla, struct_gla + 0x800
    struct_page = bytearray(0x1000)
    struct_page[2 * word:3 * word] = mm_gla.to_bytes(word, "little")   # vma->vm_mm
    data_pages.append({"gpa": h(struct_gpa), "gla": h(struct_gla),
                       "data": bytes(struct_page[:0x40]).hex()})

    vaddr_of: Callable[[int], int] | None = None
    if function == "set_pte_vaddr":
        vaddr_of = _fixmap_walk(profile, paging, table_gpa, data_pages, rng)
    entries: dict[int, int] = {}
    count = entry_size and (0x1000 // entry_size)
    for index in rng.sample(range(count), 12):
        entries[index] = v.any(level)
    target = CallTarget(paging, level, table_gla, entry_size, vma_gla, mm_gla, vaddr_of)
    calls: list[Json] = []
    targets = rng.sample(sorted(entries), 6)
    for index in targets:
        before, args = _scenario(role, level, v, rng, entries[index], variant)
        entries[index] = before
        regs, stack = place_args(record, params, args, index, target, v, rng)
        regs["rflags"] = KERNEL_RFLAGS
        call: Json = {"entry": function, "regs": {k: h(x) for k, x in regs.items()}}
        if stack:
            call["stack"] = [h(x) for x in stack]
        calls.append(call)
    if role in ("set", "xchg", "populate"):
        # A second call on an entry already written: the entry changes twice.
        again = targets[0]
        _, args = _scenario(role, level, v, rng, entries[again], variant + 1)
        regs, stack = place_args(record, params, args, again, target, v, rng)
        regs["rflags"] = KERNEL_RFLAGS
        calls.append({"entry": function, "regs": {k: h(x) for k, x in regs.items()},
                      **({"stack": [h(x) for x in stack]} if stack else {})})

    suffix = "" if _variants(record) == 1 else ("-kernel" if variant == 0 else "-user")
    source = (f"Debian {record['package']} {record['version']} ({record['kernel_release']}), "
              f"function {function} at {record['address']}: the bytes the running kernel "
              f"executes under {paging} paging (runtime profile '{profile['profile']}': ftrace "
              "site NOPed, return thunks patched, boot-time alternatives applied), from "
              f"src/ptemu/kvm/data/kernel_writers.json; called with {role}-style arguments")
    if stubs:
        source += f"; {', '.join(sorted(set(stubs)))} stubbed with ret"
    globals_read = sorted({page["symbol"] for page in data_pages if "symbol" in page})
    if globals_read:
        source += f"; kernel variables at their boot values: {', '.join(globals_read)}"
    for page in data_pages:
        page.pop("symbol", None)
    description: Json = {
        "name": f"{paging}/{function}{suffix}",
        "source": source,
        "paging": paging,
        "code_bits": code_bits,
        "code": blobs,
        "page_tables": [{"gpa": h(table_gpa), "gla": h(table_gla),
                         "entries": {str(i): h(x) for i, x in sorted(entries.items())}}],
        "data_pages": data_pages,
        "calls": calls,
        "include_page_tables": True,
    }
    try:
        fixture = capture_description(description)
    except Exception as error:  # noqa: BLE001 - reported as a skip with its reason
        raise SkipFunction(f"capture failed: {error}") from None
    if not fixture["events"]:
        raise SkipFunction("no call stored to the page table")
    return Trace(description["name"], fixture=fixture)

def _scenario(role: str, level: str, v: KernelValues, rng: random.Random, current: int,
              variant: int) -> tuple[int, dict[str, int]]:
    """The entry before the call, and the value arguments, for one call."""
    user = variant % 2 == 1
    if role == "set":
        value = v.pte("user-rw" if user else "kernel-rw") if level == "pte" and rng.random() < .3 \
            else v.any(level)
        return current, {"entry": value}
    if role in ("test_and_clear_young", "clear_flush_young"):
        before = v.present(level) | A
        return before, {}
    if role == "set_access_flags":
        before = v.present(level) & ~(A | D)
        if level == "pud":
            # i386's pudp_set_access_flags compares only the frame and P/PWT/PCD
            # (mask 0xfffffe19): give it a new frame so that it stores.
            return before, {"entry": v.present(level), "dirty": 1}
        return before, {"entry": before | A | D | RW, "dirty": 1}
    if role == "invalidate":
        return v.large(level) if level != "pte" else v.present(level), {}
    if role == "populate":
        return 0, {}
    if role == "xchg":
        return current, {"entry": v.any(level)}
    # clear, clear_flush, huge_clear_flush, modify_prot_start: a present entry goes away.
    before = v.large(level) if role == "huge_clear_flush" else v.present(level)
    return before, {}

FIXMAP_BASE = 0xFF80_0000
"""i386 set_pte_vaddr is used for fixmap addresses near the top of the address
space; the corpus uses 0xff800000 + index * 4 KiB (one PTE page's worth)."""

def _fixmap_walk(profile: Json, paging: str, pte_page_gpa: int, data_pages: list[Json],
                 rng: random.Random) -> Callable[[int], int]:
    """The tables set_pte_vaddr walks to reach the monitored PTE page.

    It reads swapper_pg_dir (found in the profile's ``data_refs``: the PAE
    PDPT, or the 2-level page directory), then (PAE) the PMD page through the
    direct map, then writes the PTE through the direct map. The corpus fills
    those entries so that every fixmap address lands on the monitored page.
    """
    refs = [ref for ref in profile.get("data_refs", []) if ref["symbol"] == "swapper_pg_dir"]
    if not refs:
        raise SkipFunction("its runtime profile names no swapper_pg_dir read")
    pgdir = int(refs[0]["address"], 16)
    pgdir_page = pgdir & ~0xFFF
    directory = bytearray(0x1000)
    offset = pgdir - pgdir_page
    if paging == "pae":
        pmd_gpa = rng.randrange(0x0100_0000, 0x3000_0000, 0x1000)
        pdpte = (pmd_gpa | P).to_bytes(8, "little")
        index = FIXMAP_BASE >> 30
        directory[offset + 8 * index:offset + 8 * index + 8] = pdpte
        pmd = bytearray(0x1000)
        pmd_index = (FIXMAP_BASE >> 21) & 0x1FF
        pmd[8 * pmd_index:8 * pmd_index + 8] = (pte_page_gpa | P | RW | A | D).to_bytes(8, "little")
        data_pages.append({"gpa": h(pmd_gpa), "gla": h(direct(paging, pmd_gpa)),
                           "data": bytes(pmd[:8 * pmd_index + 8]).hex(),
                           "symbol": "swapper_pg_dir's fixmap PMD page"})
    else:
        index = FIXMAP_BASE >> 22
        pde = (pte_page_gpa | P | RW | A | D).to_bytes(4, "little")
        directory[offset + 4 * index:offset + 4 * index + 4] = pde
    end = max(i for i, b in enumerate(directory) if b) + 1
    data_pages.append({"gpa": h(pgdir_page - 0xC000_0000), "gla": h(pgdir_page),
                       "data": bytes(directory[:end]).hex(), "symbol": "swapper_pg_dir"})
    return lambda entry_index: FIXMAP_BASE + (entry_index << 12)

def _kernel_data_pages(record: Json, profile: Json, paging: str, code_bits: int) -> list[Json]:
    """Pages holding the kernel variables the function reads (the profile's
    ``data_refs``), at their kernel-image addresses, with their boot values.

    Indexed tables (``swapper_pg_dir[i]``) are left to the function's recipe.
    """
    values = kernel_globals(paging)
    pages: dict[int, bytearray] = {}
    symbols: dict[int, set[str]] = {}
    for ref in profile.get("data_refs", []):
        if ref.get("indexed"):
            continue
        symbol, _, plus = ref["symbol"].partition("+")
        if symbol not in values:
            raise SkipFunction(f"reads kernel variable {symbol}, whose boot value the corpus "
                               "does not know")
        target = int(ref["address"], 16)
        start = int(plus, 16) if plus else 0
        value = values[symbol].to_bytes(8, "little")[start:start + ref["size"]]
        page = target & ~0xFFF
        content = pages.setdefault(page, bytearray(0x1000))
        content[target - page:target - page + len(value)] = value
        symbols.setdefault(page, set()).add(symbol)
    out = []
    for page, content in sorted(pages.items()):
        last = max((i for i, b in enumerate(content) if b), default=7) + 1
        out.append({"gpa": h(page - KERNEL_TEXT_MAP[code_bits]), "gla": h(page),
                    "data": bytes(content[:last]).hex(),
                    "symbol": ", ".join(sorted(symbols[page]))})
    return out
