"""Fixtures shared by several test folders: the host-CPU oracle (tests/native).

``oracle64`` / ``oracle32`` skip, naming what is missing (a compiler, ``gcc -m32``
support, an x86-64 Linux host), when the native helper cannot be built.
"""

from __future__ import annotations

import pytest
from cpu_oracle import NativeOracle, OracleUnavailable, get_oracle


def _oracle(bits: int) -> NativeOracle:
    try:
        return get_oracle(bits)
    except OracleUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def oracle64() -> NativeOracle:
    """The 64-bit native helper."""
    return _oracle(64)


@pytest.fixture(scope="session")
def oracle32() -> NativeOracle:
    """The 32-bit native helper (built with ``gcc -m32``; Debian package gcc-multilib)."""
    return _oracle(32)
