"""Anchor-based patch sampling (the paper's §2.3).

*Sampling anchors* are the points that training patches are cropped around (not to be confused with the *regression
anchors* of the network's output cells). Round 0 uses the ground-truth nodules; after each *round* of ``t`` epochs,
*provisional testing* over the full training scans adds its false positives: ``anchors_{i+1} = S_gt ∪ S_fp(i)``.

All coordinates here are voxel indices ``(ci, cj, ck)`` of the preprocessed 1 mm volumes in
:class:`custom_components.cache.PreprocessedScans`; a nodule is a row ``(ci, cj, ck, d)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from custom_components.boxes import cubes_to_standard
from custom_components.cache import PreprocessedScans
from custom_components.errors import InputError

GT, FP = 0, 1


class SamplingAnchors:
    """The current set of sampling anchors and the round it belongs to.

    Rows of :attr:`anchors` are ``(scan_index, ci, cj, ck, kind)`` with ``kind`` ``GT`` (0) or ``FP`` (1).
    It has ``state_dict``/``load_state_dict`` so that Ignite's ``Checkpoint`` saves it with the model: a resumed
    training continues with the anchors of the round it stopped in.

    Args:
        scans: the training scans; their ``nodules_voxel`` centres are the round-0 anchors.
    """

    def __init__(self, scans: PreprocessedScans) -> None:
        self.scans = scans
        self.seriesuids = [scan.seriesuid for scan in scans]
        self.round = 0
        self.anchors = self._ground_truth()
        if len(self.anchors) == 0:
            raise InputError(f"no ground-truth nodules in the {len(scans)} training scans: round 0 has no sampling anchors")

    def _ground_truth(self) -> np.ndarray:
        rows = [
            np.column_stack([np.full(len(scan.nodules_voxel), i), scan.nodules_voxel[:, :3], np.full(len(scan.nodules_voxel), GT)])
            for i, scan in enumerate(self.scans)
            if len(scan.nodules_voxel)
        ]
        return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 5), np.float32)

    def update(self, false_positives: dict[int, np.ndarray]) -> dict[str, float]:
        """Start the next round with ``anchors = S_gt ∪ S_fp``.

        Args:
            false_positives: scan index -> ``(F, 3)`` voxel centres of that scan's false positives.

        Returns:
            ``{"round", "anchors", "gt_anchors", "fp_anchors"}`` for the log.
        """
        fp_rows = [
            np.column_stack([np.full(len(c), i), np.asarray(c, np.float32).reshape(-1, 3), np.full(len(c), FP)])
            for i, c in sorted(false_positives.items())
            if len(c)
        ]
        self.anchors = np.concatenate([self._ground_truth(), *fp_rows]).astype(np.float32)
        self.round += 1
        return self.summary()

    def summary(self) -> dict[str, float]:
        n_fp = int((self.anchors[:, 4] == FP).sum())
        return {"round": self.round, "anchors": len(self.anchors), "gt_anchors": len(self.anchors) - n_fp, "fp_anchors": n_fp}

    def __len__(self) -> int:
        return len(self.anchors)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "anchors": torch.from_numpy(self.anchors.copy()), "seriesuids": self.seriesuids}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["seriesuids"]) != self.seriesuids:
            raise InputError("the checkpoint's sampling anchors belong to another set of training scans (fold or datalist changed)")
        self.round = int(state["round"])
        self.anchors = np.asarray(state["anchors"], dtype=np.float32).reshape(-1, 5)


class AnchorSampler(Sampler[int]):
    """Draws ``num_samples`` anchor indices per epoch, with replacement, from the anchors current at the start of the
    epoch. A fixed epoch length keeps Ignite's epoch bookkeeping valid while the anchor set grows.

    Args:
        anchors: the sampling anchors.
        num_samples: patches per epoch.
        seed: seed of the sampler's own generator (saved in checkpoints).
        gt_share: ``None`` draws uniformly from ``S_gt ∪ S_fp`` (every anchor equally often, as the paper's one patch
            per anchor). A number in (0, 1] draws a ground-truth anchor with that probability and a false-positive
            anchor otherwise (each uniformly within its kind), so the share of patches centred on a nodule stays the
            same however many false positives a provisional test adds; a round without false positives draws only
            ground truth.
    """

    def __init__(self, anchors: SamplingAnchors, num_samples: int, seed: int = 0, gt_share: float | None = None) -> None:
        self.anchors = anchors
        self.num_samples = num_samples
        self.gt_share = None if gt_share is None else float(gt_share)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        kinds = self.anchors.anchors[:, 4]
        if self.gt_share is None or not np.any(kinds == FP):
            yield from torch.randint(len(self.anchors), (self.num_samples,), generator=self.generator).tolist()
            return
        gt, fp = torch.from_numpy(np.flatnonzero(kinds == GT)), torch.from_numpy(np.flatnonzero(kinds == FP))
        pick_gt = torch.rand(self.num_samples, generator=self.generator) < self.gt_share
        from_gt = gt[torch.randint(len(gt), (self.num_samples,), generator=self.generator)]
        from_fp = fp[torch.randint(len(fp), (self.num_samples,), generator=self.generator)]
        yield from torch.where(pick_gt, from_gt, from_fp).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def crop_patch(image: np.ndarray, start: np.ndarray, size: int) -> np.ndarray:
    """Crop ``image[start:start+size]`` per axis, padding with 0 (air after intensity scaling) outside the volume.

    Args:
        image: ``(I, J, K)`` volume.
        start: ``(3,)`` integer voxel index of the patch's first voxel (may be negative).
        size: edge of the cubic patch in voxels.

    Returns:
        ``(size, size, size)`` float32 array.
    """
    out = np.zeros((size, size, size), dtype=np.float32)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, image.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = image[
        src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]
    ]
    return out


def cubes_in_patch(cubes: np.ndarray, start: np.ndarray, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Move ``(N, 4)`` voxel cubes into patch coordinates and split them into those whose centre lies inside the
    patch (training targets) and those that only overlap it (cut by the border: neither positive nor negative)."""
    if len(cubes) == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)
    moved = np.empty_like(cubes, dtype=np.float32)
    # a voxel centre at index p of the crop lands at (p + 0.5) * scale - 0.5 after resizing by ``scale``
    moved[:, :3] = (cubes[:, :3] - start + 0.5) * scale - 0.5
    moved[:, 3] = np.where(cubes[:, 3] > 0, cubes[:, 3] * scale, cubes[:, 3])
    inside = np.all((moved[:, :3] >= 0) & (moved[:, :3] <= size - 1), axis=1)
    half = np.abs(moved[:, 3:4]) / 2
    overlaps = np.all((moved[:, :3] + half >= 0) & (moved[:, :3] - half <= size - 1), axis=1)
    return moved[inside], moved[overlaps & ~inside]


