"""``python -m bundle realism``: how close a generated cohort is to real chest CT, statistic by statistic."""

from __future__ import annotations

import time

from custom_components.errors import InputError


def realism(cohort: str | list[str], reference: str | list[str], out: str, seed: int = 0) -> None:
    """Measure every scan of ``cohort`` and of ``reference`` the same way and print them side by side.

    Lung volume (litres), lung HU quantiles and the Wasserstein-1 distance of the lung HU distribution to the
    reference's, lung voxels above -500 and -300 HU, vessel calibres (equivalent diameters of dense cross-sections
    in the lung), noise standard deviation and noise-power-spectrum peak and mean frequency (homogeneous soft
    tissue). See custom_components/realism.py for how each is measured and docs/synthetic_cohort.md for the figures.
    Writes realism.json, realism.csv, realism_slices.png and realism_curves.png into ``out``.

    Args:
        cohort: the generated scans: a LUNA16-style folder, a folder of scans (searched recursively), a scan file or
            DICOM series folder, or a list of those.
        reference: the real scans, given the same way.
        out: folder for the report files (created when missing).
        seed: seed of the lung HU subsample behind the distances.
    """
    from custom_components.atomic import writable_folder
    from custom_components.scan_files import list_scans
    from custom_components.realism import compare, scan_statistics
    from custom_components.realism_report import format_table, write_report

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"--seed must be a whole number >= 0, got {seed!r}")
    writable_folder(out, "the realism report", create=False)  # before minutes of measuring; made only when written
    groups = {"cohort": list_scans(cohort), "reference": list_scans(reference)}
    start = time.perf_counter()
    measured = {
        group: [scan_statistics(s["image"], group=group, seed=seed) for s in scans] for group, scans in groups.items()
    }
    seconds = time.perf_counter() - start
    summary = compare(measured["cohort"], measured["reference"])
    print(format_table(measured["cohort"], measured["reference"], summary))
    paths = write_report(measured["cohort"], measured["reference"], summary, out)
    total = sum(len(v) for v in measured.values())
    print(f"measured {total} scans in {seconds:.1f} s ({seconds / total:.1f} s per scan)")
    print(f"wrote {', '.join(map(str, paths))}")
