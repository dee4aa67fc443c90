"""ResumableCheckpoint: what a checkpoint holds, and what resuming clears."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

from custom_components.checkpoint import ResumableCheckpoint, latest_checkpoint


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
