"""Shared fixtures of the KVM tests: an opened /dev/kvm, or a skip that says why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ptemu.kvm.device import KvmSystem, KvmUnavailable
from ptemu.kvm.probe import probe_mode


@pytest.fixture(scope="session")
def kvm() -> Iterator[KvmSystem]:
    """The opened /dev/kvm; the test is skipped when there is none or opening is refused."""
    try:
        system = KvmSystem()
    except KvmUnavailable as error:
        pytest.skip(f"needs a real hypervisor: /dev/kvm not available ({error})")
    yield system
    system.close()


def require_mode(kvm: KvmSystem, paging: str, code_bits: int) -> None:
    """Skip unless this host's KVM can run `paging` with `code_bits` code (probed)."""
    support = probe_mode(kvm, paging, code_bits)
    if not support.supported:
        pytest.skip(f"{paging} paging with {code_bits}-bit code not available under this "
                    f"host's KVM: {support.reason}")
