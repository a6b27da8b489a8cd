"""Fetch a Debian kernel flavour's files: apt picks and downloads the packages,
``dpkg-deb`` streams out the few members needed.

For each flavour (``amd64``, ``686-pae``, ``686``) the tools need the image
package (``-unsigned`` preferred) for the vmlinuz and config, and the ``-dbg``
package of the same version for the real ``System.map`` and the unstripped
vmlinux (Debian's image package ships only a stub System.map). Everything is
cached under the work folder, so a re-run downloads and extracts nothing again.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from .errors import ExtractError
from .vmlinuz import extract_vmlinux


@dataclasses.dataclass(frozen=True, slots=True)
class Flavour:
    """One Debian kernel flavour and the paging mode its kernel uses."""

    name: str  # Debian flavour suffix: amd64, 686-pae, 686
    arch: str  # Debian architecture of the package: amd64, i386
    paging: str  # ptemu paging name: 4level, pae, legacy
    code_bits: int  # 64 or 32

    @property
    def meta_package(self) -> str:
        """The metapackage that depends on the current image of this flavour."""
        return apt_name(f"linux-image-{self.name}", self.arch)

FLAVOURS: tuple[Flavour, ...] = (
    Flavour("amd64", "amd64", "4level", 64),
    Flavour("686-pae", "i386", "pae", 32),
    Flavour("686", "i386", "legacy", 32),
)

def apt_name(package: str, arch: str) -> str:
    """The apt spelling of a package of a given architecture (``pkg:i386`` when foreign)."""
    return package if arch == native_arch() else f"{package}:{arch}"

_NATIVE_ARCH: list[str] = []

def native_arch() -> str:
    """dpkg's native architecture (cached)."""
    if not _NATIVE_ARCH:
        _NATIVE_ARCH.append(run(["dpkg", "--print-architecture"]).strip())
    return _NATIVE_ARCH[0]

