"""Reading CT volumes with SimpleITK: MetaImage (``.mhd``/``.mha``), NIfTI and DICOM series folders.

MONAI's ``ITKReader`` needs the heavy ``itk`` package; :class:`SimpleITKReader` gives the same result with SimpleITK:
an array in MONAI/ITK order ``(I, J, K)`` (the transpose of ``SimpleITK.GetArrayFromImage``) and a meta dict whose
``affine`` maps a voxel index to **LPS** world mm (``meta["space"] = "LPS"``), see ``docs/conventions.md``.

Every problem with the input (missing or truncated files, a broken header, a 2D image, values that are not Hounsfield
units, an ambiguous DICOM folder) raises :class:`~custom_components.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys

from custom_components.errors import InputError

__all__ = [
    "SimpleITKReader",
    "IMAGE_SUFFIXES",
    "LoadCTd",
    "LoadedImage",
    "read_image",
    "affine_from_sitk",
    "array_ijk",
    "check_ct_values",
]

#: the volume files the reader opens (besides DICOM series folders and ``.dcm`` files); every scan finder uses these
IMAGE_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd")

# "Is this a CT in Hounsfield units?": a CT holds air (about -1000 HU; lungs and the air around the body) and
# something denser than air. No voxel below AIR_MAX_HU means the values are not HU (MRI, CT stored without its
# rescale intercept, a label map); a maximum below AIR_MAX_HU means the volume holds nothing but air or padding.
AIR_MAX_HU = -500.0

_METAIMAGE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
_DICOM_SERIES_UID_TAG = "0020|000e"


class LoadedImage(NamedTuple):
    """What :meth:`SimpleITKReader.read` returns: the SimpleITK image, where it came from and its series UID."""

    image: sitk.Image
    path: str
    seriesuid: str | None


def _sitk_message(err: RuntimeError) -> str:
    """The useful line of a SimpleITK/ITK exception (they span several lines of C++ context)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "ERROR" in line or "Error" in line or "Could not" in line or "Unable" in line:
            return re.sub(r"^.*?sitk::ERROR:\s*", "", line)
    return lines[-1] if lines else type(err).__name__


def _check_metaimage(path: Path) -> None:
    """Check a MetaImage header and its data file before SimpleITK reads it, for messages a user can act on."""
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
        return  # multi-file layouts: SimpleITK's own checks apply
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if data_name == "LOCAL":
        data_file, offset = path, header_end
    else:
        data_file, offset = path.parent / data_name, max(header_size, 0)  # HeaderSize -1: data at the file's end
        if not data_file.is_file():
            raise InputError(f"{path}: data file {data_file.name} is missing (ElementDataFile = {data_name})")
    available = data_file.stat().st_size - offset
    if compressed:
        expected = compressed_size
    else:
        expected = int(np.prod(dims, dtype=np.int64)) * channels * _METAIMAGE_BYTES[fields["ElementType"]]
    if available < expected:
        raise InputError(
            f"{path}: data file {data_file.name} is truncated ({available} bytes of image data, expected {expected})"
        )


def _find_dicom_series(folder: Path) -> dict[str, list[str]]:
    """SeriesInstanceUID -> sorted slice files of every DICOM series in ``folder`` or, if none, in its sub-folders."""
    series: dict[str, list[str]] = {}
    # only folders holding files: GDCM prints a warning for every folder it finds no series in
    folders = sorted((Path(root) for root, _, files in os.walk(folder) if files), key=lambda p: (p != folder, p))
    for sub in folders:
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub)):
            series.setdefault(uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(sub), uid)))
        if sub == folder and series:
            break
    return series


