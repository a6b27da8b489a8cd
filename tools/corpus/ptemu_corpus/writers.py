"""One JSON record per kernel function: its image bytes, its listing, its patch
sites and the runtime variants (the bytes the booted kernel runs, per CPU
profile), for every candidate that exists out of line in a flavour."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ptemu.capture.elf import STT_FUNC, ElfImage

from .candidates import CANDIDATES, Candidate, argument_locations, calling_convention
from .debian import CONFIG_KEYS, Flavour, FlavourFiles, KernelPackages, config_options
from .errors import ExtractError
from .insn import capstone_for
from .listing import Listing, disassemble, padding_is_nops
from .patching import BASE_FEATURES, LA57, Alternative, KernelImage
from .symbols import SymbolMap

DEFAULT_MAX_SIZE = 512

@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """A CPU the runtime bytes are built for, and the paging modes it stands for."""

    name: str
    features: frozenset[str]
    paging_modes: tuple[str, ...]

def profiles_for(flavour: Flavour, alternatives: Sequence[Alternative]) -> list[Profile]:
    """One profile, or two on amd64 when the code depends on LA57 (4- vs 5-level paging)."""
    if flavour.paging != "4level":
        return [Profile(flavour.paging, BASE_FEATURES, (flavour.paging,))]
    if any(a.feature_name == LA57 for a in alternatives):
        return [Profile("4level", BASE_FEATURES, ("4level",)),
                Profile("5level", BASE_FEATURES | {LA57}, ("5level",))]
    return [Profile("4level+5level", BASE_FEATURES, ("4level", "5level"))]

def describe_flavour(packages: KernelPackages, files: FlavourFiles, max_size: int,
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Analyse every candidate in one flavour; return (records, summary)."""
    flavour = packages.flavour
    symbols = SymbolMap(files.system_map)
    booted = ElfImage.open(files.vmlinux)
    debug = ElfImage.open(files.debug_vmlinux)
    try:
        if booted.bits != flavour.code_bits:
            raise ExtractError(f"{files.vmlinux.name} is ELF{booted.bits}, expected "
                               f"ELF{flavour.code_bits}")
        elf_functions: dict[tuple[str, int], int] = {
            (s.name, s.value): s.size for s in debug.symbols() if s.kind == STT_FUNC}
        image = KernelImage(booted, symbols)
        md = capstone_for(flavour.code_bits)
        config = config_options(files.config)
        frame_pointer = config.get("CONFIG_FRAME_POINTER") == "y" and flavour.code_bits == 32
        summary: dict[str, Any] = {
            "flavour": flavour.name, "package": packages.image, "dbg_package": packages.dbg,
            "version": packages.version, "release": packages.release,
            "config": {k: config.get(k, "n") for k in CONFIG_KEYS},
            "nop5": image.nops[5].hex(), "functions": {}, "absent": [], "skipped": {}}
        records: list[dict[str, Any]] = []
        for cand in CANDIDATES:
            if cand.flavours and flavour.name not in cand.flavours:
                continue
            record, why = describe_function(cand, packages, image, debug, elf_functions, md,
                                            frame_pointer, max_size)
            if record is not None:
                records.append(record)
                summary["functions"][cand.name] = record["size"]
            elif why == "absent":
                summary["absent"].append(cand.name)
            else:
                summary["skipped"][cand.name] = why
        return records, summary
    finally:
        booted.close()
        debug.close()

