"""Nodule detections as a DICOM Structured Report: highdicom's ``Comprehensive3DSR`` holding a TID 1500 *Measurement
Report*, the file a PACS stores beside the CT series and a DICOM viewer lists with it.

One *Volumetric ROI Measurements* group (TID 1411) per detection, highest noduleness first:

- the nodule's centre as a 3D ``POINT`` (``SCOORD3D``, the group's volume surface, whose source is the CT series)
  in the series' frame of reference. DICOM patient
  coordinates are LPS millimetres (x to the patient's left, y to posterior, z to head), the frame of this bundle's
  marks (``docs/conventions.md``), so the marks' world LPS mm are written as they are;
- its *diameter* (SCT 81827009) in mm and its *noduleness* as a probability (DCM 122157, unit ``1``);
- finding type *Nodule* (SCT 27925004), finding site *Lung*, a tracking identifier ``nodule <rank>`` with its UID,
  and the bundle's name and version as the algorithm.

The report references the input series: every SOP instance given as evidence is listed in its *Current Requested
Procedure Evidence Sequence*, and patient and study attributes are copied from them (highdicom does both).

Imported only by the MONAI Deploy application (``bundle/deploy_app.py``): ``highdicom`` is installed in its
environment (``requirements-deploy.txt``), not in the main one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from custom_components.errors import InputError
from custom_components.atomic import atomic_write

__all__ = ["NODULENESS", "nodule_report", "write_nodule_report"]

#: the network's noduleness: a probability in [0, 1] (DCM 122157 "Probability", unit "1")
NODULENESS = codes.DCM.Probability


def nodule_report(
    marks: np.ndarray,
    diameters: np.ndarray | Sequence[float],
    evidence: Sequence[Dataset],
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9001,
) -> hd.sr.Comprehensive3DSR:
    """Build the structured report of one CT series' detections.

    Args:
        marks: ``(N, 4)`` rows ``(x, y, z, noduleness)``, centres in world LPS mm (DICOM patient coordinates) of the
            series given as ``evidence``.
        diameters: ``(N,)`` diameters in mm, row for row.
        evidence: the series' SOP instances (headers suffice): the report references them and takes the patient,
            study and frame of reference from them.
        algorithm_name, algorithm_version: the detector, written as each group's algorithm identification.
        series_number: the report's own SeriesNumber.

    Returns:
        The ``Comprehensive3DSR`` dataset (new Series, SOP Instance and tracking UIDs).

    Raises:
        InputError: no evidence, evidence from several series or frames of reference, or marks and diameters of
            different lengths.
    """
    rows = np.asarray(marks, dtype=np.float64).reshape(-1, 4)
    d = np.asarray(diameters, dtype=np.float64).reshape(-1)
    if len(d) != len(rows):
        raise InputError(f"{len(rows)} marks need {len(rows)} diameters, got {len(d)}")
    if not evidence:
        raise InputError("a structured report needs the series' DICOM instances as evidence")
    series = {ds.SeriesInstanceUID for ds in evidence}
    frames = {getattr(ds, "FrameOfReferenceUID", None) for ds in evidence}
    if len(series) != 1 or len(frames) != 1 or None in frames:
        raise InputError(
            f"evidence must be one series in one frame of reference, got series {sorted(series)} and frames of "
            f"reference {sorted(map(str, frames))}"
        )
    frame_of_reference, series_uid = frames.pop(), series.pop()
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    groups = []
    for rank, i in enumerate(np.argsort(-rows[:, 3], kind="stable"), start=1):
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"nodule {rank}"),
                # TID 1411 takes 3D coordinates as a "volume surface"; a POINT one is the centre
                referenced_volume_surface=hd.sr.VolumeSurface(
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=rows[i : i + 1, :3],
                    frame_of_reference_uid=frame_of_reference,
                    source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
                ),
                finding_type=codes.SCT.Nodule,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(name=codes.SCT.Diameter, value=float(d[i]), unit=codes.UCUM.Millimeter,
                                      algorithm_id=algorithm),
                    hd.sr.Measurement(name=NODULENESS, value=float(rows[i, 3]), unit=codes.UCUM.NoUnits,
                                      algorithm_id=algorithm),
                ],
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=algorithm_name, model_name=algorithm_version
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=algorithm_name,
        is_complete=True,
    )


def write_nodule_report(report: hd.sr.Comprehensive3DSR, path: str | os.PathLike) -> Path:
    """Write the report as a DICOM Part 10 file, atomically."""
    with atomic_write(path, "wb") as f:
        report.save_as(f, enforce_file_format=True)
    return Path(path)
