"""A MONAI Deploy-style application: a CT scan (DICOM series folder or image file) in, nodule detections out.

Run it on an exported TorchScript network (``models/model.ts``, see ``docs/monai_deploy.md``)::

    python -m bundle.deploy_app --input <dicom folder|scan file|folder of scans> --output <dir> --model models/model.ts

The structure is the MONAI Deploy App SDK's (>= 0.6, Holoscan-based): an :class:`Application` subclass whose
:meth:`~NoduleDetectionApp.compose` creates operators and joins their ports with ``add_flow``, and operators with
``setup(spec)`` declaring ports and ``compute(op_input, op_output, context)`` doing the work. The SDK itself is not
used: ``monai-deploy-app-sdk`` >= 0.6 requires ``holoscan-cu13`` (a CUDA runtime) and ``tritonclient[all]``, which
neither install nor run on the CPU-only machines this bundle is tested on, and 0.5.x has an older, decorator-based
API. The few classes below (:class:`OperatorSpec`, :class:`InputContext`, :class:`OutputContext`,
:class:`Operator`, :class:`Application`) reproduce the calls the operators make, in plain Python, running the
operators once each in ``add_flow`` order; to move to the SDK, import those names from ``monai.deploy.core`` and
construct operators with the fragment as first argument (``NoduleDetectionOperator(self, model_path=...)``).

Everything the network needs comes out of the TorchScript file: ``ckpt_export`` embeds ``metadata.json`` (the input
key, the channels) and ``inference.json`` (the preprocessing chain and the detector's settings), which
:class:`NoduleDetectionOperator` reads through ``torch.jit.load(..., _extra_files=...)``. Coordinates: detections
are computed as voxel cubes ``(ci, cj, ck, d)`` of the preprocessed volume and written in **LPS** world mm of the
input scan (see ``docs/conventions.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from custom_components.detector import NoduleDetector
from custom_components.errors import InputError
from custom_components.scan_detection import detect_scan
from custom_components.scan_files import list_scans, seriesuid_of
from custom_components.writers import DetectionWriter

__all__ = [
    "OperatorSpec",
    "InputContext",
    "OutputContext",
    "Operator",
    "Application",
    "ScanLoaderOperator",
    "NoduleDetectionOperator",
    "DetectionWriterOperator",
    "NoduleDetectionApp",
    "load_torchscript_bundle",
    "main",
]

#: the configs ``monai.bundle ckpt_export`` embeds in the TorchScript file (``--meta_file`` and ``--config_file``)
EMBEDDED_FILES = ("metadata.json", "inference.json")


# --- the App SDK's calls, in plain Python -----------------------------------------------------------------------


class OperatorSpec:
    """What ``Operator.setup`` declares: the names of the input and output ports (SDK: ``spec.input``/``output``)."""

    def __init__(self) -> None:
        self.inputs: list[str] = []
        self.outputs: list[str] = []

    def input(self, name: str) -> None:
        self.inputs.append(name)

    def output(self, name: str) -> None:
        self.outputs.append(name)


class InputContext:
    """``op_input`` of ``compute``: ``receive(port)`` returns what the upstream operator emitted to that port."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def receive(self, name: str) -> Any:
        return self._values[name]


