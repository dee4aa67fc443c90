"""SimpleITKReader (MetaImage, NIfTI, DICOM), its error messages, and the world <-> voxel geometry helpers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from custom_components.errors import InputError
from custom_components.geometry import (
    nodules_voxel_to_world,
    nodules_world_to_voxel,
    voxel_to_world,
    world_to_voxel,
)
from custom_components.io import LoadCTd, SimpleITKReader, affine_from_sitk, check_ct_values, read_image
from tests.conftest import LIDC_0001_UID
from tests.test_bad_input import dicom_duplicate, dicom_missing

# An oblique, anisotropic, off-origin grid: a rotation about z by 30 degrees followed by a flip of the slice axis.
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
DIRECTION = np.array([[_C, -_S, 0.0], [_S, _C, 0.0], [0.0, 0.0, -1.0]])
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (-120.5, 33.25, -310.0)


def synthetic_ct(size=(24, 20, 12), seed=0) -> sitk.Image:
    """An int16 HU volume (air, soft tissue, bone) on the oblique grid above; ``size`` is (I, J, K)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1200, size=size[::-1]).astype(np.int16)  # (K, J, I)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION.ravel().tolist())
    return image


def load(path, **reader_args):
    """Read ``path`` through MONAI's ``LoadImaged`` with :class:`SimpleITKReader`; the small test volumes here
    (a few cm) need ``check_size=False``, the floor itself is tested in tests/test_bad_input.py."""
    reader_args.setdefault("check_size", False)
    chain = Compose(
        [
            LoadImaged(keys="image", reader=SimpleITKReader(**reader_args), image_only=True, dtype=None),
            EnsureChannelFirstd(keys="image"),
        ]
    )
    return chain({"image": str(path)})["image"]


@pytest.mark.parametrize("suffix", [".mhd", ".nii.gz"])
def test_reader_matches_simpleitk(tmp_path: Path, suffix: str):
    reference = synthetic_ct()
    path = tmp_path / f"1.2.840.99.7{suffix}"
    sitk.WriteImage(reference, str(path))
    written = sitk.ReadImage(str(path))  # what SimpleITK itself reads back (NIfTI may round the direction)
    image = load(path)

    assert image.shape == (1, 24, 20, 12) and image.dtype == torch.int16
    np.testing.assert_array_equal(image[0].numpy(), sitk.GetArrayFromImage(written).T)
    assert image.meta["space"] == "LPS"
    np.testing.assert_allclose(image.meta["spacing"], written.GetSpacing())
    np.testing.assert_allclose(image.affine.numpy(), image.meta["original_affine"])
    for index in [(0, 0, 0), (23, 19, 11), (5, 17, 3)]:
        world = voxel_to_world(np.array([index], dtype=float), image.affine)[0]
        np.testing.assert_allclose(world, written.TransformIndexToPhysicalPoint(index), atol=1e-4)
        np.testing.assert_allclose(world, reference.TransformIndexToPhysicalPoint(index), atol=1e-3)
    assert image.meta["filename_or_obj"] == str(path)
    if suffix == ".mhd":
        assert image.meta["seriesuid"] == "1.2.840.99.7"  # LUNA16: the file stem is the seriesuid


def test_reader_default_dtype_and_suffixes(tmp_path: Path):
    path = tmp_path / "scan.mha"
    sitk.WriteImage(synthetic_ct(), str(path))
    reader = SimpleITKReader(check_size=False)
    chain = Compose([LoadImaged(keys="image", reader=reader, image_only=True), EnsureChannelFirstd("image")])
    image = chain({"image": str(path)})["image"]
    assert image.dtype == torch.float32 and image.shape == (1, 24, 20, 12)
    reader = SimpleITKReader()
    assert reader.verify_suffix(str(path)) and reader.verify_suffix(str(tmp_path))
    assert not reader.verify_suffix("notes.txt")


