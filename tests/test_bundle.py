"""The bundle as MONAI sees it: metadata verified offline, the evaluating workflow, the ensemble's averaging."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "configs" / "meta_schema_20240725.json"


def test_metadata_passes_monai_verify_metadata_offline():
    """The schema ships in the repo; with its hash given, MONAI's check neither downloads nor warns."""
    from monai.bundle import verify_metadata

    md5 = hashlib.md5(SCHEMA.read_bytes()).hexdigest()
    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), filepath=str(SCHEMA), hash_val=md5)
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    assert list(meta["network_data_format"]["inputs"]) == ["image"], "MONAI Label reads the first input key"


def test_metadata_missing_a_required_field_is_refused(tmp_path):
    from monai.bundle import verify_metadata

    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA), hash_val=hashlib.md5(SCHEMA.read_bytes()).hexdigest())


def test_evaluating_workflow_writes_submission_and_froc_report(tmp_path):
    """``run evaluating`` over a fold: LUNA16 submission CSV, froc.json/csv/png, scored against the datalist."""
    from bundle.synthetic.cohort import generate_cohort
    from custom_components.luna16 import build_datalist
    from custom_components.luna16_tables import read_submission
    from custom_components.network import build_network

    cohort = tmp_path / "cohort"
    generate_cohort(cohort, scans=3, seed=5, progress=False)
    (cohort / "datalist.json").write_text(json.dumps(build_datalist(cohort)))
    # an untrained network whose noduleness starts at 0.5 rather than 0.01: marks above the threshold to score
    torch.manual_seed(0)
    torch.save(build_network("lean", prior=0.5).state_dict(), tmp_path / "model.pt")
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
        f"['{ROOT}/configs/train.json','{ROOT}/configs/demo.json','{ROOT}/configs/evaluate.json']",
        "--bundle_root", str(tmp_path), "--data_list_file_path", str(cohort / "datalist.json"), "--fold", "-1",
        "--load_path", str(tmp_path / "model.pt"), "--bootstrap", "50", "--num_workers", "0",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = tmp_path / "eval" / "fold-1"
    marks = read_submission(report / "submission.csv")
    assert set(marks) == {s["seriesuid"] for s in json.loads((cohort / "datalist.json").read_text())["scans"]}
    assert all(0 < len(m) <= 100 for m in marks.values())
    scores = json.loads((report / "froc.json").read_text())
    assert set(scores["sensitivity"]) == {"1/8", "1/4", "1/2", "1", "2", "4", "8"}
    assert (report / "froc.png").stat().st_size > 10_000
    assert "FROC over 3 scans" in out.stdout + out.stderr


def test_ensemble_averages_agreeing_marks_and_halves_lonely_ones():
    from custom_components.ensemble import merge_marks

    a = {"s": np.array([[0.0, 0.0, 0.0, 0.8], [50.0, 0.0, 0.0, 0.6]])}
    b = {"s": np.array([[1.0, 0.0, 0.0, 0.4]]), "t": np.array([[5.0, 5.0, 5.0, 0.9]])}
    merged = merge_marks([a, b])
    # (0,0,0) and (1,0,0) are within 3 mm: one mark, probability (0.8 + 0.4) / 2, position weighted by probability
    np.testing.assert_allclose(merged["s"], [[1 / 3, 0.0, 0.0, 0.6], [50.0, 0.0, 0.0, 0.3]])
    np.testing.assert_allclose(merged["t"], [[5.0, 5.0, 5.0, 0.45]])
