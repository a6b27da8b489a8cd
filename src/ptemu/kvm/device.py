"""Open /dev/kvm and drive a VM and its vCPUs through plain ioctls.

`KvmSystem` is the opened device (capabilities, the CPUID the host's KVM can
offer a guest); `Vm` owns memslots backed by anonymous `mmap` regions;
`VcpuHandle` runs the vCPU and reads and writes its registers. Errors the
kernel returns become `KvmError` with the ioctl's name; a missing or refused
/dev/kvm becomes `KvmUnavailable`, which tests turn into a skip that says so.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Self

from ptemu.errors import PtemuError
from ptemu.kvm import abi

KVM_DEVICE = "/dev/kvm"


class KvmError(PtemuError):
    """An ioctl on /dev/kvm, the VM or the vCPU failed."""


class KvmUnavailable(KvmError):
    """/dev/kvm is missing, cannot be opened, or lacks a capability we need."""


@dataclass(frozen=True, slots=True)
class CpuidLeaf:
    """One entry of the CPUID table KVM supports for guests."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


CPUID_LEAF7_ECX_LA57 = 1 << 16
"""CPUID.(EAX=07H,ECX=0):ECX[16]: 57-bit linear addresses, 5-level paging (SDM vol. 2A)."""


def regs_from_raw(raw: bytes) -> dict[str, int]:
    """``struct kvm_regs`` bytes as ptemu register names."""
    return dict(zip(abi.KVM_REGS_NAMES, struct.unpack_from("<18Q", raw), strict=True))


def _ioctl(fd: int, request: int, arg: int | ctypes.Structure | bytearray, what: str) -> int:
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as error:
        raise KvmError(f"{what} failed: {os.strerror(error.errno or 0)} (errno {error.errno})"
                       ) from None


