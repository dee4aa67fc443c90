"""The training iteration for MONAI's ``SupervisedTrainer``: patches in, detection loss parts out.

``SupervisedTrainer``'s default iteration takes one loss tensor; the detector's loss has parts (classification on the
positives and the hard negatives, regression on the positives) that users want to watch, and targets that are lists of
boxes of varying length per patch, so the configs pass :func:`detection_iteration` as ``iteration_update``.

Mixed precision: the forward pass runs under ``torch.autocast`` with ``engine.amp_kwargs["dtype"]``
(``configs/train.json`` sets it from the ``amp`` config id through :mod:`custom_components.precision`: bf16 on a CPU
with native bf16, fp16 on CUDA). MONAI's ``amp`` flag of the trainer then only says whether a gradient scaler is used
(fp16; its ``GradScaler`` is CUDA-only, and bf16, with fp32's exponent range, needs none). Without a ``dtype`` in
``amp_kwargs``, ``amp=True`` means fp16 autocast with the scaler, as MONAI's own iteration. The loss (target
assignment, hard-negative mining) runs in fp32 on the head outputs cast to float32.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from custom_components.precision import autocast

__all__ = ["TRAINING_MEMORY_FORMAT", "detection_iteration"]

#: Layout of a training batch ``(B, 1, γ, γ, γ)``: oneDNN's 3D convolutions and :class:`~custom_components.network.RReLU`
#: run a lean training step ~30 % faster on channels-last activations on a CPU (``docs/performance.md``); the network's
#: weights keep the default layout, so inference on whole scans is unchanged.
TRAINING_MEMORY_FORMAT = torch.channels_last_3d


def detection_iteration(engine: SupervisedTrainer, batch: dict[str, Any]) -> dict[str, Any]:
    """One SGD step on a batch of patches.

    Args:
        engine: the trainer; ``engine.loss_function`` is a :class:`custom_components.loss.DetectionLoss`.
        batch: ``{"image": (B, 1, γ, γ, γ), "boxes": list of (M_b, 4), "ignore": list of (K_b, 4)}`` patch voxel
            cubes, as :func:`custom_components.sampling.collate_patches` makes it.

    Returns:
        ``{"loss", "loss_cls", "loss_reg", "num_pos", "num_neg"}`` as Python numbers (``engine.state.output``).
    """
    device = engine.state.device
    images = batch["image"].to(device, non_blocking=engine.non_blocking, memory_format=TRAINING_MEMORY_FORMAT)
    boxes = [b.to(device) for b in batch["boxes"]]
    ignore = [b.to(device) for b in batch["ignore"]]
    engine.network.train()
    engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
    dtype = engine.amp_kwargs.get("dtype", torch.float16 if engine.amp else None)
    with autocast(dtype, device):
        outputs = engine.network(images)
    # the loss's regression anchors and targets take the outputs' dtype: bf16 would round a 90.5 voxel centre to 90
    outputs = [o.float() for o in outputs]
    engine.state.output = {Keys.IMAGE: images, Keys.PRED: outputs}
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    parts = engine.loss_function(outputs, boxes, ignore)
    loss = parts["loss"]
    engine.state.output[Keys.LOSS] = loss
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    if engine.amp and engine.scaler is not None:
        engine.scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in parts.items()}
