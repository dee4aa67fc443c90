"""Nodules: LUNA16's size distribution, lobulated shapes of three kinds, and their placement in the lungs.

The diameter table ``luna16_diameters.json`` holds 41 quantiles (probabilities 0, 0.025, ..., 1) of the 1186
``diameter_mm`` values of LUNA16's ``annotations.csv``, computed with ``numpy.quantile`` (linear interpolation)::

    d = [float(row["diameter_mm"]) for row in csv.DictReader(open("annotations.csv"))]
    numpy.quantile(d, numpy.linspace(0, 1, 41)).round(3)

Diameters are drawn by inverse transform sampling of that piecewise-linear distribution, truncated to 3-30 mm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from bundle.synthetic.anatomy import LungField

__all__ = [
    "Nodule",
    "NODULE_HU",
    "diameter_table",
    "sample_diameters",
    "sample_nodule_count",
    "make_nodule",
    "place_nodules",
]

DIAMETER_TABLE = Path(__file__).with_name("luna16_diameters.json")
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 3.0, 30.0  # LUNA16 counts nodules >= 3 mm; above 30 mm a lesion is a mass
NODULE_COUNT_P = (0.25, 0.25, 0.2, 0.12, 0.08, 0.06, 0.04)  # P(0..6 nodules in a scan): a quarter have none
#: Density ranges (HU) per kind; a part-solid nodule is a ground-glass halo around a solid core.
NODULE_HU = {"solid": (20.0, 80.0), "ground-glass": (-550.0, -300.0)}


@dataclass(frozen=True)
class Nodule:
    """A lesion in world LPS mm.

    ``centre`` is the centroid and ``diameter`` the effective diameter (of the sphere of equal volume) of the whole
    lesion, as LUNA16 annotates them. ``spheres`` ``(m, 4)`` (centre x, y, z, radius) is its lobulated shape, ``core``
    the solid core of a part-solid nodule (else empty). ``kind`` is ``solid``, ``part-solid``, ``ground-glass`` or
    ``tiny`` (an excluded finding under 3 mm); ``attachment`` is ``free``, ``juxta-pleural`` or ``juxta-vascular``.
    """

    centre: tuple[float, float, float]
    diameter: float
    kind: str
    attachment: str
    spheres: np.ndarray
    core: np.ndarray
    hu: float
    core_hu: float


@lru_cache(maxsize=1)
def diameter_table() -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, quantiles_mm)`` of LUNA16's nodule diameters, from ``luna16_diameters.json``."""
    table = json.loads(DIAMETER_TABLE.read_text())
    return np.asarray(table["probabilities"]), np.asarray(table["quantiles_mm"])


