"""Checkpoints that let an interrupted training resume exactly where it stopped.

MONAI's ``CheckpointSaver``/``CheckpointLoader`` take their ``save_dict`` from the config, and a config cannot put
the trainer into a dict that the trainer's own handler list holds (a circular reference). This handler receives the
trainer in ``attach`` instead, and saves and restores it with everything else: network, optimizer, scheduler, the
*sampling anchors* and the anchor sampler's random state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.apps.utils import get_logger

logger = get_logger("nodule_detection")


def latest_checkpoint(ckpt_dir: str | Path, prefix: str = "checkpoint") -> Path | None:
    """The checkpoint of the latest epoch in ``ckpt_dir`` (``<prefix>_epoch=N.pt``), or ``None``."""
    files = list(Path(ckpt_dir).glob(f"{prefix}_epoch=*.pt"))
    return max(files, key=lambda p: int(p.stem.split("=")[-1])) if files else None


class ResumableCheckpoint:
    """Saves ``<save_dir>/checkpoint_epoch=N.pt`` after every epoch (atomically: Ignite's ``DiskSaver`` writes a
    temporary file and renames it) and, with ``resume=True``, restores the latest one when the run starts.

    Args:
        save_dir: folder of the checkpoints.
        objects: ``{name: object with state_dict/load_state_dict}`` (network, optimizer, scheduler, anchors, ...);
            the trainer is added under ``"trainer"`` when attached.
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
        self.objects = dict(objects)
        self.resume = resume
        self.n_saved = n_saved
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        self.objects["trainer"] = engine
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._restore)
        if idist.get_rank() != 0:
            return  # under torch.distributed every rank holds the same state: rank 0 alone writes it
        saver = Checkpoint(
            self.objects,
            DiskSaver(str(self.save_dir), require_empty=False, atomic=True),
            filename_prefix="checkpoint",
            global_step_transform=lambda eng, _: eng.state.epoch,
            filename_pattern="{filename_prefix}_epoch={global_step}.{ext}",
            n_saved=self.n_saved,
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED, saver)

    def _restore(self, engine: Engine) -> None:
        path = latest_checkpoint(self.save_dir)
        if path is None:
            logger.warning("resume: no checkpoint in %s, training starts from scratch", self.save_dir)
            return
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(self.objects, torch.load(path, map_location=self.map_location, weights_only=False))
        # the command line may extend the run: keep the max_epochs asked for now, not the checkpoint's
        engine.state.max_epochs = max_epochs
        logger.info("resumed from %s at epoch %d", path, engine.state.epoch)
