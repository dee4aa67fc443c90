"""Ignite handlers of the training workflow: rounds of provisional testing, and what the user sees of training.

Both attach to MONAI's ``SupervisedTrainer`` through its ``train_handlers`` list (each has ``attach(engine)``).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.apps.utils import get_logger
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from custom_components.cache import PreprocessedScans
from custom_components.detector import NoduleDetector
from custom_components.evaluation import detect_scan
from custom_components.froc import FP as FP_MARK
from custom_components.froc import classify_marks, froc_scores
from custom_components.froc_report import format_table, write_report, write_submission
from custom_components.sampling import SamplingAnchors
from custom_components.utils import atomic_write

# MONAI's get_logger prints INFO to stdout; `python -m monai.bundle run` configures no root logger
logger = get_logger("nodule_detection")


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
        lr_scheduler: the training's scheduler. A ``ReduceLROnPlateau`` (stepped on the training loss) forgets its
            best loss when a round begins, so that a plateau is judged within a round: a new round's patches are
            harder (they hold the false positives just found), so its loss is not comparable with the previous
            round's, and comparing them would decay the learning rate at every round whether or not the loss has
            stopped falling. Other schedulers are left alone.
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
        lr_scheduler: Any = None,
    ) -> None:
        self.detector = detector
        self.scans = scans
        self.anchors = anchors
        self.round_epochs = int(round_epochs)
        self.score_threshold = float(score_threshold)
        self.max_per_scan = int(max_per_scan)
        self.use_inferer = use_inferer
        self.plateau_scheduler = lr_scheduler if isinstance(lr_scheduler, ReduceLROnPlateau) else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.round_epochs), self)
        if self.plateau_scheduler is not None:
            # at the first epoch of every round after round 0; a filter on the epoch number, so a resumed run agrees
            def round_start(_: Engine, epoch: int) -> bool:
                return epoch > 1 and (epoch - 1) % self.round_epochs == 0

            engine.add_event_handler(Events.EPOCH_STARTED(event_filter=round_start), self._new_plateau)

    def _new_plateau(self, engine: Engine) -> None:
        scheduler = self.plateau_scheduler
        scheduler.best = scheduler.mode_worse
        scheduler.num_bad_epochs = 0

    def false_positives(self, device: torch.device | str) -> dict[int, np.ndarray]:
        """Scan index -> ``(F, 3)`` voxel centres of this rank's share of the training scans' false positives."""
        rank, world = idist.get_rank(), idist.get_world_size()
        found: dict[int, np.ndarray] = {}
        indices = range(rank, len(self.scans), world)
        for index in tqdm(indices, desc="provisional testing", unit="scan", disable=rank != 0, leave=False):
            scan = self.scans[index]
            cubes, scores = detect_scan(self.detector, scan, device, self.use_inferer)
            labels = classify_marks(cubes[:, :3], scan.nodules_voxel, scan.excluded_voxel)
            keep = (labels == FP_MARK) & (scores >= self.score_threshold)
            found[index] = cubes[keep][: self.max_per_scan, :3]
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
        if idist.get_rank() != 0:
            return
        logger.info(
            "round %d begins after provisional testing: %d sampling anchors (%d GT + %d FP), %.2f FP/scan found, %.1f s",
            stats["round"], stats["anchors"], stats["gt_anchors"], stats["fp_anchors"], stats["fp_per_scan"],
            stats["seconds"],
        )


class TrainingLog:
    """What the user sees of training: a progress bar per epoch, one summary line per epoch, ``metrics.csv`` and
    TensorBoard scalars (when ``tensorboard`` is installed).

    It also puts the epoch's mean loss into ``engine.state.metrics["train_loss"]`` for the learning-rate scheduler.

    Args:
        output_dir: folder of ``metrics.csv`` (and TensorBoard's ``events.*``).
        anchors: the sampling anchors, for their count per epoch.
        validator: the validation evaluator, whose latest metrics are logged with the epoch they were computed in.
        optimizer: for the learning rate.
        progress: show the per-iteration progress bar.
    """

    def __init__(
        self,
        output_dir: str | Path,
        anchors: SamplingAnchors | None = None,
        validator: Engine | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        progress: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.anchors = anchors
        self.validator = validator
        self.optimizer = optimizer
        self.progress = progress
        self._sums: dict[str, float] = {}
        self._count = 0
        self._bar: tqdm | None = None
        self._start = 0.0
        self._writer: Any = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED | Events.TERMINATE | Events.EXCEPTION_RAISED, self._close)

    def _epoch_started(self, engine: Engine) -> None:
        self._sums, self._count, self._start = {}, 0, time.perf_counter()
        if self.progress and idist.get_rank() == 0:
            self._bar = tqdm(total=engine.state.epoch_length, desc=f"epoch {engine.state.epoch}", unit="batch", leave=False)

    def _iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output
        for key, value in output.items():
            if isinstance(value, (int, float)):
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{output['loss']:.4f}", refresh=False)
            self._bar.update(1)

    def _epoch_completed(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        row: dict[str, Any] = {"epoch": engine.state.epoch}
        row.update({k: v / max(self._count, 1) for k, v in self._sums.items()})
        engine.state.metrics["train_loss"] = row.get("loss", float("nan"))
        if self.optimizer is not None:
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.anchors is not None:
            row.update({"round": self.anchors.round, "anchors": len(self.anchors)})
        if self.validator is not None and getattr(self.validator.state, "epoch", 0):
            for key in ("cpm", "froc_new"):
                if key in self.validator.state.metrics:
                    row[f"val_{key}"] = self.validator.state.metrics[key]
        row["seconds"] = time.perf_counter() - self._start
        if idist.get_rank() != 0:
            return
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        self._write_csv(row)
        self._write_tensorboard(row)

    def _write_csv(self, row: dict[str, Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.csv"
        rows = list(csv.DictReader(path.open())) if path.exists() else []
        rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_write(path) as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def _write_tensorboard(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._writer = False
                return
            self._writer = SummaryWriter(log_dir=str(self.output_dir))
        if self._writer:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, row["epoch"])

    def _close(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer:
            self._writer.close()


class FROCReport:
    """Attached to the evaluator of ``configs/evaluate.json``: collects every scan's marks and, when the run completes,
    writes the LUNA16 submission CSV and the FROC report (table on the log, ``froc.json``, ``froc.csv``, ``froc.png``).

    Args:
        output_dir: where ``submission.csv`` and the report go.
        bootstrap: bootstrap resamples for the 95% confidence intervals (LUNA16: 1000).
        seed: seed of the resampling.
        title: title of the plot.
    """

    def __init__(self, output_dir: str | Path, bootstrap: int = 1000, seed: int = 0, title: str = "FROC") -> None:
        self.output_dir = Path(output_dir)
        self.bootstrap = bootstrap
        self.seed = seed
        self.title = title
        self._scans: dict[str, dict[str, Any]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self._scans.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _collect(self, engine: Engine) -> None:
        for scan in engine.state.output:
            self._scans.setdefault(scan["seriesuid"], scan)

    def _report(self, engine: Engine) -> None:
        if idist.get_world_size() > 1:
            self._scans = {k: v for part in idist.all_gather(self._scans) for k, v in part.items()}
        if idist.get_rank() != 0:
            return
        uids = sorted(self._scans)
        marks = {u: self._scans[u]["marks"] for u in uids}
        result = froc_scores(
            marks,
            {u: self._scans[u]["nodules"] for u in uids},
            {u: self._scans[u]["excluded"] for u in uids},
            uids,
            bootstrap=self.bootstrap,
            seed=self.seed,
        )
        submission = write_submission(marks, self.output_dir / "submission.csv")
        files = write_report(result, self.output_dir, title=self.title)
        logger.info("FROC over %d scans\n%s", len(uids), format_table(result))
        logger.info("wrote %s, %s", submission, ", ".join(str(p) for p in files.values()))


class ScanProgress:
    """A progress bar over the scans of an inference or evaluation run (one iteration = one scan)."""

    def attach(self, engine: Engine) -> None:
        state: dict[str, tqdm] = {}

        def start(eng: Engine) -> None:
            state["bar"] = tqdm(total=eng.state.epoch_length, desc="scans", unit="scan", disable=idist.get_rank() != 0)

        engine.add_event_handler(Events.EPOCH_STARTED, start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: state["bar"].update(1))
        engine.add_event_handler(Events.EPOCH_COMPLETED | Events.EXCEPTION_RAISED, lambda _: state["bar"].close())