class KvmSystem:
    """The opened /dev/kvm: what this host's KVM can do.

    Raises `KvmUnavailable` (naming the reason) when the device is absent,
    opening it is refused, or the API version is not 12.
    """

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise KvmUnavailable(f"{path}: {os.strerror(error.errno or 0)}") from None
        self.path = path
        version = _ioctl(self.fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != abi.KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"{path}: KVM API version {version}, need {abi.KVM_API_VERSION}")
        self._cpuid: tuple[CpuidLeaf, ...] | None = None

    def close(self) -> None:
        """Close the device (VMs created from it stay usable)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, capability: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when the capability is absent."""
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, capability, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        """Size of the vCPU's shared ``struct kvm_run`` mapping."""
        return _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid_raw(self) -> abi.KvmCpuid2:
        """KVM_GET_SUPPORTED_CPUID as the kernel structure (for KVM_SET_CPUID2)."""
        table = abi.KvmCpuid2()
        table.nent = abi.CPUID_MAX_ENTRIES
        _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, table, "KVM_GET_SUPPORTED_CPUID")
        return table

    def supported_cpuid(self) -> tuple[CpuidLeaf, ...]:
        """The CPUID leaves KVM can expose to a guest on this host."""
        if self._cpuid is None:
            table = self.supported_cpuid_raw()
            self._cpuid = tuple(
                CpuidLeaf(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in table.entries[:table.nent])
        return self._cpuid

    def cpuid(self, function: int, index: int = 0) -> CpuidLeaf | None:
        """The supported leaf `function`/`index`, or None when KVM lists none."""
        for leaf in self.supported_cpuid():
            if leaf.function == function and leaf.index == index:
                return leaf
        return None

    def has_la57(self) -> bool:
        """Whether a guest can use 5-level paging: CPUID.(7,0):ECX[16] as KVM offers it."""
        leaf = self.cpuid(7, 0)
        return leaf is not None and bool(leaf.ecx & CPUID_LEAF7_ECX_LA57)

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM with the default machine type."""
        return Vm(self, _ioctl(self.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM"))


class GuestRegion:
    """Anonymous host memory that backs one memslot, addressable by GPA offset."""

    def __init__(self, gpa: int, size: int) -> None:
        if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
            raise ValueError(f"memslot at {gpa:#x} size {size:#x} is not page-aligned")
        self.gpa = gpa
        self.size = size
        self.buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * size).from_buffer(
            self.buffer)
        self.host_address = ctypes.addressof(self._anchor)

    def contains(self, gpa: int, size: int = 1) -> bool:
        """Whether ``[gpa, gpa + size)`` lies inside this region."""
        return self.gpa <= gpa and gpa + size <= self.gpa + self.size

    def close(self) -> None:
        """Unmap (only after the VM that used it is gone)."""
        self._anchor = None
        self.buffer.close()


class Vm:
    """One KVM virtual machine: memslots and (here) a single vCPU."""

    def __init__(self, system: KvmSystem, fd: int) -> None:
        self.system = system
        self.fd = fd
        self.regions: dict[int, GuestRegion] = {}
        self.readonly_slots: set[int] = set()
        self.vcpus: list[VcpuHandle] = []

    def add_memory(self, slot: int, gpa: int, size: int, *, readonly: bool = False) -> GuestRegion:
        """Back ``[gpa, gpa+size)`` with fresh zeroed memory as memslot `slot`.

        With `readonly`, guest writes exit as KVM_EXIT_MMIO (needs
        KVM_CAP_READONLY_MEM; raises `KvmUnavailable` without it).
        """
        if readonly and not self.system.check_extension(abi.KVM_CAP_READONLY_MEM):
            raise KvmUnavailable("KVM_CAP_READONLY_MEM is not supported by this host's KVM")
        region = GuestRegion(gpa, size)
        descriptor = abi.KvmUserspaceMemoryRegion(
            slot=slot, flags=abi.KVM_MEM_READONLY if readonly else 0, guest_phys_addr=gpa,
            memory_size=size, userspace_addr=region.host_address)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, descriptor, "KVM_SET_USER_MEMORY_REGION")
        self.regions[slot] = region
        if readonly:
            self.readonly_slots.add(slot)
        return region

    def map_slot(self, slot: int, gpa: int, size: int, host_address: int, *,
                 readonly: bool = False) -> None:
        """Make memslot `slot` map ``[gpa, gpa+size)`` to host memory at `host_address`.

        The host memory must be part of a region this VM owns (`add_memory`): a
        `ptemu.kvm.memslots.MemslotProtector` splits one region into several slots
        so that one 4 KiB page can be read-only. Slots must not overlap.
        """
        descriptor = abi.KvmUserspaceMemoryRegion(
            slot=slot, flags=abi.KVM_MEM_READONLY if readonly else 0, guest_phys_addr=gpa,
            memory_size=size, userspace_addr=host_address)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, descriptor,
               f"KVM_SET_USER_MEMORY_REGION (slot {slot}, GPA {gpa:#x}, {size:#x} bytes)")
        if readonly:
            self.readonly_slots.add(slot)
        else:
            self.readonly_slots.discard(slot)

    def delete_slot(self, slot: int) -> None:
        """Delete memslot `slot` (KVM_SET_USER_MEMORY_REGION with size 0); its host
        memory stays mapped and owned by its region."""
        descriptor = abi.KvmUserspaceMemoryRegion(slot=slot, flags=0, guest_phys_addr=0,
                                                  memory_size=0, userspace_addr=0)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, descriptor,
               f"KVM_SET_USER_MEMORY_REGION (delete slot {slot})")
        self.readonly_slots.discard(slot)

    def region_of(self, gpa: int, size: int = 1) -> GuestRegion | None:
        """The region that holds ``[gpa, gpa+size)``, if one does."""
        for region in self.regions.values():
            if region.contains(gpa, size):
                return region
        return None

    def create_vcpu(self, cpuid: abi.KvmCpuid2 | None = None) -> VcpuHandle:
        """KVM_CREATE_VCPU, map its ``kvm_run`` and set its CPUID (all KVM supports)."""
        fd = _ioctl(self.fd, abi.KVM_CREATE_VCPU, len(self.vcpus), "KVM_CREATE_VCPU")
        vcpu = VcpuHandle(fd, self.system.vcpu_mmap_size(),
                          self.system.check_extension(abi.KVM_CAP_SYNC_REGS))
        table = cpuid if cpuid is not None else self.system.supported_cpuid_raw()
        _ioctl(fd, abi.KVM_SET_CPUID2, table, "KVM_SET_CPUID2")
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Destroy vCPUs and the VM, then unmap guest memory."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for region in self.regions.values():
            region.close()
        self.regions.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VcpuHandle:
    """One vCPU: KVM_RUN, registers, guest debug, and the shared ``kvm_run`` page."""

    def __init__(self, fd: int, mmap_size: int, capabilities_sync_regs: int = 0) -> None:
        self.fd = fd
        self.capabilities_sync_regs = capabilities_sync_regs
        self.sync_regs_enabled = False
        self.run_page = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._regs = abi.KvmRegs()
        self._sregs = abi.KvmSregs()

    def close(self) -> None:
        self.run_page.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def run(self) -> int:
        """KVM_RUN once; returns the raw exit reason.

        An interrupted run (a signal arrived) returns ``ExitReason.INTR``.
        """
        try:
            fcntl.ioctl(self.fd, abi.KVM_RUN, 0)
        except InterruptedError:
            return int(abi.ExitReason.INTR)
        except OSError as error:
            raise KvmError(f"KVM_RUN failed: {os.strerror(error.errno or 0)} "
                           f"(errno {error.errno})") from None
        return int.from_bytes(self.run_page[abi.RUN_EXIT_REASON:abi.RUN_EXIT_REASON + 4],
                              "little")

    def request_immediate_exit(self) -> None:
        """Make the current or next KVM_RUN return at once (``immediate_exit``).

        A KVM_RUN already inside the guest returns only when a signal reaches
        the thread that runs it (see `ptemu.kvm.smp`).
        """
        self.run_page[abi.RUN_IMMEDIATE_EXIT] = 1

    def u64(self, offset: int) -> int:
        """A little-endian u64 of ``struct kvm_run`` at `offset`."""
        return int.from_bytes(self.run_page[offset:offset + 8], "little")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.run_page[offset:offset + 4], "little")

    def run_bytes(self, offset: int, size: int) -> bytes:
        return bytes(self.run_page[offset:offset + size])

    def enable_sync_regs(self) -> bool:
        """Ask KVM to copy the general registers into ``kvm_run`` at every exit.

        Saves a KVM_GET_REGS ioctl per exit (single-stepping exits after every
        instruction). Returns False when KVM_CAP_SYNC_REGS lacks the x86
        register set; `sync_regs` must not be used then.
        """
        if not self.capabilities_sync_regs & abi.KVM_SYNC_X86_REGS:
            return False
        struct.pack_into("<Q", self.run_page, abi.RUN_VALID_REGS, abi.KVM_SYNC_X86_REGS)
        self.sync_regs_enabled = True
        return True

    def sync_regs_raw(self) -> bytes:
        """The ``struct kvm_regs`` KVM copied out at the last exit (see `enable_sync_regs`)."""
        return self.run_page[abi.RUN_SYNC_REGS:abi.RUN_SYNC_REGS + abi.RUN_SYNC_REGS_SIZE]

    def regs_raw(self) -> bytes:
        """The general registers as raw ``struct kvm_regs`` bytes, cheaply."""
        if self.sync_regs_enabled:
            return self.sync_regs_raw()
        _ioctl(self.fd, abi.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
        return bytes(self._regs)

    def get_regs(self) -> dict[str, int]:
        """KVM_GET_REGS as ptemu register names."""
        _ioctl(self.fd, abi.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
        regs = self._regs
        return {name: getattr(regs, name) for name in abi.KVM_REGS_NAMES}

    def set_regs(self, values: dict[str, int]) -> None:
        """KVM_SET_REGS: the given names change, the others keep their value."""
        _ioctl(self.fd, abi.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
        for name, value in values.items():
            setattr(self._regs, name, value)
        _ioctl(self.fd, abi.KVM_SET_REGS, self._regs, "KVM_SET_REGS")

    def get_sregs(self) -> abi.KvmSregs:
        """KVM_GET_SREGS (a fresh structure the caller may keep)."""
        sregs = abi.KvmSregs()
        _ioctl(self.fd, abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_single_step(self, enabled: bool) -> None:
        """KVM_SET_GUEST_DEBUG: exit with KVM_EXIT_DEBUG after every instruction."""
        debug = abi.KvmGuestDebug()
        if enabled:
            debug.control = abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP
        _ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, debug, "KVM_SET_GUEST_DEBUG")
