"""EPT write protection of single 4 KiB pages, made of KVM memslots.

KVM has no call that write-protects one guest page; what it has is the
read-only memslot (KVM_MEM_READONLY): a guest write to one stops the vCPU
with KVM_EXIT_MMIO, as an EPT write violation stops it under a hypervisor
that edits the EPT itself. `MemslotProtector` is the translation monitor's
`ptemu.monitor.PageProtector` over that: it owns every memslot of a VM and
keeps them a tiling of the VM's memory regions in which each protected page
is a read-only slot of its own and the pages between are writable slots as
large as they can be. `protect` splits the writable slot that holds the page
into up to three; `unprotect` merges the page back with its writable
neighbours. Every slot maps the region's own host memory, so guest memory
never moves or changes when the tiling does.

A slot change is only safe while no vCPU of the VM runs (KVM drops the
slot's mappings between the delete and the add): the runner calls the
monitor, and so this protector, from a vCPU's exit with the guest's only
vCPU stopped.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from ptemu.errors import UsageError
from ptemu.kvm import abi
from ptemu.kvm.device import GuestRegion, KvmUnavailable, Vm
from ptemu.values import PAGE_OFFSET_MASK, PAGE_SIZE


@dataclass(frozen=True, slots=True)
class _Slot:
    start: int
    end: int
    readonly: bool
    number: int
    region: GuestRegion


class MemslotProtector:
    """A `PageProtector` that makes each protected page a read-only KVM memslot.

    Takes over every memslot of `vm` (its regions, as `Vm.add_memory` made
    them), making each region one writable slot. Raises `KvmUnavailable`
    when the host's KVM has no read-only memslots.
    """

    def __init__(self, vm: Vm) -> None:
        if not vm.system.check_extension(abi.KVM_CAP_READONLY_MEM):
            raise KvmUnavailable("KVM_CAP_READONLY_MEM is not supported by this host's KVM: "
                                 "pages cannot be write-protected")
        self._vm = vm
        self._limit = vm.system.check_extension(abi.KVM_CAP_NR_MEMSLOTS) or 32
        self._starts: list[int] = []
        self._slots: dict[int, _Slot] = {}
        self._free_numbers: list[int] = []
        self._next_number = 0
        self.protected: set[int] = set()
        """Page GPAs protected now."""
        self.slot_changes = 0
        """KVM_SET_USER_MEMORY_REGION calls made since construction."""
        self.peak_slots = 0
        """Most memslots in use at once."""
        self.seconds = 0.0
        """Seconds spent in `protect` and `unprotect` (KVM's slot updates, mostly)."""
        for number, region in sorted(vm.regions.items()):
            vm.delete_slot(number)
            self.slot_changes += 1
        for region in sorted(vm.regions.values(), key=lambda r: r.gpa):
            self._add(region.gpa, region.gpa + region.size, False, region)

    # -- the protocol ------------------------------------------------------------

    def protect(self, gpa: int) -> None:
        """Make guest writes to the page at `gpa` exit (KVM_EXIT_MMIO)."""
        started = time.perf_counter()
        slot = self._slot_of(gpa)
        if slot.readonly:
            raise UsageError(f"page {gpa:#x} is already protected")
        self._remove(slot)
        if slot.start < gpa:
            self._add(slot.start, gpa, False, slot.region)
        self._add(gpa, gpa + PAGE_SIZE, True, slot.region)
        if gpa + PAGE_SIZE < slot.end:
            self._add(gpa + PAGE_SIZE, slot.end, False, slot.region)
        self.protected.add(gpa)
        self.seconds += time.perf_counter() - started

    def unprotect(self, gpa: int) -> None:
        """Let guest writes to the page at `gpa` reach memory without an exit."""
        started = time.perf_counter()
        slot = self._slot_of(gpa)
        if not slot.readonly:
            raise UsageError(f"page {gpa:#x} is not protected")
        start, end = slot.start, slot.end
        merged = [slot]
        before = self._slots.get(self._start_before(start))
        if before is not None and before.end == start and not before.readonly \
                and before.region is slot.region:
            merged.append(before)
            start = before.start
        after = self._slots.get(end)
        if after is not None and not after.readonly and after.region is slot.region:
            merged.append(after)
            end = after.end
        for old in merged:
            self._remove(old)
        self._add(start, end, False, slot.region)
        self.protected.discard(gpa)
        self.seconds += time.perf_counter() - started

    # -- queries -------------------------------------------------------------------

    def readonly_pages(self) -> frozenset[int]:
        """Pages whose memslot is read-only now (KVM's side of `protected`)."""
        return frozenset(slot.start for slot in self._slots.values() if slot.readonly)

    @property
    def slots(self) -> int:
        """Memslots in use now."""
        return len(self._slots)

    # -- slot bookkeeping ----------------------------------------------------------

    def _slot_of(self, gpa: int) -> _Slot:
        if isinstance(gpa, bool) or not isinstance(gpa, int) or gpa < 0 \
                or gpa & PAGE_OFFSET_MASK:
            raise UsageError(f"protection takes a page-aligned guest-physical address, "
                             f"got {gpa!r}")
        slot = self._slots.get(self._start_before(gpa + 1))
        if slot is None or not slot.start <= gpa < slot.end:
            raise UsageError(f"page {gpa:#x} is not guest memory of this VM")
        return slot

    def _start_before(self, gpa: int) -> int:
        """The start of the last slot that begins below `gpa` (-1: none)."""
        index = bisect.bisect_left(self._starts, gpa)
        return self._starts[index - 1] if index else -1

    def _number(self) -> int:
        if self._free_numbers:
            return self._free_numbers.pop()
        if self._next_number >= self._limit:
            raise UsageError(f"this host's KVM allows {self._limit} memslots, and the "
                             "protected pages would need more")
        self._next_number += 1
        return self._next_number - 1

    def _add(self, start: int, end: int, readonly: bool, region: GuestRegion) -> None:
        number = self._number()
        host = region.host_address + (start - region.gpa)
        self._vm.map_slot(number, start, end - start, host, readonly=readonly)
        self.slot_changes += 1
        self._slots[start] = _Slot(start, end, readonly, number, region)
        bisect.insort(self._starts, start)
        self.peak_slots = max(self.peak_slots, len(self._slots))

    def _remove(self, slot: _Slot) -> None:
        self._vm.delete_slot(slot.number)
        self.slot_changes += 1
        del self._slots[slot.start]
        self._starts.remove(slot.start)
        self._free_numbers.append(slot.number)
