"""The preprocessing chain of configs/inference.json and its transforms, on synthetic phantoms and the LIDC scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch, Spacingd

from custom_components.geometry import (
    nodules_voxel_to_world,
    voxel_to_world,
    world_to_voxel,
)
from custom_components.lung_mask import lung_mask
from custom_components.nodule_labels import NodulesToVoxeld
from custom_components.resampling import SeparableSpacingd
from tests.conftest import LIDC_0001_UID, LIDC_0002_UID

REPO = Path(__file__).resolve().parents[1]
LUNGS = [((-55.0, 0.0, 0.0), (35.0, 50.0, 70.0)), ((55.0, 0.0, 0.0), (35.0, 50.0, 70.0))]  # centre, semi-axes (mm)
NODULE = (84.0, 0.0, 10.0, 16.0)  # juxta-pleural: on the lateral wall of the left lung (x > 0 is the patient's left)
# An axial scan stored right-to-left and anterior-to-posterior flipped, as some DICOM series are: the reader keeps
# it, Orientationd must bring it to LPS.
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _phantom(path: Path, lungs: bool = True, direction=FLIPPED, spacing=(1.2, 1.25, 2.5)) -> Path:
    """A chest-like int16 HU volume written to ``path``: scanner padding outside a circular field of view, air,
    an elliptic 40 HU body, two -850 HU lungs (ellipsoids; without ``lungs`` a water phantom) and a 30 HU nodule."""
    size = (210, 170, 84)
    direction_m = np.asarray(direction).reshape(3, 3)
    extent = direction_m @ (np.asarray(spacing) * (np.asarray(size) - 1))
    origin = -extent / 2  # world (0, 0, 0) at the volume's centre
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in size), indexing="ij")
    world = np.einsum("ab,b...->a...", (direction_m * spacing).astype(np.float32), np.stack([i, j, k]))
    x, y, z = (world[a] + np.float32(origin[a]) for a in range(3))
    hu = np.full(size, -1000, dtype=np.int16)
    hu[(x / 120) ** 2 + (y / 90) ** 2 <= 1] = 40
    if lungs:
        for (cx, cy, cz), (ax, ay, az) in LUNGS:
            hu[((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1] = -850
        nx, ny, nz, nd = NODULE
        hu[(x - nx) ** 2 + (y - ny) ** 2 + (z - nz) ** 2 <= (nd / 2) ** 2] = 30
    hu[x**2 + y**2 > 125**2] = -2048
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.T))
    image.SetSpacing(spacing)
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> Path:
    return _phantom(tmp_path_factory.mktemp("phantom") / "1.2.840.777.1.mhd")


def _world_box(image: MetaTensor) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[0, 0, 0], np.asarray(image.shape[1:]) - 1], dtype=float)
    world = voxel_to_world(corners, image.affine)
    return world.min(axis=0), world.max(axis=0)


def _at(tensor: torch.Tensor, row: torch.Tensor) -> float:
    return float(tensor[(0, *row[:3].round().long().tolist())])


def _mask_on_image(out: dict) -> MetaTensor:
    """The coarse lung mask resampled onto the preprocessed image's 1 mm grid (no runtime stage needs this)."""
    mask = ResampleToMatch(mode="nearest", padding_mode="zeros")(out["lung_mask"], img_dst=out["image"])
    return mask.to(torch.uint8)


def _check_output(out: dict) -> None:
    image, mask = out["image"], _mask_on_image(out)
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert mask.dtype == torch.uint8 and mask.shape == image.shape and 0 < int(mask.sum()) < mask.numel()
    assert torch.allclose(mask.affine, image.affine)
    np.testing.assert_allclose(image.affine.numpy()[:3, :3], np.eye(3), atol=1e-6)  # 1 mm, LPS axes


def _inside(shape, row: torch.Tensor) -> bool:
    return bool(all(0 <= float(c) <= n - 1 for c, n in zip(row[:3], shape[1:])))


def test_config_parameters():
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    assert parser["hu_window"] == [-1000, 400] and parser["spacing_mm"] == [1, 1, 1] and parser["lung_margin_mm"] == 10


