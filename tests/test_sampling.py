"""Anchor-based patch sampling: sampling anchors, rounds, patch crops and their targets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from custom_components.sampling import (
    FP,
    GT,
    AnchorPatchDataset,
    AnchorSampler,
    SamplingAnchors,
    collate_patches,
    crop_patch,
    cubes_in_patch,
)


@dataclass
class FakeScan:
    image: np.ndarray
    nodules_voxel: np.ndarray
    excluded_voxel: np.ndarray
    seriesuid: str


def _scans() -> list[FakeScan]:
    image = np.zeros((40, 50, 60), np.float16)
    image[20, 25, 30] = 1.0
    return [
        FakeScan(image, np.array([[20, 25, 30, 6.0]], np.float32), np.zeros((0, 4), np.float32), "a"),
        FakeScan(image, np.zeros((0, 4), np.float32), np.array([[5, 5, 5, -1.0]], np.float32), "b"),
        FakeScan(image, np.array([[10, 10, 10, 4.0], [30, 40, 50, 12.0]], np.float32), np.zeros((0, 4), np.float32), "c"),
    ]


def test_round_zero_anchors_are_the_ground_truth():
    anchors = SamplingAnchors(_scans())
    assert anchors.round == 0
    np.testing.assert_array_equal(
        anchors.anchors,
        [[0, 20, 25, 30, GT], [2, 10, 10, 10, GT], [2, 30, 40, 50, GT]],
    )


def test_update_is_ground_truth_union_false_positives_and_replaces_old_false_positives():
    anchors = SamplingAnchors(_scans())
    stats = anchors.update({1: np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), 0: np.zeros((0, 3))})
    assert stats == {"round": 1, "anchors": 5, "gt_anchors": 3, "fp_anchors": 2}
    assert set(map(tuple, anchors.anchors[anchors.anchors[:, 4] == FP][:, :4].tolist())) == {(1, 1, 2, 3), (1, 4, 5, 6)}
    # the next round's false positives replace these ones (anchors_{i+1} = S_gt ∪ S_fp(i), not a growing pile)
    anchors.update({2: np.array([[7.0, 8.0, 9.0]])})
    assert anchors.round == 2
    assert anchors.summary()["fp_anchors"] == 1
    assert anchors.anchors[anchors.anchors[:, 4] == FP][0, :4].tolist() == [2, 7, 8, 9]


def test_anchors_state_dict_round_trip_and_refuses_other_scans():
    anchors = SamplingAnchors(_scans())
    anchors.update({1: np.array([[1.0, 2.0, 3.0]])})
    restored = SamplingAnchors(_scans())
    restored.load_state_dict(anchors.state_dict())
    assert restored.round == 1
    np.testing.assert_array_equal(restored.anchors, anchors.anchors)
    other = _scans()[:2]
    with pytest.raises(ValueError, match="another set of training scans"):
        SamplingAnchors(other).load_state_dict(anchors.state_dict())


def test_no_ground_truth_is_refused():
    with pytest.raises(ValueError, match="no ground-truth nodules"):
        SamplingAnchors([_scans()[1]])


def test_sampler_draws_from_the_anchors_current_at_each_epoch():
    anchors = SamplingAnchors(_scans())
    sampler = AnchorSampler(anchors, num_samples=50, seed=1)
    first = list(sampler)
    assert len(first) == 50 and max(first) < 3
    anchors.update({1: np.random.rand(20, 3)})
    second = list(sampler)
    assert max(second) >= 3, "new false-positive anchors must be drawn in the next epoch"


def test_sampler_keeps_the_ground_truth_share_when_false_positives_join():
    anchors = SamplingAnchors(_scans())  # 3 ground-truth anchors
    sampler = AnchorSampler(anchors, num_samples=4000, seed=2, gt_share=0.75)
    assert max(sampler) < 3  # round 0: no false positives yet, every patch on a nodule
    anchors.update({1: np.random.rand(30, 3)})  # 30 false positives against 3 nodules
    drawn = np.array(list(sampler))
    kinds = anchors.anchors[drawn, 4]
    assert abs((kinds == GT).mean() - 0.75) < 0.03  # uniform over the union would give 3/33
    assert len(np.unique(drawn[kinds == FP])) == 30 and len(np.unique(drawn[kinds == GT])) == 3
    uniform = np.array(list(AnchorSampler(anchors, num_samples=4000, seed=2)))
    assert abs((anchors.anchors[uniform, 4] == GT).mean() - 3 / 33) < 0.02


def test_crop_patch_pads_outside_the_volume_with_zero():
    image = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    patch = crop_patch(image, np.array([-1, 2, 0]), 3)
    assert patch.shape == (3, 3, 3)
    assert np.all(patch[0] == 0)  # i = -1 is outside
    assert np.all(patch[:, 2:] == 0)  # j = 4 is outside
    np.testing.assert_array_equal(patch[1:, :2, :], image[0:2, 2:4, 0:3])


def test_cubes_in_patch_moves_scales_and_splits_cut_cubes():
    cubes = np.array([[10.0, 10.0, 10.0, 4.0], [1.0, 10.0, 10.0, 6.0], [50.0, 50.0, 50.0, 4.0]], np.float32)
    inside, cut = cubes_in_patch(cubes, start=np.array([4, 4, 4]), size=16, scale=2.0)
    # voxel 10 is index 6 of the crop; resized by 2 its centre lands at (6 + 0.5) * 2 - 0.5 = 12.5
    np.testing.assert_allclose(inside, [[12.5, 12.5, 12.5, 8.0]])
    # centre at crop index -3 -> -5.5: outside, but the 12 voxel cube reaches into the patch
    np.testing.assert_allclose(cut, [[-5.5, 12.5, 12.5, 12.0]])


def test_patch_dataset_puts_the_nodule_in_the_patch_at_the_bright_voxel():
    torch.manual_seed(0)
    scans = _scans()
    anchors = SamplingAnchors(scans)
    dataset = AnchorPatchDataset(scans, anchors, patch_size=16, jitter=3, scale_range=(1.0, 1.0))
    for _ in range(5):
        item = dataset[0]
        assert item["image"].shape == (1, 16, 16, 16)
        (box,) = item["boxes"].tolist()
        peak = np.unravel_index(int(item["image"][0].argmax()), (16, 16, 16))
        np.testing.assert_allclose(box[:3], peak, atol=1e-4)
        assert box[3] == pytest.approx(6.0)


def test_patch_dataset_with_augmentation_keeps_boxes_on_the_nodule():
    from monai.apps.detection.transforms.dictionary import (
        RandFlipBoxd,
        RandRotateBox90d,
    )
    from monai.transforms import Compose

    torch.manual_seed(0)
    scans = _scans()
    keys = dict(image_keys="image", box_keys=["box", "ignore_box"], box_ref_image_keys="image")
    augment = Compose([RandFlipBoxd(prob=1.0, spatial_axis=0, **keys), RandRotateBox90d(prob=1.0, max_k=3, **keys)])
    augment.set_random_state(3)
    dataset = AnchorPatchDataset(scans, SamplingAnchors(scans), patch_size=16, jitter=2, scale_range=(1.0, 1.0), transform=augment)
    item = dataset[0]
    (box,) = item["boxes"].tolist()
    peak = np.unravel_index(int(item["image"][0].argmax()), (16, 16, 16))
    np.testing.assert_allclose(box[:3], peak, atol=1e-4)
    batch = collate_patches([item, dataset[1]])
    assert batch["image"].shape == (2, 1, 16, 16, 16) and len(batch["boxes"]) == 2


@pytest.mark.parametrize("share, ok", [(None, True), (0.5, True), (1.0, True), (0.0, False), (1.5, False), ("0.5", False)])
def test_gt_share_setting_is_none_or_a_share_above_zero(share, ok):
    from custom_components.errors import InputError
    from custom_components.settings import check_settings

    if ok:
        check_settings(gt_share=share)
    else:
        with pytest.raises(InputError, match=r"setting gt_share = .*: expected a number in \(0, 1\]"):
            check_settings(gt_share=share)
