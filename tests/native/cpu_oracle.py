"""Run one x86 instruction on the host CPU: an independent oracle for differential tests.

The instruction really executes on this machine (x86-64 Linux), with the registers and
memory the caller chose, so its result is the architecture's answer, not an emulator's.

API::

    from cpu_oracle import run_native, NativeResult, Outcome

    result = run_native(
        b"\\x48\\x89\\x37",                       # mov [rdi], rsi
        {"rdi": 0x1000_0008, "rsi": 0x1122334455667788},
        {0x1000_0000: bytes(4096)},              # page address -> contents (n * 4096 bytes)
        rip=0x4000_0000,                         # where the code bytes are placed
        bits=64,                                 # 64, or 32 (a 32-bit helper process)
    )
    result.outcome        # Outcome.COMPLETED | Outcome.FAULTED | Outcome.TIMED_OUT
    result.regs           # dict: GPRs, rip, rflags, xmm*, ymm* (AVX hosts), fs_base/gs_base if set
    result.rflags         # CF PF AF ZF SF DF OF and the always-one bit 1 (others masked)
    result.pages          # dict: page address -> contents after the run (same keys/lengths)
    result.fault          # NativeFault(signal, si_code, address, trapno, error_code) or None

    get_oracle(bits).capabilities   # Capabilities(bits, avx, fsgsbase, vector_registers)

Registers in (lower-case fixture names; anything else raises `OracleInputError`):

- ``rax rcx rdx rbx rsp rbp rsi rdi`` and ``r8``..``r15`` (64-bit only). Every GPR not given
  is 0. RSP is fully supported: the state is loaded with ``rt_sigreturn`` and the result is
  captured on an alternate signal stack, so RSP may point into a caller page (push/pop work)
  or anywhere at all. In 32-bit mode the same ``r`` names carry the 32-bit ``e`` registers.
- ``rflags``: only CF PF AF ZF SF OF and DF are loaded; every other bit (TF, IF, AC, ...) is
  silently masked, so fixture values such as ``0x246`` can be passed as they are.
- ``xmm0``..``xmm15`` / ``ymm0``..``ymm15`` (``0``..``7`` in 32-bit mode), as integers
  (little-endian register bytes; ``xmmN`` is the low half of ``ymmN``; given together they
  must agree). Vector registers not given are 0; MXCSR is its reset value 0x1F80. A non-zero
  upper YMM half on a host without AVX raises `OracleInputError`.
- ``fs_base`` / ``gs_base`` (64-bit only; needs the kernel's FSGSBASE, see capabilities):
  written with WRFSBASE/WRGSBASE just before the instruction and restored first thing after
  it, so FS/GS-prefixed forms run natively. In 32-bit mode segment bases are not supported.
- ``rip`` may be given in ``regs`` instead of the keyword; both must agree if both are given.

Memory: every page is mapped at its fixed address with ``MAP_FIXED_NOREPLACE`` (addresses
page-aligned, at least `MIN_ADDRESS` (Linux ``vm.mmap_min_addr``), and free in the helper:
keep to 0x1000..0x5000_0000; the helper's own image, heap and stacks lie at 0x5555_xxxx_xxxx
and 0x7fxx_xxxx_xxxx (64-bit) or 0x56xx_xxxx and 0xf7xx_xxxx up (32-bit)). The code goes to
its own page(s) at ``rip`` (read+execute, not writable), followed by an INT3 sentinel; a
data page on the code's page(s) is refused. An access outside the given pages faults like
on real hardware (#PF, si_code SEGV_MAPERR), with one difference: an address that happens
to hit the helper's own memory is readable, and a store there faults with si_code
SEGV_ACCERR (the helper write-protects itself while the instruction runs), so keep operand
addresses inside the caller's pages or in the range above.

Faults are results, not exceptions: a SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGTRAP/SIGSYS is
reported in ``fault`` with the registers and pages as they were when it was delivered (for
a fault: the state before the faulting instruction, or, inside REP string instructions, at
the faulting iteration). How Linux maps CPU exceptions: #PF -> SIGSEGV with ``address`` =
the faulting linear address, ``trapno`` 14 and the page-fault error code (bit 1 = write);
#GP(0) (e.g. CMPXCHG16B or MOVDQA on a misaligned operand, a non-canonical address) ->
SIGSEGV with si_code SI_KERNEL (0x80), ``address`` 0, ``trapno`` 13 (never SIGBUS); #SS (a
non-canonical stack address) and #AC -> SIGBUS; #UD -> SIGILL, ``trapno`` 6; #DE -> SIGFPE.
A ``syscall`` or ``int 0x80`` is blocked by a seccomp filter and reported as SIGSYS
(``address`` holds the system-call number). An instruction still running after one second
(``jmp $``) gives ``Outcome.TIMED_OUT``, with the registers at that moment.

Errors: `OracleUnavailable` (no C compiler, no ``gcc -m32`` support, not x86-64 Linux: the
message names what is missing, so tests can ``pytest.skip(str(exc))``), `OracleInputError`
(a bad request: names the offending register, page or address) and `OracleError` (the
helper itself failed; a harness error, never a CPU result; the next call restarts it).

How: ``cpu_oracle.c`` is compiled on first use with ``$CC``/``cc``/``gcc`` into
``tests/native/build/`` (or ``$PTEMU_ORACLE_BUILD_DIR``), keyed by a hash of the source, and
kept running as one persistent helper per bitness speaking a small binary protocol on its
stdin/stdout (described at the top of the C file). The helper runs cases in a forked worker
that is reused between cases (a fork per case would cost ~0.5 ms on this VM); while the
instruction runs, the worker's memory is write-protected and a seccomp filter refuses
system calls from anywhere but the helper's own code, so no instruction can corrupt the
worker for later cases or touch the machine. A worker that dies is replaced. Throughput:
roughly 2,000-4,000 cases per second here, most of it Python-side encoding.

Not run natively: 16-bit code, segment bases in 32-bit mode, and privileged instructions
(they raise #GP like any user-mode program). Branches into the helper's own code are not
sandboxed beyond the above: the oracle is for data instructions.
"""

