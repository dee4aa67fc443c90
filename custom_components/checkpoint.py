"""Checkpoints that let an interrupted training resume exactly where it stopped.

MONAI's ``CheckpointSaver``/``CheckpointLoader`` take their ``save_dict`` from the config, and a config cannot put
the trainer into a dict that the trainer's own handler list holds (a circular reference); ``CheckpointLoader`` also
loads with ``weights_only=True``, which refuses the sampler's random state, and takes one fixed path where a resumed
run needs the latest of a folder. This handler receives the trainer in ``attach`` instead, and saves and restores it
with everything else: network, optimizer, scheduler, the *sampling anchors* and the anchor sampler's random state.
Writes go through :class:`AtomicDiskSaver` rather than Ignite's ``DiskSaver``: the file is synced before it replaces
the old one, and a killed write leaves a recognisable temporary file that the next resume clears.

A checkpoint is taken after every other end-of-epoch handler has run, whatever the order of the config's handler
list, so that the checkpoint of a round's last epoch already holds the next round's sampling anchors (from
provisional testing), the scheduler's step and the epoch's ``metrics.csv`` row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.apps.utils import get_logger

from custom_components.atomic import atomic_write, partial_writes, writable_folder

logger = get_logger("nodule_detection")


def epoch_checkpoints(ckpt_dir: str | Path, prefix: str = "checkpoint") -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``<prefix>_epoch=N.pt`` in ``ckpt_dir``, oldest epoch first."""
    files = Path(ckpt_dir).glob(f"{prefix}_epoch=*.pt")
    return sorted((int(p.stem.split("=")[-1]), p) for p in files)


