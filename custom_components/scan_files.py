"""Finding scans on disk (image files and DICOM series folders under a path), the identifier of each, and the
dataset that preprocesses them one by one for whole-scan inference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from monai.data import Dataset

from custom_components.errors import InputError, input_error_in
from custom_components.io import IMAGE_SUFFIXES

__all__ = ["list_scans", "seriesuid_of", "slice_spacing_mm", "ScanDataset"]


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry ``DICM`` at byte 128, whatever their name."""
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def list_scans(input_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, str]]:
    """The scans under ``input_path`` as datalist entries ``{"image": path}``.

    ``input_path`` is an image file (MetaImage, NIfTI, NRRD), a DICOM series folder, a folder of such files and
    series (searched recursively), or a list of any of those.

    Raises:
        InputError: a path does not exist, or no scan is found under it.
    """
    if isinstance(input_path, (list, tuple)):
        return [scan for p in input_path for scan in list_scans(p)]
    root = Path(input_path)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    if root.is_file():
        if not (_is_image_file(root) or _is_dicom_file(root)):
            raise InputError(f"{root}: not a scan (expected {', '.join(IMAGE_SUFFIXES)} or a DICOM series folder)")
        return [{"image": str(root if _is_image_file(root) else root.parent)}]
    scans = []
    for folder, _, files in sorted(os.walk(root)):
        paths = [Path(folder) / f for f in sorted(files)]
        scans += [{"image": str(p)} for p in paths if _is_image_file(p)]
        if any(_is_dicom_file(p) for p in paths if not _is_image_file(p)):
            scans.append({"image": folder})
    if not scans:
        raise InputError(f"{root}: no scan found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series)")
    return scans


def seriesuid_of(image: Any, path: str) -> str:
    """The scan's identifier: the reader's ``seriesuid`` (DICOM SeriesInstanceUID, LUNA16 file stem) when known,
    else the file name without its image suffix."""
    uid = getattr(image, "meta", {}).get("seriesuid")
    if uid:
        return str(uid)
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def slice_spacing_mm(path: str | os.PathLike) -> float:
    """The voxel size along a scan file's third axis (k: the slice spacing of an axial CT, as LUNA16's ``.mhd``
    ``ElementSpacing`` gives it), mm, read from the header alone. Raises :class:`InputError` for an unreadable file."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read the image header ({str(err).strip().splitlines()[-1]})") from err
    return float(reader.GetSpacing()[2])


class ScanDataset(Dataset):
    """MONAI ``Dataset`` of scans to preprocess for inference, in which a bad scan does not stop the others.

    A scan whose preprocessing raises :class:`InputError` (unreadable file, not a CT, several DICOM series, ...)
    becomes ``{"image_path": path, "error": message}``; the writer reports it, lists it in ``failed.csv`` and makes
    the run end non-zero once every other scan is done. Any other exception (a bug, not bad input) propagates.
    """

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as err:
            error = input_error_in(err)
            if error is None:
                raise
            return {"image_path": str(self.data[index]["image"]), "error": str(error)}
