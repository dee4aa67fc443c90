"""ResNetFPN: output layout for any input size, presets, prior, RReLU modes, TorchScript, and a tiny overfit."""

from __future__ import annotations

import io

import pytest
import torch

from custom_components.anchors import RegressionAnchors, flatten_outputs
from custom_components.boxes import CubeCoder, cube_iou
from custom_components.loss import DetectionLoss
from custom_components.network import PRESETS, ResNetFPN, build_network
from custom_components.postprocess import select_detections


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_output_shapes_for_odd_sizes(norm):
    net = build_network("lean", norm=norm).eval()
    with torch.no_grad():
        out0, out1 = net(torch.rand(2, 1, 37, 41, 19))
    assert out0.shape == (2, 4 * 5, 19, 21, 10)
    assert out1.shape == (2, 5 * 5, 10, 11, 5)
    assert RegressionAnchors().for_outputs([out0, out1]).shape[0] == flatten_outputs([out0, out1]).shape[1]


def test_padding_is_at_the_far_end():
    """A 30^3 input gives the same cells as the same input zero-padded to 32^3 (cropped): cell (u, v, w) always
    covers voxels [u*s, (u+1)*s)."""
    torch.manual_seed(0)
    net = build_network("lean").eval()
    x = torch.rand(1, 1, 30, 30, 30)
    with torch.no_grad():
        small = net(x)
        padded = net(torch.nn.functional.pad(x, [0, 2, 0, 2, 0, 2]))
    for s, p in zip(small, padded):
        torch.testing.assert_close(s, p[:, :, : s.shape[2], : s.shape[3], : s.shape[4]])


def test_presets_overrides_and_custom_anchor_split():
    assert set(PRESETS) >= {"lean", "paper"}
    lean, paper = build_network("lean"), build_network("paper")
    assert sum(p.numel() for p in paper.parameters()) > 5 * sum(p.numel() for p in lean.parameters())
    net = build_network("lean", channels=(8, 16, 16, 16), anchor_sizes=((3, 5), (7, 10, 13))).eval()
    assert net.stage1[0].conv1.out_channels == 8 and net.num_anchors == (2, 3)
    with torch.no_grad():
        out0, out1 = net(torch.rand(1, 1, 16, 16, 16))
    assert out0.shape[1] == 10 and out1.shape[1] == 15
    with pytest.raises(ValueError, match="unknown network preset"):
        build_network("huge")


def test_noduleness_starts_at_the_prior():
    torch.manual_seed(0)
    net = ResNetFPN(prior=0.01).eval()
    with torch.no_grad():
        flat = flatten_outputs(net(torch.rand(1, 1, 32, 32, 32)))
    probs = torch.sigmoid(flat[0, :, 0])
    assert abs(float(probs.mean()) - 0.01) < 0.002 and float(probs.max()) < 0.02


def test_rrelu_is_random_in_train_and_deterministic_in_eval():
    torch.manual_seed(0)
    net = build_network("lean")
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert not torch.equal(net(x)[0], net(x)[0])
        net.eval()
        assert torch.equal(net(x)[0], net(x)[0])


def test_rrelu_train_mode_is_nn_rrelu_drawn_as_one_tensor():
    """Train mode: positives unchanged, each negative times its own slope in [lower, upper], the gradient that same
    factor (as ``nn.RReLU``); eval mode: ``nn.RReLU``'s leaky ReLU with the mean slope, exactly."""
    from custom_components.network import RReLU

    torch.manual_seed(0)
    act = RReLU()
    x = torch.randn(4, 8, 16, 16, 16).to(memory_format=torch.channels_last_3d).requires_grad_()
    y = act(x)
    y.sum().backward()
    factor = (y / x).detach()
    negative = x.detach() < 0
    assert torch.equal(y[~negative], x[~negative])
    assert factor[negative].min() >= act.lower and factor[negative].max() <= act.upper
    assert len(torch.unique(factor[negative])) > 0.9 * int(negative.sum())  # a slope per element, not per tensor
    assert abs(float(factor[negative].mean()) - (act.lower + act.upper) / 2) < 0.005
    assert torch.allclose(x.grad, factor)
    act.eval()
    assert torch.equal(act(x.detach()), torch.nn.RReLU().eval()(x.detach()))


def test_torchscript_round_trip():
    torch.manual_seed(0)
    net = build_network("lean").eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.rand(1, 1, 23, 32, 17)
    with torch.no_grad():
        for a, b in zip(net(x), loaded(x)):
            torch.testing.assert_close(a, b)


def _sphere_patch(n: int, centre: tuple[float, float, float], d: float, batch: int) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"), -1)
    ball = ((grid - torch.tensor(centre)).norm(dim=-1) <= d / 2).float()
    g = torch.Generator().manual_seed(0)
    return 0.1 + 0.7 * ball + 0.02 * torch.randn(batch, 1, n, n, n, generator=g)


def test_lean_network_overfits_a_bright_sphere():
    """60 Adam steps on a 32^3 patch with an 8 mm ball: the ball's anchors outscore the background and the top
    decoded detection lands within 2 voxels of the centre. Batch 2: on a CPU PyTorch runs batch-1 conv3d on its slow
    native kernel (see docs/network.md). One thread: on the shared 2-core test machine two OpenMP threads stall each
    other whenever another job runs (3x slower); alone, one thread costs little at this size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _overfit_sphere()
    finally:
        torch.set_num_threads(threads)


def _overfit_sphere() -> None:
    torch.manual_seed(0)
    centre, d = (15.0, 17.0, 14.0), 8.0
    x = _sphere_patch(32, centre, d, batch=2)
    gt = torch.tensor([[*centre, d]])
    net, anchors, coder = build_network("lean"), RegressionAnchors(), CubeCoder()
    loss_fn = DetectionLoss(anchors, coder)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(60):
        loss = loss_fn(net(x), [gt, gt])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        out = net(x[:1])
    scores = torch.sigmoid(flatten_outputs(out)[0, :, 0])
    iou = cube_iou(anchors.for_outputs(out), gt).squeeze(1)
    assert scores[iou > 0.3].max() > 0.5 > scores[iou == 0].max()
    cubes, top = select_detections(out, anchors, coder)[0]
    assert top[0] > 0.5
    assert (cubes[0, :3] - torch.tensor(centre)).norm() < 2.0
    assert abs(float(cubes[0, 3]) - d) < 3.0