def test_chain_on_synthetic_chest(chest: Path, preprocessing):
    nodule = [list(NODULE)]
    out = preprocessing({"image": str(chest), "nodules": nodule, "excluded": [[-55.0, 0.0, 0.0, -1.0]]})
    _check_output(out)
    image, mask = out["image"], _mask_on_image(out)

    # the crop is the lungs' box plus 10 mm (up to the ~3 mm coarse mask grid and voxel rounding)
    lung_lo = np.array([-90.0, -50.0, -70.0])
    lung_hi = np.array([90.0, 50.0, 70.0])
    lo, hi = _world_box(image)
    assert np.all(lo <= lung_lo - 10 + 1) and np.all(lo >= lung_lo - 10 - 5)
    assert np.all(hi >= lung_hi + 10 - 1) and np.all(hi <= lung_hi + 10 + 5)

    row = out["nodules_voxel"][0]
    assert out["nodules_voxel"].shape == (1, 4) and out["nodules_voxel"].dtype == torch.float32
    assert _inside(image.shape, row) and float(row[3]) == pytest.approx(16.0, abs=1e-4)
    assert _at(image, row) == pytest.approx((30 + 1000) / 1400, abs=0.02)  # the voxel really is the nodule
    assert _at(mask, row) == 1  # juxta-pleural, solid (not air), yet inside the closed lung mask
    np.testing.assert_allclose(nodules_voxel_to_world(out["nodules_voxel"], image.affine).numpy(), nodule, atol=1e-3)
    assert out["excluded_voxel"][0, 3] == -1.0 and _at(mask, out["excluded_voxel"][0]) == 1


def test_bare_scan_without_annotations(chest: Path, preprocessing):
    out = preprocessing({"image": str(chest)})
    _check_output(out)
    assert "nodules_voxel" not in out and "excluded_voxel" not in out


def test_no_lungs_falls_back_to_body_box(tmp_path: Path, preprocessing):
    water = _phantom(tmp_path / "water.mhd", lungs=False, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.warns(UserWarning, match=rf"{water}: no lungs found .* using the body's bounding box"):
        out = preprocessing({"image": str(water)})
    _check_output(out)
    assert out["lung_mask"].meta["lung_mask_fallback"] and out["image"].meta["lung_mask_fallback"]
    lo, hi = _world_box(out["image"])
    # body: |x| <= 120, |y| <= 90, all slices; + 10 mm margin, clamped to the volume (x: +-125.4, z: +-103.75 mm)
    np.testing.assert_allclose(lo, [-125.4, -100, -103.75], atol=3)
    np.testing.assert_allclose(hi, [125.4, 100, 103.75], atol=3)


def test_lung_mask_closes_juxta_pleural_nodule():
    spacing = np.array([2.5, 2.5, 2.5])
    x, y, z = np.meshgrid(*(np.arange(-60, 61) * 2.5,) * 3, indexing="ij")  # mm, 2.5 mm voxels
    hu = np.full(x.shape, 40, dtype=np.int16)
    hu[(x / 100) ** 2 + (y / 80) ** 2 > 1] = -1000
    inside = ((x - 40) / 35) ** 2 + (y / 45) ** 2 + (z / 60) ** 2 <= 1
    hu[inside] = -850
    nodule = (x - 72) ** 2 + y**2 + z**2 <= 10**2
    hu[nodule] = 30
    centre = (89, 60, 60)  # x = 72 mm
    mask = lung_mask(hu, spacing)
    assert mask is not None and mask[centre] and mask[nodule].mean() > 0.5
    assert not (hu < -400)[centre]  # the nodule is not air: only the closing puts it in the mask
    assert lung_mask(np.full((20, 20, 20), 40, dtype=np.int16), spacing) is None


def test_separable_spacing_matches_monai():
    rng = torch.Generator().manual_seed(0)
    # spacings chosen so that no output voxel falls exactly halfway between two input voxels, where "nearest" may
    # round either way
    grids = [(np.diag([-1.0, 1.0, -1.0]), (0.7, 0.9, 2.3)), (np.eye(3)[[1, 0, 2]], (0.85, 0.65, 1.7))]
    for direction, spacing in grids:
        affine = np.eye(4)
        affine[:3, :3] = direction @ np.diag(spacing)
        affine[:3, 3] = (10.3, -20.0, 30.0)
        values = torch.randn(1, 30, 25, 12, generator=rng) * 300
        image = MetaTensor(values, affine=torch.tensor(affine), meta={"space": "LPS"})
        for mode in ("bilinear", "nearest"):
            args = {"keys": "image", "pixdim": (1, 1, 1), "mode": mode, "dtype": torch.float32}
            expected = Spacingd(**args)({"image": image})["image"]
            fast = SeparableSpacingd(**args)
            got = fast({"image": image})["image"]
            assert got.shape == expected.shape and got.dtype == torch.float32
            torch.testing.assert_close(got.affine, expected.affine)
            torch.testing.assert_close(got.as_tensor(), expected.as_tensor(), atol=5e-3, rtol=1e-5)
            restored = fast.inverse({"image": got})["image"]
            assert restored.shape == image.shape and torch.allclose(restored.affine, image.affine.to(restored.affine))


def test_chain_keeps_a_string_image_path_on_nifti(chest: Path, tmp_path: Path, preprocessing):
    """MONAI Label adds ``image_path`` (a string) to the request; on a NIfTI scan ``Spacingd`` took every
    ``image_*`` entry for a meta dict and failed (HTTP 500 for every NIfTI study). The chain keeps the string and
    gives the same image as without it."""
    nifti = tmp_path / "chest.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(chest)), str(nifti))
    with pytest.raises(AttributeError, match="'str' object has no attribute 'update'"):
        Spacingd(keys="image", pixdim=(1, 1, 1))(
            {"image": preprocessing.transforms[0]({"image": str(nifti)})["image"][None], "image_path": str(nifti)}
        )
    out = preprocessing({"image": str(nifti), "image_path": str(nifti)})
    assert out["image_path"] == str(nifti)
    plain = preprocessing({"image": str(nifti)})
    torch.testing.assert_close(out["image"].as_tensor(), plain["image"].as_tensor())
    torch.testing.assert_close(out["image"].affine, plain["image"].affine)


def test_nodules_to_voxel_rows():
    image = MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.tensor(np.diag([2.0, 2.0, 2.0, 1.0])))
    out = NodulesToVoxeld()({"image": image, "nodules": [], "excluded": [[2.0, 4.0, 6.0, -1.0], [0.0, 0.0, 0.0, 8.0]]})
    assert out["nodules_voxel"].shape == (0, 4) and out["nodules_voxel"].dtype == torch.float32
    assert out["excluded_voxel"].tolist() == [[1.0, 2.0, 3.0, -1.0], [0.0, 0.0, 0.0, 4.0]]