from __future__ import annotations

import atexit
import enum
import functools
import hashlib
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FLAGS_MASK",
    "MIN_ADDRESS",
    "PAGE_SIZE",
    "Capabilities",
    "NativeFault",
    "NativeOracle",
    "NativeResult",
    "OracleError",
    "OracleInputError",
    "OracleUnavailable",
    "Outcome",
    "get_oracle",
    "native_register_names",
    "run_native",
]

PAGE_SIZE = 4096
FLAGS_MASK = 0x0CD5
"""CF PF AF ZF SF DF OF: the RFLAGS bits loaded from the caller and compared after."""
RFLAGS_RESERVED_ONE = 0x2


def _mmap_min_addr() -> int:
    try:
        return max(PAGE_SIZE, int(Path("/proc/sys/vm/mmap_min_addr").read_text()))
    except (OSError, ValueError):
        return 0x10000


MIN_ADDRESS = _mmap_min_addr()
"""Linux's ``vm.mmap_min_addr`` (4096 here, 65536 on stock Debian): nothing maps below it."""

GPR_NAMES: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
"""The wire order of the general registers (their encoding numbers)."""

_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE / "cpu_oracle.c"
_CFLAGS = (
    "-O2", "-std=gnu11", "-Wall", "-Wextra", "-fno-stack-protector", "-mno-red-zone",
)
"""No stack protector: the handler starts while FS may hold the caller's base (TLS). No red
zone: inline PUSHF/POPF must not clobber locals below RSP."""
_LINK_CHOICES = (("-static-pie",), ())
"""Static first: a small static process forks faster; fall back to the default link."""

_MAGIC_HELLO = 0x484F5450
_MAGIC_REQ = 0x514F5450
_MAGIC_RESP = 0x524F5450
_PROTOCOL_VERSION = 2
_REQ_SET_FS, _REQ_SET_GS, _REQ_SET_YMM = 0x1, 0x2, 0x4
_FEAT_AVX, _FEAT_FSGSBASE = 0x1, 0x2
_HELLO = struct.Struct("<8I")
_REQ_HEAD = struct.Struct("<4I4Q16Q512s")
_RESP_HEAD = struct.Struct("<3Ii3Q4Q16Q512s2I")
_STATUS_COMPLETED, _STATUS_FAULT, _STATUS_TIMEOUT, _STATUS_SETUP, _STATUS_CRASHED = range(5)