def sample_diameters(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` nodule diameters (mm) drawn from LUNA16's distribution truncated to [3, 30] mm."""
    probabilities, quantiles = diameter_table()
    lo, hi = np.interp([MIN_DIAMETER_MM, MAX_DIAMETER_MM], quantiles, probabilities)
    return np.interp(rng.uniform(lo, hi, size=n), probabilities, quantiles)


def sample_nodule_count(rng: np.random.Generator) -> int:
    """Number of nodules (0..6) in one scan."""
    return int(rng.choice(len(NODULE_COUNT_P), p=NODULE_COUNT_P))


def _lobulated_shape(rng: np.random.Generator, lobes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A unit sphere with ``lobes`` smaller spheres bulging from it: ``(centres, radii, effective diameter)``,
    recentred on the union's centroid (both measured on a 0.08-unit grid)."""
    directions = rng.standard_normal((lobes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    centres = np.vstack([np.zeros(3), directions * rng.uniform(0.35, 0.65, size=(lobes, 1))])
    radii = np.concatenate([[1.0], rng.uniform(0.4, 0.7, size=lobes)])
    step = 0.08
    axis = np.arange(-1.8, 1.8 + step / 2, step)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    inside = np.any(np.sum((points - centres) ** 2, axis=-1) < radii**2, axis=1)
    volume = inside.sum() * step**3
    centroid = points[inside, 0].mean(axis=0)
    return centres - centroid, radii, 2.0 * (3.0 * volume / (4.0 * np.pi)) ** (1 / 3)


def make_nodule(
    rng: np.random.Generator, centre: np.ndarray, diameter: float, kind: str, attachment: str
) -> Nodule:
    """A lobulated nodule of effective ``diameter`` mm whose centroid is ``centre`` (LPS mm).

    The unit shape is scaled so that its volume equals that of a sphere of ``diameter``; a part-solid nodule's core is
    the same shape at 40-65 % of the size.
    """
    unit_centres, unit_radii, unit_diameter = _lobulated_shape(rng, int(rng.integers(0, 5)))
    scale = diameter / unit_diameter
    spheres = np.column_stack([centre + scale * unit_centres, scale * unit_radii])
    core = np.empty((0, 4))
    if kind == "part-solid":
        core = spheres.copy()
        core_scale = rng.uniform(0.4, 0.65)
        core[:, :3] = centre + core_scale * (spheres[:, :3] - centre)
        core[:, 3] *= core_scale
    hu_range = NODULE_HU["ground-glass" if kind in ("ground-glass", "part-solid") else "solid"]
    return Nodule(
        centre=tuple(float(c) for c in centre),
        diameter=float(diameter),
        kind=kind,
        attachment=attachment,
        spheres=spheres,
        core=core,
        hu=float(rng.uniform(*hu_range)),
        core_hu=float(rng.uniform(*NODULE_HU["solid"])),
    )


def _distance_to_segments(point: np.ndarray, vessels: np.ndarray) -> np.ndarray:
    """Distance (mm) from ``point`` to the surface of each vessel capsule (negative inside)."""
    a, b = vessels[:, :3], vessels[:, 3:6]
    ab = b - a
    t = np.clip(np.einsum("ij,ij->i", point - a, ab) / np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-12), 0.0, 1.0)
    radius = vessels[:, 6] + t * (vessels[:, 7] - vessels[:, 6])
    return np.linalg.norm(point - (a + t[:, None] * ab), axis=1) - radius


def _choose_kind(rng: np.random.Generator, diameter: float) -> str:
    """Mostly solid, as in LUNA16; a faint ground-glass lesion under 6 mm would be invisible at these resolutions."""
    if diameter < 6.0:
        return "solid"
    return str(rng.choice(["solid", "part-solid", "ground-glass"], p=[0.7, 0.15, 0.15]))


def place_nodules(
    rng: np.random.Generator, lungs: LungField, vessels: np.ndarray, count: int, tiny: int
) -> tuple[list[Nodule], list[Nodule]]:
    """Place ``count`` nodules (3-30 mm) and ``tiny`` excluded findings (1.5-3 mm) in the lungs, never overlapping.

    Nodules are free (in the parenchyma, clear of large vessels), juxta-pleural (centre within 0.55-0.85 radii of the
    pleura, so the lesion touches the chest wall) or juxta-vascular (touching a 0.8-3.5 mm vessel). A lesion that
    cannot be placed after a few tries is dropped, so a scan may hold fewer than asked.

    Returns:
        ``(nodules, excluded)``.
    """
    margin = lungs.spacing  # the coarse depth map is exact to about one of its voxels
    placed: list[Nodule] = []
    sizes = [("nodule", d) for d in sample_diameters(rng, count)] + [("tiny", d) for d in rng.uniform(1.5, 2.9, tiny)]
    big = vessels[np.maximum(vessels[:, 6], vessels[:, 7]) > 0.8]
    mid = vessels[(vessels[:, 6] > 0.8) & (vessels[:, 6] < 3.5)]
    for role, diameter in sizes:
        r = 0.5 * diameter
        kind = "tiny" if role == "tiny" else _choose_kind(rng, diameter)
        attachment = "free"
        if role == "nodule" and diameter >= 5.0:
            attachment = str(rng.choice(["free", "juxta-pleural", "juxta-vascular"], p=[0.5, 0.25, 0.25]))
        for _ in range(30):
            if attachment == "juxta-pleural":
                centre = lungs.sample(rng, 0.55 * r + margin, max(0.85 * r, 0.55 * r + 1.0) + margin)
            elif attachment == "juxta-vascular" and len(mid):
                seg = mid[rng.integers(len(mid))]
                axis = seg[3:6] - seg[:3]
                normal = np.cross(axis, rng.standard_normal(3))
                normal /= np.linalg.norm(normal)
                centre = seg[:3] + rng.uniform(0.2, 0.8) * axis + normal * (seg[6] + 0.8 * r)
                if lungs.depth_at(centre)[0] < r + margin:
                    continue
            else:
                centre = lungs.sample(rng, r + 2.0 + margin, np.inf)
                if centre is not None and len(big) and _distance_to_segments(centre, big).min() < 0.5 * r + 1.0:
                    continue
            if centre is None:
                break
            if all(np.linalg.norm(centre - np.asarray(n.centre)) > r + 0.5 * n.diameter + 3.0 for n in placed):
                placed.append(make_nodule(rng, centre, diameter, kind, attachment))
                break
    return [n for n in placed if n.kind != "tiny"], [n for n in placed if n.kind == "tiny"]
