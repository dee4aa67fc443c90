"""Findings that are not nodules but look like them or break the lung's texture: the hard negatives beyond vessels.

- **Calcified granulomas**: very dense (300-1200 HU) small spheres, 1.0-2.8 mm across, in no annotation file. LIDC's
  readers marked lesions under 3 mm only when they were *not clearly benign* (Armato et al. 2011), and a calcified
  granuloma is the textbook clearly benign lesion, so LUNA16 neither lists such a finding among its nodules nor among
  its excluded findings; a detector's mark on one is a false positive there, and it must be one here too. Keeping
  them under 3 mm also keeps them out of LUNA16's nodule definition (>= 3 mm) whatever their density.
- **Scars**: irregular strands (chains of thin capsules, 0.4-1.2 mm radius), often reaching the pleura.
- **Atelectasis bands** (plate-like atelectasis): thin plates 10-35 mm long in the lower lungs, running in from the
  pleura; a ribbon of parallel capsules, seen on an axial slice as a dense line.
- **Pleural plaques**: flat lens-like thickenings of the costal pleura (6-15 mm long, 3-10 mm high, 1.6-3 mm
  thick; soft tissue, a fifth calcified at 300-600 HU), half in the chest wall and half in the lung: a juxta-pleural
  nodule's flat look-alike.
- **Emphysema**: clusters of low-density holes (about -1000 HU): centrilobular (1-5 mm, upper lungs, no walls) and
  paraseptal bullae (3-8 mm, under the pleura, in a 0.5 mm wall).

All are placed clear of the nodules and excluded findings (by the sum of radii plus 3 mm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bundle.synthetic.anatomy import ChestAnatomy, LungField
from bundle.synthetic.nodules import Nodule

__all__ = ["Mimics", "draw_mimics", "GRANULOMA_MAX_MM", "EMPHYSEMA_HU", "BULLA_WALL_MM", "BULLA_WALL_HU"]

GRANULOMA_MAX_MM = 2.8  # under LUNA16's 3 mm nodule threshold (see the module docstring)
EMPHYSEMA_HU = -1000.0
BULLA_WALL_MM, BULLA_WALL_HU = 0.5, -100.0  # the thin wall of a paraseptal bulla


@dataclass(frozen=True)
class Mimics:
    """Non-nodule findings of one scan (world LPS mm).

    ``granulomas`` ``(g, 5)``: centre, radius (mm), HU. ``strands`` ``(s, 9)``: capsules (start, end, start and end
    radius) of scars and atelectasis bands with their HU; ``plaques`` the same for pleural plaques. ``holes``
    ``(h, 4)``: emphysema holes, centre and radius; the last ``bullae`` of them are paraseptal bullae, which have a thin
    wall.
    """

    granulomas: np.ndarray
    strands: np.ndarray
    plaques: np.ndarray
    holes: np.ndarray
    bullae: int


def _clear(points: np.ndarray, radii: np.ndarray, findings: list[Nodule]) -> np.ndarray:
    """Which of ``points`` ``(n, 3)`` with ``radii`` keep 3 mm clear of every finding."""
    keep = np.ones(len(points), dtype=bool)
    for f in findings:
        keep &= np.linalg.norm(points - np.asarray(f.centre), axis=1) > radii + 0.5 * f.diameter + 3.0
    return keep


def _upper_weighted(rng: np.random.Generator, points: np.ndarray, anatomy: ChestAnatomy, power: float) -> np.ndarray:
    """Keep ``points`` with probability ``height ** power`` (height 0 at the lung base, 1 at the apex)."""
    height = np.clip((points[:, 2] - anatomy.z_base) / (anatomy.z_apex - anatomy.z_base), 0.0, 1.0)
    return points[rng.uniform(size=len(points)) < height**power]


def _strands(rng: np.random.Generator, lungs: LungField, anatomy: ChestAnatomy, avoid: list[Nodule]) -> np.ndarray:
    """Scars and atelectasis bands as capsules ``(s, 9)``."""
    rows = []
    margin = lungs.spacing
    for _ in range(int(rng.uniform() < 0.4) * int(rng.integers(1, 4))):  # scars: random walks from the pleura
        point = lungs.sample(rng, margin, margin + 2.0)
        if point is None:
            break
        radius, hu = rng.uniform(0.4, 1.2), rng.uniform(-100.0, 40.0)
        direction = rng.standard_normal(3)
        for _ in range(int(rng.integers(3, 7))):
            direction = direction / np.linalg.norm(direction) + rng.normal(0.0, 0.5, 3)
            nxt = point + rng.uniform(4.0, 8.0) * direction / np.linalg.norm(direction)
            if np.any(lungs.depth_at(np.array([0.5 * (point + nxt), nxt])) <= 0):
                break
            rows.append([*point, *nxt, radius, radius * rng.uniform(0.6, 1.0), hu])
            point = nxt
    for _ in range(int(rng.uniform() < 0.35) * int(rng.integers(1, 4))):  # plate-like atelectasis in the lower lungs
        candidates = lungs.sample(rng, margin, margin + 2.0, size=40)
        if candidates is None:
            break
        low = candidates[candidates[:, 2] < anatomy.z_base + 0.45 * (anatomy.z_apex - anatomy.z_base)]
        if not len(low):
            continue
        start = low[0]
        inward = np.array([anatomy.cx - start[0], anatomy.cy - start[1], 0.0])
        inward = inward / np.linalg.norm(inward) + rng.normal(0.0, 0.3, 3)
        inward /= np.linalg.norm(inward)
        across = np.cross(inward, rng.standard_normal(3))
        across /= np.linalg.norm(across)
        length, width = rng.uniform(10.0, 35.0), rng.uniform(4.0, 12.0)
        radius, hu = rng.uniform(0.6, 1.3), rng.uniform(-150.0, 20.0)
        for offset in np.arange(-0.5 * width, 0.5 * width + 1e-6, radius):
            a = start + offset * across
            b = a + length * inward
            # Only the lines of the plate that stay in the lung: a plate ends at the pleura and the mediastinum.
            if np.all(lungs.depth_at(np.array([a, 0.5 * (a + b), b])) > 0):
                rows.append([*a, *b, radius, radius, hu])
    strands = np.array(rows).reshape(-1, 9)
    if len(strands):
        middle = 0.5 * (strands[:, :3] + strands[:, 3:6])
        half = 0.5 * np.linalg.norm(strands[:, 3:6] - strands[:, :3], axis=1)
        strands = strands[_clear(middle, half + strands[:, 6], avoid)]
    return strands


def _plaques(rng: np.random.Generator, lungs: LungField, anatomy: ChestAnatomy, avoid: list[Nodule]) -> np.ndarray:
    """Pleural plaques in 30 % of scans, 1-3, as capsules ``(p, 9)``: ribbons along the costal pleura."""
    rows = []
    margin = lungs.spacing
    for _ in range(int(rng.uniform() < 0.3) * int(rng.integers(1, 4))):  # pleural plaques on the costal pleura
        point = lungs.sample(rng, margin, margin + 1.5)
        if point is None:
            break
        # The outward normal of the pleura, from the lungs' depth map (depth grows inwards).
        steps = np.eye(3) * lungs.spacing
        gradient = lungs.depth_at(point + steps) - lungs.depth_at(point - steps)
        if np.linalg.norm(gradient) == 0 or abs(gradient[2]) > 0.5 * np.linalg.norm(gradient):
            continue  # not the costal pleura (apex, diaphragm)
        outward = -gradient / np.linalg.norm(gradient)
        along = np.cross(outward, [0.0, 0.0, 1.0])
        along /= np.linalg.norm(along)
        up = np.cross(along, outward)
        centre = point + outward * float(lungs.depth_at(point)[0])  # on the pleura: half in the wall, half in the lung
        length, height = rng.uniform(6.0, 15.0), rng.uniform(3.0, 10.0)
        radius = rng.uniform(0.8, 1.5)
        hu = rng.uniform(300.0, 600.0) if rng.uniform() < 0.2 else rng.uniform(20.0, 60.0)  # some calcified
        for offset in np.arange(-0.5 * height, 0.5 * height + 1e-6, radius):
            a = centre + offset * up - 0.5 * length * along
            rows.append([*a, *(a + length * along), radius, radius, hu])
    plaques = np.array(rows).reshape(-1, 9)
    middle = 0.5 * (plaques[:, :3] + plaques[:, 3:6])
    half = 0.5 * np.linalg.norm(plaques[:, 3:6] - plaques[:, :3], axis=1)
    return plaques[_clear(middle, half + plaques[:, 6], avoid)]


def _holes(
    rng: np.random.Generator, lungs: LungField, anatomy: ChestAnatomy, avoid: list[Nodule]
) -> tuple[np.ndarray, int]:
    """Emphysema holes ``(h, 4)`` in 30 % of scans, centrilobular (upper lungs) first and, in some, paraseptal bullae
    last; and the number of bullae."""
    if rng.uniform() >= 0.3:
        return np.zeros((0, 4)), 0
    litres = np.count_nonzero(lungs.depth) * lungs.spacing**3 / 1e6
    count = int(litres * rng.uniform(150.0, 700.0))
    centres = _upper_weighted(rng, lungs.sample(rng, 2.0 + lungs.spacing, np.inf, size=3 * count), anatomy, 1.5)
    radii = np.clip(rng.lognormal(np.log(1.6), 0.45, size=len(centres)), 0.8, 5.0)
    holes = np.column_stack([centres, radii])
    holes = holes[_clear(holes[:, :3], holes[:, 3], avoid)]
    bullae = np.zeros((0, 4))
    if rng.uniform() < 0.4:
        centres = _upper_weighted(rng, lungs.sample(rng, lungs.spacing, lungs.spacing + 4.0, size=30), anatomy, 2.0)
        bullae = np.column_stack([centres, rng.uniform(3.0, 8.0, size=len(centres))])
        bullae = bullae[_clear(bullae[:, :3], bullae[:, 3] + BULLA_WALL_MM, avoid)]
    return np.concatenate([holes, bullae]), len(bullae)


def _granulomas(rng: np.random.Generator, lungs: LungField, avoid: list[Nodule]) -> np.ndarray:
    """Calcified granulomas ``(g, 5)`` in half of the scans: 1-4, 1.0-2.8 mm across, 300-1200 HU."""
    count = int(rng.uniform() < 0.5) * int(rng.integers(1, 5))
    if not count:
        return np.zeros((0, 5))
    centres = lungs.sample(rng, 2.0 + lungs.spacing, np.inf, size=count)
    radii = 0.5 * rng.uniform(1.0, GRANULOMA_MAX_MM, size=count)
    hu = rng.uniform(300.0, 1200.0, size=count)
    keep = _clear(centres, radii, avoid)
    return np.column_stack([centres, radii, hu])[keep]


def draw_mimics(rng: np.random.Generator, anatomy: ChestAnatomy, lungs: LungField, avoid: list[Nodule]) -> Mimics:
    """Draw the non-nodule findings of one scan, clear of the nodules and excluded findings in ``avoid``."""
    granulomas = _granulomas(rng, lungs, avoid)
    strands = _strands(rng, lungs, anatomy, avoid)
    plaques = _plaques(rng, lungs, anatomy, avoid)
    holes, bullae = _holes(rng, lungs, anatomy, avoid)
    return Mimics(granulomas=granulomas, strands=strands, plaques=plaques, holes=holes, bullae=bullae)
