"""The paper's feature-learning network (§2.2): a 3D ResNet down-sampling pathway and an FPN up-sampling pathway with
lateral connections on the last two scales only, feeding two independent output heads.

Layout (``C = channels``, ``F = fpn_channels``, ``s`` = stride relative to the input)::

    input (B, 1, I, J, K)                       padded at the far end of each axis to a multiple of 16
    stem    conv3 1->stem_channels (stride stem_stride), norm, RReLU s1 or s2
    stage1  ResBlock(stride 2/stem_stride) + (blocks[0]-1) -> C[0]   s2  ──lateral 1x1──┐
    stage2  ResBlock(stride 2) + (blocks[1]-1) ResBlocks -> C[1]     s4  ──lateral 1x1─┐│
    stage3  ResBlock(stride 2) + (blocks[2]-1) ResBlocks -> C[2]     s8                ││
    stage4  ResBlock(stride 2) + (blocks[3]-1) ResBlocks -> C[3]     s16               ││
    up8     convT2 C[3]->F[2], norm, RReLU; ResBlock F[2]            s8   (no lateral) ││
    up4     convT2 F[2]->F[1] (+ lateral C[1]->F[1]); ResBlock F[1]  s4  <─────────────┘│ -> head 1 (large anchors)
    up2     convT2 F[1]->F[0] (+ lateral C[0]->F[0]); ResBlock F[0]  s2  <──────────────┘ -> head 0 (small anchors)

A head is ``conv3 F->F, RReLU, conv1 F->A_h*5``. The outputs are cropped back to ``ceil(I/s) x ceil(J/s) x ceil(K/s)``
cells, so any input size works and cell ``(u, v, w)`` of a stride-``s`` head always covers input voxels
``[u*s, (u+1)*s)`` per axis (the padding is at the far end only), whatever the padding.

The base block (Fig. 1, right) is ``conv3-norm-RReLU-conv3-norm`` plus a skip (a strided 1x1x1 conv + norm when the
shape changes), then RReLU. :class:`RReLU` draws a random negative slope in ``[lower, upper]`` in train mode and uses
their mean in eval mode, as in the paper.

Presets (:data:`PRESETS`) are plain keyword dicts; :func:`build_network` merges ``overrides`` over one, which is how a
bundle config picks a preset and how ``--network_def#channels "[...]"`` on the command line changes any field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.utils import get_norm_layer
from torch import Tensor, nn

__all__ = ["DEFAULT_ANCHOR_SIZES", "HEAD_STRIDES", "NUM_OUTPUTS", "PRESETS", "RReLU", "ResBlock", "ResNetFPN", "build_network"]

#: Regression anchor sides (voxels = mm after preprocessing) per head: small ones on the stride-2 head, large ones on
#: the stride-4 head (a 13 mm anchor still spans ~3 cells at stride 4; a 3 mm one would fall between stride-4 cells).
DEFAULT_ANCHOR_SIZES: tuple[tuple[float, ...], ...] = ((3.0, 5.0, 7.0, 10.0), (13.0, 17.0, 22.0, 30.0, 40.0))
#: Strides of head 0 and head 1 relative to the input.
HEAD_STRIDES: tuple[int, int] = (2, 4)
#: Numbers per cell x anchor: the paper's <n, x, y, z, d> = (noduleness logit, di, dj, dk, dd).
NUM_OUTPUTS = 5
#: Input sizes are padded to a multiple of this (the coarsest stride).
SIZE_DIVISIBLE = 16

PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: a few 64^3 patches per second forward+backward on 2 cores, a whole lung crop in seconds.
    "lean": {
        "stem_channels": 8,
        "stem_stride": 2,
        "channels": (16, 24, 32, 48),
        "blocks": (1, 1, 1, 1),
        "fpn_channels": (16, 24, 32),
        "norm": "batch",
    },
    # GPU training with gamma = 96 patches as in the paper (§3.1): wider and deeper.
    "paper": {
        "stem_channels": 24,
        "stem_stride": 1,
        "channels": (32, 64, 96, 128),
        "blocks": (2, 2, 3, 3),
        "fpn_channels": (64, 64, 96),
        "norm": "batch",
    },
}


def _norm(norm: str, channels: int) -> nn.Module:
    """MONAI's norm factory; instance norm gets learnable affine parameters like batch norm has."""
    if norm == "instance":
        return get_norm_layer(("instance", {"affine": True}), spatial_dims=3, channels=channels)
    if norm == "batch":
        return get_norm_layer("batch", spatial_dims=3, channels=channels)
    raise ValueError(f"norm must be 'batch' or 'instance', got {norm!r}")