def test_geometry_round_trips():
    image = synthetic_ct()
    affine = np.eye(4)
    affine[:3, :3] = DIRECTION @ np.diag(SPACING)
    affine[:3, 3] = ORIGIN
    rng = np.random.default_rng(1)
    world = rng.uniform(-200, 200, size=(50, 3))

    voxels = world_to_voxel(world, affine)
    np.testing.assert_allclose(voxel_to_world(voxels, affine), world, atol=1e-9)
    index = (3, 7, 5)
    np.testing.assert_allclose(
        world_to_voxel(np.array([image.TransformIndexToPhysicalPoint(index)]), affine)[0], index, atol=1e-9
    )

    nodules = np.column_stack([world, rng.uniform(3, 30, 50)])
    nodules[::7, 3] = -1.0  # excluded findings of unknown size
    as_voxels = nodules_world_to_voxel(nodules, affine)
    assert as_voxels.shape == (50, 4)
    sized = nodules[:, 3] > 0
    np.testing.assert_allclose(as_voxels[sized, 3] * np.prod(SPACING) ** (1 / 3), nodules[sized, 3])
    assert np.all(as_voxels[::7, 3] == -1.0)
    np.testing.assert_allclose(nodules_voxel_to_world(as_voxels, affine), nodules, atol=1e-9)

    tensor = torch.as_tensor(nodules, dtype=torch.float32)
    back = nodules_voxel_to_world(nodules_world_to_voxel(tensor, torch.as_tensor(affine)), affine)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    torch.testing.assert_close(back, tensor, atol=1e-3, rtol=0)
    assert nodules_world_to_voxel(np.zeros((0, 4)), affine).shape == (0, 4)