def run(cmd: Sequence[str], *, cwd: Path | None = None, check: bool = True) -> str:
    """Run a command, return its stdout; raise ExtractError naming the command on failure."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ExtractError(f"{cmd[0]} not found: this script needs Debian's apt and dpkg") \
            from exc
    if check and proc.returncode != 0:
        raise ExtractError(f"`{' '.join(cmd)}` failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout

def prepare_apt(skip_update: bool, need_i386: bool) -> None:
    """Enable i386 packages and refresh the package lists (needs root)."""
    if skip_update:
        return
    if os.geteuid() != 0:
        raise ExtractError("apt-get update and dpkg --add-architecture need root "
                           "(or pass --no-update if the lists are already current)")
    if need_i386 and "i386" not in run(["dpkg", "--print-foreign-architectures"]).split() \
            and native_arch() != "i386":
        run(["dpkg", "--add-architecture", "i386"])
    # A partially failing update (e.g. a mirror mid-sync for one index) still leaves usable
    # lists; the ABI choice below only uses packages apt can actually see.
    proc = subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"warning: apt-get update reported errors:\n{proc.stderr.strip()}",
              file=sys.stderr)

def package_version(package: str) -> str | None:
    """The candidate version apt would download for ``package``, or None if unknown."""
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    match = re.search(r"^Version: (\S+)$", proc.stdout, re.MULTILINE)
    return match.group(1) if match else None

@dataclasses.dataclass(frozen=True, slots=True)
class KernelPackages:
    """The two packages used for one flavour."""

    flavour: Flavour
    abi: str  # e.g. 6.1.0-50
    image: str  # package name without :arch
    dbg: str
    version: str  # Debian version of both, e.g. 6.1.176-1

    @property
    def release(self) -> str:
        """The kernel release string (``uname -r``), e.g. ``6.1.0-50-amd64``."""
        return f"{self.abi}-{self.flavour.name}"

def packages_for(flavour: Flavour, abi: str) -> KernelPackages | None:
    """The image (unsigned preferred) and -dbg packages of ``abi``, if apt knows both."""
    dbg = f"linux-image-{abi}-{flavour.name}-dbg"
    dbg_version = package_version(apt_name(dbg, flavour.arch))
    if dbg_version is None:
        return None
    for image in (f"linux-image-{abi}-{flavour.name}-unsigned",
                  f"linux-image-{abi}-{flavour.name}"):
        version = package_version(apt_name(image, flavour.arch))
        if version == dbg_version:
            return KernelPackages(flavour, abi, image, dbg, version)
    return None

def _abi_key(abi: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", abi))

def choose_abi(flavours: Sequence[Flavour], requested: str | None) -> list[KernelPackages]:
    """Resolve the packages for every flavour (see step 1 of the module docstring)."""
    if requested is not None:
        candidates = [requested]
    else:
        found: set[str] = set()
        for flavour in flavours:
            out = run(["apt-cache", "depends", flavour.meta_package], check=False)
            found.update(re.findall(rf"Depends: linux-image-(\S+)-{re.escape(flavour.name)}"
                                    rf"(?::\S+)?$", out, re.MULTILINE))
        if not found:
            raise ExtractError("apt knows no linux-image-<flavour> metapackage; is a Debian "
                               "archive in the apt sources and `apt-get update` done?")
        candidates = sorted(found, key=_abi_key, reverse=True)
    for abi in candidates:
        resolved = [packages_for(f, abi) for f in flavours]
        if all(r is not None for r in resolved):
            return [r for r in resolved if r is not None]
        missing = [f.name for f, r in zip(flavours, resolved) if r is None]
        if requested is None:
            print(f"note: ABI {abi} lacks image or -dbg packages for {', '.join(missing)}; "
                  "trying an older one", file=sys.stderr)
    raise ExtractError(f"no kernel ABI among {candidates} has image and -dbg packages for "
                       f"every flavour ({', '.join(f.name for f in flavours)})")

def download(packages: KernelPackages, debs: Path) -> tuple[Path, Path]:
    """``apt-get download`` both packages into ``debs`` (reused when already there)."""
    debs.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in (packages.image, packages.dbg):
        filename = f"{name}_{packages.version.replace(':', '%3a')}_{packages.flavour.arch}.deb"
        path = debs / filename
        if not path.exists():
            print(f"downloading {name} {packages.version} ...", file=sys.stderr)
            spec = f"{apt_name(name, packages.flavour.arch)}={packages.version}"
            run(["apt-get", "download", spec], cwd=debs)
            if not path.exists():
                raise ExtractError(f"apt-get download did not produce {path}")
        paths.append(path)
    return paths[0], paths[1]

def extract_members(deb: Path, wanted: dict[str, Path]) -> None:
    """Stream ``deb``'s data tarball and write the members named in ``wanted`` (cached).

    Members are matched by path without the leading ``./``.  The tar stream is abandoned as
    soon as every wanted member has been written, so the huge -dbg packages are only read up
    to the files needed (they come first in Debian's -dbg data tarball).
    """
    todo = {name: dest for name, dest in wanted.items() if not dest.exists()}
    if not todo:
        return
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in todo or not member.isfile():
                    continue
                dest = todo.pop(name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                partial = dest.with_suffix(dest.suffix + ".part")
                with open(partial, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                partial.rename(dest)
                if not todo:
                    break
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if todo:
        raise ExtractError(f"{deb.name} has no member(s) {', '.join(sorted(todo))}")

@dataclasses.dataclass(frozen=True, slots=True)
class FlavourFiles:
    """The files extracted for one flavour."""

    vmlinuz: Path
    config: Path
    system_map: Path
    debug_vmlinux: Path
    vmlinux: Path

def fetch(packages: KernelPackages, work: Path) -> FlavourFiles:
    """Download, extract and decompress everything one flavour needs."""
    image_deb, dbg_deb = download(packages, work / "debs")
    out = work / packages.release
    files = FlavourFiles(
        vmlinuz=out / f"vmlinuz-{packages.release}",
        config=out / f"config-{packages.release}",
        system_map=out / f"System.map-{packages.release}",
        debug_vmlinux=out / f"vmlinux-{packages.release}.debug",
        vmlinux=out / f"vmlinux-{packages.release}",
    )
    extract_members(image_deb, {f"boot/vmlinuz-{packages.release}": files.vmlinuz,
                                f"boot/config-{packages.release}": files.config})
    if not (files.system_map.exists() and files.debug_vmlinux.exists()):
        print(f"extracting System.map and debug vmlinux of {packages.release} ...",
              file=sys.stderr)
    extract_members(dbg_deb, {
        f"usr/lib/debug/boot/System.map-{packages.release}": files.system_map,
        f"usr/lib/debug/boot/vmlinux-{packages.release}": files.debug_vmlinux,
    })
    kind = extract_vmlinux(files.vmlinuz, files.vmlinux)
    print(f"{files.vmlinuz.name}: {kind}-compressed -> {files.vmlinux}", file=sys.stderr)
    return files

def config_options(config: Path) -> dict[str, str]:
    """``CONFIG_X=value`` lines of a kernel config."""
    out = {}
    for line in config.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out

CONFIG_KEYS = ("CONFIG_PGTABLE_LEVELS", "CONFIG_X86_5LEVEL", "CONFIG_X86_PAE",
               "CONFIG_PARAVIRT", "CONFIG_PARAVIRT_XXL", "CONFIG_PAGE_TABLE_ISOLATION",
               "CONFIG_RETPOLINE", "CONFIG_RETHUNK", "CONFIG_SLS", "CONFIG_DYNAMIC_FTRACE",
               "CONFIG_FRAME_POINTER", "CONFIG_X86_KERNEL_IBT", "CONFIG_KERNEL_XZ")
