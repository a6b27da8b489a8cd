"""Turn a bzImage (``vmlinuz``) into the ELF vmlinux that boots.

What ``scripts/extract-vmlinux`` does, but precisely: the payload is located
through the bzImage setup header, its compressor identified by its magic
number, and it is decompressed with the Python standard library (Debian 12's
kernels use xz).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from pathlib import Path

from .errors import ExtractError

_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
)

def bzimage_payload(image: bytes) -> bytes:
    """The compressed kernel inside a bzImage, located through its setup header.

    Boot protocol >= 2.08: the protected-mode part starts at ``(setup_sects + 1) * 512``
    (``setup_sects`` 0 means 4) and the payload is at ``payload_offset`` from there, for
    ``payload_length`` bytes.  Falls back to scanning for a compression magic (what
    ``scripts/extract-vmlinux`` does) when the header is not there.
    """
    if len(image) > 0x250 and image[0x202:0x206] == b"HdrS":
        (version,) = struct.unpack_from("<H", image, 0x206)
        if version >= 0x208:
            setup_sects = image[0x1F1] or 4
            payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
            start = (setup_sects + 1) * 512 + payload_offset
            return image[start:start + payload_length]
    for _, magic in _MAGICS:
        at = image.find(magic)
        if at >= 0:
            return image[at:]
    raise ExtractError("no bzImage header and no known compression magic in the vmlinuz")

def decompress_payload(payload: bytes) -> tuple[str, bytes]:
    """Decompress a kernel payload; return (format name, data)."""
    kind = next((k for k, magic in _MAGICS if payload.startswith(magic)), None)
    if kind == "xz":
        return kind, lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if kind == "lzma":
        return kind, lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if kind == "gzip":
        # wbits=31: a gzip member; the kernel's trailing size word is left as unused data.
        return kind, zlib.decompressobj(wbits=31).decompress(payload)
    if kind == "bzip2":
        import bz2

        return kind, bz2.BZ2Decompressor().decompress(payload)
    if kind == "zstd":
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ExtractError("this vmlinuz is zstd-compressed: pip install zstandard") \
                from exc
        return kind, zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    if kind == "lz4":
        raise ExtractError("this vmlinuz is lz4-compressed (legacy frame); decompress it with "
                           "Debian's lz4 package (`lz4 -dc`) and pass --vmlinux-dir")
    raise ExtractError(f"unknown kernel compression (payload starts {payload[:8].hex()})")

def extract_vmlinux(vmlinuz: Path, dest: Path) -> str:
    """Write the ELF vmlinux inside ``vmlinuz`` to ``dest``; return the compression name."""
    kind_file = dest.with_suffix(".compression")
    if dest.exists() and kind_file.exists():
        return kind_file.read_text().strip()
    kind, data = decompress_payload(bzimage_payload(vmlinuz.read_bytes()))
    if not data.startswith(b"\x7fELF"):
        raise ExtractError(f"{vmlinuz.name}: the decompressed payload is not an ELF file")
    dest.write_bytes(data)
    kind_file.write_text(kind + "\n")
    return kind
