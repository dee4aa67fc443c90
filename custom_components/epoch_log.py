"""``metrics.csv``: one row per training epoch, for plotting a run and for checking a resumed one.

MONAI's ``StatsHandler`` logs the same numbers and ``TensorBoardStatsHandler`` plots them; neither writes a table,
and MONAI's ``MetricsSaver`` writes an evaluator's final metrics once, not a row per epoch. This handler writes the
table, rewriting it atomically each epoch so that a run resumed from epoch E keeps rows 1..E and continues after them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from custom_components.atomic import atomic_write, writable_folder
from custom_components.sampling import SamplingAnchors

__all__ = ["MetricsCSV"]


class MetricsCSV:
    """Writes ``<output_dir>/metrics.csv`` at every ``EPOCH_COMPLETED`` of the trainer (rank 0 only).

    A row holds ``epoch``, the trainer's numeric ``engine.state.metrics`` (``train_loss`` and the other averages,
    ``round_*`` after provisional testing), ``lr``, the sampling anchors' ``round`` and count, the latest validation
    metrics (``val_<name>``, repeated until the next validation) and the epoch's ``seconds``.

    Args:
        output_dir: folder of ``metrics.csv``.
        optimizer: for the learning rate of its first parameter group.
        anchors: the sampling anchors.
        validator: the validation evaluator.
        validation_metrics: which of the validator's metrics to record.
    """

    def __init__(
        self,
        output_dir: str | Path,
        optimizer: torch.optim.Optimizer | None = None,
        anchors: SamplingAnchors | None = None,
        validator: Engine | None = None,
        validation_metrics: Sequence[str] = ("cpm", "froc_new"),
    ) -> None:
        self.path = Path(output_dir) / "metrics.csv"
        self.optimizer = optimizer
        self.anchors = anchors
        self.validator = validator
        self.validation_metrics = tuple(validation_metrics)

    def attach(self, engine: Engine) -> None:
        writable_folder(self.path.parent, "metrics.csv")
        # registered when the run starts, after every handler of the config, so the row sees this epoch's validation
        # and provisional testing whatever their place in the handler list
        engine.add_event_handler(Events.STARTED, self._register)

    def _register(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def row(self, engine: Engine) -> dict[str, Any]:
        """The current epoch's row."""
        row: dict[str, Any] = {"epoch": engine.state.epoch}
        row.update({k: v for k, v in engine.state.metrics.items() if isinstance(v, (int, float))})
        if self.optimizer is not None:
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.anchors is not None:
            row.update({"round": self.anchors.round, "anchors": len(self.anchors)})
        if self.validator is not None and getattr(self.validator.state, "epoch", 0):
            for key in self.validation_metrics:
                if key in self.validator.state.metrics:
                    row[f"val_{key}"] = self.validator.state.metrics[key]
        row["seconds"] = engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0
        return row

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        row = self.row(engine)
        earlier = list(csv.DictReader(io.StringIO(self.path.read_text()))) if self.path.exists() else []
        rows = [r for r in earlier if int(r["epoch"]) < row["epoch"]] + [row]
        with atomic_write(self.path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
