"""A racer thread for the concurrency tests: flips Accessed/Dirty bits the way
the CPU's page walker does, with the hardware compare-and-exchange, and
remembers what it left so a test can check that no flip was lost."""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from ptemu.atomic import libatomic

ACCESSED = 1 << 5
DIRTY = 1 << 6
RACER_BITS = ACCESSED | DIRTY


class Racer(threading.Thread):
    """Toggles bit 5 or 6 of random 8-byte entries at host `addresses` until
    stopped, each toggle one atomic read-modify-write (a CAS loop).

    `bits[i]` is what entry i's A/D bits must be once the racer stops (they
    start clear); `updates` counts the toggles.
    """

    def __init__(self, addresses: Sequence[int], seed: int = 1) -> None:
        super().__init__(daemon=True)
        self.addresses = list(addresses)
        self.bits = [0] * len(addresses)
        self.updates = 0
        self.retries = 0
        self._stop_flag = threading.Event()
        self._random = random.Random(seed)
        self.error: BaseException | None = None

    def run(self) -> None:
        exchange = libatomic().compare_exchange
        try:
            while not self._stop_flag.is_set():
                index = self._random.randrange(len(self.addresses))
                bit = ACCESSED if self._random.getrandbits(1) else DIRTY
                address = self.addresses[index]
                current = bytes(8)  # a guess; the failed exchange reads the truth
                while True:
                    value = int.from_bytes(current, "little") ^ bit
                    found = exchange(address, current, value.to_bytes(8, "little"))
                    if found is None:
                        break
                    current = found
                    self.retries += 1
                self.bits[index] ^= bit
                self.updates += 1
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(timeout=10)
        assert not self.is_alive(), "the racer did not stop"
        if self.error is not None:
            raise self.error


@contextmanager
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond, so commits and flips interleave."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def run_threads(target: Callable[..., None], shares: Sequence[object]) -> list[BaseException]:
    """Run `target(share)` on one thread per share under `fast_switching`;
    return what the threads raised (an empty list when nothing did)."""
    errors: list[BaseException] = []

    def guarded(share: object) -> None:
        try:
            target(share)
        except BaseException as error:  # noqa: BLE001 - reported to the caller
            errors.append(error)

    with fast_switching():
        threads = [threading.Thread(target=guarded, args=(share,)) for share in shares]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return errors
