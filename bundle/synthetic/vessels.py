"""Branching pulmonary vessel trees: the hard negatives of nodule detection.

Each lung gets one tree rooted at its hilum, built by recursive territory splitting (a simple form of constrained
constructive optimisation): the lung is represented by points drawn uniformly in it, each the territory of one
terminal vessel. A branch runs from its parent's end part of the way towards the centroid of its territory, where
it splits in two; the territory is cut by a random plane along the branch (at a random quantile, so bifurcations are
asymmetric) and each child takes one part. Radii follow Murray's law with flow proportional to territory size
(``r_child = r_parent * share ** (1/3)``), so they taper from about 6 mm at the hilum to sub-millimetre at the
periphery while the trees fill the lungs evenly. Branches are slightly curved (two capsules each). Cut across, a
vessel is a round bright dot and a bifurcation a bright blob: both look like small nodules to a detector.
"""

from __future__ import annotations

import numpy as np

from bundle.synthetic.anatomy import ChestAnatomy, LungField

__all__ = ["grow_vessel_trees"]

TAPER = 0.9  # radius at a branch's end relative to its start
MIN_RADIUS_MM = 0.3  # thinnest vessel drawn (0.6 mm across): thinner ones vanish in noise at these spacings


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.sqrt(v @ v)), 1e-9)


def _perpendicular(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to the unit vector ``direction``."""
    v = rng.standard_normal(3)
    return _unit(v - (v @ direction) * direction)


def _branch(start: np.ndarray, end: np.ndarray, r0: float, r1: float, rng: np.random.Generator) -> np.ndarray:
    """A slightly curved branch, two capsules ``(2, 8)``: the midpoint moves sideways by up to 10 % of the length."""
    axis = end - start
    length = float(np.sqrt(axis @ axis))
    middle = 0.5 * (start + end) + rng.uniform(0.0, 0.1) * length * _perpendicular(_unit(axis), rng)
    r_mid = 0.5 * (r0 + r1)
    return np.array([[*start, *middle, r0, r_mid], [*middle, *end, r_mid, r1]])


def grow_vessel_trees(
    anatomy: ChestAnatomy, lungs: LungField, rng: np.random.Generator, terminals_per_lung: int
) -> np.ndarray:
    """Grow the vessel trees of both lungs.

    Args:
        anatomy: the chest; each tree starts at a hilum.
        lungs: the lungs, in which the terminal territories are drawn (deeper than 1 mm).
        rng: random generator of this scan.
        terminals_per_lung: number of terminal branches per lung; a tree has ``4 * terminals_per_lung - 2`` capsules.

    Returns:
        ``(n, 8)`` float array of capsules: start ``x, y, z``, end ``x, y, z`` (LPS mm), start and end radius (mm).
    """
    root_radius = 6.0 * min(1.0, anatomy.scale) ** 0.5
    points = lungs.sample(rng, 1.0 + lungs.spacing, np.inf, size=8 * terminals_per_lung)
    segments: list[np.ndarray] = []
    for hilum, side in zip(anatomy.hilum, (-1.0, 1.0)):
        territory = points[side * (points[:, 0] - anatomy.cx) > 0][:terminals_per_lung]
        stack = [(np.asarray(hilum, dtype=float), root_radius, territory)]
        while stack:
            start, radius, territory = stack.pop()
            end_radius = max(TAPER * radius, MIN_RADIUS_MM)
            if len(territory) == 1:
                segments.append(_branch(start, territory[0], radius, end_radius, rng))
                continue
            fork = start + rng.uniform(0.35, 0.6) * (territory.mean(axis=0) - start)
            segments.append(_branch(start, fork, radius, end_radius, rng))
            cut = territory @ _perpendicular(_unit(fork - start), rng)
            n = len(territory)
            k = int(np.clip(round(rng.uniform(0.25, 0.75) * n), 1, n - 1))
            order = np.argpartition(cut, k - 1)
            for part in (order[:k], order[k:]):
                # From the radius at the branch's start: the taper along a branch is a look, not a loss of flow.
                child_radius = max(radius * (len(part) / n) ** (1 / 3), MIN_RADIUS_MM)
                stack.append((fork, child_radius, territory[part]))
    return np.concatenate(segments) if segments else np.zeros((0, 8))
