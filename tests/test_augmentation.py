"""Training augmentations: the simulated slice thickness (``custom_components/augmentation.py``) does what a thick-slice
reconstruction does, and ``configs/train.json``'s ``train#augmentation`` (with ``demo.json``) parses and runs on a
patch dict as ``AnchorPatchDataset`` builds it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom_components.augmentation import RandSliceThicknessd, thick_slice_matrix

REPO = Path(__file__).resolve().parents[1]


def test_thick_slice_matrix_is_box_average_then_linear_interpolation():
    assert np.allclose(thick_slice_matrix(10, 1.0, 0.0), np.eye(10))
    m = thick_slice_matrix(12, 3.0, 0.0)  # slices 3 voxels thick centred at 0, 3, 6, 9, ...
    assert np.allclose(m.sum(axis=1), 1.0)
    line = np.arange(12.0) ** 2
    slices = {c: line[c - 1 : c + 2].mean() for c in (3, 6)}
    assert (m @ line)[3] == pytest.approx(slices[3])  # a voxel at a slice centre is that slice's mean
    assert (m @ line)[4] == pytest.approx(2 / 3 * slices[3] + 1 / 3 * slices[6])  # between two: interpolated
    with pytest.raises(ValueError, match="thickness"):
        thick_slice_matrix(12, 0.5, 0.0)


@pytest.mark.parametrize("thickness", [2.0, 4.0, 5.0])
def test_smooths_along_k_by_the_slice_width(thickness: float):
    # a thin plane at k = 24: averaged over the slice phase, its profile is the box of the slice (variance t²/12),
    # the voxel (1/12) and the linear interpolation between slices t apart (a triangle, t²/6): std sqrt(t²/4 + 1/12)
    transform = RandSliceThicknessd("image", prob=1.0, thickness_mm=(thickness, thickness))
    transform.set_random_state(0)
    plane = torch.zeros(1, 4, 4, 48)
    plane[..., 24] = 1.0
    profile = torch.stack([transform({"image": plane})["image"][0, 0, 0] for _ in range(400)]).mean(0).double()
    k = torch.arange(48.0, dtype=torch.float64)
    mean = (profile * k).sum() / profile.sum()
    std = ((profile * (k - mean) ** 2).sum() / profile.sum()).sqrt()
    assert float(profile.sum()) == pytest.approx(1.0, abs=1e-6)  # nothing lost away from the ends
    assert float(mean) == pytest.approx(24.0, abs=0.1)
    assert float(std) == pytest.approx((thickness**2 / 4 + 1 / 12) ** 0.5, rel=0.05)
    assert float(profile.max()) < 1.0 / thickness + 1e-6  # a slice's mean can hold at most 1/t of a thin plane


def test_keeps_in_plane_detail_shape_and_dtype():
    generator = torch.Generator().manual_seed(0)
    in_plane = torch.rand(1, 48, 48, 1, generator=generator)  # fine detail in (i, j)
    along_k = torch.rand(48, generator=generator)
    image = in_plane * along_k  # separable: g(i, j) h(k)
    transform = RandSliceThicknessd("image", prob=1.0, thickness_mm=(3.0, 5.0))
    transform.set_random_state(1)
    out = transform({"image": image})["image"]
    assert out.shape == image.shape and out.dtype == image.dtype and isinstance(out, torch.Tensor)
    # every line along k went through the same matrix: the in-plane pattern g(i, j) survives untouched
    ratio = out / in_plane
    assert torch.allclose(ratio, ratio[:, :1, :1], atol=1e-4)
    assert not torch.allclose(ratio[0, 0, 0], along_k)  # ... while k was smoothed
    constant_k = in_plane.expand(1, 48, 48, 48).contiguous()
    assert torch.allclose(transform({"image": constant_k})["image"], constant_k, atol=1e-6)
    half = RandSliceThicknessd("image", prob=1.0)
    assert half({"image": image.numpy().astype(np.float16)})["image"].dtype == np.float16


def test_deterministic_with_set_random_state_and_prob_zero_is_identity():
    image = torch.rand(1, 16, 16, 48, generator=torch.Generator().manual_seed(2))
    a = RandSliceThicknessd("image", prob=0.5)
    b = RandSliceThicknessd("image", prob=0.5)
    a.set_random_state(7)
    b.set_random_state(7)
    outs_a = [a({"image": image})["image"] for _ in range(6)]
    outs_b = [b({"image": image})["image"] for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert any(torch.equal(x, image) for x in outs_a) and any(not torch.equal(x, image) for x in outs_a)
    assert torch.equal(RandSliceThicknessd("image", prob=0.0)({"image": image})["image"], image)
    with pytest.raises(ValueError, match="thickness_mm"):
        RandSliceThicknessd("image", thickness_mm=(0.5, 3.0))


def _augmentation(**overrides):
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.json"), str(REPO / "configs" / "demo.json")])
    for key, value in overrides.items():
        parser[key] = value
    return parser, parser.get_parsed_content("train#augmentation")


def _patch(size: int = 48) -> dict:
    """A patch as ``AnchorPatchDataset._augment`` hands it over: lung-like background with a bright cube."""
    image = torch.full((1, size, size, size), 0.1)
    image[:, 20:28, 20:28, 20:28] = 0.75
    box = torch.tensor([[20.0, 20.0, 20.0, 28.0, 28.0, 28.0]])
    return {"image": image, "box": box, "ignore_box": torch.zeros(0, 6)}


def test_config_augmentation_parses_and_runs_on_a_patch():
    parser, augmentation = _augmentation()

    def walk(transform):  # the transforms inside Compose / OneOf, depth first
        yield transform
        for inner in getattr(transform, "transforms", ()):
            yield from walk(inner)

    names = [type(t).__name__ for t in walk(augmentation)]
    for name in ("RandShiftIntensityd", "RandScaleIntensityd", "RandGaussianNoised", "RandGaussianSmoothd",
                 "RandGaussianSharpend", "RandSliceThicknessd", "RandFlipBoxd", "RandRotateBox90d"):  # fmt: skip
        assert name in names
    # every transform is a named entry of train#augment, referenced by id (no list position matters)
    listed = json.loads((REPO / "configs" / "train.json").read_text())["train"]["augmentation"]["transforms"]
    assert listed and all(isinstance(ref, str) and ref.startswith("@train#augment#") for ref in listed)
    assert parser.get_parsed_content("train#augment#thickness") in augmentation.transforms
    augmentation.set_random_state(0)
    changed = 0
    for _ in range(20):
        patch = _patch()
        out = augmentation(patch)
        image = torch.as_tensor(out["image"])
        assert image.shape == (1, 48, 48, 48) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0  # the HU window's [0, 1], clipped
        # the box follows the flips and rotations: the bright cube is still inside it
        lo, hi = out["box"][0, :3].long(), out["box"][0, 3:].long()
        assert float(image[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].mean()) > 0.5
        changed += not torch.allclose(image.sum(), patch["image"].sum().float(), rtol=1e-4)
    assert changed >= 10  # intensity, noise, kernel, thickness transforms are on by default


def test_config_augmentation_can_be_switched_off_by_id():
    off = {f"train#augment#{name}_prob": 0.0 for name in ("intensity_shift", "intensity_scale", "noise", "blur", "sharpen", "thickness")}
    _, augmentation = _augmentation(**off)
    augmentation.set_random_state(0)
    for _ in range(10):
        patch = _patch()
        out = augmentation(patch)
        # only flips and 90° rotations remain: the same voxel values, permuted
        assert torch.equal(torch.as_tensor(out["image"]).flatten().sort().values, patch["image"].flatten().sort().values)


@pytest.mark.parametrize("kernel", ["soft_kernel", "sharp_kernel"])
def test_kernels_keep_size_and_do_not_darken_the_border(kernel: str):
    # MONAI's Gaussian filters pad with zeros: without the replicate margin the patch border would turn dark
    parser, _ = _augmentation(patch_size=40)
    transform = parser.get_parsed_content(f"train#augment#{kernel}")
    transform.set_random_state(0)
    out = torch.as_tensor(transform({"image": torch.full((1, 40, 40, 40), 0.5)})["image"])
    assert out.shape == (1, 40, 40, 40)
    assert torch.allclose(out, torch.tensor(0.5), atol=1e-4)
    # net effect on fine detail: a soft kernel lowers white noise, a sharp one raises it (MONAI's sharpen blurs
    # by sigma1 first; too large a sigma1 or too small an alpha would make it a blur too)
    noise = 0.5 + 0.02 * torch.randn(1, 40, 40, 40, generator=torch.Generator().manual_seed(0))
    ratio = float(torch.as_tensor(transform({"image": noise})["image"]).std() / noise.std())
    assert (ratio < 0.9) if kernel == "soft_kernel" else (ratio > 1.1)
    edge = torch.zeros(1, 40, 40, 40)
    edge[:, 20:] = 1.0  # a step along i: the soft kernel widens it, the sharp one overshoots
    out = torch.as_tensor(transform({"image": edge})["image"])[0, :, 10, 10]
    if kernel == "soft_kernel":
        assert 0.0 < float(out[19]) < 0.5 < float(out[20]) < 1.0
    else:
        assert float(out[:20].min()) < -0.02 and float(out[20:].max()) > 1.02
