"""A KVM guest ready to run: VM, memslots, loaded image, vCPU in its paging mode.

`GuestMachine` turns a `GuestLayout` and a `GuestProgram` into a VM whose
vCPU starts at the program's first instruction, already in protected or long
mode with paging on. The monitored pages get their own memslot, read-only in
a monitored run (every guest write to them exits as KVM_EXIT_MMIO) or
writable in an unmonitored one (the CPU writes them directly).

`KvmGuestMemory` is the `ptemu.memory.GuestMemory` the handler commits
through: plain reads and writes of the memslots' backing memory, and the
hardware's compare-and-exchange for the commit (atomic with respect to vCPUs
that keep running while the handler works).
"""

from __future__ import annotations

import os
from typing import Self

from ptemu.errors import UsageError
from ptemu.kvm.device import KvmSystem, KvmUnavailable, VcpuHandle, Vm
from ptemu.kvm.layout import (
    CR0_PG,
    CR4_LA57,
    PAGE,
    GuestLayout,
    build_gdt,
    build_sregs,
    build_tables,
)
from ptemu.kvm.programs import GuestProgram
from ptemu.memory import InMemoryGuestMemory, MappedGuestMemory
from ptemu.paging.modes import ModeName

RAM_SLOT = 0
MONITORED_SLOT = 1
RFLAGS_RESERVED = 0x2
MAX_VCPUS = 8
"""vCPUs a `GuestMachine` creates at most (``ptemu kvm run --vcpus``)."""
STACK_PER_VCPU = PAGE
"""Stack bytes each vCPU gets below `GuestLayout.stack_top_gpa` (vCPU i at top - i pages)."""


class KvmGuestMemory(MappedGuestMemory):
    """Guest-physical memory of a `Vm`, as the handler's `GuestMemory`.

    A `MappedGuestMemory` over the memslots' `mmap` regions, so its
    compare-and-store is the hardware's compare-and-exchange: atomic with
    respect to running vCPUs (their locked instructions and the page walker's
    A/D updates), not only to a stopped one. Bytes outside every memslot read
    as zero and cannot be written. The regions are not pinned, because the
    `Vm` unmaps them when it closes; a call after that raises `UsageError`.
    """

    def __init__(self, vm: Vm) -> None:
        super().__init__(((region.gpa, region.buffer) for region in vm.regions.values()),
                         pin=False)


def guest_image(layout: GuestLayout, program: GuestProgram) -> tuple[InMemoryGuestMemory, int]:
    """Everything the guest finds in memory at its first instruction, and CR3."""
    image = InMemoryGuestMemory()
    build_gdt(layout, image)
    extra: dict[int, int] = {}
    for index, (gla, content) in enumerate(sorted(program.pages.items())):
        gpa = layout.pages_gpa + index * PAGE
        if gla % PAGE or len(content) > PAGE or gpa + PAGE > layout.ram_size:
            raise UsageError(f"extra page {gla:#x}: not a page, or too many pages")
        extra[gla] = gpa
        image.write(gpa, content)
    cr3 = build_tables(layout, image, len(program.code), extra)
    image.write(layout.code_gpa, program.code)
    if program.data:
        image.write(layout.data_gpa, program.data)
    if program.heap:
        if layout.heap_gpa + len(program.heap) > layout.pages_gpa:
            raise UsageError(f"the program's table of {len(program.heap)} bytes does not fit "
                             "guest memory: use fewer iterations")
        image.write(layout.heap_gpa, program.heap)
    if len(program.monitored) > layout.monitored_size:
        raise UsageError("the program's monitored content is larger than the monitored pages")
    image.write(layout.monitored_gpa, program.monitored.ljust(layout.monitored_size, b"\0"))
    return image, cr3


