"""The Linux KVM user-space ABI for x86, spelled with `ctypes` and `struct`.

Everything here is a transcription of ``<linux/kvm.h>`` and
``<asm/kvm.h>`` (x86): ioctl request numbers, capability and flag numbers,
exit reasons and the structures the ioctls exchange. Nothing here talks to
the kernel: `ptemu.kvm.device` does. Only the standard library is used so
that ptemu needs no binding package to drive a real hypervisor.
"""

from __future__ import annotations

import ctypes
import mmap
from enum import IntEnum

# --- ioctl number encoding (asm-generic/ioctl.h) ------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _ioc(direction: int, number: int, size: int) -> int:
    return ((direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT)
            | (number << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _io(number: int) -> int:
    return _ioc(_IOC_NONE, number, 0)


def _ior(number: int, size: int) -> int:
    return _ioc(_IOC_READ, number, size)


def _iow(number: int, size: int) -> int:
    return _ioc(_IOC_WRITE, number, size)


def _iowr(number: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, number, size)


# --- structures (asm/kvm.h, linux/kvm.h) --------------------------------------


KVM_REGS_NAMES: tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
"""Fields of ``struct kvm_regs`` in order; they are also ptemu's register names."""


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs``: the general registers, RIP and RFLAGS."""

    _fields_ = [(name, ctypes.c_uint64) for name in KVM_REGS_NAMES]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``: a segment register with its hidden part."""

    _fields_ = [
        ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8), ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable``: GDTR or IDTR."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs``: segments, descriptor tables, control registers, EFER."""

    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region``: one memslot."""

    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class KvmGuestDebug(ctypes.Structure):
    """``struct kvm_guest_debug`` with the x86 ``kvm_guest_debug_arch``."""

    _fields_ = [("control", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("debugreg", ctypes.c_uint64 * 8)]


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2``: one CPUID leaf/subleaf."""

    _fields_ = [("function", ctypes.c_uint32), ("index", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32),
                ("ecx", ctypes.c_uint32), ("edx", ctypes.c_uint32),
                ("padding", ctypes.c_uint32 * 3)]


CPUID_MAX_ENTRIES = 256
"""Room for the supported-CPUID table (KVM returns E2BIG when it is too small)."""


class KvmCpuid2(ctypes.Structure):
    """``struct kvm_cpuid2`` with room for `CPUID_MAX_ENTRIES` entries."""

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                ("entries", KvmCpuidEntry2 * CPUID_MAX_ENTRIES)]


RunPage = mmap.mmap
"""The vCPU's shared ``struct kvm_run`` mapping."""

# kvm_run: the fixed header, then a union at offset 32 (linux/kvm.h).
RUN_EXIT_REASON = 8
"""Offset of ``__u32 exit_reason`` in ``struct kvm_run``."""
RUN_IMMEDIATE_EXIT = 1
"""Offset of ``__u8 immediate_exit``."""
RUN_UNION = 32
"""Offset of the exit-reason union."""
RUN_MMIO_PHYS_ADDR = RUN_UNION
RUN_MMIO_DATA = RUN_UNION + 8
RUN_MMIO_LEN = RUN_UNION + 16
RUN_MMIO_IS_WRITE = RUN_UNION + 20
RUN_IO_DIRECTION = RUN_UNION
RUN_IO_SIZE = RUN_UNION + 1
RUN_IO_PORT = RUN_UNION + 2
RUN_IO_COUNT = RUN_UNION + 4
RUN_IO_DATA_OFFSET = RUN_UNION + 8
RUN_DEBUG_EXCEPTION = RUN_UNION
RUN_DEBUG_PC = RUN_UNION + 8
RUN_FAIL_ENTRY_REASON = RUN_UNION
RUN_INTERNAL_SUBERROR = RUN_UNION
RUN_INTERNAL_NDATA = RUN_UNION + 4
RUN_INTERNAL_DATA = RUN_UNION + 8

RUN_VALID_REGS = 288
"""Offset of ``__u64 kvm_valid_regs``: which register sets KVM copies out at every exit."""
RUN_DIRTY_REGS = 296
RUN_SYNC_REGS = 304
"""Offset of ``struct kvm_sync_regs``: its ``struct kvm_regs`` comes first."""
RUN_SYNC_REGS_SIZE = 144

KVM_SYNC_X86_REGS = 1 << 0

# --- ioctl request numbers ----------------------------------------------------

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_SET_GUEST_DEBUG = _iow(0x9B, ctypes.sizeof(KvmGuestDebug))

KVM_API_VERSION = 12
"""The only API version there has ever been (KVM_GET_API_VERSION)."""

KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_SYNC_REGS = 74
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81

KVM_MEM_READONLY = 1 << 1
"""Memslot flag: guest reads hit memory, guest writes exit as KVM_EXIT_MMIO."""

KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2


class ExitReason(IntEnum):
    """``KVM_EXIT_*``: why KVM_RUN returned to user space."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24


def exit_reason_name(value: int) -> str:
    """``KVM_EXIT_<NAME>`` for a raw exit reason, or its number when unknown."""
    try:
        return f"KVM_EXIT_{ExitReason(value).name}"
    except ValueError:
        return f"KVM exit reason {value}"
