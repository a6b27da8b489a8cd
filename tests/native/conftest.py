"""Fixtures for tests that run instructions on the host CPU through `cpu_oracle`.

``oracle64`` / ``oracle32`` skip (naming what is missing: a compiler, ``gcc -m32``
support, an x86-64 Linux host) when the helper cannot be built; ``avx64`` also skips
on a host without AVX.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

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


@pytest.fixture(scope="session")
def avx64(oracle64: NativeOracle) -> NativeOracle:
    """The 64-bit helper on a host whose CPU and kernel enable AVX (YMM state)."""
    if not oracle64.capabilities.avx:
        pytest.skip("host CPU/kernel does not enable AVX (CPUID.1:ECX.AVX and XCR0 bits 1-2)")
    return oracle64
