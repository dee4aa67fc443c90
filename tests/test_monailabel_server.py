"""The bundle served by a real MONAI Label server (``monailabel start_server``, monailabel 0.8.5, its ``monaibundle``
sample app copied from the wheel) and queried over HTTP on 127.0.0.1, for a ``.mhd`` and a ``.nii.gz`` study.

Runs in the MONAI Label environment (``requirements-label-server.txt``, built by ``.ci/venv.sh label ...``; see
``docs/monai_label.md``); elsewhere the module is skipped, unless ``BUNDLE_REQUIRE_ENV=label`` (set by CI), where a
missing piece fails. ``torchvision`` has no CPU build for torch 2.13 and MONAI Label imports it (for 2-D overlays,
never on the detection path): a stand-in module on the server's ``PYTHONPATH`` takes its place.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.test_monailabel import BUNDLE_NAME, _write_bundle

REPO = Path(__file__).resolve().parents[1]
#: MONAI Label's sample apps ship as data files of the wheel, installed under the environment's prefix
SAMPLE_APP = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
STARTUP_TIMEOUT_S = 300
INFER_TIMEOUT_S = 300


def _require_label_environment() -> None:
    missing = [name for name in ("monailabel", "uvicorn", "fastapi", "itk", "girder_client") if not _importable(name)]
    if not missing and SAMPLE_APP.is_dir():
        return
    reason = f"not the MONAI Label server environment (missing {', '.join(missing) or SAMPLE_APP})"
    if os.environ.get("BUNDLE_REQUIRE_ENV") == "label":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


_require_label_environment()

TORCHVISION_STAND_IN = '''"""Stand-in for torchvision (no CPU build for torch 2.13): MONAI Label imports it, the detection
path never calls it."""
'''
TORCHVISION_UTILS_STAND_IN = '''def make_grid(*args, **kwargs):
    raise RuntimeError("torchvision is a stand-in here (MONAI Label's 2-D overlays need the real one)")


save_image = make_grid
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_studies(folder: Path, cohort: Path) -> dict[str, Path]:
    """Two small synthetic chest CTs (``python -m bundle synth``, 300 x 300 x 66 voxels) as MONAI Label studies: the
    first as MetaImage, the second converted to NIfTI. Returns ``{study id: path}`` (the id is the file stem)."""
    subprocess.run([sys.executable, "-m", "bundle", "synth", str(cohort), "--scans", "2"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    scans = sorted(cohort.glob("subset*/*.mhd"))
    assert len(scans) == 2
    folder.mkdir()
    studies = {"chest_mhd": folder / "chest_mhd.mhd", "chest_nifti": folder / "chest_nifti.nii.gz"}
    for scan, path in zip(scans, studies.values()):
        sitk.WriteImage(sitk.ReadImage(str(scan)), str(path))
    return studies


@contextlib.contextmanager
def _server(app: Path, studies: Path, stand_ins: Path, log: Path) -> Iterator[str]:
    """``monailabel start_server`` on a free 127.0.0.1 port; yields its base URL once ``/info/`` answers, and always
    stops it (SIGTERM to its process group, SIGKILL after 30 s)."""
    port = _free_port()
    env = {
        **os.environ,
        "MONAILABEL_PYEXE": sys.executable,  # the launcher script otherwise runs whatever `python` is first on PATH
        "MONAI_LABEL_DATASTORE_FILE_EXT": json.dumps(["*.mhd", "*.nii.gz"]),  # .mhd is not in the default list
        "BUNDLE_DOWNLOAD_SRC": "ngc",  # use the local bundle folder without fetching the model zoo's list
        "PYTHONPATH": os.pathsep.join([str(stand_ins), str(REPO)]),  # the stand-in; custom_components
        "OMP_NUM_THREADS": "1",
    }
    command = [str(Path(sys.prefix) / "bin" / "monailabel"), "start_server", "--app", str(app), "--studies",
               str(studies), "--conf", "models", BUNDLE_NAME, "--conf", "skip_trainers", "true",
               "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"the server exited with status {server.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/info/ after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(f"{url}/info/", timeout=5) as response:
                    if response.status == 200:
                        break
            time.sleep(2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def _infer(url: str, study: str) -> tuple[int, dict | str]:
    """``POST /infer/<model>?image=<study>&output=json``: the HTTP status and the decoded JSON (or the body text)."""
    request = urllib.request.Request(f"{url}/infer/{BUNDLE_NAME}?image={study}&output=json", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=INFER_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _bundle_top_marks(bundle: Path, studies: Path, out: Path) -> dict[str, np.ndarray]:
    """The bundle's own inference (``python -m monai.bundle run --config_file configs/inference.json``) on the same
    studies with the same weights and MONAI Label's inferer (the sliding window): per study id, the CSV's rows
    ``(x, y, z, probability)`` in world LPS mm, highest probability first."""
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input",
         str(studies), "--output_dir", str(out), "--load_path", str(bundle / "models" / "model.pt"),
         "--network_preset", "lean", "--use_sliding_window", "true"],
        cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
    )
    marks = {}
    for path in sorted(out.glob("*.csv")):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        marks[path.stem] = np.array([[float(r[k]) for k in ("coordX", "coordY", "coordZ", "probability")]
                                     for r in rows]).reshape(-1, 4)
    return marks


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The server running on the two studies, the answers of ``/infer`` for each, and the bundle's own marks."""
    import shutil

    root = tmp_path_factory.mktemp("monailabel_server")
    app = root / "monaibundle"
    shutil.copytree(SAMPLE_APP, app)
    bundle = _write_bundle(app / "model")
    studies = _write_studies(root / "studies", root / "cohort")
    stand_ins = root / "stand_ins"
    (stand_ins / "torchvision").mkdir(parents=True)
    (stand_ins / "torchvision" / "__init__.py").write_text(TORCHVISION_STAND_IN)
    (stand_ins / "torchvision" / "utils.py").write_text(TORCHVISION_UTILS_STAND_IN)
    log = root / "server.log"
    with _server(app, root / "studies", stand_ins, log) as url:
        with urllib.request.urlopen(f"{url}/info/", timeout=30) as response:
            info = json.loads(response.read())
        answers = {study: _infer(url, study) for study in studies}
    yield {"info": info, "answers": answers, "marks": _bundle_top_marks(bundle, root / "studies", root / "bundle_out"),
           "log": log}


