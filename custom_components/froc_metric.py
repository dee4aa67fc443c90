"""Ignite pieces of LUNA16's FROC: :class:`FROCMetric` for validation (FROC[luna] = CPM, FROC[new] over the scans of an
epoch) and :class:`FROCReport`, the evaluator handler that writes the submission and the FROC report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from monai.apps.utils import get_logger

from custom_components.atomic import writable_folder
from custom_components.froc import MAX_MARKS, as_rows, froc_scores
from custom_components.froc_report import format_table, write_report
from custom_components.luna16_tables import write_submission

__all__ = ["FROCMetric", "FROCReport"]

logger = get_logger("nodule_detection")

_Scan = tuple[str, np.ndarray, np.ndarray, np.ndarray]


def _numpy(value: Any) -> Any:
    """Tensors (MetaTensors included, any device) to numpy; anything else is left to ``np.asarray``."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


class FROCMetric(Metric):
    """LUNA16's FROC over the validation scans, computed with :func:`custom_components.froc.froc_scores`.

    Per scan it keeps the detections and the reference, all in world LPS mm; ``compute()`` scores every scan seen
    since ``reset()`` together (FP/scan is over those scans) and returns::

        {"cpm": float, "froc_new": float,
         "sens_0.125": float, "sens_0.25": ..., "sens_0.5": ..., "sens_1": ..., "sens_2": ..., "sens_4": ...,
         "sens_8": float}

    Attached to an engine under ``name``, every key goes into ``engine.state.metrics`` and ``name`` holds the CPM
    (a scalar, which MONAI's workflows need to track the best key metric); attach it as ``"cpm"``.

    Expected ``output_transform(engine.state.output)``: one scan dict or a sequence of them (e.g. MONAI's decollated
    batch), each::

        {"seriesuid": str,
         "marks":    (N, 4) tensor/array (x, y, z, probability), world LPS mm; N may be 0,
         "nodules":  (M, 4) tensor/array (x, y, z, diameter_mm); M may be 0,
         "excluded": (K, 4) tensor/array (x, y, z, diameter_mm), diameter < 0 = unknown (10 mm); optional}

    Every validation scan must be passed, even with no marks and no nodules: it counts in the FP/scan denominator.
    A seriesuid seen twice keeps its first entry (``DistributedSampler`` pads the last batch with repeated scans).

    Distributed (native backends): each rank keeps its own scans; ``compute()`` gathers them on every rank with
    ``ignite.distributed.all_gather`` (object gather) so all ranks return the same scores.

    Args:
        output_transform: maps the engine output to the format above.
        max_marks: LUNA16's cap of marks per scan (``None``: no cap).
        device: kept for Ignite's API; the scoring runs on CPU in numpy.

    Example::

        metric = FROCMetric(output_transform=lambda out: [
            {"seriesuid": o["seriesuid"], "marks": o["marks"], "nodules": o["nodules"], "excluded": o["excluded"]}
            for o in out])
        metric.attach(evaluator, "cpm")   # engine.state.metrics["cpm"], ["froc_new"], ["sens_1"], ...
    """

    required_output_keys = None

    def __init__(
        self,
        output_transform: Callable[[Any], Any] = lambda x: x,
        max_marks: int | None = MAX_MARKS,
        device: str | torch.device = torch.device("cpu"),
    ) -> None:
        self.max_marks = max_marks
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._scans: list[_Scan] = []

    @reinit__is_reduced
    def update(self, output: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Add one scan dict or a sequence of them (format in the class docstring)."""
        for scan in [output] if isinstance(output, Mapping) else output:
            if not isinstance(scan, Mapping) or "seriesuid" not in scan or "marks" not in scan or "nodules" not in scan:
                raise ValueError(
                    "FROCMetric expects per-scan dicts with keys 'seriesuid', 'marks', 'nodules' (and optionally "
                    f"'excluded'), got {type(scan).__name__}"
                    + (f" with keys {sorted(scan)}" if isinstance(scan, Mapping) else "")
                )
            uid = str(scan["seriesuid"])
            self._scans.append(
                (
                    uid,
                    as_rows(_numpy(scan["marks"]), f"marks of {uid}"),
                    as_rows(_numpy(scan["nodules"]), f"nodules of {uid}"),
                    as_rows(_numpy(scan.get("excluded")), f"excluded of {uid}"),
                )
            )

    def iteration_completed(self, engine: Any) -> None:
        # Ignite's default would unpack a mapping by required_output_keys or split (y_pred, y) pairs; our output is
        # per-scan dicts, passed through as they are
        self.update(self._output_transform(engine.state.output))

    def completed(self, engine: Any, name: str) -> None:
        scores = self.compute()
        engine.state.metrics.update(scores)
        engine.state.metrics[name] = scores["cpm"]

    def compute(self) -> dict[str, float]:
        scans = self._scans
        if idist.get_world_size() > 1:
            scans = [scan for rank in idist.all_gather(self._scans) for scan in rank]
        if not scans:
            raise NotComputableError("FROCMetric must have at least one scan before it can be computed.")
        marks: dict[str, np.ndarray] = {}
        nodules: dict[str, np.ndarray] = {}
        excluded: dict[str, np.ndarray] = {}
        for uid, scan_marks, scan_nodules, scan_excluded in scans:
            if uid not in marks:
                marks[uid], nodules[uid], excluded[uid] = scan_marks, scan_nodules, scan_excluded
        return froc_scores(marks, nodules, excluded, list(marks), max_marks=self.max_marks).scores()


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
        writable_folder(self.output_dir, "the FROC report")
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