@pytest.fixture(scope="module")
def lidc_0001(lidc_dir: Path, preprocessing) -> dict:
    nodules = [[56.20840547, 86.34341278, -115.8675792, 23.35064438]]
    return preprocessing({"image": str(lidc_dir / f"{LIDC_0001_UID}.mhd"), "nodules": nodules, "excluded": []})


def test_lidc_0001_nodule_inside_crop_and_lung_mask(lidc_0001: dict):
    _check_output(lidc_0001)
    image, mask = lidc_0001["image"], _mask_on_image(lidc_0001)
    assert image.numel() < 0.6 * 512 * 512 * 133 * 0.703125**2 * 2.5  # the crop drops well over 40 % of the scan
    row = lidc_0001["nodules_voxel"][0]
    assert _inside(image.shape, row)
    assert _at(mask, row) == 1
    assert _at(image, row) > 0.6  # solid tissue (~90 HU) at the nodule centre, not lung air
    world = voxel_to_world(row[None, :3].double(), image.affine)[0]
    np.testing.assert_allclose(world.numpy(), [56.20840547, 86.34341278, -115.8675792], atol=1.0)
    np.testing.assert_allclose(world_to_voxel(world[None], image.affine)[0].numpy(), row[:3].numpy(), atol=1e-3)
    assert float(row[3]) == pytest.approx(23.35064438, abs=1e-4)


def test_lidc_0002_excluded_lesion_inside_crop(lidc_dir: Path, preprocessing):
    lesion = [
        [59.77586628, 71.53102562, -104.1027259, 23.32221915],
        [59.40267185, 70.18377372, -104.3877531, 24.08464915],
    ]
    unknown = [[-105.2911565, 10.2245315, -100.75, -1.0]]
    out = preprocessing(
        {"image": str(lidc_dir / f"{LIDC_0002_UID}.mhd"), "nodules": [], "excluded": lesion + unknown}
    )
    _check_output(out)
    assert out["nodules_voxel"].shape == (0, 4)
    rows = out["excluded_voxel"]
    assert rows.shape == (3, 4) and float(rows[2, 3]) == -1.0
    for row in rows:
        assert _inside(out["image"].shape, row) and _at(_mask_on_image(out), row) == 1
    np.testing.assert_allclose(
        nodules_voxel_to_world(rows, out["image"].affine).numpy(), lesion + unknown, atol=1e-3
    )
