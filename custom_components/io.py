"""Reading CT volumes with SimpleITK: MetaImage (``.mhd``/``.mha``), NIfTI and DICOM series folders.

MONAI's ``ITKReader`` needs the heavy ``itk`` package; :class:`SimpleITKReader` gives the same result with SimpleITK:
an array in MONAI/ITK order ``(I, J, K)`` (the transpose of ``SimpleITK.GetArrayFromImage``) and a meta dict whose
``affine`` maps a voxel index to **LPS** world mm (``meta["space"] = "LPS"``), see ``docs/conventions.md``.

Every problem with the input (missing, truncated, too long or damaged files, a broken header, a 2D image, a grid no CT
has, a DICOM series with duplicated, missing or unevenly spaced slices, NaN voxels, values that are not Hounsfield
units, an ambiguous DICOM folder) raises :class:`~custom_components.errors.InputError` naming the file:
:func:`read_image` runs every check, and every reader path (``SimpleITKReader``, ``LoadCTd``) goes through it.
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

from custom_components.compressed_data import ZlibStream, check_nifti_gz, check_zlib_stream
from custom_components.dicom_series import read_dicom_series
from custom_components.errors import InputError
from custom_components.metaimage import check_metaimage
from custom_components.native_stderr import native_stderr
from custom_components.nifti import check_nifti_finite
from custom_components.volume_checks import AIR_MAX_HU, check_ct_values, check_finite, check_grid

__all__ = [
    "AIR_MAX_HU",
    "IMAGE_SUFFIXES",
    "LoadCTd",
    "LoadedImage",
    "SimpleITKReader",
    "affine_from_sitk",
    "array_ijk",
    "check_ct_values",
    "read_image",
]

#: the volume files the reader opens (besides DICOM series folders and ``.dcm`` files); every scan finder uses these
IMAGE_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd")
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


def affine_from_sitk(image: sitk.Image) -> np.ndarray:
    """The ``(4, 4)`` float64 affine mapping a voxel index ``(i, j, k, 1)`` to LPS world mm:
    ``direction @ diag(spacing)`` and the origin, exactly the geometry SimpleITK/ITK use."""
    ndim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = direction @ np.diag(image.GetSpacing())
    affine[:ndim, ndim] = image.GetOrigin()
    return affine


def _check_shape(path: Path, dimension: int, size: tuple[int, ...], components: int) -> None:
    if dimension != 3 or min(size) < 2:
        raise InputError(
            f"{path}: is a {dimension}D image of size {'x'.join(map(str, size))}, expected a 3D CT volume"
            + (" (a single DICOM slice? give the series folder)" if path.suffix.lower() == ".dcm" else "")
        )
    if components != 1:
        raise InputError(f"{path}: has {components} values per voxel, expected a CT volume")


def read_image(
    path: str | os.PathLike,
    series_uid: str | None = None,
    check_hu: bool = True,
    check_size: bool = True,
    resample_slices: bool = False,
) -> LoadedImage:
    """Read one 3D CT volume with SimpleITK and validate it: every reader path of the bundle comes through here.

    Checks, each raising :class:`InputError` naming the file and the problem (thresholds in
    :mod:`custom_components.volume_checks`):

    * the file: exists; a MetaImage header is readable and its data file is exactly as long as the header says
      (:func:`~custom_components.metaimage.check_metaimage`);
    * the grid, from the header before any voxel is read (for a DICOM series: after its slices are checked): 3D,
      one value per voxel, a spacing no CT has, a box larger than a body (so that resampling it cannot exhaust
      memory), and, with ``check_size``, smaller than a chest (:func:`~custom_components.volume_checks.check_grid`;
      slices coarser than 5 mm only warn);
    * the voxels: a ``.zraw`` or ``.nii.gz`` decoded intact (:mod:`custom_components.compressed_data`); the slices
      of a DICOM series at uniform positions along their normal (:mod:`custom_components.dicom_series`); no NaN or
      infinity; and, with ``check_hu``, Hounsfield units
      (:func:`~custom_components.volume_checks.check_ct_values`).

    Args:
        path: a ``.mhd``/``.mha`` (with its ``.raw``/``.zraw``), a NIfTI file, or a folder holding a DICOM series
            (searched recursively when the folder itself holds none).
        series_uid: the SeriesInstanceUID to read when the folder holds several series.
        check_hu: reject volumes whose values are not Hounsfield units.
        check_size: reject volumes smaller than a chest (under 100 mm along an axis).
        resample_slices: for a DICOM series with duplicated or missing slices or uneven spacing, interpolate the
            slices at their true positions onto a uniform grid and warn, instead of refusing it.

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
            image, seriesuid = read_dicom_series(path, series_uid, resample_slices)
            _check_shape(path, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
            check_grid(path, image.GetSize(), image.GetSpacing(), check_size)
        else:
            stream = None
            if path.suffix.lower() in (".mhd", ".mha"):
                stream = check_metaimage(path)
                seriesuid = path.stem
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()  # the header only: the grid is checked before the voxels are allocated
            _check_shape(path, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents())
            check_grid(path, reader.GetSize(), reader.GetSpacing(), check_size)
            image = reader.Execute() if stream is None else _read_zlib_metaimage(path, reader, stream)
            if path.name.lower().endswith((".nii", ".nii.gz")):
                voxels = sitk.GetArrayViewFromImage(image)
                as_stored = path.name.lower().endswith(".gz") and check_nifti_gz(path, voxels)
                if not as_stored and np.issubdtype(voxels.dtype, np.floating):
                    check_nifti_finite(path)  # SimpleITK turns a NIfTI's NaN into 0: look at the file's own voxels
            if image.HasMetaDataKey(_DICOM_SERIES_UID_TAG):
                seriesuid = image.GetMetaData(_DICOM_SERIES_UID_TAG).strip()
    except RuntimeError as err:
        raise InputError(f"{path}: cannot be read as an image ({_sitk_message(err)})") from err
    voxels = sitk.GetArrayViewFromImage(image)
    check_finite(voxels, path)
    if check_hu:
        check_ct_values(voxels, path)
    return LoadedImage(image, str(path), seriesuid)


# what ITK's MetaIO writes to the process's stderr for a damaged stream: said again, and better, by the InputError
_ITK_DAMAGE_MESSAGES = ("Uncompress failed",)


def _read_zlib_metaimage(path: Path, reader: sitk.ImageFileReader, stream: ZlibStream) -> sitk.Image:
    """``reader.Execute()`` of a MetaImage with a zlib stream (``.zraw``), its voxels checked against the stream.

    ITK decodes a damaged stream without raising and prints ``Uncompress failed`` to the process's stderr; when the
    check refuses the file, its ``InputError`` (file, damage, where) replaces that line. Anything else ITK wrote is
    passed on.
    """
    with native_stderr() as itk_said:
        image = reader.Execute()
    try:
        check_zlib_stream(path, stream, sitk.GetArrayViewFromImage(image))
    except InputError:
        itk_said.replay(drop=_ITK_DAMAGE_MESSAGES)
        raise
    itk_said.replay()
    return image


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
        check_size: reject volumes smaller than a chest (:func:`read_image`).
        resample_slices: interpolate a DICOM series with duplicated, missing or unevenly spaced slices onto a
            uniform grid (and warn) instead of refusing it (:func:`read_image`).
    """

    def __init__(
        self,
        series_uid: str | None = None,
        check_hu: bool = True,
        check_size: bool = True,
        resample_slices: bool = False,
    ) -> None:
        super().__init__()
        self.series_uid = series_uid
        self.check_hu = check_hu
        self.check_size = check_size
        self.resample_slices = resample_slices

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True for MetaImage, NIfTI, NRRD and DICOM files, and for folders (DICOM series)."""
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return all(Path(n).is_dir() or str(n).lower().endswith(IMAGE_SUFFIXES + (".dcm",)) for n in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> LoadedImage | list[LoadedImage]:
        """Read one path (or each of several paths) with :func:`read_image`."""
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        images = [read_image(n, self.series_uid, self.check_hu, self.check_size, self.resample_slices) for n in names]
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
        check_size: reject volumes smaller than a chest (under 100 mm along an axis).
        resample_slices: interpolate a DICOM series with duplicated, missing or unevenly spaced slices onto a
            uniform grid at their true positions (and warn) instead of refusing it.
        kwargs: other ``LoadImaged`` arguments (``image_only``, ``dtype`` ...; ``image_only`` defaults to True).
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        check_hu: bool = True,
        check_size: bool = True,
        resample_slices: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("image_only", True)
        self.ct_reader = SimpleITKReader(
            series_uid=series_uid, check_hu=check_hu, check_size=check_size, resample_slices=resample_slices
        )
        super().__init__(keys, reader=self.ct_reader, **kwargs)

    def __call__(self, data: Any, reader: ImageReader | None = None) -> dict:
        return super().__call__(data, reader or self.ct_reader)
