"""The KVM ABI transcription against the numbers the C headers produce.

Expected values: the ioctl numbers and structure sizes as compiled from
<linux/kvm.h> on x86-64 (the same numbers strace and QEMU print), worked out
by hand from _IOC(dir, 0xAE, nr, size) = dir<<30 | size<<16 | 0xAE<<8 | nr.
"""

from __future__ import annotations

import ctypes

from ptemu.kvm import abi


def test_ioctl_numbers_match_linux_headers():
    assert abi.KVM_GET_API_VERSION == 0xAE00
    assert abi.KVM_CREATE_VM == 0xAE01
    assert abi.KVM_CHECK_EXTENSION == 0xAE03
    assert abi.KVM_GET_VCPU_MMAP_SIZE == 0xAE04
    assert abi.KVM_GET_SUPPORTED_CPUID == 0xC008AE05  # _IOWR, struct kvm_cpuid2 = 8 bytes
    assert abi.KVM_CREATE_VCPU == 0xAE41
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46  # _IOW, 32 bytes
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_GET_REGS == 0x8090AE81  # _IOR, 144 bytes
    assert abi.KVM_SET_REGS == 0x4090AE82
    assert abi.KVM_GET_SREGS == 0x8138AE83  # _IOR, 312 bytes
    assert abi.KVM_SET_SREGS == 0x4138AE84
    assert abi.KVM_SET_CPUID2 == 0x4008AE90
    assert abi.KVM_SET_GUEST_DEBUG == 0x4048AE9B  # _IOW, 72 bytes


def test_structure_sizes_match_linux_headers():
    assert ctypes.sizeof(abi.KvmRegs) == 18 * 8
    assert ctypes.sizeof(abi.KvmSegment) == 24
    assert ctypes.sizeof(abi.KvmDtable) == 16
    assert ctypes.sizeof(abi.KvmSregs) == 8 * 24 + 2 * 16 + 7 * 8 + 4 * 8
    assert ctypes.sizeof(abi.KvmUserspaceMemoryRegion) == 32
    assert ctypes.sizeof(abi.KvmGuestDebug) == 8 + 8 * 8
    assert ctypes.sizeof(abi.KvmCpuidEntry2) == 40


def test_kvm_run_offsets():
    # struct kvm_run: 8 header bytes, exit_reason, then cr8/apic_base; the exit
    # union starts at 32 and is 256 bytes; kvm_valid_regs/kvm_dirty_regs follow.
    assert abi.RUN_EXIT_REASON == 8
    assert abi.RUN_MMIO_PHYS_ADDR == 32
    assert abi.RUN_MMIO_DATA == 40
    assert abi.RUN_MMIO_LEN == 48
    assert abi.RUN_MMIO_IS_WRITE == 52
    assert abi.RUN_VALID_REGS == 32 + 256
    assert abi.RUN_SYNC_REGS == 32 + 256 + 16


def test_exit_reason_names():
    assert abi.exit_reason_name(6) == "KVM_EXIT_MMIO"
    assert abi.exit_reason_name(8) == "KVM_EXIT_SHUTDOWN"
    assert abi.exit_reason_name(999) == "KVM exit reason 999"
