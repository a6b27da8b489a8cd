"""Effective rights of a translation, combined over the levels of a walk.

The CPU grants an access only if every paging-structure entry on the way
grants it (Intel SDM vol. 3A, 4.6): a page is writable when R/W=1 at every
level, a user page when U/S=1 at every level, and executable when XD=0 at
every level (XD exists only with IA32_EFER.NXE=1). An entry that has no such
bit (a PAE PDPTE has no R/W, U/S or XD; a 32-bit entry has no XD) restricts
nothing. `walk` applies the same rule to one address; this module gives it to
code that combines rights level by level over a whole subtree (the translation
monitor), so the two cannot drift apart.

>>> from ptemu.paging.modes import paging_mode
>>> from ptemu.paging.entry import decode_entry
>>> mode = paging_mode("4level")
>>> pml4e = decode_entry(mode, mode.level(4), 0x1000_0005)   # present, user, read-only
>>> combine_rights(ALL_RIGHTS, pml4e)
AccessRights(writable=False, user=True, executable=True)
"""

from __future__ import annotations

from dataclasses import dataclass

from ptemu.paging.entry import DecodedEntry


@dataclass(frozen=True, slots=True)
class AccessRights:
    """The page attributes the levels grant together (SDM 4.6)."""

    writable: bool
    """R/W=1 at every level that has the bit."""
    user: bool
    """U/S=1 at every level that has the bit."""
    executable: bool
    """XD=0 at every level that has the bit (always true with IA32_EFER.NXE=0)."""


ALL_RIGHTS = AccessRights(writable=True, user=True, executable=True)
"""What a walk starts from: CR3 itself restricts nothing."""


def combine_rights(rights: AccessRights, entry: DecodedEntry) -> AccessRights:
    """The rights of `rights` further restricted by `entry` (one level down).

    Returns `rights` itself when the entry restricts nothing new, so a chain
    of permissive levels allocates nothing.
    """
    writable = rights.writable and entry.writable is not False
    user = rights.user and entry.user is not False
    executable = rights.executable and entry.nx is not True
    if (writable, user, executable) == (rights.writable, rights.user, rights.executable):
        return rights
    return AccessRights(writable=writable, user=user, executable=executable)


def translates(entry: DecodedEntry) -> bool:
    """Whether the CPU uses `entry` (present, no reserved bit set: SDM 4.7).

    A walk stops at an entry that is not present or has a reserved bit set;
    neither a page nor a table is reached through it.
    """
    return entry.present and not entry.reserved_bits