class AnchorPatchDataset(Dataset):
    """γ³ training patches cropped around the sampling anchors, with patch-level augmentation.

    Item ``a`` (an index into :attr:`SamplingAnchors.anchors`) is a patch around that anchor, shifted by a random
    jitter so the nodule is not always centred, cropped at a random scale and resized to γ³, then passed through
    ``transform`` (the configs' MONAI box-aware flips and rotations, on ``image`` and StandardMode ``box`` /
    ``ignore_box``).

    Returns ``{"image": (1, γ, γ, γ) float32, "boxes": (M, 4), "ignore": (K, 4)}``: ``boxes`` the nodules whose centre
    is in the patch, ``ignore`` the excluded findings and the nodules cut by the border (patch voxel cubes).

    Args:
        scans: the cached training scans.
        anchors: the current sampling anchors.
        patch_size: γ.
        jitter: the anchor is moved by up to this many voxels along each axis.
        scale_range: the crop is ``γ / s`` voxels for ``s`` drawn uniformly from this range, then resized to γ.
        transform: box-aware augmentation applied last (``None`` for none).

    Randomness comes from torch's generator, which DataLoader seeds differently in every worker and epoch, so
    ``torch.manual_seed`` (MONAI's ``set_determinism``) makes a run reproducible.
    """

    def __init__(
        self,
        scans: PreprocessedScans,
        anchors: SamplingAnchors,
        patch_size: int = 96,
        jitter: float = 16.0,
        scale_range: Sequence[float] = (0.8, 1.25),
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        self.scans = scans
        self.anchors = anchors
        self.patch_size = int(patch_size)
        self.jitter = float(jitter)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        scan_index, *centre, _ = self.anchors.anchors[index]
        scan = self.scans[int(scan_index)]
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,))))
        scale = float(rng.uniform(*self.scale_range))
        crop = max(int(round(self.patch_size / scale)), 1)
        scale = self.patch_size / crop
        centre = np.asarray(centre) + rng.uniform(-self.jitter, self.jitter, size=3)
        start = np.round(centre - (crop - 1) / 2).astype(int)
        patch = torch.from_numpy(crop_patch(scan.image, start, crop))[None]
        if crop != self.patch_size:
            patch = F.interpolate(patch[None], size=(self.patch_size,) * 3, mode="trilinear", align_corners=False)[0]
        boxes, cut = cubes_in_patch(scan.nodules_voxel, start, self.patch_size, scale)
        excluded, excluded_cut = cubes_in_patch(scan.excluded_voxel, start, self.patch_size, scale)
        ignore = np.concatenate([cut, excluded, excluded_cut])
        item = {"image": patch, "boxes": torch.from_numpy(boxes), "ignore": torch.from_numpy(ignore)}
        return self._augment(item) if self.transform is not None else item

    def _augment(self, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # MONAI's box flips and rotations take voxel i to span [i, i + 1) (its centre at i + 0.5), while our cubes put
        # voxel centres at integer indices: shift by half a voxel on the way in and out
        half = torch.tensor([0.5, 0.5, 0.5, 0.0])
        data = {
            "image": item["image"],
            "box": cubes_to_standard(item["boxes"] + half),
            "ignore_box": cubes_to_standard(item["ignore"].abs() + half),
        }
        data = self.transform(data)
        return {
            "image": torch.as_tensor(data["image"]).float(),
            "boxes": standard_to_cubes(torch.as_tensor(data["box"]), item["boxes"][:, 3]) - half,
            "ignore": standard_to_cubes(torch.as_tensor(data["ignore_box"]), item["ignore"][:, 3]) - half,
        }


def standard_to_cubes(boxes: torch.Tensor, diameters: torch.Tensor) -> torch.Tensor:
    """``(N, 6)`` StandardMode boxes back to ``(N, 4)`` cubes, keeping the given (possibly negative) diameters:
    flips and 90° rotations move a cube's centre but never its size."""
    centres = (boxes[:, :3] + boxes[:, 3:]) / 2
    return torch.cat([centres, diameters.reshape(-1, 1).to(centres)], dim=1).float()


def collate_patches(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack the patches; keep the per-patch box lists as lists (their lengths differ)."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "boxes": [b["boxes"] for b in batch],
        "ignore": [b["ignore"] for b in batch],
    }
