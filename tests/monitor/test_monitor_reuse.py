"""A table freed, rewritten as data while unwatched, and linked again.

The guest's writes to a page the monitor has unprotected never reach the
handler, so what the handler remembered about that page's entries (a pending
partial write, the last write a duplicate is recognised by) is stale once the
page is a table again. Values worked out by hand (semantics section 3): a
1-byte store leaves an 8-byte entry partial; a later 8-byte MOV completes it
with ``old`` = the value before the first pending write, which must be the one
memory held when the page became watched again, not the one before the free.
"""

from __future__ import annotations

from monitor_guest import RW, US, A, D, Guest, P

from ptemu.status import EntryState

PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x4000, 0x3000
TABLE = P | RW | US


def _guest() -> Guest:
    guest = Guest("4level")
    guest.put(PML4, PDPT | TABLE)
    guest.put(PDPT, PD | TABLE)
    guest.put(PD, PT | TABLE)
    guest.put(PT, 0x10000 | TABLE | A | D)
    guest.monitor.watch_space(PML4, ranges="user")
    return guest


def test_a_reused_table_completes_its_entries_from_what_memory_held_when_relinked():
    guest = _guest()
    guest.write(PT, 0x10000 | P | US | A | D, how="byte")      # clears R/W: partial
    assert guest.monitor.handler.pending() == (PT,)
    guest.write(PD, 0, how="mov")                               # frees the PT
    assert PT not in guest.protector.protected
    assert guest.monitor.handler.pending() == ()
    guest.put(PT, 0x55555000 | P)                               # data, no exit
    guest.write(PD, PT | TABLE, how="mov")                      # linked again
    assert PT in guest.protector.protected
    (result,) = guest.write(PT, 0x20000 | TABLE | A | D, how="mov")
    assert result.event is not None
    (entry,) = result.event.entries
    assert entry.state is EntryState.COMPLETE
    assert (entry.old, entry.new) == (0x55555000 | P, 0x20000 | TABLE | A | D)


def test_a_table_still_watched_keeps_its_pending_entry():
    guest = _guest()
    guest.write(PT, 0x10000 | P | US | A | D, how="byte")
    guest.write(PD, PT | TABLE | 0x200, how="mov")              # a software bit: still linked
    assert guest.monitor.handler.pending() == (PT,)
    (result,) = guest.write(PT, 0x20000 | TABLE | A | D, how="mov")
    assert result.event is not None
    (entry,) = result.event.entries
    assert (entry.old, entry.new) == (0x10000 | TABLE | A | D, 0x20000 | TABLE | A | D)