class RReLU(nn.RReLU):
    """``nn.RReLU`` (same arguments, no parameters, the same eval-mode leaky ReLU with the mean slope) whose train-mode
    slopes are drawn with ``uniform_`` over the whole tensor.

    In train mode each negative input is multiplied by its own slope drawn from U(``lower``, ``upper``), positive
    inputs pass unchanged, and the gradient is that same factor, exactly as ``nn.RReLU``. PyTorch's CPU kernel for it
    (``rrelu_with_noise``) draws the slopes one element at a time on one thread: 14 % of a lean training step on 2
    cores, and it cannot use a channels-last input's layout; drawn as one tensor the step is ~30 % faster with the
    channels-last batches of :func:`custom_components.train_iteration.detection_iteration` (`docs/performance.md`).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.rrelu(x, self.lower, self.upper, training=False)
        slope = torch.empty_like(x).uniform_(self.lower, self.upper)
        return x * torch.where(x >= 0, torch.ones_like(slope), slope)


class ResBlock(nn.Module):
    """3D residual base block: ``RReLU(norm(conv(RReLU(norm(conv(x))))) + skip(x))``.

    ``(B, in_channels, I, J, K) -> (B, out_channels, ceil(I/stride), ceil(J/stride), ceil(K/stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, out_channels)
        self.act1 = RReLU()
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, out_channels)
        self.act2 = RReLU()
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), _norm(norm, out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + self.skip(x))


