"""Synthetic chest CT with annotated lung nodules, written in LUNA16's format: the bundle's embedded default data.

Small chests by default (a CPU trains on them in minutes), LUNA16-sized adult chests with ``full_size``. Each scan has
anisotropic spacing and 0.6-5 mm slices, a body with fat, muscle, ribs and spine, a mediastinum with heart, aorta and
airways, two textured lungs with fissures and dependent density, filled with continuous tapering artery and vein
trees and the airways beside the arteries (the hard negatives), plus calcified granulomas, scars, atelectasis and
emphysema (unannotated), and 0-6 nodules (solid, part-solid, ground-glass; free, juxta-pleural, juxta-vascular) whose
diameters follow LUNA16's, plus tiny excluded findings; imaged with a drawn reconstruction kernel, dose-dependent
noise of a CT noise-power spectrum, slice profile, streaks from bone and cardiac motion blur.
See docs/synthetic_cohort.md.
"""

from bundle.synthetic.cohort import (
    SyntheticScan,
    generate_cohort,
    seriesuid,
    synthesize_scan,
    write_scan,
)
from bundle.synthetic.nodules import sample_diameters, sample_nodule_count

__all__ = [
    "SyntheticScan",
    "generate_cohort",
    "synthesize_scan",
    "write_scan",
    "seriesuid",
    "sample_diameters",
    "sample_nodule_count",
]
