"""Did SimpleITK decode a compressed image intact? Checks of ``.zraw`` (zlib) and ``.nii.gz`` (gzip) voxel data.

SimpleITK decodes a damaged zlib or gzip stream without raising: ITK prints ``Uncompress failed`` (MetaImage) or
nothing (NIfTI) and returns a volume whose slices past the damage are garbage. Both formats end with a checksum of
the decoded bytes (zlib: Adler-32; gzip: CRC-32 and the length), so the check is cheap: the checksum of the voxels
SimpleITK returned, compared with the stream's own (~0.05 s for a 512 x 512 x 261 int16 scan; no copy). Only when
they differ (a damaged stream, or an intact one SimpleITK changed while decoding: byte-swapped, rescaled) is the
stream inflated again, in pieces and discarding the output, so zlib itself says whether it is damaged and where,
without a second copy of the volume in memory.

Python's ``zlib`` is used rather than a library reader because the point is to check SimpleITK's decoding of the
very bytes it read; no MONAI or SimpleITK function exposes the stream's checksum.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from custom_components.errors import InputError

__all__ = ["ZlibStream", "check_nifti_gz", "check_zlib_stream"]

_CHUNK = 1 << 16  # compressed bytes fed at a time: where zlib stops is known to this much
_MAX_OUT = 1 << 24  # decoded bytes produced at a time (bounds memory whatever the compression ratio)


class ZlibStream(NamedTuple):
    """Where the zlib-compressed voxels of a MetaImage lie: ``length`` bytes of ``data_file`` from ``offset``."""

    data_file: Path
    offset: int
    length: int


def _inflate(path: str | os.PathLike, data_file: Path, offset: int, length: int, wbits: int, slice_bytes: int,
             expected: int | None) -> None:  # fmt: skip
    """Inflate ``length`` bytes of ``data_file`` from ``offset`` (``wbits``: 15 zlib, 31 gzip, members in
    sequence), discarding the output; raise :class:`InputError` if zlib finds the stream damaged, or if it decodes
    to other than ``expected`` bytes (when given)."""
    decoded = 0
    decoder = zlib.decompressobj(wbits)
    try:
        with open(data_file, "rb") as f:
            f.seek(offset)
            left = length
            while left > 0:
                data = f.read(min(_CHUNK, left))
                if not data:
                    break
                left -= len(data)
                while data:
                    decoded += len(decoder.decompress(data, _MAX_OUT))
                    data = decoder.unconsumed_tail
                    if decoder.eof:
                        if wbits == 31 and decoder.unused_data:  # the next gzip member
                            data = decoder.unused_data + data
                            decoder = zlib.decompressobj(wbits)
                        elif decoder.unused_data or left:
                            raise InputError(
                                f"{path}: compressed data in {data_file.name} is damaged (the stream ends "
                                f"{len(decoder.unused_data) + len(data) + left} bytes before the data does)"
                            )
            if not decoder.eof:
                raise zlib.error("the stream is cut short")
    except zlib.error as err:
        if "incorrect data check" in str(err) or "incorrect length check" in str(err):
            # the checksum at the stream's end: the damage decoded to other voxels, somewhere before it
            what = "the decoded voxels are not those that were written"
        else:
            where = f", about slice k = {decoded // slice_bytes}" if slice_bytes else ""
            what = f"after {decoded} decoded bytes{where}; the voxels from there on would be garbage"
        raise InputError(
            f"{path}: compressed data in {data_file.name} is damaged (zlib: {err}; {what}), copy the file again"
        ) from err
    if expected is not None and decoded != expected:
        raise InputError(
            f"{path}: compressed data in {data_file.name} decodes to {decoded} bytes, the header says {expected}"
        )


def check_zlib_stream(path: str | os.PathLike, stream: ZlibStream, decoded: np.ndarray) -> None:
    """Refuse a MetaImage whose zlib stream is damaged; ``decoded`` is SimpleITK's ``(K, J, I)`` view of its voxels.

    Fast path: Adler-32 of ``decoded`` equals the stream's last 4 bytes (big-endian). Otherwise the stream is
    inflated again by :func:`_inflate`, which names the damage.
    """
    if stream.length >= 6:
        with open(stream.data_file, "rb") as f:
            f.seek(stream.offset + stream.length - 4)
            (stored,) = struct.unpack(">I", f.read(4))
        if zlib.adler32(decoded) == stored:
            return
    slice_bytes = decoded[0].nbytes if decoded.ndim == 3 else 0
    _inflate(path, stream.data_file, stream.offset, stream.length, 15, slice_bytes, decoded.nbytes)


def _nifti_data_offset(path: Path) -> int | None:
    """``vox_offset`` of a gzipped NIfTI-1 or NIfTI-2 file (where its voxels start in the decoded bytes), or
    ``None`` if the header is not one of those."""
    with gzip.open(path, "rb") as f:
        head = f.read(176)
    if len(head) < 176:
        return None
    for order in "<>":
        (sizeof_hdr,) = struct.unpack(order + "i", head[:4])
        if sizeof_hdr == 348:
            return int(struct.unpack(order + "f", head[108:112])[0])
        if sizeof_hdr == 540:
            return int(struct.unpack(order + "q", head[168:176])[0])
    return None


def check_nifti_gz(path: str | os.PathLike, decoded: np.ndarray) -> bool:
    """Refuse a ``.nii.gz`` whose gzip stream is damaged; ``decoded`` is SimpleITK's ``(K, J, I)`` view of its
    voxels. Returns whether ``decoded`` are the file's voxels byte for byte (the fast path matched).

    Fast path: the gzip trailer (CRC-32 and length mod 2^32 of the decoded file: header, then voxels) matches the
    header bytes followed by ``decoded``. Otherwise (damage, several gzip members, voxels rescaled or byte-swapped
    by SimpleITK) the file is inflated again by :func:`_inflate`, which names the damage.
    """
    path = Path(path)
    size = path.stat().st_size
    offset = _nifti_data_offset(path)
    if offset is not None and size > 18:
        with open(path, "rb") as f:
            f.seek(size - 8)
            stored_crc, stored_len = struct.unpack("<II", f.read(8))
        with gzip.open(path, "rb") as f:
            header = f.read(offset)
        crc = zlib.crc32(decoded, zlib.crc32(header))
        if crc == stored_crc and (len(header) + decoded.nbytes) % (1 << 32) == stored_len:
            return True
    slice_bytes = decoded[0].nbytes if decoded.ndim == 3 else 0
    _inflate(path, path, 0, size, 31, slice_bytes, None)
    return False
