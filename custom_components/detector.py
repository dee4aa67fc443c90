"""Inference wrapper with MONAI ``RetinaNetDetector``'s API: images in, nodule boxes/scores out (voxel coordinates).

Whole images run tile by tile (:mod:`custom_components.tiling`: peak memory bounded by ``tile_size``, not by the
scan), each tile's cells thresholded and capped at once (:mod:`custom_components.candidates`), then one NMS over the
merged candidates. Only the network runs under mixed precision (``amp``, :mod:`custom_components.precision`); the
head outputs are cast to float32 before decoding and NMS.

Training does not go through this class: it calls the network and :class:`custom_components.loss.DetectionLoss`
directly on patches. Mapping the voxel boxes to LPS millimetres is the geometry module's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.utils import BlendMode, PytorchPadMode
from torch import Tensor, nn

from custom_components.anchors import RegressionAnchors
from custom_components.boxes import CubeCoder, cubes_to_standard
from custom_components.candidates import Candidates, head_candidates
from custom_components.postprocess import select_detections, suppress
from custom_components.precision import autocast
from custom_components.tiling import DEFAULT_TILE_MARGIN, plan_tiles

__all__ = ["NoduleDetector"]


class NoduleDetector(nn.Module):
    """Runs the two-head network on whole images (or with MONAI's sliding-window inferer) and selects nodule marks.

    Args:
        network: a :class:`custom_components.network.ResNetFPN` (or any module with the same outputs and the
            attributes ``anchor_sizes``, ``strides`` and optionally ``size_divisible``; MONAI Label reads
            ``detector.network``).
        anchors: the network's regression anchors (default: built from ``network.anchor_sizes``/``strides``).
        coder: offset coder (default :class:`CubeCoder()`).
        inferer: optional sliding-window inferer (see :meth:`set_sliding_window_inferer`, which checks alignment).
        score_thresh, topk_candidates, nms_thresh, max_detections, soft_nms, soft_nms_sigma: see
            :func:`custom_components.postprocess.select_detections`.
        amp: mixed precision of the network (``False``, ``"bfloat16"``, ``"float16"``, ``True`` for the device's
            own; :func:`custom_components.precision.autocast_dtype`), resolved on the input's device. A TorchScript
            network (the Deploy app's ``model.ts``) always runs in its own dtype: TorchScript's autocast ignores the
            heads' opt-out (:class:`~custom_components.network.Float32Conv3d`) and would return bf16 logits, whose
            ties scramble the candidate cap and the ranking.
        tile_size: whole-image passes run in tiles of at most ``tile_size**3`` input voxels
            (:func:`custom_components.tiling.plan_tiles`); ``None``: one pass over the whole image.
        tile_margin: context voxels around each tile's core (a multiple of 16).

    ``detector(images, use_inferer=False)``: ``images`` is ``(B, 1, I, J, K)`` or a list of ``(1, I, J, K)`` tensors
    (sizes may differ). Tiled and untiled passes give the same marks when ``tile_margin`` covers the network's
    receptive radius (the cells are the same; each is decoded by exactly one tile). Returns one dict per image: ``"box"`` ``(N, 6)`` MONAI StandardMode boxes in voxel coordinates
    of the given tensor, ``"label"`` ``(N,)`` int64 zeros (one class), ``"label_scores"`` ``(N,)`` noduleness, and
    ``"cube"`` ``(N, 4)`` ``(ci, cj, ck, d)``; keys follow :meth:`set_target_keys`. Runs in eval mode under
    ``torch.inference_mode`` (the network's train/eval mode is restored afterwards).
    """

    def __init__(
        self,
        network: nn.Module,
        anchors: RegressionAnchors | None = None,
        coder: CubeCoder | None = None,
        inferer: SlidingWindowInferer | None = None,
        score_thresh: float = 0.02,
        topk_candidates: int = 1000,
        nms_thresh: float = 0.1,
        max_detections: int = 100,
        soft_nms: bool = False,
        soft_nms_sigma: float = 0.5,
        amp: bool | str | torch.dtype | None = None,
        tile_size: int | None = None,
        tile_margin: int = DEFAULT_TILE_MARGIN,
    ) -> None:
        super().__init__()
        self.network = network
        self.anchors = anchors or RegressionAnchors(network.anchor_sizes, network.strides)
        self.coder = coder or CubeCoder()
        self.size_divisible = int(getattr(network, "size_divisible", 16))
        self.inferer = inferer
        self.set_box_selector_parameters(score_thresh, topk_candidates, nms_thresh, max_detections)
        self.soft_nms = soft_nms
        self.soft_nms_sigma = soft_nms_sigma
        self.set_target_keys("box", "label")
        self.cube_key = "cube"
        self.amp = amp
        plan_tiles((1, 1, 1), tile_size, tile_margin, self.size_divisible)  # raises on a tile size the margins don't fit
        self.tile_size = tile_size
        self.tile_margin = int(tile_margin)

    def set_target_keys(self, box_key: str, label_key: str) -> None:
        """Keys of the output dicts: boxes, labels and ``label_key + "_scores"`` (as MONAI)."""
        self.target_box_key = box_key
        self.target_label_key = label_key
        self.pred_score_key = label_key + "_scores"

    def set_box_selector_parameters(
        self,
        score_thresh: float = 0.02,
        topk_candidates_per_level: int = 1000,
        nms_thresh: float = 0.1,
        detections_per_img: int = 100,
        apply_sigmoid: bool = True,
        soft_nms: bool | None = None,
        soft_nms_sigma: float | None = None,
    ) -> None:
        """MONAI's box-selector settings; the candidate cap is over all anchors of an image, not per level.

        ``apply_sigmoid`` is accepted for MONAI compatibility and must be True (the heads output logits).
        """
        if not apply_sigmoid:
            raise ValueError("the network outputs noduleness logits, apply_sigmoid must be True")
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates_per_level
        self.nms_thresh = nms_thresh
        self.max_detections = detections_per_img
        if soft_nms is not None:
            self.soft_nms = soft_nms
        if soft_nms_sigma is not None:
            self.soft_nms_sigma = soft_nms_sigma

    def set_sliding_window_inferer(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        overlap: float = 0.25,
        mode: BlendMode | str = BlendMode.CONSTANT,
        sigma_scale: Sequence[float] | float = 0.125,
        padding_mode: PytorchPadMode | str = PytorchPadMode.CONSTANT,
        cval: float = 0.0,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        cache_roi_weight_map: bool = False,
    ) -> None:
        """MONAI's :class:`SlidingWindowInferer` with the same arguments as ``RetinaNetDetector``'s.

        Windows must start on the coarsest head's grid so that each window's output cells land on whole cells of the
        stitched map: ``roi_size`` (each positive entry) must be a multiple of ``size_divisible`` (16) and
        ``int(roi * (1 - overlap))`` a multiple of 4 (e.g. 96 or 128 with overlap 0.25 or 0.5). The image is padded to
        a multiple of 16 before windowing. On a CPU prefer ``sw_batch_size >= 2``: for batch-1 inputs with
        ``B*C*I*J <= 20480`` PyTorch picks its slow native conv3d instead of oneDNN.
        """
        rois = [roi_size] * 3 if isinstance(roi_size, int) else list(roi_size)
        coarsest = max(self.anchors.strides)
        for roi in rois:
            if roi > 0 and (roi % self.size_divisible or int(roi * (1 - overlap)) % coarsest):
                raise ValueError(
                    f"roi_size {roi_size} with overlap {overlap} misaligns the output cells: need roi % "
                    f"{self.size_divisible} == 0 and int(roi * (1 - overlap)) % {coarsest} == 0"
                )
        self.inferer = SlidingWindowInferer(
            roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval, sw_device, device, progress,
            cache_roi_weight_map,
        )

    def _network(self, images: Tensor) -> list[Tensor]:
        """The network's head outputs for ``images (B, 1, I, J, K)`` under ``amp``, cast to float32."""
        amp = False if isinstance(self.network, torch.jit.ScriptModule) else self.amp
        with autocast(amp, images.device):
            outputs = self.network(images)
        return [o.float() for o in outputs]

    def _head_outputs(self, images: Tensor) -> list[Tensor]:
        """Sliding-window outputs for ``images (B, 1, I, J, K)``, cropped to the head grids of ``(I, J, K)``."""
        if self.inferer is None:
            raise ValueError("use_inferer=True needs set_sliding_window_inferer(...) to be called first")
        size = images.shape[2:]
        roi = self.inferer.roi_size
        rois = [roi] * 3 if isinstance(roi, int) else list(roi)
        padded = [max(n, r) for n, r in zip(size, rois)]
        padded = [n + (-n) % self.size_divisible for n in padded]
        pad = [p - n for p, n in zip(padded, size)]
        images = F.pad(images, [0, pad[2], 0, pad[1], 0, pad[0]])
        outputs = self.inferer(images, self._network)
        grids = self.anchors.grid_shapes(size)
        return [o[:, :, : g[0], : g[1], : g[2]] for o, g in zip(outputs, grids)]

    def _tiled(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(cubes, scores)`` of each image of ``images (B, 1, I, J, K)``, tile by tile."""
        shape = images.shape[2:]
        tiles = plan_tiles(shape, self.tile_size, self.tile_margin, self.size_divisible)
        found: list[list[Candidates]] = [[] for _ in range(images.shape[0])]
        for tile in tiles:
            core = (tile.core_lo, tile.core_hi) if len(tiles) > 1 else None
            outputs = self._network(images[(slice(None), slice(None), *tile.input_slices)])
            for b, parts in enumerate(found):
                parts.append(
                    head_candidates(
                        [o[b] for o in outputs], self.anchors, self.coder, shape, self.score_thresh,
                        self.topk_candidates, tile.input_lo, core,
                    )
                )
            del outputs
        return [
            suppress(
                Candidates.cat(parts), self.topk_candidates, self.nms_thresh, self.max_detections, self.soft_nms,
                self.soft_nms_sigma, self.score_thresh, shape,
            )
            for parts in found
        ]

    def forward(self, input_images: Tensor | list[Tensor], use_inferer: bool = False) -> list[dict[str, Tensor]]:
        if isinstance(input_images, Tensor):
            batches = [input_images]
        else:
            batches = [img[None] for img in input_images]
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.inference_mode():
                results = []
                for images in batches:
                    if use_inferer:
                        marks = select_detections(
                            self._head_outputs(images), self.anchors, self.coder, self.score_thresh,
                            self.topk_candidates, self.nms_thresh, self.max_detections, self.soft_nms,
                            self.soft_nms_sigma, image_shape=images.shape[2:],
                        )
                    else:
                        marks = self._tiled(images)
                    for cubes, scores in marks:
                        results.append(
                            {
                                self.target_box_key: cubes_to_standard(cubes),
                                self.target_label_key: torch.zeros_like(scores, dtype=torch.long),
                                self.pred_score_key: scores,
                                self.cube_key: cubes,
                            }
                        )
        finally:
            self.network.train(was_training)
        return results
