"""Regression anchors (§2.2): reference cubes ``(ci, cj, ck, d)`` at every output cell of the two heads.

Order of the ``N`` anchors (the same as :func:`flatten_outputs`): head 0 then head 1; within a head, cells in C order
``(u, v, w)`` (``w``, the ``k`` cell index, fastest), and within a cell the head's anchor sizes in the given order. So
row ``n`` of ``anchors`` and row ``n`` of ``flatten_outputs(outputs)[b]`` always describe the same cell x anchor.

Cell ``(u, v, w)`` of a stride-``s`` head covers input voxels ``[u*s, u*s + s - 1]`` per axis (voxel centres at
integer indices), so its centre is ``c = u*s + (s - 1)/2``: 0.5, 2.5, ... for ``s = 2``; 1.5, 5.5, ... for ``s = 4``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from custom_components.network import DEFAULT_ANCHOR_SIZES, HEAD_STRIDES, NUM_OUTPUTS

__all__ = ["RegressionAnchors", "flatten_outputs"]


def flatten_outputs(outputs: Sequence[Tensor]) -> Tensor:
    """Network head outputs ``[(B, A_h*5, I_h, J_h, K_h), ...]`` -> ``(B, N, 5)``, ``N = sum_h I_h*J_h*K_h*A_h``.

    Column 0 is the noduleness logit, columns 1..4 the ``(di, dj, dk, dd)`` offsets; rows follow the anchor order.
    """
    flat = []
    for out in outputs:
        b, c, i, j, k = out.shape
        a = c // NUM_OUTPUTS
        flat.append(out.reshape(b, a, NUM_OUTPUTS, i, j, k).permute(0, 3, 4, 5, 1, 2).reshape(b, -1, NUM_OUTPUTS))
    return torch.cat(flat, dim=1)


class RegressionAnchors:
    """Anchor cubes of every cell x anchor of the heads, cached per grid shape, device and dtype.

    Args:
        sizes_per_head: anchor sides (voxels) per head; defaults to ``(3, 5, 7, 10)`` at stride 2 and
            ``(13, 17, 22, 30, 40)`` at stride 4. Must match the network's ``anchor_sizes``.
        strides: stride of each head relative to the input.
    """

    def __init__(
        self,
        sizes_per_head: Sequence[Sequence[float]] = DEFAULT_ANCHOR_SIZES,
        strides: Sequence[int] = HEAD_STRIDES,
    ) -> None:
        if len(sizes_per_head) != len(strides):
            raise ValueError(f"one anchor-size tuple per head expected, got {len(sizes_per_head)} for {len(strides)}")
        self.sizes_per_head: tuple[tuple[float, ...], ...] = tuple(tuple(float(d) for d in s) for s in sizes_per_head)
        self.strides: tuple[int, ...] = tuple(int(s) for s in strides)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors_per_head(self) -> tuple[int, ...]:
        """``A_h`` for each head."""
        return tuple(len(s) for s in self.sizes_per_head)

    def grid_shapes(self, image_shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """Output grid of each head for an input of spatial shape ``(I, J, K)``: ``ceil(I/s), ceil(J/s), ceil(K/s)``."""
        return [tuple((int(n) + s - 1) // s for n in image_shape) for s in self.strides]  # type: ignore[misc]

    def counts_per_head(self, grid_shapes: Sequence[Sequence[int]]) -> list[int]:
        """Number of anchors of each head; head ``h`` owns rows ``sum(counts[:h]) .. sum(counts[:h+1]) - 1``."""
        return [int(g[0]) * int(g[1]) * int(g[2]) * a for g, a in zip(grid_shapes, self.num_anchors_per_head)]

    def for_grids(
        self, grid_shapes: Sequence[Sequence[int]], device: torch.device | str | None = None, dtype=torch.float32
    ) -> Tensor:
        """Anchors ``(N, 4)`` rows ``(ci, cj, ck, d)`` in input voxel coordinates for the given head grids."""
        key = (tuple(tuple(int(n) for n in g) for g in grid_shapes), str(torch.device(device or "cpu")), dtype)
        if key not in self._cache:
            if len(key[0]) != len(self.strides):
                raise ValueError(f"expected {len(self.strides)} head grids, got {len(key[0])}")
            per_head = []
            for grid, stride, sizes in zip(key[0], self.strides, self.sizes_per_head):
                axes = [torch.arange(n, dtype=dtype, device=device) * stride + (stride - 1) / 2 for n in grid]
                centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 1, 3)
                d = torch.tensor(sizes, dtype=dtype, device=device)
                cubes = torch.cat([centres.expand(-1, len(sizes), 3), d.view(1, -1, 1).expand(len(centres), -1, 1)], 2)
                per_head.append(cubes.reshape(-1, 4))
            self._cache[key] = torch.cat(per_head, dim=0)
        return self._cache[key]

    def __call__(
        self, image_shape: Sequence[int], device: torch.device | str | None = None, dtype=torch.float32
    ) -> Tensor:
        """Anchors ``(N, 4)`` for an input of spatial shape ``(I, J, K)`` (any size, as the network accepts)."""
        return self.for_grids(self.grid_shapes(image_shape), device, dtype)

    def for_outputs(self, outputs: Sequence[Tensor]) -> Tensor:
        """Anchors ``(N, 4)`` matching ``flatten_outputs(outputs)``, on the outputs' device."""
        return self.for_grids([o.shape[2:] for o in outputs], outputs[0].device, outputs[0].dtype)