class OutputContext:
    """``op_output`` of ``compute``: ``emit(value, port)`` hands ``value`` to the operators joined to that port."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def emit(self, value: Any, name: str) -> None:
        self.values[name] = value


class Operator:
    """Base operator: subclasses implement :meth:`setup` (ports) and :meth:`compute` (one run)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.spec = OperatorSpec()
        self.setup(self.spec)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare the input and output ports on ``spec``."""

    def compute(self, op_input: InputContext, op_output: OutputContext, context: Any) -> None:
        raise NotImplementedError


class Application:
    """Base application: :meth:`compose` builds the operator graph with :meth:`add_flow`; :meth:`run` executes it.

    ``run`` executes each operator once, in the order the flows first name them (the SDK's ``CountCondition(1)``
    on a linear graph), passing emitted values along the declared ``(output port, input port)`` pairs.
    """

    def __init__(self) -> None:
        self._operators: list[Operator] = []
        self._flows: list[tuple[Operator, Operator, set[tuple[str, str]]]] = []

    def compose(self) -> None:
        raise NotImplementedError

    def add_operator(self, op: Operator) -> None:
        if op not in self._operators:
            self._operators.append(op)

    def add_flow(self, upstream: Operator, downstream: Operator, port_pairs: set[tuple[str, str]]) -> None:
        for out_port, in_port in port_pairs:
            if out_port not in upstream.spec.outputs or in_port not in downstream.spec.inputs:
                raise ValueError(f"no port pair {out_port!r} -> {in_port!r} between {upstream.name} and {downstream.name}")
        self.add_operator(upstream)
        self.add_operator(downstream)
        self._flows.append((upstream, downstream, set(port_pairs)))

    def run(self) -> None:
        self.compose()
        emitted: dict[int, dict[str, Any]] = {}
        for op in self._operators:
            received: dict[str, Any] = {}
            for upstream, downstream, pairs in self._flows:
                if downstream is op:
                    received.update({in_port: emitted[id(upstream)][out_port] for out_port, in_port in pairs})
            op_output = OutputContext()
            op.compute(InputContext(received), op_output, None)
            emitted[id(op)] = op_output.values


# --- the bundle's operators -------------------------------------------------------------------------------------


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


class ScanLoaderOperator(Operator):
    """Finds the scans under the input path (SDK: ``DICOMDataLoaderOperator`` + series selection).

    Output ``"scans"``: datalist entries ``[{"image": path}, ...]``, one per image file or DICOM series folder
    (:func:`custom_components.scan_files.list_scans`); reading happens in the detection operator's preprocessing.
    """

    def __init__(self, input_path: str | Path, name: str | None = None) -> None:
        self.input_path = Path(input_path)
        super().__init__(name)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("scans")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: Any) -> None:
        op_output.emit(list_scans(self.input_path), "scans")


class NoduleDetectionOperator(Operator):
    """Runs the bundle on each scan with the exported TorchScript network.

    On construction it loads ``model.ts`` (:func:`load_torchscript_bundle`) and parses the embedded
    ``inference.json`` with :class:`monai.bundle.ConfigParser`: ``preprocessing`` (read, lung crop, ``LPS``
    orientation, 1 mm, HU window to [0, 1]) and ``detector`` (:class:`NoduleDetector` with the config's score,
    NMS and sliding-window settings) whose ``network`` id is replaced by the TorchScript module, so the Python
    network definition is never built. The ScriptModule keeps ``anchor_sizes``, ``strides`` and ``size_divisible``,
    from which the detector's regression anchors are made.

    Input ``"scans"``: datalist entries. Output ``"detections"``: one dict per scan, the format of
    :class:`custom_components.writers.DetectionWriter`::

        {"seriesuid", "image_path",
         "detections": ScanDetections (world LPS mm of the input scan, voxel cubes of the preprocessed volume),
         "image": (I, J, K) the preprocessed volume in [0, 1]}

    Args:
        model_path: the TorchScript file.
        device: where to run (default: the embedded config's ``device``, CUDA when available).
    """

    def __init__(self, model_path: str | Path, device: str | None = None, name: str | None = None) -> None:
        network, metadata, config = load_torchscript_bundle(model_path)
        parser = ConfigParser(config)
        if device is not None:
            parser["device"] = device
        self.device = torch.device(parser.get_parsed_content("device"))
        # the detector's "network" id becomes the loaded module: ConfigParser hands non-config values through as is
        parser["network"] = network.to(self.device)
        # MONAI Label and MONAI Deploy name the image by the first input of the metadata's network_data_format
        self.image_key = next(iter(metadata["network_data_format"]["inputs"]))
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.detector: NoduleDetector = parser.get_parsed_content("detector")
        parser.get_parsed_content("detector_ops")
        self.use_inferer = bool(parser.get_parsed_content("use_sliding_window"))
        super().__init__(name)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("scans")
        spec.output("detections")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: Any) -> None:
        op_output.emit([self.detect(entry) for entry in op_input.receive("scans")], "detections")

    def detect(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Preprocess one datalist entry and detect nodules in it (see the class docstring for the output)."""
        path = str(entry["image"])
        item = self.preprocessing({self.image_key: path})
        image = item[self.image_key]  # (1, I, J, K) MetaTensor, affine: voxel -> LPS mm of the input scan
        return {
            "seriesuid": seriesuid_of(image, path),
            "image_path": path,
            "detections": detect_scan(self.detector, image, image.affine, self.device, self.use_inferer),
            "image": image[0].cpu().numpy(),
        }


class DetectionWriterOperator(Operator):
    """Writes each scan's detections (SDK: a sink operator such as ``DICOMSegmentationWriterOperator``):
    ``<output>/<seriesuid>.csv`` (LUNA16 submission rows), ``.json`` (MONAI detection boxes, ``cccwhd``),
    ``.mrk.json`` (3D Slicer markups) and, unless disabled, ``.png``; every coordinate in LPS world mm, through
    :class:`custom_components.writers.DetectionWriter`.

    Input ``"detections"``: the detection operator's per-scan dicts.
    """

    def __init__(self, output_dir: str | Path, png: bool = True, name: str | None = None) -> None:
        self.writer = DetectionWriter(output_dir, png=png)
        super().__init__(name)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("detections")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: Any) -> None:
        for scan in op_input.receive("detections"):
            self.writer.write_scan(scan)


class NoduleDetectionApp(Application):
    """Loader -> detection -> writer, the MONAI Deploy application of the bundle.

    Args:
        input_path: a DICOM series folder (searched recursively), an image file, or a folder of scans.
        output_dir: where the per-scan files go.
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
        super().__init__()
        self.input_path = input_path
        self.output_dir = output_dir
        self.model_path = model_path
        self.device = device
        self.png = png

    def compose(self) -> None:
        loader = ScanLoaderOperator(self.input_path, name="loader")
        detector = NoduleDetectionOperator(self.model_path, device=self.device, name="detector")
        writer = DetectionWriterOperator(self.output_dir, png=self.png, name="writer")
        self.add_flow(loader, detector, {("scans", "scans")})
        self.add_flow(detector, writer, {("detections", "detections")})


def main(argv: Iterable[str] | None = None) -> int:
    """Command line: ``python -m bundle.deploy_app --input ... --output ... --model models/model.ts``.

    Returns the exit status: 0, or 2 after printing ``error: <message>`` for bad input.
    """
    parser = argparse.ArgumentParser(prog="python -m bundle.deploy_app", description=__doc__.splitlines()[0])
    parser.add_argument("--input", "-i", required=True, help="DICOM series folder, image file or folder of scans")
    parser.add_argument("--output", "-o", required=True, help="output folder")
    parser.add_argument("--model", "-m", default="models/model.ts", help="TorchScript file from ckpt_export")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    parser.add_argument("--no-png", dest="png", action="store_false", help="skip the PNG of the top detections")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        NoduleDetectionApp(args.input, args.output, args.model, device=args.device, png=args.png).run()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