_CPU_EXCEPTIONS = {
    0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC",
    18: "#MC", 19: "#XM", 21: "#CP",
}
"""Exception vectors (SDM vol. 3A, table 6-1), for readable fault reports."""


class OracleUnavailable(RuntimeError):
    """The oracle cannot run here; the message names what is missing."""


class OracleInputError(ValueError):
    """A request the oracle refuses; the message names the register, page or address."""


class OracleError(RuntimeError):
    """The helper process failed: a harness error, not a CPU result."""


class Outcome(enum.Enum):
    """How the instruction ended."""

    COMPLETED = "completed"
    """It retired and execution reached the sentinel after it."""
    FAULTED = "faulted"
    """A signal was delivered (see `NativeResult.fault`)."""
    TIMED_OUT = "timed_out"
    """Still running after one second (e.g. a jump to itself)."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the host and the helper of one bitness can do."""

    bits: int
    avx: bool
    """YMM registers are loaded and reported (CPUID AVX and XCR0 enable it)."""
    fsgsbase: bool
    """``fs_base``/``gs_base`` are supported (64-bit helper, kernel enabled FSGSBASE)."""
    vector_registers: int
    """How many XMM/YMM registers the mode has: 16 (64-bit) or 8 (32-bit)."""


@dataclass(frozen=True, slots=True)
class NativeFault:
    """The signal the instruction raised, as Linux reported it."""

    signal: signal.Signals
    si_code: int
    address: int
    """``si_addr`` (the faulting address for #PF; 0 for #GP); for SIGSYS the syscall number."""
    trapno: int
    """The CPU exception vector from the signal frame (14 = #PF, 13 = #GP, 6 = #UD)."""
    error_code: int
    """The exception's error code from the signal frame (for #PF: bit 1 set = write)."""

    @property
    def exception(self) -> str | None:
        """The SDM mnemonic of `trapno` (``"#GP"``), or None for a non-exception signal."""
        if self.signal == signal.SIGSYS:
            return None
        return _CPU_EXCEPTIONS.get(self.trapno)


@dataclass(frozen=True, slots=True)
class NativeResult:
    """The machine state after the instruction (or at the fault)."""

    outcome: Outcome
    regs: dict[str, int]
    """GPRs, ``rip``, ``rflags``, vector registers (and ``fs_base``/``gs_base`` if given)."""
    rflags: int
    """RFLAGS masked to `FLAGS_MASK`, plus the always-one bit 1 (same as ``regs["rflags"]``)."""
    rflags_raw: int
    """RFLAGS exactly as the signal frame held it (IF and friends included)."""
    pages: dict[int, bytes]
    fault: NativeFault | None


@functools.cache
def native_register_names(bits: int = 64, *, avx: bool = True) -> frozenset[str]:
    """The register names `run_native` accepts for `bits` (to filter an event's registers)."""
    _check_bits(bits)
    nvec = 16 if bits == 64 else 8
    names = set(GPR_NAMES if bits == 64 else GPR_NAMES[:8]) | {"rip", "rflags"}
    names |= {f"xmm{i}" for i in range(nvec)}
    if avx:
        names |= {f"ymm{i}" for i in range(nvec)}
    if bits == 64:
        names |= {"fs_base", "gs_base"}
    return frozenset(names)


def _check_bits(bits: int) -> None:
    if bits not in (32, 64):
        raise OracleInputError(f"bits: expected 32 or 64, got {bits!r}")


# ---- building the helper -------------------------------------------------------------


def _build_dir() -> Path:
    override = os.environ.get("PTEMU_ORACLE_BUILD_DIR")
    candidates = [Path(override)] if override else []
    candidates += [_HERE / "build", Path(tempfile.gettempdir()) / "ptemu-cpu-oracle"]
    for directory in candidates:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    raise OracleUnavailable(f"no writable build directory among {[str(c) for c in candidates]}")


def _find_compiler() -> str:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc")):
        path = shutil.which(name)
        if path:
            return path
    raise OracleUnavailable(
        "cpu_oracle: no C compiler: neither $CC, 'cc' nor 'gcc' is on PATH "
        "(Debian: apt-get install gcc)"
    )