def _stage(in_channels: int, out_channels: int, blocks: int, norm: str, stride: int = 2) -> nn.Sequential:
    """``blocks`` ResBlocks, the first one with ``stride``."""
    layers = [ResBlock(in_channels, out_channels, stride=stride, norm=norm)]
    layers += [ResBlock(out_channels, out_channels, norm=norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _upsample(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """Transposed conv doubling the resolution: ``(B, in, I, J, K) -> (B, out, 2I, 2J, 2K)``."""
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2, bias=False), _norm(norm, out_channels), RReLU()
    )


class Float32Conv3d(nn.Conv3d):
    """A ``Conv3d`` that runs in float32 under ``torch.autocast`` (same parameters and state-dict keys).

    The heads' last layer: bf16 keeps 8 bits of mantissa, so bf16 noduleness logits near the prior's -4.6 come in
    steps of 0.03 and whole regions of cells tie, which scrambles the candidate cap and the FROC ranking. A 1x1x1 conv
    on 1/8 of the voxels costs little in float32.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript has no autocast here; a scripted network runs in its own dtype
            return self._conv_forward(x, self.weight, self.bias)
        return self._float32_forward(x)

    @torch.jit.unused
    def _float32_forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self._conv_forward(x.float(), self.weight, self.bias)


def _head(channels: int, num_anchors: int, prior: float) -> nn.Sequential:
    """``conv3-RReLU-conv1`` to ``num_anchors * 5`` channels; noduleness biases start at the logit of ``prior`` so the
    first steps are not swamped by the loss of ~10^5 confidently-wrong negatives (RetinaNet's initialisation). The last
    conv is a :class:`Float32Conv3d`: the outputs are float32 logits and offsets even under mixed precision."""
    out = Float32Conv3d(channels, num_anchors * NUM_OUTPUTS, 1)
    nn.init.normal_(out.weight, std=0.01)
    with torch.no_grad():
        out.bias.zero_()
        out.bias[0::NUM_OUTPUTS] = -math.log((1.0 - prior) / prior)
    return nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), RReLU(), out)


class ResNetFPN(nn.Module):
    """Single-stage nodule detection network (paper §2.2, Fig. 1).

    Args:
        anchor_sizes: regression anchor sides per head, ``(head-0 sizes at stride 2, head-1 sizes at stride 4)``.
        stem_channels: channels of the stem conv.
        stem_stride: 1 (a full-resolution stem, as the paper) or 2 (the stem itself halves the resolution and
            stage 1 keeps it: no full-resolution feature map, ~25% less time and far less memory on a whole scan).
        channels: channels of the four down-sampling stages (strides 2, 4, 8, 16).
        blocks: ResBlocks per down-sampling stage.
        fpn_channels: channels of the up-sampling pathway at strides 2, 4, 8 (head 0 and head 1 see the first two).
        norm: ``"batch"`` or ``"instance"``.
        prior: initial noduleness probability of every anchor.

    ``forward(x)``: ``x`` is ``(B, 1, I, J, K)`` of any spatial size (padded with zeros, the air value, at the far end
    of each axis to a multiple of 16 internally). Returns ``[out0, out1]``, ``out_h`` of shape
    ``(B, A_h * 5, ceil(I/s_h), ceil(J/s_h), ceil(K/s_h))`` with ``s = (2, 4)``; channel ``a * 5 + f`` holds, for anchor
    ``a`` of that head, ``f = 0`` the noduleness logit and ``f = 1..4`` the ``(di, dj, dk, dd)`` offsets of
    :class:`custom_components.boxes.CubeCoder`. Use :func:`custom_components.anchors.flatten_outputs` for ``(B, N, 5)``.
    """

    def __init__(
        self,
        anchor_sizes: Sequence[Sequence[float]] = DEFAULT_ANCHOR_SIZES,
        stem_channels: int = 8,
        stem_stride: int = 2,
        channels: Sequence[int] = (16, 24, 32, 48),
        blocks: Sequence[int] = (1, 1, 1, 1),
        fpn_channels: Sequence[int] = (16, 24, 32),
        norm: str = "batch",
        prior: float = 0.01,
    ) -> None:
        super().__init__()
        if len(anchor_sizes) != 2 or not all(len(s) > 0 for s in anchor_sizes):
            raise ValueError(f"anchor_sizes needs a non-empty tuple of sizes for each of 2 heads, got {anchor_sizes}")
        if len(channels) != 4 or len(blocks) != 4 or len(fpn_channels) != 3:
            raise ValueError("channels and blocks need 4 entries (strides 2..16), fpn_channels 3 (strides 2, 4, 8)")
        self.anchor_sizes: tuple[tuple[float, ...], ...] = tuple(tuple(float(d) for d in s) for s in anchor_sizes)
        self.strides: tuple[int, int] = HEAD_STRIDES
        self.size_divisible: int = SIZE_DIVISIBLE
        self.num_anchors: tuple[int, int] = (len(self.anchor_sizes[0]), len(self.anchor_sizes[1]))
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        c, f = list(channels), list(fpn_channels)
        self.stem = nn.Sequential(
            nn.Conv3d(1, stem_channels, 3, stride=stem_stride, padding=1, bias=False),
            _norm(norm, stem_channels),
            RReLU(),
        )
        self.stage1 = _stage(stem_channels, c[0], blocks[0], norm, stride=2 // stem_stride)
        self.stage2 = _stage(c[0], c[1], blocks[1], norm)
        self.stage3 = _stage(c[1], c[2], blocks[2], norm)
        self.stage4 = _stage(c[2], c[3], blocks[3], norm)
        self.up8 = _upsample(c[3], f[2], norm)
        self.fuse8 = ResBlock(f[2], f[2], norm=norm)
        self.up4 = _upsample(f[2], f[1], norm)
        self.lateral4 = nn.Conv3d(c[1], f[1], 1)
        self.fuse4 = ResBlock(f[1], f[1], norm=norm)
        self.up2 = _upsample(f[1], f[0], norm)
        self.lateral2 = nn.Conv3d(c[0], f[0], 1)
        self.fuse2 = ResBlock(f[0], f[0], norm=norm)
        self.head0 = _head(f[0], self.num_anchors[0], prior)
        self.head1 = _head(f[1], self.num_anchors[1], prior)

    def forward(self, x: Tensor) -> list[Tensor]:
        size = [int(x.shape[2]), int(x.shape[3]), int(x.shape[4])]
        pad = [(-s) % self.size_divisible for s in size]
        if pad[0] + pad[1] + pad[2] > 0:
            x = F.pad(x, [0, pad[2], 0, pad[1], 0, pad[0]])
        c1 = self.stage1(self.stem(x))
        c2 = self.stage2(c1)
        p8 = self.fuse8(self.up8(self.stage4(self.stage3(c2))))
        p4 = self.fuse4(self.up4(p8) + self.lateral4(c2))
        p2 = self.fuse2(self.up2(p4) + self.lateral2(c1))
        out0 = self.head0(p2)
        out1 = self.head1(p4)
        s0, s1 = self.strides[0], self.strides[1]
        out0 = out0[:, :, : (size[0] + s0 - 1) // s0, : (size[1] + s0 - 1) // s0, : (size[2] + s0 - 1) // s0]
        out1 = out1[:, :, : (size[0] + s1 - 1) // s1, : (size[1] + s1 - 1) // s1, : (size[2] + s1 - 1) // s1]
        return [out0, out1]


def build_network(preset: str = "lean", **overrides: Any) -> ResNetFPN:
    """A :class:`ResNetFPN` from ``PRESETS[preset]`` with ``overrides`` (any constructor argument) merged over it.

    Bundle config: ``{"_target_": "custom_components.network.build_network", "preset": "lean"}``; command line:
    ``--network_def#preset paper`` or ``--network_def#channels "[16, 32, 48, 64]"``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown network preset {preset!r}, expected one of {sorted(PRESETS)}")
    return ResNetFPN(**{**PRESETS[preset], **overrides})
