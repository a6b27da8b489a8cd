"""Fixtures for the oracle's own tests (``oracle64``/``oracle32`` are in tests/conftest.py)."""

from __future__ import annotations

import pytest
from cpu_oracle import NativeOracle


@pytest.fixture(scope="session")
def avx64(oracle64: NativeOracle) -> NativeOracle:
    """The 64-bit helper on a host whose CPU and kernel enable AVX (YMM state)."""
    if not oracle64.capabilities.avx:
        pytest.skip("host CPU/kernel does not enable AVX (CPUID.1:ECX.AVX and XCR0 bits 1-2)")
    return oracle64
