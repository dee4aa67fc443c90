"""Checks of a MetaImage (``.mhd``/``.mha``) header and its data file before SimpleITK reads it.

SimpleITK's own messages for a broken MetaImage are C++ exceptions, or nothing: a data file longer than the header
says is read without a word (a ``.raw`` of another scan with the same name, a header edited by hand), and a damaged
``.zraw`` decodes to garbage (see :mod:`custom_components.compressed_data`). :func:`check_metaimage` refuses those
with a message a user can act on and says where the compressed voxels lie, so that the reader can check their
decoding afterwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from custom_components.compressed_data import ZlibStream
from custom_components.errors import InputError

__all__ = ["check_metaimage"]

_METAIMAGE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


def check_metaimage(path: Path) -> ZlibStream | None:
    """Check the header of ``path`` and the size of its data file; return where its zlib stream lies if compressed.

    Uncompressed data must hold exactly ``prod(DimSize) x ElementNumberOfChannels x bytes(ElementType)`` bytes after
    ``HeaderSize`` (more is accepted only with ``HeaderSize = -1``, data at the file's end); compressed data exactly
    ``CompressedDataSize`` bytes when the header gives it. Multi-file layouts (``LIST``, ``%d`` patterns) are left to
    SimpleITK. Raises :class:`InputError` naming the file and the problem.
    """
    with open(path, "rb") as f:
        raw = f.read(1 << 16)
    fields: dict[str, str] = {}
    header_end = 0
    for line in raw.split(b"\n"):
        header_end += len(line) + 1
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            raise InputError(f"{path}: header is unreadable (binary data where a text header was expected)") from None
        if not text:
            continue
        if "=" not in text:
            raise InputError(f"{path}: header is unreadable (line {text[:60]!r} is not 'Key = Value')")
        key, value = (s.strip() for s in text.split("=", 1))
        fields[key] = value
        if key == "ElementDataFile":  # by the MetaImage standard the last header field
            break
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            raise InputError(f"{path}: header is unreadable ({key} missing)")
    try:
        ndims = int(fields["NDims"])
        dims = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header_size = int(fields.get("HeaderSize", "0"))
        compressed_size = int(fields.get("CompressedDataSize", "0"))
    except ValueError:
        raise InputError(
            f"{path}: header is unreadable (NDims/DimSize/ElementNumberOfChannels/HeaderSize/CompressedDataSize are "
            f"not all integers: NDims = {fields['NDims']!r}, DimSize = {fields['DimSize']!r})"
        ) from None
    if len(dims) != ndims or min(dims, default=0) < 1:
        raise InputError(
            f"{path}: header is unreadable (DimSize = {fields['DimSize']!r} does not match NDims = {ndims})"
        )
    if fields["ElementType"] not in _METAIMAGE_BYTES:
        raise InputError(f"{path}: header is unreadable (unknown ElementType {fields['ElementType']!r})")
    data_name = fields["ElementDataFile"]
    if data_name == "LIST" or "%" in data_name:
        return None  # multi-file layouts: SimpleITK's own checks apply
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if data_name == "LOCAL":
        data_file, offset = path, header_end
    else:
        data_file, offset = path.parent / data_name, max(header_size, 0)  # HeaderSize -1: data at the file's end
        if not data_file.is_file():
            raise InputError(f"{path}: data file {data_file.name} is missing (ElementDataFile = {data_name})")
    available = data_file.stat().st_size - offset
    decoded = int(np.prod(dims, dtype=np.int64)) * channels * _METAIMAGE_BYTES[fields["ElementType"]]
    if compressed:
        if compressed_size <= 0:  # no CompressedDataSize: SimpleITK inflates the whole rest of the file
            return ZlibStream(data_file, offset, available)
        expected, what = compressed_size, f"CompressedDataSize = {compressed_size}"
    else:
        expected = decoded
        what = (
            f"DimSize {fields['DimSize']} x {_METAIMAGE_BYTES[fields['ElementType']]} bytes ({fields['ElementType']})"
        )
        if channels != 1:
            what += f" x {channels} channels"
    if available < expected:
        raise InputError(
            f"{path}: data file {data_file.name} is truncated ({available} bytes of image data, expected {expected}: "
            f"{what})"
        )
    if available > expected and header_size != -1:
        raise InputError(
            f"{path}: data file {data_file.name} is too long ({available} bytes of image data, expected {expected}: "
            f"{what}; the data of another image, or a wrong header?)"
        )
    return ZlibStream(data_file, offset, expected) if compressed else None
