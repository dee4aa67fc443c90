"""The training workflow: a short run learns, an interrupted run resumes with its sampling anchors, DDP runs.

These run the real bundle configs (``configs/train.json`` + ``configs/demo.json``) on a few small synthetic scans.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_components.synth.cohort import generate_cohort

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """6 small synthetic scans in LUNA16's format and their datalist."""
    from custom_components.luna16 import build_datalist

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, scans=6, seed=3, progress=False)
    datalist = build_datalist(out)
    (out / "datalist.json").write_text(json.dumps(datalist))
    return out


def _parser(cohort: Path, bundle_root: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "demo.json")])
    parser.update(
        {
            "bundle_root": str(bundle_root),
            "data_list_file_path": str(cohort / "datalist.json"),
            "fold": -1,
            "num_workers": 0,
            **overrides,
        }
    )
    return parser


def _noduleness_map(parser, scan) -> tuple[np.ndarray, np.ndarray]:
    """Noduleness of every cell x regression anchor over the whole scan (before NMS) and the anchors' cubes."""
    from custom_components.anchors import flatten_outputs

    network = parser.get_parsed_content("network").eval()
    anchors = parser.get_parsed_content("regression_anchors")
    with torch.inference_mode():
        outputs = network(torch.from_numpy(np.asarray(scan.image, np.float32))[None, None])
        scores = torch.sigmoid(flatten_outputs(outputs)[0, :, 0])
    return scores.numpy(), anchors.for_outputs(outputs).numpy()


def _nodule_vs_background(parser, scan, nodule: np.ndarray) -> tuple[float, float]:
    """The highest noduleness of anchors centred within 2 voxels of ``nodule``, and the median noduleness of the
    anchors farther than two diameters from every nodule (the background)."""
    scores, cubes = _noduleness_map(parser, scan)
    dist = np.linalg.norm(cubes[:, None, :3] - scan.nodules_voxel[None, :, :3], axis=2)
    near = np.linalg.norm(cubes[:, :3] - nodule[:3], axis=1) <= 2.0
    far = np.all(dist > 2 * scan.nodules_voxel[None, :, 3], axis=1)
    return float(scores[near].max()), float(np.median(scores[far]))


def test_a_short_training_learns_to_find_a_training_nodule(cohort, tmp_path):
    """Three rounds: round 0 on the nodules, then provisional testing adds the false positives of the whole scans
    (ribs, heart, mediastinum: never seen in round 0's patches), and the next rounds train them away."""
    torch.manual_seed(0)
    parser = _parser(
        cohort, tmp_path, epochs=24, patches_per_epoch=32, batch_size=8, patch_size=48, round_epochs=8,
        val_interval=100, learning_rate=0.01, fp_score_threshold=0.05,
    )
    parser.get_parsed_content("initialize")
    scans = parser.get_parsed_content("train#dataset")
    scan = next(s for s in scans if len(s.nodules_voxel) and s.nodules_voxel[0, 3] >= 5)
    nodule = scan.nodules_voxel[0]
    before, _ = _nodule_vs_background(parser, scan, nodule)
    parser.get_parsed_content("train#trainer").run()
    after, background = _nodule_vs_background(parser, scan, nodule)
    assert after > before + 0.1, (before, after)
    # well above the typical background of the whole scan (which, after two rounds, is back near the prior)
    assert after > background + 0.2, (after, background)


def _run_training(cohort: Path, bundle_root: Path, *args: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{ROOT}/configs/train.json','{ROOT}/configs/demo.json']",
        "--bundle_root", str(bundle_root), "--data_list_file_path", str(cohort / "datalist.json"), "--fold", "-1",
        "--patch_size", "32", "--batch_size", "2", "--patches_per_epoch", "4", "--val_interval", "100",
        "--round_epochs", "2", "--fp_score_threshold", "0.0", "--detector#score_thresh", "0.0", *args,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")


def test_a_killed_training_resumes_mid_round_with_its_sampling_anchors(cohort, tmp_path):
    ckpt = tmp_path / "models"
    proc = _run_training(cohort, tmp_path, "--epochs", "50")
    deadline = time.time() + 240
    # epoch 3 is the first epoch of round 1 (rounds end after epochs 2, 4, ...): kill the run inside that round
    while not (ckpt / "checkpoint_epoch=3.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint of epoch 3 in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(ckpt / "checkpoint_epoch=3.pt", weights_only=False)
    assert saved["anchors"]["round"] == 1
    saved_anchors = np.asarray(saved["anchors"]["anchors"])
    assert (saved_anchors[:, 4] == 1).any(), "round 1 must hold false-positive anchors"
    assert not any(p.name.endswith(".tmp") for p in ckpt.iterdir()), "a killed run must not leave partial files"

    out = subprocess.run(
        _run_training(cohort, tmp_path, "--epochs", "4", "--resume", "true").args,
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout + out.stderr
    rows = list(__import__("csv").DictReader((tmp_path / "eval" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    epoch4 = rows[3]
    # epoch 4 trained on the restored round-1 anchors, not on round 0's ground truth only
    assert int(epoch4["round"]) == 1 and int(epoch4["anchors"]) == len(saved_anchors)
    assert (ckpt / "checkpoint_epoch=4.pt").exists()


def test_multi_gpu_config_runs_with_two_processes_on_cpu(cohort, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle", "run", "training",
        "--config_file",
        f"['{ROOT}/configs/train.json','{ROOT}/configs/demo.json','{ROOT}/configs/multi_gpu_train.json']",
        "--bundle_root", str(tmp_path), "--data_list_file_path", str(cohort / "datalist.json"), "--fold", "0",
        "--patch_size", "32", "--batch_size", "2", "--patches_per_epoch", "8", "--epochs", "2", "--round_epochs", "1",
        "--val_interval", "2", "--fp_score_threshold", "0.0", "--detector#score_thresh", "0.0",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert log.count("round 1 begins after provisional testing") == 1, "rank 0 alone reports the round"
    ckpt = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", weights_only=False)
    assert ckpt["anchors"]["round"] == 1
    assert not any(k.startswith("module.") for k in ckpt["model"]), "the checkpoint holds the bare network"
    assert (tmp_path / "models" / "model.pt").exists()