def _read_dicom_folder(folder: Path, series_uid: str | None) -> tuple[sitk.Image, str]:
    series = _find_dicom_series(folder)
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder or its sub-folders")
    if series_uid is None:
        if len(series) > 1:
            listing = ", ".join(f"{uid} ({len(files)} slices)" for uid, files in sorted(series.items()))
            raise InputError(
                f"{folder}: holds {len(series)} DICOM series, choose one with series_uid: {listing}"
            )
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise InputError(f"{folder}: no DICOM series {series_uid}; found {', '.join(sorted(series))}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[series_uid])
    return reader.Execute(), series_uid


def affine_from_sitk(image: sitk.Image) -> np.ndarray:
    """The ``(4, 4)`` float64 affine mapping a voxel index ``(i, j, k, 1)`` to LPS world mm:
    ``direction @ diag(spacing)`` and the origin, exactly the geometry SimpleITK/ITK use."""
    ndim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = direction @ np.diag(image.GetSpacing())
    affine[:ndim, ndim] = image.GetOrigin()
    return affine


def check_ct_values(array: np.ndarray, path: str | os.PathLike) -> None:
    """Raise :class:`InputError` unless ``array`` looks like a CT in Hounsfield units (see :data:`AIR_MAX_HU`).

    The rule runs on every second voxel per axis: the statistics it needs (is there air, is there anything denser)
    do not need every voxel, and it keeps the check at a few milliseconds for a 512 x 512 x 300 scan.
    """
    sample = array[tuple(slice(None, None, 2) for _ in range(array.ndim))]
    low, high = float(sample.min()), float(sample.max())
    if low < AIR_MAX_HU <= high:
        return
    low, high = float(array.min()), float(array.max())  # the exact range, for the message
    if low >= AIR_MAX_HU:
        raise InputError(
            f"{path}: values are not CT Hounsfield units (range [{low:g}, {high:g}], no air below {AIR_MAX_HU:g} HU; "
            "an MRI, or a CT saved without its rescale intercept?)"
        )
    if high < AIR_MAX_HU:
        raise InputError(f"{path}: values are not a CT in Hounsfield units (range [{low:g}, {high:g}]: only air)")


def read_image(path: str | os.PathLike, series_uid: str | None = None, check_hu: bool = True) -> LoadedImage:
    """Read one 3D CT volume with SimpleITK and validate it.

    Args:
        path: a ``.mhd``/``.mha`` (with its ``.raw``/``.zraw``), a NIfTI file, or a folder holding a DICOM series
            (searched recursively when the folder itself holds none).
        series_uid: the SeriesInstanceUID to read when the folder holds several series.
        check_hu: reject volumes whose values are not Hounsfield units (see :func:`check_ct_values`).

    Returns:
        :class:`LoadedImage` with the SimpleITK image (LPS geometry), the path and the series UID (the DICOM
        SeriesInstanceUID; for a ``.mhd`` its file stem, which is LUNA16's ``seriesuid``; else ``None``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    seriesuid: str | None = None
    try:
        if path.is_dir():
            image, seriesuid = _read_dicom_folder(path, series_uid)
        else:
            if path.suffix.lower() in (".mhd", ".mha"):
                _check_metaimage(path)
                seriesuid = path.stem
            image = sitk.ReadImage(str(path))
            if image.HasMetaDataKey(_DICOM_SERIES_UID_TAG):
                seriesuid = image.GetMetaData(_DICOM_SERIES_UID_TAG).strip()
    except RuntimeError as err:
        raise InputError(f"{path}: cannot be read as an image ({_sitk_message(err)})") from err
    size = image.GetSize()
    if image.GetDimension() != 3 or min(size) < 2:
        raise InputError(
            f"{path}: is a {image.GetDimension()}D image of size {'x'.join(map(str, size))}, expected a 3D CT volume"
            + (" (a single DICOM slice? give the series folder)" if path.suffix.lower() == ".dcm" else "")
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} values per voxel, expected a CT volume")
    if check_hu:
        check_ct_values(sitk.GetArrayViewFromImage(image), path)
    return LoadedImage(image, str(path), seriesuid)


def array_ijk(image: sitk.Image) -> np.ndarray:
    """The voxels of ``image`` as a C-contiguous array in MONAI/ITK order ``(I, J, K)``, a new copy.

    This is ``GetArrayFromImage(image).T`` made contiguous (MONAI's ``LoadImage`` makes it contiguous anyway), copied
    in 32 x 4 x 32 blocks that stay in cache: a plain transpose-copy strides through the whole volume and takes
    1.2-2 s for a 512 x 512 x 261 scan, the blocks about 0.2 s. NumPy, single-threaded on purpose: torch's parallel
    copy is faster on an idle machine but several times slower when other jobs share the cores.
    """
    view = sitk.GetArrayViewFromImage(image)  # (K, J, I), read-only, valid while ``image`` lives
    size_k, size_j, size_i = view.shape
    out = np.empty((size_i, size_j, size_k), dtype=view.dtype)
    for k in range(0, size_k, 32):
        for j in range(0, size_j, 4):
            for i in range(0, size_i, 32):
                out[i : i + 32, j : j + 4, k : k + 32] = view[k : k + 32, j : j + 4, i : i + 32].T
    return out


class SimpleITKReader(ImageReader):
    """MONAI image reader backed by SimpleITK (MetaImage, NIfTI, DICOM folders), LPS geometry.

    Use it as ``LoadImaged(keys="image", reader=SimpleITKReader(), image_only=True)`` followed by
    ``EnsureChannelFirstd``. :meth:`get_data` returns the array in MONAI/ITK order ``(I, J, K)``, with the voxel
    type of the file (int16 for LUNA16: pass ``dtype=None`` to ``LoadImaged`` to keep it; its default converts to
    float32), and the meta dict: ``affine`` and ``original_affine`` (voxel -> LPS mm), ``space = "LPS"``, ``spacing``,
    ``spatial_shape``, ``original_channel_dim = nan`` (no channel), ``filename_or_obj``, and ``seriesuid`` /
    ``SeriesInstanceUID`` when known.

    Args:
        series_uid: SeriesInstanceUID to read from a DICOM folder holding several series.
        check_hu: reject volumes whose values are not CT Hounsfield units (:func:`check_ct_values`).
    """

    def __init__(self, series_uid: str | None = None, check_hu: bool = True) -> None:
        super().__init__()
        self.series_uid = series_uid
        self.check_hu = check_hu

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True for MetaImage, NIfTI, NRRD and DICOM files, and for folders (DICOM series)."""
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return all(Path(n).is_dir() or str(n).lower().endswith(IMAGE_SUFFIXES + (".dcm",)) for n in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> LoadedImage | list[LoadedImage]:
        """Read one path (or each of several paths) with :func:`read_image`."""
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        images = [read_image(n, self.series_uid, self.check_hu) for n in names]
        return images[0] if len(images) == 1 else images

    def get_data(self, img: LoadedImage | sitk.Image | Sequence[LoadedImage]) -> tuple[np.ndarray, dict]:
        """Array ``(I, J, K)`` (several images: stacked as ``(C, I, J, K)``) and meta dict, see the class docstring."""
        items = [img] if isinstance(img, (LoadedImage, sitk.Image)) else list(img)
        arrays, metas = [], []
        for item in items:
            loaded = item if isinstance(item, LoadedImage) else LoadedImage(item, "", None)
            arrays.append(array_ijk(loaded.image))
            metas.append(self._meta(loaded))
        meta = metas[0]
        if len(arrays) == 1:
            return arrays[0], meta
        for other in metas[1:]:
            if not np.array_equal(other[MetaKeys.SPATIAL_SHAPE], meta[MetaKeys.SPATIAL_SHAPE]) or not np.allclose(
                other[MetaKeys.AFFINE], meta[MetaKeys.AFFINE], atol=1e-4
            ):
                raise InputError(f"{other['filename_or_obj']}: geometry differs from {meta['filename_or_obj']}")
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays), meta

    @staticmethod
    def _meta(loaded: LoadedImage) -> dict:
        image = loaded.image
        affine = affine_from_sitk(image)
        meta: dict[str, Any] = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPACE: SpaceKeys.LPS,
            MetaKeys.SPATIAL_SHAPE: np.asarray(image.GetSize()),
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "spacing": np.asarray(image.GetSpacing(), dtype=np.float64),
            "filename_or_obj": loaded.path,
        }
        if loaded.seriesuid:
            meta["seriesuid"] = meta["SeriesInstanceUID"] = loaded.seriesuid
        return meta


class LoadCTd(LoadImaged):
    """``LoadImaged`` reading with :class:`SimpleITKReader` only.

    ``LoadImaged(reader=SimpleITKReader())`` works too, but when that reader raises, MONAI's ``LoadImage`` quietly
    tries its other readers (NiBabel, PIL, ...) and ends with a ``RuntimeError`` that buries the message, or, worse,
    NiBabel loads a NIfTI our reader rejected. Passing the reader at call time makes it the only one, so its
    :class:`InputError` comes through unchanged.

    Args:
        keys: keys of the paths to load.
        series_uid: SeriesInstanceUID to read from a DICOM folder holding several series.
        check_hu: reject volumes whose values are not Hounsfield units.
        kwargs: other ``LoadImaged`` arguments (``image_only``, ``dtype`` ...; ``image_only`` defaults to True).
    """

    def __init__(
        self, keys: KeysCollection, series_uid: str | None = None, check_hu: bool = True, **kwargs: Any
    ) -> None:
        kwargs.setdefault("image_only", True)
        self.ct_reader = SimpleITKReader(series_uid=series_uid, check_hu=check_hu)
        super().__init__(keys, reader=self.ct_reader, **kwargs)

    def __call__(self, data: Any, reader: ImageReader | None = None) -> dict:
        return super().__call__(data, reader or self.ct_reader)
