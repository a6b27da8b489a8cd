"""Settings and fixtures shared by every test folder.

Hypothesis: no per-example deadline (an example that creates a Unicorn engine
takes milliseconds, more on a loaded 2-core machine); under CI (``CI`` set)
the examples are derandomized, so a run is reproducible; locally they vary and
keep exploring.

``oracle64`` / ``oracle32`` (the host-CPU oracle of tests/native) skip, naming
what is missing (a compiler, ``gcc -m32`` support, an x86-64 Linux host), when
the native helper cannot be built.
"""

from __future__ import annotations

import os

import pytest
from cpu_oracle import NativeOracle, OracleUnavailable, get_oracle
from hypothesis import settings

settings.register_profile("local", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "local")


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