def build_helper(bits: int) -> Path:
    """Compile the helper for `bits` (once per source version) and return its path."""
    _check_bits(bits)
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise OracleUnavailable(
            f"cpu_oracle: needs an x86-64 Linux host, this is {sys.platform}/{platform.machine()}"
        )
    compiler = _find_compiler()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + repr((_CFLAGS, _LINK_CHOICES, compiler)).encode()).hexdigest()
    target = _build_dir() / f"cpu_oracle{bits}-{key[:16]}"
    if target.exists():
        return target
    errors: list[str] = []
    for link in _LINK_CHOICES:
        scratch = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        cmd = [compiler, f"-m{bits}", *_CFLAGS, *link, "-o", str(scratch), str(_SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            os.replace(scratch, target)  # atomic: concurrent builders agree on the result
            for stale in target.parent.glob(f"cpu_oracle{bits}-*"):
                if stale != target and not stale.name.endswith(".tmp"):
                    stale.unlink(missing_ok=True)
            return target
        scratch.unlink(missing_ok=True)
        errors.append(f"$ {' '.join(cmd)}\n{proc.stderr.strip()[-800:]}")
    hint = " (32-bit builds need Debian's gcc-multilib)" if bits == 32 else ""
    raise OracleUnavailable(
        f"cpu_oracle: cannot build the {bits}-bit helper with {compiler} -m{bits}{hint}:\n"
        + "\n".join(errors)
    )


# ---- the persistent helper process -----------------------------------------------------


class NativeOracle:
    """One running helper for one bitness; `run` executes a case. Thread-safe."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._path = build_helper(bits)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self.capabilities = self._start()

    def _start(self) -> Capabilities:
        # No rseq registration: the helper write-protects its memory while the
        # instruction runs, and the kernel must not need to write an rseq area then.
        env = {**os.environ, "GLIBC_TUNABLES": "glibc.pthread.rseq=0"}
        self._proc = subprocess.Popen(
            [str(self._path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env,
        )
        raw = self._read(_HELLO.size)
        magic, version, bits, features, nvec, _max_pages, _max_code, _ymm = _HELLO.unpack(raw)
        if magic != _MAGIC_HELLO or version != _PROTOCOL_VERSION or bits != self.bits:
            raise OracleError(f"cpu_oracle: unexpected hello from {self._path}")
        self._max_pages, self._max_code = _max_pages, _max_code
        return Capabilities(
            bits=bits, avx=bool(features & _FEAT_AVX),
            fsgsbase=bool(features & _FEAT_FSGSBASE), vector_registers=nvec,
        )

    @property
    def helper_pid(self) -> int | None:
        """The supervisor process's pid (its one child is the worker), or None if stopped."""
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        """Stop the helper (it exits when its stdin closes)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()

    def _read(self, size: int) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        data = self._proc.stdout.read(size)
        if len(data) != size:
            self._die()
        return data

    def _die(self) -> None:
        proc, self._proc = self._proc, None
        detail = ""
        if proc is not None:
            proc.kill()
            proc.wait()
            detail = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        raise OracleError(f"cpu_oracle: the {self.bits}-bit helper died: {detail or 'no output'}")

    def run(
        self,
        code: bytes,
        regs: Mapping[str, int],
        pages: Mapping[int, bytes],
        *,
        rip: int | None = None,
    ) -> NativeResult:
        """Execute `code` at `rip` with `regs` against `pages`; see the module docstring."""
        request, layout, given = self._encode(code, regs, pages, rip)
        with self._lock:
            if self._proc is None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(request)
                self._proc.stdin.flush()
            except BrokenPipeError:
                self._die()
            head = _RESP_HEAD.unpack(self._read(_RESP_HEAD.size))
            (magic, status, signo, si_code, fault_addr, trapno, error_code, out_rip,
             out_rflags, fs_base, gs_base, *rest) = head
            gprs, vec, npages, msg_len = rest[:16], rest[16], rest[17], rest[18]
            if magic != _MAGIC_RESP:
                self._die()
            page_bytes = self._read(npages * PAGE_SIZE) if npages else b""
            message = self._read(msg_len).decode(errors="replace") if msg_len else ""
        if status == _STATUS_SETUP:
            raise OracleInputError(f"cpu_oracle: {message}")
        if status == _STATUS_CRASHED:
            raise OracleError(
                f"cpu_oracle: the case's child process died without a report "
                f"(signal {signo}, exit status {si_code})"
            )
        return self._decode(status, signo, si_code, fault_addr, trapno, error_code, out_rip,
                            out_rflags, fs_base, gs_base, gprs, vec, page_bytes, layout, given)

    # -- encoding ---------------------------------------------------------------------

    def _encode(
        self, code: bytes, regs: Mapping[str, int], pages: Mapping[int, bytes], rip: int | None
    ) -> tuple[bytes, list[tuple[int, int]], frozenset[str]]:
        caps = self.capabilities
        allowed = native_register_names(self.bits, avx=True)
        addr_limit = 1 << 47 if self.bits == 64 else 1 << 32
        word_bits = 64 if self.bits == 64 else 32

        if not isinstance(code, (bytes, bytearray)) or not 0 < len(code) <= self._max_code:
            raise OracleInputError(f"code: expected 1..{self._max_code} bytes, got {code!r}")
        for name, value in regs.items():
            if name not in allowed:
                raise OracleInputError(
                    f"register {name!r} is not supported by the {self.bits}-bit oracle "
                    f"(supported: {', '.join(sorted(allowed))})"
                )
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise OracleInputError(f"register {name}: expected a non-negative int, "
                                       f"got {value!r}")
        if rip is None:
            rip = regs.get("rip")
            if rip is None:
                raise OracleInputError("rip: give it as the keyword or in regs")
        elif "rip" in regs and regs["rip"] != rip:
            raise OracleInputError(f"rip: keyword {rip:#x} differs from regs['rip'] "
                                   f"{regs['rip']:#x}")
        if not MIN_ADDRESS <= rip < addr_limit - PAGE_SIZE:
            raise OracleInputError(f"rip {rip:#x}: outside the mappable user range")

        gprs = []
        for name in GPR_NAMES:
            value = regs.get(name, 0)
            if value >> word_bits:
                raise OracleInputError(f"register {name}: {value:#x} exceeds {word_bits} bits")
            gprs.append(value)
        rflags = regs.get("rflags", RFLAGS_RESERVED_ONE)
        if rflags >> 64:
            raise OracleInputError(f"register rflags: {rflags:#x} exceeds 64 bits")

        vec = bytearray(16 * 32)
        flags = 0
        for index in range(caps.vector_registers):
            xmm, ymm = regs.get(f"xmm{index}"), regs.get(f"ymm{index}")
            if xmm is not None and xmm >> 128:
                raise OracleInputError(f"register xmm{index}: {xmm:#x} exceeds 128 bits")
            if ymm is not None and ymm >> 256:
                raise OracleInputError(f"register ymm{index}: {ymm:#x} exceeds 256 bits")
            if xmm is not None and ymm is not None and ymm & ((1 << 128) - 1) != xmm:
                raise OracleInputError(f"registers xmm{index} and the low half of ymm{index} "
                                       "differ")
            value = ymm if ymm is not None else (xmm or 0)
            if value >> 128:
                if not caps.avx:
                    raise OracleInputError(f"register ymm{index}: upper half given but the "
                                           "host has no AVX")
                flags |= _REQ_SET_YMM
            vec[32 * index:32 * index + 32] = value.to_bytes(32, "little")

        fs_base, gs_base = regs.get("fs_base"), regs.get("gs_base")
        for name, base in (("fs_base", fs_base), ("gs_base", gs_base)):
            if base is None:
                continue
            if not caps.fsgsbase:
                raise OracleInputError(f"register {name}: the host kernel does not enable "
                                       "FSGSBASE, so segment bases cannot be set")
            if base >> 64:
                raise OracleInputError(f"register {name}: {base:#x} exceeds 64 bits")
        if fs_base is not None:
            flags |= _REQ_SET_FS
        if gs_base is not None:
            flags |= _REQ_SET_GS

        layout: list[tuple[int, int]] = []  # (caller's key, number of pages)
        body = bytearray()
        seen: set[int] = set()
        for address, data in pages.items():
            if not isinstance(data, (bytes, bytearray)) or not data or len(data) % PAGE_SIZE:
                raise OracleInputError(f"page {address:#x}: contents must be a non-empty "
                                       f"multiple of {PAGE_SIZE} bytes")
            if address % PAGE_SIZE or not MIN_ADDRESS <= address <= addr_limit - len(data):
                raise OracleInputError(f"page {address:#x}: not a page-aligned user address "
                                       f"in [{MIN_ADDRESS:#x}, {addr_limit:#x})")
            count = len(data) // PAGE_SIZE
            for i in range(count):
                page = address + i * PAGE_SIZE
                if page in seen:
                    raise OracleInputError(f"page {page:#x}: given twice")
                seen.add(page)
                body += struct.pack("<Q", page) + data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            layout.append((address, count))
        if len(seen) > self._max_pages:
            raise OracleInputError(f"pages: {len(seen)} pages, at most {self._max_pages}")

        head = _REQ_HEAD.pack(_MAGIC_REQ, flags, len(code), len(seen), rip,
                              rflags & FLAGS_MASK, fs_base or 0, gs_base or 0, *gprs,
                              bytes(vec))
        given = frozenset(n for n in ("fs_base", "gs_base") if n in regs)
        return head + bytes(code) + bytes(body), layout, given

    # -- decoding ---------------------------------------------------------------------

    def _decode(
        self, status: int, signo: int, si_code: int, fault_addr: int, trapno: int,
        error_code: int, rip: int, rflags_raw: int, fs_base: int, gs_base: int,
        gprs: list[int], vec: bytes, page_bytes: bytes, layout: list[tuple[int, int]],
        given: frozenset[str],
    ) -> NativeResult:
        caps = self.capabilities
        ngpr = 16 if self.bits == 64 else 8
        rflags = (rflags_raw & FLAGS_MASK) | RFLAGS_RESERVED_ONE
        out: dict[str, int] = dict(zip(GPR_NAMES[:ngpr], gprs[:ngpr], strict=True))
        out["rip"] = rip
        out["rflags"] = rflags
        for index in range(caps.vector_registers):
            value = int.from_bytes(vec[32 * index:32 * index + 32], "little")
            out[f"xmm{index}"] = value & ((1 << 128) - 1)
            if caps.avx:
                out[f"ymm{index}"] = value
        if "fs_base" in given:
            out["fs_base"] = fs_base
        if "gs_base" in given:
            out["gs_base"] = gs_base
        result_pages: dict[int, bytes] = {}
        offset = 0
        for address, count in layout:
            result_pages[address] = page_bytes[offset:offset + count * PAGE_SIZE]
            offset += count * PAGE_SIZE
        fault = None
        if status == _STATUS_FAULT:
            fault = NativeFault(signal=signal.Signals(signo), si_code=si_code,
                                address=fault_addr, trapno=trapno, error_code=error_code)
        outcome = {_STATUS_COMPLETED: Outcome.COMPLETED, _STATUS_FAULT: Outcome.FAULTED,
                   _STATUS_TIMEOUT: Outcome.TIMED_OUT}[status]
        return NativeResult(outcome=outcome, regs=out, rflags=rflags, rflags_raw=rflags_raw,
                            pages=result_pages, fault=fault)


_ORACLES: dict[int, NativeOracle] = {}
_ORACLES_LOCK = threading.Lock()


def get_oracle(bits: int = 64) -> NativeOracle:
    """The shared helper for `bits`, built and started on first use.

    Raises `OracleUnavailable` (message names what is missing) if it cannot be built.
    """
    _check_bits(bits)
    with _ORACLES_LOCK:
        oracle = _ORACLES.get(bits)
        if oracle is None:
            oracle = _ORACLES[bits] = NativeOracle(bits)
        return oracle


def run_native(
    code: bytes,
    regs: Mapping[str, int],
    pages: Mapping[int, bytes],
    *,
    rip: int | None = None,
    bits: int = 64,
) -> NativeResult:
    """Execute one instruction natively; see the module docstring for every rule."""
    return get_oracle(bits).run(code, regs, pages, rip=rip)


@atexit.register
def _close_all() -> None:
    for oracle in _ORACLES.values():
        oracle.close()
