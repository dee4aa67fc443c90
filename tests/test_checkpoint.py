"""ResumableCheckpoint: what a checkpoint holds, and what resuming clears."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from custom_components.checkpoint import BestModelSaver, ResumableCheckpoint, latest_checkpoint


class _Counter:
    """A stand-in for the sampling anchors: state that an end-of-epoch handler changes."""

    def __init__(self) -> None:
        self.round = 0

    def state_dict(self) -> dict:
        return {"round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]


def _engine(tmp_path, counter: _Counter, resume: bool = False) -> Engine:
    engine = Engine(lambda engine, batch: None)
    # attached before the handler that changes the state, as train.json lists it first
    ResumableCheckpoint(tmp_path, {"anchors": counter}, resume=resume).attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def _next_round(_: Engine) -> None:
        counter.round += 1

    return engine


def test_a_checkpoint_holds_what_every_end_of_epoch_handler_did(tmp_path):
    _engine(tmp_path, _Counter()).run([0, 1], max_epochs=3)
    path = latest_checkpoint(tmp_path)
    assert path.name == "checkpoint_epoch=3.pt"
    assert [p.name for p in tmp_path.glob("*.pt")] == ["checkpoint_epoch=3.pt"], "n_saved=1 keeps the latest only"
    assert torch.load(path, weights_only=False)["anchors"]["round"] == 3


def test_resuming_restores_the_state_and_clears_partial_writes(tmp_path):
    _engine(tmp_path, _Counter()).run([0, 1], max_epochs=2)
    partial = tmp_path / ".checkpoint_epoch=3.pt.k1ll3d.tmp"
    partial.write_bytes(b"half a checkpoint")
    counter = _Counter()
    engine = _engine(tmp_path, counter, resume=True)
    epochs: list[tuple[int, int]] = []
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append((e.state.epoch, counter.round)))
    engine.run([0, 1], max_epochs=4)
    assert epochs == [(3, 2), (4, 3)], "resumes at epoch 3 with the round the checkpoint of epoch 2 held"
    assert not partial.exists()
    assert torch.load(latest_checkpoint(tmp_path), weights_only=False)["anchors"]["round"] == 4


class _NoScansAnchors:
    """Sampling anchors of a cohort without scans: provisional testing finds nothing, rounds still advance."""

    round = 0

    def update(self, false_positives: dict) -> dict:
        self.round += 1
        return {"round": self.round, "anchors": 0, "gt_anchors": 0, "fp_anchors": 0}


def test_a_round_judges_the_loss_plateau_on_its_own_losses():
    """Round 1's patches are harder: its loss starts above round 0's best and falls. That is no plateau, and the
    learning rate must stay; a round whose loss stops falling still decays it."""
    from custom_components.rounds import PlateauPerRound, ProvisionalTesting
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    losses = [3.0, 2.0, 1.5, 1.0, 2.5, 2.2, 2.2, 2.2, 2.0, 2.0, 2.0, 2.0]  # rounds of 4 epochs
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = ReduceLROnPlateau(optimizer, patience=2)
    engine = Engine(lambda engine, batch: None)
    PlateauPerRound(scheduler).attach(engine)  # attached before the handler that fires the round events
    ProvisionalTesting(None, [], _NoScansAnchors(), round_epochs=4).attach(engine)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "device", "cpu"))
    lrs: list[float] = []

    @engine.on(Events.EPOCH_COMPLETED)
    def _step(e: Engine) -> None:
        scheduler.step(losses[e.state.epoch - 1])
        lrs.append(optimizer.param_groups[0]["lr"])

    engine.run([0], max_epochs=len(losses))
    # round 1 (epochs 5-8) never beats round 0's 1.0, which would decay at epoch 7, but falls within 2 epochs of its
    # start; round 2 (epochs 9-12) stays flat: 3 epochs without a better loss, more than the patience of 2
    assert lrs == pytest.approx([0.1] * 11 + [0.01])


def _validation(saver: BestModelSaver, scores: list[float], net: torch.nn.Module) -> list[bytes]:
    """Run one evaluator epoch per score (the weights change each time); the model file's bytes after each."""
    written = []
    for score in scores:
        with torch.no_grad():
            net.weight.fill_(score)
        evaluator = Engine(lambda engine, batch: None)
        saver.attach(evaluator)

        @evaluator.on(Events.EPOCH_COMPLETED)
        def _metric(engine: Engine, value: float = score) -> None:
            engine.state.metrics["cpm"] = value

        evaluator.run([0])
        written.append(saver.path.read_bytes() if saver.path.exists() else b"")
    return written


def test_the_model_file_follows_the_best_score_and_a_resumed_run_keeps_it(tmp_path):
    net = torch.nn.Linear(1, 1)
    saver = BestModelSaver(tmp_path, {"model": net}, "cpm")
    after = _validation(saver, [0.5, 0.4, 0.5, 0.7], net)
    # written at 0.5; kept at 0.4 and at the tie; replaced at 0.7
    assert after[0] == after[1] == after[2] != after[3]
    assert torch.load(saver.path)["model"]["weight"].item() == pytest.approx(0.7)
    resumed = BestModelSaver(tmp_path, {"model": net}, "cpm")
    resumed.load_state_dict(saver.state_dict())
    assert _validation(resumed, [0.6], net) == [after[3]], "a resumed run does not replace the best with a worse model"


def test_a_failed_write_leaves_the_best_model_whole(tmp_path, monkeypatch):
    """MONAI's CheckpointSaver deletes model.pt before writing the new one in place; this saver replaces it only once
    the new file is complete."""
    net = torch.nn.Linear(1, 1)
    saver = BestModelSaver(tmp_path, {"model": net}, "cpm")
    before = _validation(saver, [0.5], net)[0]

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        _validation(saver, [0.9], net)
    assert saver.path.read_bytes() == before and saver.best == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"], "no partial file is left"
