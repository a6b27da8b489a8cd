"""The translation monitor: what an introspection engine builds on the write handler.

`TranslationMonitor` write-protects exactly the paging-structure pages that
its watched linear ranges reach, has the handler emulate the writes to them,
and reports how the translations of the watched ranges change
(semantics.md section 5; docs/monitor.md).

>>> from ptemu.memory import InMemoryGuestMemory
>>> from ptemu.monitor import InMemoryProtector, TranslationMonitor
>>> memory = InMemoryGuestMemory()
>>> memory.write(0x1000, (0x2003).to_bytes(8, "little"))   # PML4E 0 -> PDPT at 0x2000
>>> protector = InMemoryProtector()
>>> monitor = TranslationMonitor(memory, "4level", protector)
>>> handle = monitor.watch_space(0x1000, ranges="user")
>>> sorted(hex(page) for page in protector.protected)
['0x1000', '0x2000']
"""

from ptemu.monitor.monitor import (
    TIMINGS,
    ChangeCallback,
    MonitorResult,
    MonitorStatus,
    SpaceRanges,
    Timing,
    TranslationMonitor,
    WatchHandle,
)
from ptemu.monitor.protection import InMemoryProtector, PageProtector
from ptemu.monitor.translation import (
    EntryWrite,
    Run,
    Translation,
    TranslationChange,
    TranslationState,
    Unfollowed,
)
from ptemu.monitor.view import DEFAULT_MAX_TABLES

__all__ = [
    "DEFAULT_MAX_TABLES",
    "TIMINGS",
    "ChangeCallback",
    "EntryWrite",
    "InMemoryProtector",
    "MonitorResult",
    "MonitorStatus",
    "PageProtector",
    "Run",
    "SpaceRanges",
    "Timing",
    "Translation",
    "TranslationChange",
    "TranslationMonitor",
    "TranslationState",
    "Unfollowed",
    "WatchHandle",
]
