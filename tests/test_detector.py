"""NoduleDetector: MONAI-style API, output layout, and whole-volume vs sliding-window agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from custom_components.boxes import cubes_to_standard
from custom_components.detector import NoduleDetector
from custom_components.network import DEFAULT_ANCHOR_SIZES, HEAD_STRIDES, build_network


class LocalNet(nn.Module):
    """A stand-in network whose every output cell depends only on the voxels it covers (average over the s^3 block),
    so sliding windows and the whole volume must give identical maps if cells and anchors line up."""

    anchor_sizes = DEFAULT_ANCHOR_SIZES
    strides = HEAD_STRIDES

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for sizes, s in zip(self.anchor_sizes, self.strides):
            mean = F.avg_pool3d(x, s)
            per_anchor = [
                torch.cat([20 * (mean - 0.5) - 0.5 * a, 0.2 * mean, -0.1 * mean, 0.05 * mean, 0 * mean], 1)
                for a in range(len(sizes))
            ]
            outs.append(torch.cat(per_anchor, 1))
        return outs


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"), -1)
    return ((grid - torch.tensor(centre)).norm(dim=-1) <= radius).float()[None, None]


def test_whole_volume_and_sliding_window_agree():
    shape = (80, 72, 64)  # 72 is padded to 80 for the windows
    image = _ball(shape, (40.0, 30.0, 20.0), 5.0) + 0.7 * _ball(shape, (60.0, 60.0, 44.0), 3.0)
    detector = NoduleDetector(LocalNet(), score_thresh=0.05, nms_thresh=0.1)
    whole = detector(image)[0]
    detector.set_sliding_window_inferer(roi_size=(32, 32, 32), overlap=0.25, sw_batch_size=2)
    windows = detector(image, use_inferer=True)[0]
    assert len(whole["cube"]) >= 2
    torch.testing.assert_close(windows["cube"], whole["cube"])
    torch.testing.assert_close(windows["label_scores"], whole["label_scores"])
    # the best mark sits inside the bright ball (radius 5): anchors are in the input's voxel coordinates.
    assert (whole["cube"][0, :3] - torch.tensor([40.0, 30.0, 20.0])).norm() < 5.0


def test_misaligned_windows_are_refused():
    detector = NoduleDetector(LocalNet())
    with pytest.raises(ValueError, match="misaligns"):
        detector.set_sliding_window_inferer(roi_size=(40, 32, 32))
    with pytest.raises(ValueError, match="misaligns"):
        detector.set_sliding_window_inferer(roi_size=32, overlap=0.3)
    with pytest.raises(ValueError, match="set_sliding_window_inferer"):
        detector(torch.zeros(1, 1, 16, 16, 16), use_inferer=True)


def test_output_layout_keys_and_modes_with_the_real_network():
    torch.manual_seed(0)
    network = build_network("lean", prior=0.5)  # every anchor near 0.5: plenty of marks
    detector = NoduleDetector(network, max_detections=7)
    detector.set_target_keys(box_key="boxes", label_key="labels")
    images = [torch.rand(1, 30, 40, 20), torch.rand(1, 24, 24, 24)]
    results = detector(images)
    assert network.training  # the caller's mode is restored
    assert len(results) == 2
    for result in results:
        assert set(result) == {"boxes", "labels", "labels_scores", "cube"}
        n = len(result["labels_scores"])
        assert 0 < n <= 7
        assert result["boxes"].shape == (n, 6) and result["cube"].shape == (n, 4)
        assert result["labels"].dtype == torch.int64 and (result["labels"] == 0).all()
        torch.testing.assert_close(result["boxes"], cubes_to_standard(result["cube"]))
        assert (result["labels_scores"][:-1] >= result["labels_scores"][1:]).all()


def test_single_window_equals_whole_volume_with_the_real_network():
    torch.manual_seed(0)
    detector = NoduleDetector(build_network("lean", prior=0.5), max_detections=20)
    image = torch.rand(1, 1, 30, 32, 28)
    detector.set_sliding_window_inferer(roi_size=32, overlap=0.25)
    whole, window = detector(image)[0], detector(image, use_inferer=True)[0]
    torch.testing.assert_close(window["cube"], whole["cube"])
    torch.testing.assert_close(window["label_scores"], whole["label_scores"])
