"""Native oracle fixtures for the differential tests (shared with tests/native)."""

from __future__ import annotations

import pytest
from cpu_oracle import NativeOracle, OracleUnavailable, get_oracle


def _oracle(bits: int) -> NativeOracle:
    try:
        return get_oracle(bits)
    except OracleUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def native64() -> NativeOracle:
    return _oracle(64)


@pytest.fixture(scope="session")
def native32() -> NativeOracle:
    return _oracle(32)
