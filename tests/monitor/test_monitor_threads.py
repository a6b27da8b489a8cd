"""One monitor served by several vCPU threads at once: leaf writes from four
threads into a watched space (each thread its own PTEs, with a 1 us switch
interval) lose no change, and the view ends equal to a fresh walk of memory."""

from __future__ import annotations

import random
import sys
import threading

from ptemu.bench import monitor_bench as bench
from ptemu.handler import WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.monitor import InMemoryProtector, TranslationMonitor
from ptemu.monitor.monitor import MonitorStatus
from ptemu.paging import paging_mode, walk
from ptemu.status import Status
from ptemu.vcpu import Vcpu

THREADS = 4
WRITES = 150
PAGES = 2048


def test_threads_sharing_one_monitor_see_every_change_and_end_on_memory() -> None:
    memory = InMemoryGuestMemory()
    space = bench.build_space(PAGES, memory)
    changes: list[object] = []
    monitor = TranslationMonitor(memory, "4level", InMemoryProtector())
    monitor.watch_space(space.cr3, changes.append, ranges="all")
    pt_gpas = [table + 8 * index for table in space.pts[:THREADS * 2] for index in range(512)]
    errors: list[BaseException] = []
    written: list[int] = []

    def serve(thread: int) -> None:
        generator = random.Random(thread)
        vcpu = Vcpu()
        mine = pt_gpas[thread::THREADS]
        try:
            for _ in range(WRITES):
                gpa = generator.choice(mine)
                value = (bench.DATA_BASE + generator.randrange(1 << 20) * 0x1000) | 0x7
                gla = bench.KERNEL_MAP + gpa
                vcpu.begin_exit()
                result = monitor.handle_ept_write(vcpu, WriteEvent(
                    gpa, gla, {"rip": 0x40_1000, "rdi": gla, "rax": value},
                    bench.MOV_STORE, 64))
                assert result.status is MonitorStatus.HANDLED
                assert result.event is not None and result.event.status is Status.EMULATED
                written.append(gpa)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=serve, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch)
    assert errors == [] and len(written) == THREADS * WRITES
    assert changes, "the writes changed translations"
    mode = paging_mode("4level")
    # Every page whose PTE was written: the monitor's view equals a fresh walk.
    pt_linear = {table: index for index, table in enumerate(space.pts)}
    for gpa in set(written):
        table, slot = gpa & ~0xFFF, (gpa & 0xFFF) // 8
        gla = mode.canonical((pt_linear[table] * 512 + slot) * 0x1000)
        fresh = walk(mode, space.cr3, gla, memory)
        state = monitor.translation(space.cr3, gla)
        assert getattr(state, "frame", None) == fresh.gpa, hex(gla)
