"""The bundle as a MONAI Deploy App SDK application: a CT series (DICOM folder) or scan file in, nodule detections out.

Run it on an exported TorchScript network (``models/model.ts``, see ``docs/monai_deploy.md``) in the MONAI Deploy
environment (``requirements-deploy.txt``)::

    python -m bundle.deploy_app --input <DICOM series folder | .mhd/.nii.gz file> --output <dir> --model models/model.ts

The graph (``NoduleDetectionApp.compose``), on the SDK's Holoscan runtime:

- DICOM folder: the SDK's ``DICOMDataLoaderOperator`` -> :class:`CTSeriesSelectorOperator` (the SDK's
  ``DICOMSeriesSelectorOperator`` with CT rules, requiring exactly one CT series) -> the SDK's
  ``DICOMSeriesToVolumeOperator`` (LPS affine) -> :class:`NoduleDetectionOperator` -> :class:`DetectionWriterOperator`;
- scan file: :class:`NoduleDetectionOperator` reads the path itself -> :class:`DetectionWriterOperator`.

The SDK's generic ``MonaiBundleInferenceOperator`` cannot run this bundle: it keeps the bundle's own loader and runs
a ``SimpleInferer`` on the network, where detection needs the ``detector`` (regression anchors, box decoding, NMS).
:class:`NoduleDetectionOperator` therefore runs the embedded ``inference.json``'s ``preprocessing`` and ``detector``
as ``monai.bundle run --config_file configs/inference.json`` does. Coordinates: detections are voxel cubes
``(ci, cj, ck, d)`` of the preprocessed volume, written in **world LPS mm** of the input (DICOM patient coordinates,
``docs/conventions.md``).

Bad input (no DICOM series, several series, no CT series, values that are not Hounsfield units, a model file without
the embedded configs) ends with one ``error: ...`` line and exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from holoscan.logger import LogLevel, set_log_level
from monai.bundle import ConfigParser
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Fragment, Image, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator, DICOMSeriesToVolumeOperator
from monai.transforms import Compose
from pydicom import Dataset

from custom_components.detector import NoduleDetector
from custom_components.dicom_sr import nodule_report, write_nodule_report
from custom_components.errors import InputError, exit_status
from custom_components.io import LoadCTd, LoadedImage, SimpleITKReader, check_ct_values
from custom_components.scan_detection import detect_scan
from custom_components.scan_files import seriesuid_of
from custom_components.writers import DetectionWriter

__all__ = [
    "EMBEDDED_FILES",
    "CT_SELECTION_RULES",
    "load_torchscript_bundle",
    "CTSeriesSelectorOperator",
    "NoduleDetectionOperator",
    "DetectionWriterOperator",
    "NoduleDetectionApp",
    "main",
]

#: the configs ``monai.bundle ckpt_export`` embeds in the TorchScript file (``--meta_file`` and ``--config_file``)
EMBEDDED_FILES = ("metadata.json", "inference.json")
#: the SDK selector's rules: every series of modality CT (each is then counted by :class:`CTSeriesSelectorOperator`)
CT_SELECTION_RULES = json.dumps({"selections": [{"name": "CT", "conditions": {"Modality": "(?i)^CT$"}}]})


def load_torchscript_bundle(
    model_path: str | Path, device: torch.device | str = "cpu"
) -> tuple[torch.jit.ScriptModule, dict[str, Any], dict[str, Any]]:
    """Load ``model.ts`` written by ``monai.bundle ckpt_export`` with its embedded ``metadata.json`` and
    ``inference.json``.

    Returns:
        ``(network, metadata, inference_config)``: the TorchScript network in eval mode on ``device`` and the two
        embedded JSON files as dicts.

    Raises:
        InputError: the file is missing, not a TorchScript archive, or lacks the embedded configs (it was not
            written by ``ckpt_export --meta_file ... --config_file configs/inference.json``).
    """
    path = Path(model_path)
    if not path.is_file():
        raise InputError(f"{path}: no such TorchScript file (export one with monai.bundle ckpt_export)")
    extra = {name: "" for name in EMBEDDED_FILES}
    try:
        network = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"{path}: not a TorchScript file ({err})") from err
    missing = [name for name in EMBEDDED_FILES if not extra[name]]
    if missing:
        raise InputError(
            f"{path}: holds no {', '.join(missing)}; export it with monai.bundle ckpt_export --meta_file "
            "configs/metadata.json --config_file configs/inference.json"
        )
    network.eval()
    return network, json.loads(extra["metadata.json"]), json.loads(extra["inference.json"])


class CTSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """The SDK's ``DICOMSeriesSelectorOperator`` with :data:`CT_SELECTION_RULES` (all matches), which also requires
    exactly one CT series among the loaded studies: the detector reads one series, and picking one of several
    silently would report on a series the user may not have meant.

    Input ``"dicom_study_list"``, output ``"study_selected_series_list"`` (the SDK's ports).

    Args:
        fragment: the application.
        folder: the input folder, named in the error messages.
    """

    def __init__(self, fragment: Fragment, *args: Any, folder: str | Path, **kwargs: Any) -> None:
        self.folder = Path(folder)
        super().__init__(fragment, *args, rules=CT_SELECTION_RULES, all_matched=True, **kwargs)

    def filter(
        self, selection_rules: Any, dicom_study_list: Sequence[Any], all_matched: bool = False,
        sort_by_sop_instance_count: bool = False,
    ) -> list[StudySelectedSeries]:
        """The SDK's selection, then the one-CT-series check.

        Raises:
            InputError: no DICOM series in the folder, no CT series, or several.
        """
        selected = super().filter(selection_rules, dicom_study_list, all_matched, sort_by_sop_instance_count)
        found = [series for study in dicom_study_list or [] for series in study.get_all_series()]
        ct = [item.series for study in selected for item in study.selected_series]
        if not found:
            raise InputError(f"{self.folder}: no DICOM series found")
        if not ct:
            listing = ", ".join(f"{s.Modality} series {s.SeriesInstanceUID}" for s in found)
            raise InputError(f"{self.folder}: no CT series (found {listing})")
        if len(ct) > 1:
            listing = ", ".join(str(s.SeriesInstanceUID) for s in ct)
            raise InputError(f"{self.folder}: holds {len(ct)} CT series ({listing}); give the folder of one series")
        return selected


class _SeriesVolumeReader(SimpleITKReader):
    """:class:`custom_components.io.SimpleITKReader` over a volume already in memory (the SDK's DICOM volume), so
    that the bundle's own loader (``LoadCTd``) builds the same MetaTensor and meta dict as from the folder on disk."""

    def __init__(self, loaded: LoadedImage) -> None:
        super().__init__()
        self.loaded = loaded

    def read(self, data: Any, **kwargs: Any) -> LoadedImage:
        return self.loaded


def _sitk_from_sdk_image(image: Image) -> sitk.Image:
    """The SDK's volume (``asnumpy()`` in ``(k, j, i)`` order, ``metadata()["affine"]`` voxel ``(i, j, k)`` -> LPS mm,
    from ``DICOMSeriesToVolumeOperator(affine_lps_to_ras=False)``) as a SimpleITK image with the same geometry."""
    affine = np.asarray(image.metadata()["affine"], dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    volume = sitk.GetImageFromArray(np.ascontiguousarray(image.asnumpy()))
    volume.SetSpacing(spacing.tolist())
    volume.SetDirection((affine[:3, :3] / spacing).flatten().tolist())
    volume.SetOrigin(affine[:3, 3].tolist())
    return volume


class NoduleDetectionOperator(Operator):
    """Runs the bundle on one CT with the exported TorchScript network.

    On construction it loads ``model.ts`` (:func:`load_torchscript_bundle`) and parses the embedded
    ``inference.json`` with :class:`monai.bundle.ConfigParser`: ``preprocessing`` (read, lung crop, ``LPS``
    orientation, 1 mm, HU window to [0, 1]) and ``detector`` (:class:`NoduleDetector` with the config's score,
    NMS and sliding-window settings) whose ``network`` id is replaced by the TorchScript module, so the Python
    network definition is never built. The input key is the first key of the metadata's
    ``network_data_format.inputs``, as MONAI Label and the SDK's bundle operator take it.

    Inputs (DICOM): ``"image"``, the SDK's volume, and ``"study_selected_series_list"``, whose series' instances the
    structured report references. With ``scan_path`` (a ``.mhd``/NIfTI file) it has no inputs and reads the file.
    Output ``"detections"``, the per-scan dict of :class:`custom_components.writers.DetectionWriter`::

        {"seriesuid", "image_path",
         "detections": ScanDetections (world LPS mm of the input, voxel cubes of the preprocessed volume),
         "image": (I, J, K) the preprocessed volume in [0, 1],
         "evidence": the series' DICOM datasets (DICOM input only)}

    Args:
        fragment: the application.
        model_path: the TorchScript file.
        scan_path: a scan file to read instead of the DICOM inputs.
        device: where to run (default: the embedded config's ``device``, CUDA when available).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        model_path: str | Path,
        scan_path: str | Path | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        network, metadata, config = load_torchscript_bundle(model_path)
        parser = ConfigParser(config)
        if device is not None:
            parser["device"] = device
        self.device = torch.device(parser.get_parsed_content("device"))
        # the detector's "network" id becomes the loaded module: ConfigParser hands non-config values through as is
        parser["network"] = network.to(self.device)
        self.bundle_metadata = metadata
        self.image_key = next(iter(metadata["network_data_format"]["inputs"]))
        self.preprocessing: Compose = parser.get_parsed_content("preprocessing")
        if not isinstance(self.preprocessing.transforms[0], LoadCTd):
            raise InputError(f"{model_path}: the embedded preprocessing does not start with LoadCTd")
        self.detector: NoduleDetector = parser.get_parsed_content("detector")
        parser.get_parsed_content("detector_ops")
        self.use_inferer = bool(parser.get_parsed_content("use_sliding_window"))
        self.scan_path = None if scan_path is None else str(scan_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        if self.scan_path is None:
            spec.input("image")
            spec.input("study_selected_series_list")
        spec.output("detections")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        if self.scan_path is not None:
            op_output.emit(self.detect_file(self.scan_path), "detections")
            return
        image = op_input.receive("image")
        selected = op_input.receive("study_selected_series_list")[0].selected_series[0].series
        evidence = [sop.get_native_sop_instance() for sop in selected.get_sop_instances()]
        op_output.emit(self.detect_series(image, evidence), "detections")

    def detect_file(self, path: str) -> dict[str, Any]:
        """Preprocess the scan file at ``path`` (the whole embedded ``preprocessing``) and detect nodules in it."""
        return self.detections(self.preprocessing({self.image_key: path})[self.image_key], path)

    def detect_series(self, image: Image, evidence: Sequence[Dataset]) -> dict[str, Any]:
        """Detect nodules in the SDK's DICOM volume: the embedded ``LoadCTd`` reads it from memory (the same
        MetaTensor as from the folder), the rest of ``preprocessing`` runs as configured."""
        first = evidence[0]
        folder = str(Path(first.filename).parent) if getattr(first, "filename", None) else ""
        loaded = LoadedImage(_sitk_from_sdk_image(image), folder, str(first.SeriesInstanceUID))
        check_ct_values(sitk.GetArrayViewFromImage(loaded.image), folder or loaded.seriesuid)
        loader, rest = self.preprocessing.transforms[0], Compose(self.preprocessing.transforms[1:])
        item = rest(loader({self.image_key: folder}, reader=_SeriesVolumeReader(loaded)))
        return {**self.detections(item[self.image_key], folder), "evidence": list(evidence)}

    def detections(self, image: torch.Tensor, path: str) -> dict[str, Any]:
        """Detections of one preprocessed scan through the bundle's one scan-to-detections path
        (:func:`custom_components.scan_detection.detect_scan`, as ``configs/inference.json``), in the writer's format.

        Args:
            image: ``(1, I, J, K)`` MetaTensor, affine voxel -> world LPS mm of the input scan.
            path: where the scan came from.
        """
        return {
            "seriesuid": seriesuid_of(image, path),
            "image_path": path,
            "detections": detect_scan(self.detector, image, image.affine, self.device, self.use_inferer),
            "image": torch.as_tensor(image)[0].cpu().numpy(),
        }


class DetectionWriterOperator(Operator):
    """Writes one scan's detections: ``<output>/<seriesuid>.csv`` (LUNA16 submission rows), ``.json`` (MONAI
    detection boxes, ``cccwhd``), ``.mrk.json`` (3D Slicer markups), ``.png`` unless disabled (through
    :class:`custom_components.writers.DetectionWriter`) and, for DICOM input, ``.SR.dcm`` (the DICOM structured
    report of :mod:`custom_components.dicom_sr`); every coordinate in world LPS mm.

    The files are first written into a temporary folder beside the output and moved into it only when all are
    written, so a failure leaves none of them.

    Input ``"detections"``: the detection operator's dict.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_dir: str | Path,
        png: bool = True,
        algorithm_version: str = "",
        **kwargs: Any,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.png = png
        self.algorithm_version = algorithm_version
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("detections")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        scan = op_input.receive("detections")
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.output_dir.name}.", dir=self.output_dir.parent))
        try:
            written = DetectionWriter(staging, png=self.png).write_scan(scan)
            if scan.get("evidence"):
                found = scan["detections"]
                report = nodule_report(found.marks, found.world[:, 3], scan["evidence"],
                                       algorithm_name="lung_nodule_detection", algorithm_version=self.algorithm_version)
                written.append(write_nodule_report(report, staging / f"{scan['seriesuid']}.SR.dcm"))
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for path in written:
                os.replace(path, self.output_dir / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class NoduleDetectionApp(Application):
    """The bundle's MONAI Deploy application (see the module docstring for the graph).

    Args:
        input_path: a DICOM folder (one CT series, searched recursively) or a scan file.
        output_dir: where the files go.
        model_path: the TorchScript file exported by ``monai.bundle ckpt_export``.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        png: also draw the top detections.
    """

    def __init__(
        self,
        input_path: str | Path,
        output_dir: str | Path,
        model_path: str | Path,
        device: str | None = None,
        png: bool = True,
    ) -> None:
        super().__init__([sys.argv[0]])  # the SDK's runtime must not parse this command line, which is ours
        self.input_path = Path(input_path)
        self.output_dir = Path(output_dir)
        self.model_path = Path(model_path)
        self.device = device
        self.png = png

    def compose(self) -> None:
        if not self.input_path.exists():
            raise InputError(f"{self.input_path}: no such file or folder")
        dicom = self.input_path.is_dir()
        detector = NoduleDetectionOperator(
            self,
            *(() if dicom else (CountCondition(self, 1),)),
            model_path=self.model_path,
            scan_path=None if dicom else self.input_path,
            device=self.device,
            name="nodule_detector",
        )
        writer = DetectionWriterOperator(self, output_dir=self.output_dir, png=self.png,
                                         algorithm_version=str(detector.bundle_metadata["version"]), name="writer")
        if dicom:
            loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=self.input_path,
                                             must_load=False, name="dicom_loader")
            selector = CTSeriesSelectorOperator(self, folder=self.input_path, name="ct_series_selector")
            volume = DICOMSeriesToVolumeOperator(self, affine_lps_to_ras=False, name="series_to_volume")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(selector, detector, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(volume, detector, {("image", "image")})
        self.add_flow(detector, writer, {("detections", "detections")})


def main(argv: Iterable[str] | None = None) -> int:
    """Command line: ``python -m bundle.deploy_app --input ... --output ... --model models/model.ts``.

    Returns the exit status: 0, or 2 after printing ``error: <message>`` for bad input.
    """
    parser = argparse.ArgumentParser(prog="python -m bundle.deploy_app", description=__doc__.splitlines()[0])
    parser.add_argument("--input", "-i", required=True, help="DICOM folder of one CT series, or a scan file")
    parser.add_argument("--output", "-o", required=True, help="output folder")
    parser.add_argument("--model", "-m", default="models/model.ts", help="TorchScript file from ckpt_export")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    parser.add_argument("--no-png", dest="png", action="store_false", help="skip the PNG of the top detections")
    parser.add_argument("--verbose", action="store_true", help="keep the Holoscan runtime's and the SDK's log")
    args = parser.parse_args(None if argv is None else list(argv))
    if not args.verbose:
        # The runtime logs each failing operator over a dozen lines, and on a machine without nvImageCodec (a CUDA
        # DICOM decoder; pydicom decodes instead) the SDK and MONAI warn about it through the root logger and a
        # UserWarning: the one error line below says what went wrong, --verbose shows all of it.
        set_log_level(LogLevel.OFF)
        logging.basicConfig(level=logging.ERROR)
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    return exit_status(
        lambda: NoduleDetectionApp(args.input, args.output, args.model, device=args.device, png=args.png).run()
    )


if __name__ == "__main__":
    sys.exit(main())