class GuestMachine:
    """One VM with `vcpus` vCPUs (default 1) running `program` in `layout`'s mode.

    Every vCPU starts at the program's first instruction in the same mode,
    with the program's registers plus its own `GuestProgram.vcpu_registers`
    and its own stack page; `vcpu` is the first.

    Raises `KvmUnavailable` when this host's KVM cannot run the mode (no
    LA57 for 5-level paging; a KVM that refuses CR0.PG outside long mode).
    """

    def __init__(self, system: KvmSystem, layout: GuestLayout, program: GuestProgram, *,
                 monitored: bool, vcpus: int = 1) -> None:
        if not 1 <= vcpus <= MAX_VCPUS:
            raise UsageError(f"vcpus: {vcpus} is not in 1..{MAX_VCPUS}")
        if program.vcpu_registers and len(program.vcpu_registers) != vcpus:
            raise UsageError(f"program {program.name} is built for "
                             f"{len(program.vcpu_registers)} vCPUs, not {vcpus}")
        if layout.mode.name is ModeName.LEVEL5 and not system.has_la57():
            raise KvmUnavailable("5-level paging needs LA57, and this host's KVM does not offer "
                                 "it (CPUID.(EAX=07H,ECX=0):ECX[16] = 0)")
        self.layout = layout
        self.program = program
        self.monitored = monitored
        self.vm = system.create_vm()
        try:
            self.ram = self.vm.add_memory(RAM_SLOT, 0, layout.ram_size)
            self.monitored_region = self.vm.add_memory(
                MONITORED_SLOT, layout.monitored_gpa, layout.monitored_size, readonly=monitored)
            image, self.cr3 = guest_image(layout, program)
            self.memory = KvmGuestMemory(self.vm)
            for page in image.pages():
                self.memory.write(page, image.read(page, PAGE))
            self.vcpus: tuple[VcpuHandle, ...] = tuple(
                self.vm.create_vcpu() for _ in range(vcpus))
            self.vcpu: VcpuHandle = self.vcpus[0]
            for index, vcpu in enumerate(self.vcpus):
                self._enter_mode(vcpu, index)
        except BaseException:
            self.vm.close()
            raise

    def _enter_mode(self, vcpu: VcpuHandle, index: int) -> None:
        sregs = vcpu.get_sregs()
        build_sregs(self.layout, self.cr3, sregs)
        vcpu.set_sregs(sregs)
        loaded = vcpu.get_sregs()
        if not loaded.cr0 & CR0_PG or (loaded.cr4 & CR4_LA57) != (sregs.cr4 & CR4_LA57):
            raise KvmUnavailable(
                f"this host's KVM does not run {self.layout.mode.name} paging: it kept "
                f"CR0={loaded.cr0:#x} CR4={loaded.cr4:#x} EFER={loaded.efer:#x} of the requested "
                f"CR0={sregs.cr0:#x} CR4={sregs.cr4:#x} EFER={sregs.efer:#x}"
                + _backend_hint())
        registers = dict(self.program.registers)
        if self.program.vcpu_registers:
            registers.update(self.program.vcpu_registers[index])
        stack_top = self.layout.stack_top_gpa - index * STACK_PER_VCPU
        registers.update(rip=self.layout.text, rsp=self.layout.gla_of(stack_top),
                         rflags=RFLAGS_RESERVED)
        vcpu.set_regs(registers)

    def monitored_bytes(self) -> bytes:
        """The monitored pages as they are now."""
        return self.memory.read(self.layout.monitored_gpa, self.layout.monitored_size)

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


KVM_BACKENDS = ("kvm_intel", "kvm_amd", "kvm_pvm")
"""KVM vendor modules: VMX, SVM, and PVM (software virtualization, long mode only)."""


def kvm_backend() -> str | None:
    """The KVM vendor module of this host (built in or loaded), from /sys/module."""
    for name in KVM_BACKENDS:
        if os.path.isdir(f"/sys/module/{name}"):
            return name
    return None


def _backend_hint() -> str:
    backend = kvm_backend()
    if backend == "kvm_pvm":
        return (" (the host runs kvm_pvm, a KVM without hardware virtualization that supports "
                "paging only in long mode)")
    return f" (KVM backend: {backend})" if backend else ""