def describe_function(cand: Candidate, packages: KernelPackages, image: KernelImage,
                      debug: ElfImage, elf_functions: dict[tuple[str, int], int], md: Any,
                      frame_pointer: bool, max_size: int) -> tuple[dict[str, Any] | None, str]:
    """The JSON record of one candidate, or (None, why it is left out)."""
    flavour = packages.flavour
    map_syms = image.map.by_name.get(cand.name, [])
    if not map_syms:
        return None, "absent"
    if len(map_syms) > 1:
        return None, f"{len(map_syms)} local symbols share the name"
    address = map_syms[0].address
    next_address = image.map.next_address(address)
    gap = next_address - address if next_address is not None else None
    size = elf_functions.get((cand.name, address)) or gap
    if not size:
        return None, "size unknown"
    if size > max_size:
        return None, f"{size} bytes > --max-size {max_size}"
    code = image.elf.read(address, size)
    if debug.read(address, size) != code:
        raise ExtractError(f"{cand.name}: bytes differ between the vmlinuz and the -dbg "
                           "vmlinux of the same package version")
    listing = disassemble(code, address, image, md, frame_pointer, reachability=False)
    alternatives = image.alternatives_in(address, address + size)
    paravirt = image.paravirt_in(address, address + size)
    variants: list[dict[str, Any]] = []
    for profile in profiles_for(flavour, alternatives):
        runtime = image.runtime_code(address, code, profile.features, md)
        run_listing = disassemble(runtime, address, image, md, frame_pointer)
        variants.append({
            "profile": profile.name,
            "paging_modes": list(profile.paging_modes),
            "cpu_features": sorted(profile.features),
            "bytes": runtime.hex(),
            "disassembly": run_listing.lines,
            "entry_store_offsets": run_listing.entry_stores,
            "ret_offsets": run_listing.returns,
            "calls": run_listing.calls,
            "external_jumps": run_listing.external_jumps,
            "data_refs": run_listing.data_refs,
            "segment_ref_offsets": run_listing.segment_refs,
            "bad_branch_targets": run_listing.bad_targets,
        })
    if not any(v["entry_store_offsets"] for v in variants):
        calls = sorted({c["target"] for v in variants for c in v["calls"] + v["external_jumps"]})
        if calls:
            return None, "no page-table store of its own; calls " + ", ".join(calls)
        return None, "no page-table store"
    padding = image.elf.read(address + size, gap - size) if gap and gap > size else b""
    notes = function_notes(cand, listing, variants, image, padding, md, address + size)
    record = {
        "package": packages.image,
        "dbg_package": packages.dbg,
        "version": packages.version,
        "arch": flavour.arch,
        "flavour": flavour.name,
        "kernel_release": packages.release,
        "paging": flavour.paging,
        "code_bits": flavour.code_bits,
        "function": cand.name,
        "prototype": cand.prototype,
        "effect": cand.what,
        "address": f"{address:#x}",
        "size": size,
        "size_source": ("ELF symbol table of the -dbg vmlinux"
                        if (cand.name, address) in elf_functions else "next System.map symbol"),
        "bytes": code.hex(),
        "disassembly": listing.lines,
        "calling_convention": cand.convention or calling_convention(flavour),
        "args": list(cand.registers) if cand.registers else argument_locations(cand, flavour),
        "arg_names": [p.name for p in cand.params],
        "fentry_call_offsets": listing.fentry_calls,
        "nop5": image.nops[5].hex(),
        "return_thunk_jump_offsets": listing.return_thunk_jumps,
        "alternatives": [{
            "offset": a.orig - address, "length": a.instrlen, "feature": a.feature_name,
            "patch_when": "feature absent" if a.negated else "feature present",
            "original": image.elf.read(a.orig, a.instrlen).hex(),
            "replacement": image.elf.read(a.repl, a.repllen).hex(),
            "replacement_address": f"{a.repl:#x}"} for a in alternatives],
        "paravirt_calls": [{
            "offset": p.instr - address, "length": p.length, "pv_ops_slot": p.slot,
            "native_target": image.map.describe(p.target)} for p in paravirt],
        "runtime": variants,
        "notes": notes,
    }
    return record, ""

def function_notes(cand: Candidate, listing: Listing, variants: Sequence[dict[str, Any]],
                   image: KernelImage, padding: bytes, md: Any, end: int) -> list[str]:
    """Human-readable remarks for one function."""
    notes = list(cand.notes)
    if listing.fentry_calls:
        notes.append(f"call __fentry__ at offset(s) {listing.fentry_calls}: replace the 5 "
                     f"bytes with x86_nops[5] = {image.nops[5].hex()} (ftrace does at boot; "
                     "done in 'runtime')")
    if listing.return_thunk_jumps:
        notes.append(f"jmp __x86_return_thunk at offset(s) {listing.return_thunk_jumps}: acts "
                     "as ret (patched to ret; int3 x4 at boot when no return thunk is needed; "
                     "done in 'runtime')")
    for variant in variants:
        extra = variant["calls"] + variant["external_jumps"]
        if extra:
            notes.append(f"runtime {variant['profile']}: leaves the function through "
                         + ", ".join(f"+{c['offset']:#x} {c['target']}" for c in extra)
                         + " (a capture must stub these)")
    for variant in variants:
        if variant["bad_branch_targets"]:
            notes.append(f"WARNING: runtime {variant['profile']} jumps into the middle of an "
                         f"instruction at {variant['bad_branch_targets']}")
    if not listing.ends_cleanly:
        notes.append("WARNING: the listing does not end in ret/jmp/ud2; check the boundary")
    if padding and not padding_is_nops(padding, end, md):
        notes.append(f"WARNING: non-padding bytes before the next symbol: {padding.hex()}")
    return notes
