"""``python -m bundle insert-nodules``: real chest CT backgrounds with synthetic nodules inserted (a hybrid cohort),
written in LUNA16's own format."""

from __future__ import annotations

import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def insert_nodules(
    out: str,
    backgrounds: str | list[str] | tuple[str, ...] | None = None,
    scans: int = 20,
    seed: int = 0,
    annotations: str | None = None,
    excluded: str | None = None,
    max_size_mm: float | None = None,
    in_plane_mm: float = 0.0,
    workers: int | None = None,
) -> None:
    """Write ``scans`` real chest CTs, varied and with synthetic nodules inserted, under ``out`` in LUNA16's layout.

    ``out/subset0..9/<seriesuid>.mhd`` + ``.raw`` (int16 HU, LPS world mm), ``out/annotations.csv`` (inserted nodules
    and the backgrounds' own LUNA16 nodules), ``out/annotations_excluded.csv`` (the backgrounds' excluded findings and
    the lesions found in them) and ``out/seriesuids.csv``. The same arguments write byte-identical files. See
    docs/synthetic_cohort.md ("Real backgrounds with inserted nodules").

    Args:
        out: cohort folder (created when missing).
        backgrounds: real chest CTs (.mhd/.mha, NIfTI, DICOM series folders), comma-separated or a list; default the
            shared scans ``../shared/data/lidc/*.mhd`` and ``../shared/data/backgrounds/*/image.mhd``.
        scans: number of output scans; scan i is made from background i % (number of backgrounds).
        seed: cohort seed (>= 0).
        annotations: LUNA16-style nodule table the backgrounds' own nodules are looked up in (by seriesuid); default
            ``../shared/data/lidc/annotations.csv`` when it exists.
        excluded: the same for excluded findings; default ``../shared/data/lidc/annotations_excluded.csv``.
        max_size_mm: longest z extent of an output scan (a random window of the lungs); default all of the lungs.
        in_plane_mm: smallest in-plane voxel size of the output (1.0 makes files about half the size).
        workers: processes writing scans in parallel (default: one per available CPU); the files do not depend on it.
    """
    from bundle.synthetic.hybrid import (
        default_backgrounds,
        default_tables,
        generate_hybrid_cohort,
    )
    from bundle.synthetic.parallel import check_workers
    from custom_components.atomic import writable_folder

    check_workers(workers)
    writable_folder(out, "the cohort")

    if backgrounds is None:
        paths = default_backgrounds(REPO_ROOT)
    elif isinstance(backgrounds, str):
        paths = [p for p in backgrounds.split(",") if p]
    else:
        paths = list(backgrounds)
    default_annotations, default_excluded = default_tables(REPO_ROOT)
    start = time.perf_counter()
    summary = generate_hybrid_cohort(
        out,
        paths,
        scans=scans,
        seed=seed,
        annotations=annotations if annotations is not None else default_annotations,
        excluded=excluded if excluded is not None else default_excluded,
        max_size_mm=max_size_mm,
        in_plane_mm=in_plane_mm,
        workers=workers,
    )
    seconds = time.perf_counter() - start
    print(
        f"wrote {summary['scans']} scans from {len(paths)} backgrounds ({summary['inserted']} inserted nodules, "
        f"{summary['nodules']} nodules in all, {summary['excluded']} excluded findings of which "
        f"{summary['own_lesions']} lesions found in the backgrounds) to {summary['out']} in {seconds:.1f} s"
    )
