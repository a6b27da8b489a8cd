"""What this host's KVM can do for the runner, found by trying it.

`probe_mode` brings a one-instruction guest (HLT) up in a paging mode and
runs it: a mode is supported when the guest halts. `probe_accessed_dirty`
repeats the experiment behind the runner's layout: a guest reads and writes
through a PTE that lives in the monitored memslot with A and D clear, once
with the slot writable and once read-only, and reports what became of A/D
and which exits KVM made.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptemu.kvm import abi
from ptemu.kvm.asm import RAX, RDI, Assembler
from ptemu.kvm.device import KvmError, KvmSystem, KvmUnavailable
from ptemu.kvm.layout import RW, GuestLayout, P, code_bits_allowed
from ptemu.kvm.machine import GuestMachine, kvm_backend
from ptemu.kvm.programs import GuestProgram
from ptemu.paging.modes import MODE_NAMES, paging_mode


@dataclass(frozen=True, slots=True)
class ModeSupport:
    """Whether a guest can run in `paging` with `code_bits`-bit code here."""

    paging: str
    code_bits: int
    supported: bool
    reason: str
    """Why not (empty when supported)."""


def probe_mode(system: KvmSystem, paging: str, code_bits: int) -> ModeSupport:
    """Run a HLT-only guest in `paging` with `code_bits` code; report the outcome."""
    layout = GuestLayout.create(paging, code_bits, monitored_pages=1)
    program = GuestProgram(name="probe", code=b"\xf4")
    try:
        with GuestMachine(system, layout, program, monitored=False) as machine:
            reason = machine.vcpu.run()
    except KvmUnavailable as error:
        return ModeSupport(paging, code_bits, False, str(error))
    except KvmError as error:
        return ModeSupport(paging, code_bits, False, f"KVM refused the guest: {error}")
    if reason != abi.ExitReason.HLT:
        return ModeSupport(paging, code_bits, False,
                           f"a guest that only executes HLT ended with "
                           f"{abi.exit_reason_name(reason)}")
    return ModeSupport(paging, code_bits, True, "")


def probe_modes(system: KvmSystem) -> tuple[ModeSupport, ...]:
    """`probe_mode` for every paging mode and code size the runner knows."""
    return tuple(probe_mode(system, name, bits) for name in MODE_NAMES
                 for bits in code_bits_allowed(paging_mode(name)))


@dataclass(frozen=True, slots=True)
class AccessedDirtyFinding:
    """A PTE with A=D=0 in the monitored slot, after a guest read and write through it."""

    entry_before: int
    after_writable: int
    """The PTE after the accesses when the slot is ordinary memory."""
    after_readonly: int
    """The PTE after the same accesses when the slot is read-only."""
    exits_readonly: tuple[str, ...]
    """The exits KVM made in the read-only run (a HLT alone: nothing exited)."""

    def describe(self) -> str:
        return (f"PTE {self.entry_before:#x} (A=D=0) after a read and a write through it: "
                f"{self.after_writable:#x} in a writable memslot, {self.after_readonly:#x} in a "
                f"read-only memslot (exits: {', '.join(self.exits_readonly)})")


def probe_accessed_dirty(system: KvmSystem) -> AccessedDirtyFinding:
    """Whether KVM sets A/D in a page-table entry that lives in a read-only memslot."""
    layout = GuestLayout.create("4level", 64, monitored_pages=1)
    target = layout.data_gpa
    code = Assembler(64)
    code.mov_imm(RDI, layout.window)         # mapped by PTE 0 of the monitored page
    code.load(RAX, RDI, 0, w=True)
    code.store(RAX, RDI, 8, w=True)
    code.hlt()
    entry = target | P | RW
    program = GuestProgram(name="accessed-dirty", code=code.assemble(),
                           monitored=entry.to_bytes(8, "little"))
    after: dict[bool, int] = {}
    exits: list[str] = []
    for readonly in (False, True):
        with GuestMachine(system, layout, program, monitored=readonly) as machine:
            for _ in range(8):
                reason = machine.vcpu.run()
                if readonly:
                    exits.append(abi.exit_reason_name(reason))
                if reason != abi.ExitReason.MMIO:
                    break
            after[readonly] = int.from_bytes(machine.memory.read(layout.monitored_gpa, 8),
                                             "little")
    return AccessedDirtyFinding(entry, after[False], after[True], tuple(exits))


@dataclass(frozen=True, slots=True)
class HostReport:
    """Everything `ptemu kvm probe` prints."""

    device: str
    backend: str | None
    readonly_memslots: bool
    guest_debug: bool
    sync_regs: bool
    la57: bool
    modes: tuple[ModeSupport, ...]
    accessed_dirty: AccessedDirtyFinding | None


def probe_host(system: KvmSystem) -> HostReport:
    """Capabilities, paging modes and the A/D finding of this host's KVM."""
    readonly = bool(system.check_extension(abi.KVM_CAP_READONLY_MEM))
    modes = probe_modes(system)
    level4 = any(m.supported and m.paging == "4level" for m in modes)
    return HostReport(
        device=system.path, backend=kvm_backend(), readonly_memslots=readonly,
        guest_debug=bool(system.check_extension(abi.KVM_CAP_SET_GUEST_DEBUG)),
        sync_regs=bool(system.check_extension(abi.KVM_CAP_SYNC_REGS) & abi.KVM_SYNC_X86_REGS),
        la57=system.has_la57(), modes=modes,
        accessed_dirty=probe_accessed_dirty(system) if readonly and level4 else None)