def latest_checkpoint(ckpt_dir: str | Path, prefix: str = "checkpoint") -> Path | None:
    """The checkpoint of the latest epoch in ``ckpt_dir`` (``<prefix>_epoch=N.pt``), or ``None``."""
    files = epoch_checkpoints(ckpt_dir, prefix)
    return files[-1][1] if files else None


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler writing through :func:`~custom_components.atomic.atomic_write`.

    Unlike Ignite's ``DiskSaver(atomic=True)``, the file is synced before it replaces the old one, and the temporary
    file of a killed write is recognisable (``.<name>.*.tmp``), so that :meth:`remove_partial` can clear it.

    Ignite's ``Checkpoint`` asks for the checkpoint it rotates out to be removed *before* it writes the new one: with
    ``n_saved=1`` a kill during that write would leave no whole checkpoint at all. :meth:`remove` therefore only marks
    the file; it is deleted once the next checkpoint is whole on disk.
    """

    def __init__(self, dirname: str | Path) -> None:
        self.dirname = Path(dirname)
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        with atomic_write(self.dirname / filename, "wb") as f:
            torch.save(checkpoint, f)
        for old in self._superseded:
            if old != filename:  # a checkpoint written again under its own name replaced itself
                (self.dirname / old).unlink(missing_ok=True)
        self._superseded.clear()

    def remove(self, filename: str) -> None:
        self._superseded.append(filename)

    def remove_partial(self) -> list[Path]:
        """Delete the temporary files that killed writes left behind; returns them."""
        partial = partial_writes(self.dirname)
        for path in partial:
            path.unlink(missing_ok=True)
        return partial


class ResumableCheckpoint:
    """Saves ``<save_dir>/checkpoint_epoch=N.pt`` after every epoch, atomically, and, with ``resume=True``,
    restores the latest one when the run starts (clearing the partial file of a write the interruption cut short).

    Args:
        save_dir: folder of the checkpoints.
        objects: ``{name: object with state_dict/load_state_dict}`` (network, optimizer, scheduler, anchors, ...);
            the trainer is added under ``"trainer"`` when attached; ``None`` values (disabled handlers) are left out.
        resume: restore the latest checkpoint of ``save_dir`` at ``Events.STARTED`` (a fresh start when none).
        n_saved: how many epoch checkpoints to keep.
        map_location: device the tensors are loaded to.
    """

    def __init__(
        self,
        save_dir: str | Path,
        objects: Mapping[str, Any],
        resume: bool = False,
        n_saved: int = 1,
        map_location: str | torch.device = "cpu",
    ) -> None:
        self.save_dir = Path(save_dir)
        self.objects = {name: obj for name, obj in objects.items() if obj is not None}  # a disabled handler is None
        self.resume = resume
        self.n_saved = n_saved
        self.map_location = map_location
        self.disk = AtomicDiskSaver(self.save_dir)
        self._saver: Checkpoint | None = None

    def attach(self, engine: Engine) -> None:
        writable_folder(self.save_dir, "checkpoints")
        self.objects["trainer"] = engine
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._restore)
        if idist.get_rank() != 0:
            return  # under torch.distributed every rank holds the same state: rank 0 alone writes it
        engine.add_event_handler(Events.EPOCH_STARTED, self._attach_saver)

    def _attach_saver(self, engine: Engine) -> None:
        # registered when the first epoch starts, after every handler attached or registered at STARTED (metrics.csv),
        # so it fires last at EPOCH_COMPLETED: a checkpoint never precedes what its epoch wrote
        if self._saver is not None:
            return
        self._saver = Checkpoint(
            self.objects,
            self.disk,
            filename_prefix="checkpoint",
            global_step_transform=lambda eng, _: eng.state.epoch,
            filename_pattern="{filename_prefix}_epoch={global_step}.{ext}",
            n_saved=self.n_saved,
        )
        if self.resume:  # Ignite's Checkpoint rotates only what it wrote itself: hand it the killed run's files
            self._saver.load_state_dict({"_saved": [(epoch, path.name) for epoch, path in epoch_checkpoints(self.save_dir)]})
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._saver)

    def _restore(self, engine: Engine) -> None:
        for partial in self.disk.remove_partial():
            logger.warning("resume: removed %s, the partial write of an interrupted run", partial)
        path = latest_checkpoint(self.save_dir)
        if path is None:
            logger.warning("resume: no checkpoint in %s, training starts from scratch", self.save_dir)
            return
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(self.objects, torch.load(path, map_location=self.map_location, weights_only=False))
        # the command line may extend the run: keep the max_epochs asked for now, not the checkpoint's
        engine.state.max_epochs = max_epochs
        logger.info("resumed from %s at epoch %d", path, engine.state.epoch)


class BestModelSaver:
    """Writes ``<save_dir>/<filename>`` (``models/model.pt``) whenever the evaluator's key metric beats the best so far
    (ties keep the earlier model), through :func:`~custom_components.atomic.atomic_write`.

    MONAI's ``CheckpointSaver(key_metric_filename=...)`` is not used for this file: it deletes the old file before
    writing the new one in place (its disk saver is not atomic), so a kill during that write loses the best model.
    The best score is part of the training checkpoint (:meth:`state_dict`), so a resumed run does not replace the
    model with a worse one.

    Args:
        save_dir: folder of the model file.
        save_dict: ``{name: object with state_dict}`` saved as ``{name: state_dict}`` (the network, its record).
        key_metric_name: the evaluator's metric to compare (greater is better).
        filename: the model file's name.
    """

    def __init__(
        self, save_dir: str | Path, save_dict: Mapping[str, Any], key_metric_name: str, filename: str = "model.pt"
    ) -> None:
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.key_metric_name = key_metric_name
        self.best: float | None = None

    def attach(self, engine: Engine) -> None:
        writable_folder(self.path.parent, "the model file")
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        score = float(engine.state.metrics[self.key_metric_name])
        if self.best is not None and not score > self.best:
            return
        with atomic_write(self.path, "wb") as f:
            torch.save({name: obj.state_dict() for name, obj in self.save_dict.items()}, f)
        self.best = score
        logger.info("%s: %s %.4f, the best so far", self.path, self.key_metric_name, score)

    def state_dict(self) -> dict[str, float | None]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, float | None]) -> None:
        self.best = state["best"]