def test_server_lists_the_bundle_as_a_detection_model(served: dict) -> None:
    model = served["info"]["models"][BUNDLE_NAME]
    assert model["type"] == "detection" and model["labels"] == {"nodule": 0} and model["dimension"] == 3


@pytest.mark.parametrize("study", ["chest_mhd", "chest_nifti"])
def test_infer_returns_the_bundles_boxes_in_world_lps(served: dict, study: str) -> None:
    """HTTP 200 for the ``.mhd`` and the ``.nii.gz`` study; boxes ``(x, y, z, d, d, d)`` in world LPS mm whose first
    (highest noduleness) is the bundle's own top detection within 1 mm, and as many boxes as the bundle reports."""
    status, answer = served["answers"][study]
    assert status == 200, f"{study}: HTTP {status}: {answer}\n{served['log'].read_text()[-3000:]}"
    boxes = np.asarray(answer["box"], dtype=np.float64)
    marks = served["marks"][study]
    assert boxes.ndim == 2 and boxes.shape[1] == 6 and len(boxes) == len(marks) > 0
    assert answer["label"] == [0] * len(boxes)
    np.testing.assert_allclose(boxes[:, 3:], boxes[:, 3:4].repeat(3, axis=1), atol=1e-3)  # cubes: d, d, d
    assert np.linalg.norm(boxes[0, :3] - marks[0, :3]) <= 1.0, (boxes[0], marks[0])
