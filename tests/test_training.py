"""The training workflow: a short run learns, an interrupted run resumes with its sampling anchors, DDP runs.

These run the real bundle configs (``configs/train.json`` + ``configs/demo.json``) on a few small synthetic scans.
"""

from __future__ import annotations

import csv
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

from bundle.synthetic.cohort import generate_cohort

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
    (ribs, heart, mediastinum: never seen in round 0's patches), and the next rounds train them away.

    96 steps in all: too few for the demo's intensity, noise, kernel and slice-thickness augmentations and its bf16
    autocast (with them the nodule's noduleness reached 0.10 and 0.16 against backgrounds of 0.01: learning, but
    slower than these bounds). So this test trains in fp32 with the box flips and rotations only; the demo's own
    figures (docs/README.md) cover the full recipe."""
    torch.manual_seed(0)
    parser = _parser(
        cohort, tmp_path, epochs=24, patches_per_epoch=32, batch_size=8, patch_size=48, round_epochs=8,
        val_interval=100, learning_rate=0.01, fp_score_threshold=0.05, amp="none",
        **{"train#augmentation#transforms": [f"@train#augment#{name}" for name in ("flip_i", "flip_j", "flip_k", "rotate90")]},
    )
    parser.get_parsed_content("initialize")
    scans = parser.get_parsed_content("train#dataset")
    scan = next(s for s in scans if len(s.nodules_voxel) and s.nodules_voxel[0, 3] >= 5)
    nodule = scan.nodules_voxel[0]
    before, _ = _nodule_vs_background(parser, scan, nodule)
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    after, background = _nodule_vs_background(parser, scan, nodule)
    assert after > before + 0.1, (before, after)
    # well above the typical background of the whole scan (which, after two rounds, is back near the prior)
    assert after > background + 0.2, (after, background)
    # the trainer's "best" training loss (logged as its key metric every epoch) is the lowest epoch's, not the highest
    with open(tmp_path / "eval" / "metrics.csv") as table:
        losses = [float(row["train_loss"]) for row in csv.DictReader(table)]
    assert trainer.state.best_metric == pytest.approx(min(losses), rel=1e-6)
    assert trainer.state.best_metric_epoch == 1 + losses.index(min(losses))


def _training_command(cohort: Path, bundle_root: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{ROOT}/configs/train.json','{ROOT}/configs/demo.json']",
        "--bundle_root", str(bundle_root), "--data_list_file_path", str(cohort / "datalist.json"), "--fold", "-1",
        "--patch_size", "32", "--batch_size", "2", "--patches_per_epoch", "4", "--val_interval", "100",
        "--round_epochs", "2", "--fp_score_threshold", "0.0", "--score_threshold", "0.0", *args,
    ]


def test_a_killed_training_resumes_with_its_sampling_anchors(cohort, tmp_path):
    """SIGKILL a run once it is past its first round, wherever it then is (inside a round, in provisional testing or
    half-way through writing a checkpoint), and resume it for one more epoch."""
    from custom_components.checkpoint import latest_checkpoint

    ckpt = tmp_path / "models"
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            _training_command(cohort, tmp_path, "--epochs", "50"), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 240
        while (latest_checkpoint(ckpt) is None or int(latest_checkpoint(ckpt).stem.split("=")[-1]) < 3):
            assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")[-3000:]
            assert time.time() < deadline, "no checkpoint of epoch 3 in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    path = latest_checkpoint(ckpt)
    saved = torch.load(path, weights_only=False)
    epoch = saved["trainer"]["iteration"] // saved["trainer"]["epoch_length"]
    assert path.name == f"checkpoint_epoch={epoch}.pt"
    # rounds end after epochs 2, 4, ...: the checkpoint of a round's last epoch holds the next round's anchors
    assert saved["anchors"]["round"] == epoch // 2 >= 1
    saved_anchors = np.asarray(saved["anchors"]["anchors"])
    assert (saved_anchors[:, 4] == 1).any(), "after round 0 the sampling anchors hold false positives"

    out = subprocess.run(
        _training_command(cohort, tmp_path, "--epochs", str(epoch + 1), "--resume", "true"),
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed from {path}" in out.stdout + out.stderr
    assert not list(ckpt.glob(".*.tmp")), "a resumed run clears the partial files of the killed one"
    rows = list(__import__("csv").DictReader((tmp_path / "eval" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epoch + 2))
    # the resumed epoch trained on the restored anchors, not on round 0's ground truth only
    assert int(rows[-1]["round"]) == epoch // 2 and int(rows[-1]["anchors"]) == len(saved_anchors)
    assert (ckpt / f"checkpoint_epoch={epoch + 1}.pt").exists()


#: Runs ``python -m monai.bundle run training`` in a process that SIGKILLs itself at a chosen point: ``{patch}`` wraps
#: one function of the bundle so that the kill lands exactly there, not wherever a poll happens to catch the run.
_KILLED_AT = """
import os, runpy, signal, sys
{patch}
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def _killed_run(patch: str, cohort: Path, bundle_root: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = _training_command(cohort, bundle_root, *args)
    driver = [sys.executable, "-c", _KILLED_AT.format(patch=patch), *cmd[3:]]
    out = subprocess.run(driver, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _resume(cohort: Path, bundle_root: Path, epochs: int) -> str:
    out = subprocess.run(
        _training_command(cohort, bundle_root, "--epochs", str(epochs), "--resume", "true"),
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _metrics_epochs(bundle_root: Path) -> list[int]:
    with (bundle_root / "eval" / "metrics.csv").open(newline="") as f:
        return [int(r["epoch"]) for r in __import__("csv").DictReader(f)]


def test_killed_during_provisional_testing_resumes_at_the_rounds_last_epoch(cohort, tmp_path):
    """SIGKILL after the first scan of round 0's provisional test (end of epoch 2): the checkpoint of epoch 2 is never
    written (the checkpoint follows the round's end), so the run resumes from epoch 1 with round 0's anchors, trains
    epoch 2 again and redoes the whole provisional test; the checkpoints after it hold round 1's anchors."""
    patch = (
        "import custom_components.rounds as rounds\n"
        "detect, calls = rounds.detect_scan, []\n"
        "def detect_then_die(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return detect(*a, **k)\n"
        "rounds.detect_scan = detect_then_die\n"
    )
    _killed_run(patch, cohort, tmp_path, "--epochs", "50")
    ckpt = tmp_path / "models"
    assert sorted(p.name for p in ckpt.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]
    assert torch.load(ckpt / "checkpoint_epoch=1.pt", weights_only=False)["anchors"]["round"] == 0

    log = _resume(cohort, tmp_path, 3)
    assert f"resumed from {ckpt / 'checkpoint_epoch=1.pt'} at epoch 1" in log
    assert log.count("round 1 begins after provisional testing") == 1
    # one checkpoint is kept (n_saved 1): epoch 3's, trained on round 1's anchors
    assert sorted(p.name for p in ckpt.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=3.pt"]
    saved = torch.load(ckpt / "checkpoint_epoch=3.pt", weights_only=False)["anchors"]
    assert saved["round"] == 1 and (np.asarray(saved["anchors"])[:, 4] == 1).any()
    assert _metrics_epochs(tmp_path) == [1, 2, 3]


def test_killed_while_writing_a_checkpoint_resumes_from_the_one_before(cohort, tmp_path):
    """SIGKILL half-way through writing ``checkpoint_epoch=3.pt`` (half of its bytes on disk, in the temporary file):
    no ``checkpoint_epoch=3.pt`` appears, epoch 2's stays whole (it is removed only after its successor is written) and
    is where the run resumes; the partial file is cleared and epoch 3 is trained again."""
    patch = (
        "import io, torch\n"
        "save, checkpoints = torch.save, []\n"
        "def save_half_then_die(obj, f, *a, **k):\n"
        "    checkpoints.extend([1] if isinstance(obj, dict) and 'trainer' in obj else [])\n"
        "    if len(checkpoints) != 3 or not isinstance(obj, dict) or 'trainer' not in obj:\n"
        "        return save(obj, f, *a, **k)\n"
        "    buffer = io.BytesIO()\n"
        "    save(obj, buffer, *a, **k)\n"
        "    f.write(buffer.getvalue()[: buffer.tell() // 2])\n"
        "    f.flush()\n"
        "    os.fsync(f.fileno())\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = save_half_then_die\n"
    )
    _killed_run(patch, cohort, tmp_path, "--epochs", "50")
    from custom_components.atomic import partial_writes

    ckpt = tmp_path / "models"
    assert sorted(p.name for p in ckpt.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=2.pt"]
    partial = partial_writes(ckpt)
    assert len(partial) == 1 and partial[0].name.startswith(".checkpoint_epoch=3.pt.") and partial[0].stat().st_size > 0
    assert torch.load(ckpt / "checkpoint_epoch=2.pt", weights_only=False)["anchors"]["round"] == 1

    log = _resume(cohort, tmp_path, 3)
    assert f"resumed from {ckpt / 'checkpoint_epoch=2.pt'} at epoch 2" in log
    assert not partial_writes(ckpt)
    # the checkpoint keeps one epoch (n_saved 1): epoch 3's replaced epoch 2's once it was whole
    assert sorted(p.name for p in ckpt.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=3.pt"]
    saved = torch.load(ckpt / "checkpoint_epoch=3.pt", weights_only=False)
    assert saved["trainer"]["iteration"] == 3 * saved["trainer"]["epoch_length"]
    assert _metrics_epochs(tmp_path) == [1, 2, 3]


def test_multi_gpu_config_runs_with_two_processes_on_cpu(cohort, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle", "run", "training",
        "--config_file",
        f"['{ROOT}/configs/train.json','{ROOT}/configs/demo.json','{ROOT}/configs/multi_gpu_train.json']",
        "--bundle_root", str(tmp_path), "--data_list_file_path", str(cohort / "datalist.json"), "--fold", "0",
        "--patch_size", "32", "--batch_size", "2", "--patches_per_epoch", "8", "--epochs", "2", "--round_epochs", "1",
        "--val_interval", "2", "--fp_score_threshold", "0.0", "--score_threshold", "0.0",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert log.count("round 1 begins after provisional testing") == 1, "rank 0 alone reports the round"
    ckpt = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", weights_only=False)
    assert ckpt["anchors"]["round"] == 1
    assert not any(k.startswith("module.") for k in ckpt["model"]), "the checkpoint holds the bare network"
    assert (tmp_path / "models" / "model.pt").exists()