def test_dicom_series_matches_mhd(lidc_dir: Path, lidc_0001_dicom: Path):
    mhd = read_image(lidc_dir / f"{LIDC_0001_UID}.mhd").image
    loaded = read_image(lidc_0001_dicom)  # the patient folder: the series is found two levels down
    dicom = loaded.image
    assert loaded.seriesuid == LIDC_0001_UID
    assert dicom.GetSize() == mhd.GetSize() == (512, 512, 133)
    np.testing.assert_allclose(dicom.GetOrigin(), mhd.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(dicom.GetSpacing(), mhd.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(dicom.GetDirection(), mhd.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(dicom), sitk.GetArrayViewFromImage(mhd))
    # the slice checks change nothing on an intact series, and resample_slices has nothing to do there
    via_monai = LoadCTd(keys="image", dtype=None, resample_slices=True)({"image": str(lidc_0001_dicom)})["image"]
    np.testing.assert_array_equal(via_monai.numpy(), sitk.GetArrayViewFromImage(mhd).T)
    np.testing.assert_allclose(via_monai.affine.numpy(), affine_from_sitk(mhd), atol=1e-4)


@pytest.mark.parametrize("make", [dicom_duplicate, dicom_missing], ids=["duplicate", "missing"])
def test_dicom_slices_resampled_onto_true_positions(
    make, lidc_dir: Path, tmp_path: Path, request, caplog: pytest.LogCaptureFixture
):
    """LIDC-IDRI-0001 with slice 66 (z = -175 mm) duplicated, or deleted: refused by default (tests/test_bad_input.py);
    with resample_slices the volume is the intact scan's grid: a duplicate is dropped (every voxel as the .mhd), a
    missing slice is interpolated halfway between its neighbours and every other slice is kept as it was."""
    mhd = read_image(lidc_dir / f"{LIDC_0001_UID}.mhd").image
    expected = sitk.GetArrayFromImage(mhd)  # (K, J, I)
    folder = make(tmp_path, request)
    with caplog.at_level(logging.WARNING):
        image = LoadCTd(keys="image", dtype=None, resample_slices=True)({"image": str(folder)})["image"]
    warnings = [r.getMessage() for r in caplog.records if "resample_slices" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{folder}: DICOM series {LIDC_0001_UID}")
    assert "onto 133 slices 2.5 mm apart" in warnings[0] and "\n" not in warnings[0]
    np.testing.assert_allclose(image.affine.numpy(), affine_from_sitk(mhd), atol=1e-4)
    got = image.numpy().T  # (K, J, I)
    assert got.shape == expected.shape == (133, 512, 512)
    if make is dicom_missing:
        halfway = np.rint((expected[65].astype(np.float32) + expected[67]) / 2).astype(np.int16)
        np.testing.assert_array_equal(got[66], halfway)
        expected[66] = halfway
    np.testing.assert_array_equal(got, expected)


def test_dicom_duplicate_with_other_voxels_is_refused_even_with_resampling(lidc_dir: Path, tmp_path: Path, request):
    folder = dicom_duplicate(tmp_path, request)
    copy = folder / "duplicate.dcm"
    data = bytearray(copy.read_bytes())
    data[-2:] = (1200).to_bytes(2, "little")  # the last voxel of the pixel data: same position, other content
    copy.write_bytes(data)
    with pytest.raises(InputError, match=r"two different slices lie at the same position -175 mm"):
        read_image(folder, resample_slices=True)


def test_dicom_slices_off_the_normal_or_of_other_orientations(tmp_path: Path):
    uid = "1.2.826.0.1.3680043.2.1125.33"
    tilted, rotated = tmp_path / "tilted", tmp_path / "rotated"
    tilted.mkdir()
    rotated.mkdir()
    _write_dicom_series(tilted, uid, slices=5, first_file=0, step=(0.0, 0.5, 2.0))  # a gantry tilted by 14 degrees
    with pytest.raises(InputError, match=r"tilted: DICOM series .*: slice positions do not follow the slice normal"):
        read_image(tilted, check_size=False, resample_slices=True)
    _write_dicom_series(rotated, uid, slices=3, first_file=0, orientation="0\\1\\0\\1\\0\\0")
    with pytest.raises(InputError, match=r"rotated: DICOM series .*: its slices have different orientations"):
        read_image(rotated, check_size=False)


def _write_dicom_series(
    folder: Path, series_uid: str, slices: int, first_file: int, step=(0.0, 0.0, 2.0), orientation="1\\0\\0\\0\\1\\0"
) -> None:
    """A small axial CT series written slice by slice with SimpleITK (explicit UIDs; slice ``k`` at LPS
    ``k * step`` mm, ImageOrientationPatient ``orientation`` for all slices but the first, which is axial)."""
    for k in range(slices):
        plane = sitk.GetImageFromArray(np.full((1, 8, 10), -1000 + 400 * k, dtype=np.int16))
        plane.SetSpacing((0.8, 0.8, 2.0))
        tags = {
            "0008|0060": "CT",
            "0010|0020": "PHANTOM",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{k * s:g}" for s in step),
            "0020|0037": orientation if k else "1\\0\\0\\0\\1\\0",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{first_file + k:04d}.dcm"))
        writer.Execute(plane)


def test_several_dicom_series_in_one_folder(tmp_path: Path):
    first, second = "1.2.826.0.1.3680043.2.1125.11", "1.2.826.0.1.3680043.2.1125.22"
    _write_dicom_series(tmp_path, first, slices=3, first_file=0)
    _write_dicom_series(tmp_path, second, slices=4, first_file=100)

    with pytest.raises(InputError) as err:
        read_image(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "2 DICOM series" in message
    assert f"{first} (3 slices)" in message and f"{second} (4 slices)" in message

    image = load(tmp_path, series_uid=second)
    assert image.shape == (1, 10, 8, 4) and image.meta["seriesuid"] == second
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], (0, 0, 0), atol=1e-6)
    np.testing.assert_allclose(np.diag(image.affine.numpy())[:3], (0.8, 0.8, 2.0), atol=1e-6)
    assert image[0, 0, 0].tolist() == [-1000, -600, -200, 200]


def test_missing_file(tmp_path: Path):
    with pytest.raises(InputError, match=r"nowhere\.mhd: file not found"):
        read_image(tmp_path / "nowhere.mhd")
    with pytest.raises(InputError, match=r"nowhere\.nii\.gz: file not found"):
        LoadCTd(keys="image")({"image": str(tmp_path / "nowhere.nii.gz")})


def test_truncated_and_missing_raw(tmp_path: Path):
    path = tmp_path / "scan.mhd"
    sitk.WriteImage(synthetic_ct(), str(path))  # uncompressed: scan.raw
    raw = tmp_path / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"scan\.mhd: data file scan\.raw is truncated \(1000 bytes") as err:
        read_image(path)
    assert str(path) in str(err.value)
    raw.unlink()
    with pytest.raises(InputError, match=r"scan\.mhd: data file scan\.raw is missing"):
        read_image(path)


def test_broken_header(tmp_path: Path):
    path = tmp_path / "scan.mhd"
    sitk.WriteImage(synthetic_ct(), str(path))
    header = path.read_text()
    path.write_text("\n".join(line for line in header.splitlines() if not line.startswith("ElementDataFile")))
    with pytest.raises(InputError, match=r"scan\.mhd: header is unreadable \(ElementDataFile missing\)"):
        read_image(path)
    path.write_text(header.replace("DimSize = 24 20 12", "DimSize = 24 twenty 12"))
    with pytest.raises(InputError, match=r"scan\.mhd: header is unreadable \(NDims/DimSize"):
        read_image(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(InputError, match=r"scan\.mhd: header is unreadable"):
        read_image(path)


def test_not_an_image_wraps_simpleitk_error(tmp_path: Path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(InputError, match=r"scan\.nii\.gz: cannot be read as an image") as err:
        read_image(path)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_2d_image(tmp_path: Path):
    path = tmp_path / "slice.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((16, 16), -1000, dtype=np.int16)), str(path))
    with pytest.raises(InputError, match=r"slice\.mhd: is a 2D image of size 16x16, expected a 3D CT volume"):
        read_image(path)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((1, 16, 16), -1000, dtype=np.int16)), str(flat))
    with pytest.raises(InputError, match=r"flat\.nii\.gz: is a 3D image of size 16x16x1"):
        read_image(flat)


def test_values_not_hounsfield(tmp_path: Path):
    mri = tmp_path / "t1.nii.gz"
    values = np.random.default_rng(0).integers(0, 900, (8, 16, 16)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(values), str(mri))
    with pytest.raises(InputError, match=r"t1\.nii\.gz: values are not CT Hounsfield units \(range \[0"):
        read_image(mri, check_size=False)
    only_air = tmp_path / "air.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 16, 16), -2048, dtype=np.int16)), str(only_air))
    with pytest.raises(InputError, match=r"air\.nii\.gz: .*only air"):
        read_image(only_air, check_size=False)
    assert read_image(mri, check_hu=False, check_size=False).image.GetSize() == (16, 16, 8)
    # NaN never passes the HU rule (an all-NaN volume once gave a clean "0 detections")
    with pytest.raises(InputError, match=r"x\.nii\.gz: all 8 voxels are NaN or infinite \(8 NaN\)"):
        check_ct_values(np.full((2, 2, 2), np.nan, dtype=np.float32), "x.nii.gz")
    lungs_and_nan = np.full((4, 4, 4), -850.0, dtype=np.float32)
    lungs_and_nan[0, 0, 0], lungs_and_nan[2, 2, 0] = 40.0, np.nan  # (K, J, I), on the rule's every-second-voxel grid
    with pytest.raises(InputError, match=r"1 NaN voxels of 64, within voxels i 0\.\.0, j 2\.\.2, k 2\.\.2"):
        check_ct_values(lungs_and_nan, "x.nii.gz")
