"""Rounds of anchor-based patch sampling (the paper's §2.3): t epochs on the current *sampling anchors*, then a
*provisional test* over the full training scans whose false positives join the ground truth as the next round's
anchors (anchors_0 = S_gt, anchors_{i+1} = S_gt ∪ S_fp(i)).

:class:`ProvisionalTesting` owns the round and fires :class:`RoundEvents` on the trainer; what depends on rounds
subscribes to those events (:class:`PlateauPerRound`) instead of depending on where it sits in the handler list.
The checkpoint handler (:mod:`custom_components.checkpoint`) fires after every other end-of-epoch handler, so the
checkpoint of a round's last epoch holds the next round's anchors.
"""

from __future__ import annotations

import time

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, EventEnum, Events
from monai.apps.utils import get_logger
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from custom_components.cache import PreprocessedScans
from custom_components.detector import NoduleDetector
from custom_components.froc import FP as FP_MARK
from custom_components.froc import classify_marks
from custom_components.sampling import SamplingAnchors
from custom_components.scan_detection import detect_scan

__all__ = ["RoundEvents", "ProvisionalTesting", "PlateauPerRound"]

logger = get_logger("nodule_detection")


class RoundEvents(EventEnum):
    """Custom Ignite events of the trainer, fired by :class:`ProvisionalTesting`."""

    ROUND_STARTED = "round_started"  #: at EPOCH_STARTED of the first epoch of every round
    ROUND_COMPLETED = "round_completed"  #: at EPOCH_COMPLETED of a round's last epoch, once the anchors are updated


class ProvisionalTesting:
    """Ends each round of ``round_epochs`` epochs: anchors_{i+1} = S_gt ∪ S_fp(i) (the paper's §2.3).

    The detector runs over every full training scan; its false positives (detections that hit no nodule and no
    excluded finding, by LUNA16's distance rule, with noduleness ≥ ``score_threshold``, the ``max_per_scan`` highest
    per scan) become the sampling anchors of the next round together with the ground truth. Matching is done in the
    preprocessed 1 mm voxel grid, where voxel distances are millimetres, as LUNA16 measures them.

    Under ``torch.distributed`` each rank tests every ``world_size``-th scan and the false positives are gathered, so
    all ranks continue with the same anchors.

    Args:
        detector: detector sharing the trained network.
        scans: the cached training scans (the same object the anchors refer to).
        anchors: the sampling anchors to update.
        round_epochs: t, the epochs of a round.
        score_threshold: the least noduleness of a false positive worth sampling.
        max_per_scan: at most this many false positives per scan (the highest scoring).
        use_inferer: sliding-window inference instead of one whole-volume pass (bounded memory on a GPU).

    Events (:class:`RoundEvents`, registered on the trainer when attached): ``ROUND_COMPLETED`` right after the
    anchors are updated, ``ROUND_STARTED`` at the first epoch of every round (an epoch-number filter, so a resumed run
    fires it at the same epochs as an uninterrupted one).
    """

    def __init__(
        self,
        detector: NoduleDetector,
        scans: PreprocessedScans,
        anchors: SamplingAnchors,
        round_epochs: int,
        score_threshold: float = 0.5,
        max_per_scan: int = 10,
        use_inferer: bool = False,
    ) -> None:
        self.detector = detector
        self.scans = scans
        self.anchors = anchors
        self.round_epochs = int(round_epochs)
        self.score_threshold = float(score_threshold)
        self.max_per_scan = int(max_per_scan)
        self.use_inferer = use_inferer

    def attach(self, engine: Engine) -> None:
        engine.register_events(*RoundEvents)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.round_epochs), self)

        def round_start(_: Engine, epoch: int) -> bool:
            return (epoch - 1) % self.round_epochs == 0

        engine.add_event_handler(
            Events.EPOCH_STARTED(event_filter=round_start), lambda eng: eng.fire_event(RoundEvents.ROUND_STARTED)
        )

    def false_positives(self, device: torch.device | str) -> dict[int, np.ndarray]:
        """Scan index -> ``(F, 3)`` voxel centres of this rank's share of the training scans' false positives."""
        rank, world = idist.get_rank(), idist.get_world_size()
        found: dict[int, np.ndarray] = {}
        indices = range(rank, len(self.scans), world)
        for index in tqdm(indices, desc="provisional testing", unit="scan", disable=rank != 0, leave=False):
            scan = self.scans[index]
            detections = detect_scan(self.detector, scan.image, scan.affine, device, self.use_inferer)
            labels = classify_marks(detections.cubes[:, :3], scan.nodules_voxel, scan.excluded_voxel)
            keep = (labels == FP_MARK) & (detections.scores >= self.score_threshold)
            found[index] = detections.cubes[keep][: self.max_per_scan, :3]
        return found

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch >= engine.state.max_epochs:
            return
        start = time.perf_counter()
        found = self.false_positives(engine.state.device)
        if idist.get_world_size() > 1:
            found = {k: v for part in idist.all_gather(found) for k, v in part.items()}
        stats = self.anchors.update(found)
        stats["fp_per_scan"] = float(sum(len(v) for v in found.values()) / max(len(self.scans), 1))
        stats["seconds"] = time.perf_counter() - start
        engine.state.metrics.update({f"round_{k}": v for k, v in stats.items()})
        engine.fire_event(RoundEvents.ROUND_COMPLETED)
        if idist.get_rank() != 0:
            return
        logger.info(
            "round %d begins after provisional testing: %d sampling anchors (%d GT + %d FP), %.2f FP/scan found, %.1f s",
            stats["round"], stats["anchors"], stats["gt_anchors"], stats["fp_anchors"], stats["fp_per_scan"],
            stats["seconds"],
        )


class PlateauPerRound:
    """Judges a ``ReduceLROnPlateau`` within a round: it forgets its best loss when a round starts.

    A new round's patches are harder (they hold the false positives just found), so its loss is not comparable with
    the previous round's; comparing them would decay the learning rate at every round whether or not the loss has
    stopped falling. Subscribes to :attr:`RoundEvents.ROUND_STARTED`; any other scheduler is left alone.

    Args:
        lr_scheduler: the training's learning-rate scheduler.
    """

    def __init__(self, lr_scheduler: object) -> None:
        self.lr_scheduler = lr_scheduler

    def attach(self, engine: Engine) -> None:
        if isinstance(self.lr_scheduler, ReduceLROnPlateau):
            engine.register_events(*RoundEvents)
            engine.add_event_handler(RoundEvents.ROUND_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        # ReduceLROnPlateau has no public reset; these are the two fields its step() compares against
        self.lr_scheduler.best = self.lr_scheduler.mode_worse
        self.lr_scheduler.num_bad_epochs = 0
