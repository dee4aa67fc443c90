"""FROCMetric (custom_components.froc_metric): in an Ignite engine, standalone, and gathered across 2 gloo ranks."""

from __future__ import annotations

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError

from custom_components.froc import froc_scores
from custom_components.froc_metric import FROCMetric


def _scans(seed: int = 0, n: int = 10) -> list[dict]:
    """Per-scan dicts as the evaluator's output: tensors, world mm; scan 0 has neither marks nor nodules."""
    rng = np.random.default_rng(seed)
    scans = []
    for i in range(n):
        k = 0 if i == 0 else int(rng.integers(0, 4))
        nodules = np.c_[rng.uniform(-100, 100, (k, 3)), rng.uniform(4, 20, k)]
        found = nodules[rng.random(k) < 0.8]
        fp = 0 if i == 0 else int(rng.poisson(5))
        marks = np.r_[np.c_[found[:, :3], rng.beta(4, 1.5, len(found))],
                      np.c_[rng.uniform(-150, 150, (fp, 3)), rng.beta(1, 3, fp)]]
        excluded = np.c_[rng.uniform(-100, 100, (2, 3)), [-1.0, 8.0]]
        scans.append({"seriesuid": f"1.2.{i}", "marks": torch.as_tensor(marks, dtype=torch.float32),
                      "nodules": torch.as_tensor(nodules), "excluded": torch.as_tensor(excluded)})
    return scans


def _expected(scans: list[dict]) -> dict[str, float]:
    return froc_scores(
        {s["seriesuid"]: s["marks"].numpy() for s in scans},
        {s["seriesuid"]: s["nodules"].numpy() for s in scans},
        {s["seriesuid"]: s["excluded"].numpy() for s in scans},
        [s["seriesuid"] for s in scans],
    ).scores()


def test_metric_in_an_engine_equals_froc_scores():
    scans = _scans()
    batches = [scans[i : i + 3] for i in range(0, len(scans), 3)]  # a decollated batch: a list of scan dicts
    engine = Engine(lambda engine, batch: batch)
    FROCMetric().attach(engine, "froc")
    state = engine.run(batches, max_epochs=2)  # reset at each epoch: the second epoch does not double the scans
    expected = _expected(scans)
    assert {k: state.metrics[k] for k in expected} == pytest.approx(expected)
    assert state.metrics["froc"] == pytest.approx(expected["cpm"]), "the attached name holds the scalar CPM"
    assert sorted(expected) == sorted(["cpm", "froc_new"] + [f"sens_{r}" for r in
                                                             ("0.125", "0.25", "0.5", "1", "2", "4", "8")])
    assert 0 < expected["cpm"] < 1


def test_metric_with_output_transform_and_single_dicts():
    scans = _scans(seed=1)
    engine = Engine(lambda engine, scan: {"pred": scan, "loss": 0.0})
    FROCMetric(output_transform=lambda out: out["pred"]).attach(engine, "cpm")
    metrics = engine.run(scans).metrics
    assert {k: metrics[k] for k in _expected(scans)} == pytest.approx(_expected(scans))


def test_metric_outside_an_engine():
    scans = _scans(seed=2)
    metric = FROCMetric()
    with pytest.raises(NotComputableError):
        metric.compute()
    metric.update(scans[:4])
    metric.update(scans[4])
    metric.update(scans[5:])
    metric.update(scans[:2])  # repeated scans (DistributedSampler padding) keep their first entry
    assert metric.compute() == pytest.approx(_expected(scans))
    metric.reset()
    metric.update(scans[3])
    assert metric.compute() == pytest.approx(_expected(scans[3:4]))


def test_metric_rejects_other_outputs():
    metric = FROCMetric()
    with pytest.raises(ValueError, match="per-scan dicts with keys 'seriesuid', 'marks', 'nodules'"):
        metric.update({"y_pred": torch.zeros(3), "y": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"marks of 1\.2: expected an \(N, 4\) array, got shape \(2, 3\)"):
        metric.update({"seriesuid": "1.2", "marks": torch.zeros(2, 3), "nodules": torch.zeros(0, 4)})


def _distributed(local_rank: int, scans: list[dict], out: dict) -> None:
    metric = FROCMetric()
    rank, world = idist.get_rank(), idist.get_world_size()
    metric.update(scans[rank::world])  # each rank sees its share, as with a DistributedSampler
    result = metric.compute()
    gathered = idist.all_gather(result["cpm"])
    if rank == 0:
        out.update(result, spread=float(np.ptp(np.asarray(gathered, dtype=float))))


def test_metric_gathers_scans_across_ranks():
    scans = _scans(seed=3, n=9)
    with torch.multiprocessing.Manager() as manager:
        out = manager.dict()
        with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
            parallel.run(_distributed, scans, out)
        out = dict(out)
    assert out.pop("spread") == 0.0  # every rank computes the same scores
    assert out == pytest.approx(_expected(scans))
