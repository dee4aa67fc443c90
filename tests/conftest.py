"""Shared fixtures: the real LIDC/LUNA16 test data next to the repository (skipped cleanly when absent)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # ``pytest -n 2`` runs two workers on a 2-core machine: one torch thread each (and in every subprocess a test
    # starts) keeps them from oversubscribing the cores with four spinning OpenMP threads
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

LIDC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc"
UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
LIDC_0001_UID = UID_PREFIX + "179049373636438705059720603192"
LIDC_0002_UID = UID_PREFIX + "619372068417051974713149104919"

requires_lidc = pytest.mark.skipif(not LIDC_DIR.is_dir(), reason=f"real test data not found at {LIDC_DIR}")


@pytest.fixture(scope="session")
def lidc_dir() -> Path:
    """``../shared/data/lidc`` (two LUNA16 scans, the LIDC-IDRI-0001 DICOM tarball, LUNA16's tables); skips the
    test when absent."""
    if not LIDC_DIR.is_dir():
        pytest.skip(f"real test data not found at {LIDC_DIR}")
    return LIDC_DIR


@pytest.fixture(scope="session")
def lidc_0001_dicom(lidc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LIDC-IDRI-0001 DICOM series extracted into pytest's temporary folder (never into the repository); the
    returned folder is the patient folder, the series lies two levels down."""
    target = tmp_path_factory.mktemp("lidc_dicom")
    with tarfile.open(lidc_dir / "LIDC-IDRI-0001_dicom.tar.gz") as tar:
        tar.extractall(target, filter="data")
    return target / "LIDC-IDRI-0001"


@pytest.fixture(scope="session")
def preprocessing():
    """The ``preprocessing`` Compose of ``configs/inference.json``, parsed once."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "configs" / "inference.json"))
    return parser.get_parsed_content("preprocessing")
