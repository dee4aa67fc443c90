"""Pulmonary artery and vein trees and the airways beside the arteries: the hard negatives of nodule detection.

Each lung gets an artery tree rooted at its hilum and a vein tree rooted lower and further back (where the pulmonary
veins enter the left atrium), built by recursive territory splitting (a simple form of constrained constructive
optimisation): the lung is represented by points drawn uniformly in it, each the territory of one terminal vessel. A
branch runs from its parent's end part of the way towards the centroid of its territory, where it splits in two; the
territory is cut by a random plane along the branch at a random quantile (10-50 %, so most bifurcations are
asymmetric: a trunk that runs on with a side branch, as in real lungs) and each child takes one part. Radii follow
Murray's law with flow proportional to territory size (``r_child = r_parent * share ** (1/3)``), so they taper
continuously from 6-8.5 mm at an adult hilum (the large, dense hilar vessels; scaled with the lung's linear size in
small chests) to 0.3-0.5 mm at the periphery, and the two trees fill the lungs evenly and interleave, as arteries and
veins do. Branches of 0.7 mm and more are slightly curved (two capsules), thinner ones straight; every child starts
exactly where its parent ends, at no more than the parent's end radius, so a tree is one continuous tube with smooth
joints.

Airways (bronchi and bronchioles) accompany the arteries: a tube of about the artery's calibre (broncho-arterial
ratio 0.8-1.05), an air lumen inside a soft-tissue wall of a quarter of its radius (at least 0.3 mm), running beside
the artery at a fixed side that turns with the tree, down to arteries of 0.8 mm radius (smaller airways are not seen
on CT). An airway branch starts where its parent airway ends, so the airway trees are connected within the lungs; they
are drawn only inside the lungs (from the first bifurcation on), leaving the main bronchi (which end at the hila)
sealed from them.

The trees are grown level by level with vectorised numpy (all nodes of one generation at once), so tens of thousands
of branches cost a few tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bundle.synthetic.anatomy import ChestAnatomy, LungField

__all__ = ["VesselTrees", "grow_vessel_trees"]

TAPER = 0.9  # radius at a branch's end relative to its start
MIN_RADIUS_MM = 0.3  # thinnest vessel drawn (0.6 mm across): thinner ones vanish in noise at CT resolution
AIRWAY_MIN_ARTERY_MM = 0.8  # arteries thinner than this have no visible airway beside them
AIRWAY_GAP_MM = 0.2  # between the artery's wall and the airway's
TERMINALS_PER_LITRE = 4000  # terminal branches per tree and litre of lung: sets the density of the vessel network
MAX_TERMINALS = 8000  # per tree (adult lungs): bounds the rendering time; terminals stay under 0.5 mm radius
ADULT_LUNG_LITRES = 2.5  # one adult lung at CT inspiration; its hilar artery is 6.5-8.5 mm in radius
SUBPLEURAL_MM = 3.0  # no terminal closer to the pleura than this
STRAIGHT_BELOW_MM = 0.7  # branches thinner than this are drawn as one straight capsule (their bend is invisible)


@dataclass(frozen=True)
class VesselTrees:
    """The vascular and airway trees of one scan, as capsules (world LPS mm).

    ``vessels`` ``(n, 8)``: start ``x, y, z``, end ``x, y, z``, start and end radius (mm), arteries then veins;
    ``is_artery`` ``(n,)`` bool. ``airways`` ``(m, 10)``: start, end, outer radius at start and end, lumen radius at
    start and end (mm); ``airway_artery`` ``(m,)`` the row of ``vessels`` each airway capsule runs beside.
    """

    vessels: np.ndarray
    is_artery: np.ndarray
    airways: np.ndarray
    airway_artery: np.ndarray


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows of ``v`` ``(n, 3)`` scaled to unit length."""
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


def _perpendicular(direction: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Unit vectors perpendicular to the unit rows of ``direction``, from the rows of ``v`` (``(n, 3)`` each)."""
    return _unit(v - np.sum(v * direction, axis=1, keepdims=True) * direction)


@dataclass
class _Branches:
    """Straight branches of the grown trees, in creation order (a parent always before its children)."""

    start: np.ndarray  # (b, 3)
    end: np.ndarray  # (b, 3)
    r0: np.ndarray  # (b,)
    r1: np.ndarray  # (b,)
    parent: np.ndarray  # (b,) row of the parent branch, -1 for a root


def _grow(roots: np.ndarray, root_radii: np.ndarray, territories: list[np.ndarray], rng: np.random.Generator):
    """Grow one tree per root by territory splitting, all nodes of a generation at once.

    Args:
        roots: ``(t, 3)`` root points (LPS mm); root_radii: ``(t,)`` mm.
        territories: one ``(n_i, 3)`` array of terminal points (LPS mm) per root, ``n_i >= 1``.

    A node is a branch start with a radius and a contiguous range ``[lo, hi)`` of ``points`` (its territory); points are
    reordered within their node's range at each split so that every child's territory is contiguous again.
    """
    points = np.concatenate(territories)
    sizes = np.array([len(t) for t in territories])
    hi = np.cumsum(sizes)
    lo = hi - sizes
    start, radius, parent = roots.astype(float), root_radii.astype(float), np.full(len(roots), -1)
    out: list[tuple[np.ndarray, ...]] = []
    count = 0
    while len(lo):
        n = hi - lo
        r_end = np.maximum(TAPER * radius, MIN_RADIUS_MM)
        cumulative = np.vstack([np.zeros(3), np.cumsum(points, axis=0)])
        centroid = (cumulative[hi] - cumulative[lo]) / n[:, None]
        leaf = n == 1
        end = np.where(leaf[:, None], points[np.minimum(lo, len(points) - 1)], 0.0)
        fork = start + rng.uniform(0.35, 0.6, size=(len(n), 1)) * (centroid - start)
        end = np.where(leaf[:, None], end, fork)
        rows = count + np.arange(len(n))
        out.append((start, end, radius, r_end, parent))
        count += len(n)

        inner = np.flatnonzero(~leaf)
        if not len(inner):
            break
        lo_i, hi_i, n_i = lo[inner], hi[inner], n[inner]
        direction = _unit(end[inner] - start[inner])
        normal = _perpendicular(direction, rng.standard_normal((len(inner), 3)))
        # Every point of an inner node, with its node: sort by (node, position along the cutting normal).
        node_of = np.repeat(np.arange(len(inner)), n_i)
        index = np.repeat(lo_i - np.cumsum(n_i) + n_i, n_i) + np.arange(n_i.sum())
        cut = np.sum(points[index] * normal[node_of], axis=1)
        points[index] = points[index[np.lexsort((cut, node_of))]]
        k = np.clip(np.rint(rng.uniform(0.1, 0.5, size=len(inner)) * n_i), 1, n_i - 1).astype(int)
        share = np.concatenate([k / n_i, (n_i - k) / n_i])
        r_parent = np.concatenate([radius[inner], radius[inner]])
        r_cap = np.concatenate([r_end[inner], r_end[inner]])
        # From the radius at the branch's start (Murray), but never wider than the parent's end: no bulge at the joint.
        radius = np.maximum(np.minimum(r_parent * share ** (1 / 3), r_cap), MIN_RADIUS_MM)
        start = np.concatenate([end[inner], end[inner]])
        parent = np.concatenate([rows[inner], rows[inner]])
        lo, hi = np.concatenate([lo_i, lo_i + k]), np.concatenate([lo_i + k, hi_i])
    return _Branches(*(np.concatenate(parts) for parts in zip(*out)))


def _curve(b: _Branches, rng: np.random.Generator) -> np.ndarray:
    """Midpoints ``(b, 3)`` of the branches, displaced sideways by up to 10 % of each branch's length."""
    axis = b.end - b.start
    length = np.linalg.norm(axis, axis=1, keepdims=True)
    side = _perpendicular(_unit(axis), rng.standard_normal((len(axis), 3)))
    return 0.5 * (b.start + b.end) + rng.uniform(0.0, 0.1, size=(len(axis), 1)) * length * side


def _capsules(start: np.ndarray, middle: np.ndarray, end: np.ndarray, *radii: tuple[np.ndarray, np.ndarray]):
    """Two capsules per branch ``start -> middle -> end``, each ``(r0, r1)`` pair of radii interpolated at the middle.

    Returns ``(2b, 6 + 2 * len(radii))`` rows: start, end, then for each pair the radius at the capsule's two ends;
    the first halves of all branches, then the second halves.
    """
    first = [start, middle] + [np.column_stack([r0, 0.5 * (r0 + r1)]) for r0, r1 in radii]
    second = [middle, end] + [np.column_stack([0.5 * (r0 + r1), r1]) for r0, r1 in radii]
    return np.concatenate([np.hstack(first), np.hstack(second)])


def _vessel_capsules(b: _Branches, middle: np.ndarray) -> np.ndarray:
    """Capsules ``(c, 8)`` of the branches: two (curved) per branch, one (straight) below ``STRAIGHT_BELOW_MM``.

    The first ``len(b.r0)`` rows are the branches' first capsules (row = branch), in order."""
    caps = _capsules(b.start, middle, b.end, (b.r0, b.r1))
    n = len(b.r0)
    thin = b.r0 < STRAIGHT_BELOW_MM
    caps[:n][thin, 3:6] = b.end[thin]
    caps[:n][thin, 7] = b.r1[thin]
    return np.concatenate([caps[:n], caps[n:][~thin]])


def _airways(
    arteries: _Branches, middle: np.ndarray, lungs: LungField, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Airways beside the arteries of at least ``AIRWAY_MIN_ARTERY_MM``: ``(m, 10)`` capsules and their artery rows.

    Each airway branch keeps a side (a unit vector perpendicular to its artery) inherited from its parent's airway and
    re-orthogonalised, and starts where the parent airway ends, so the airway tree is connected.
    """
    b = len(arteries.r0)
    direction = _unit(arteries.end - arteries.start)
    side = np.zeros((b, 3))
    start = np.zeros((b, 3))
    end = np.zeros((b, 3))
    ratio = rng.uniform(0.8, 1.05, size=b)
    outer0, outer1 = ratio * arteries.r0, ratio * arteries.r1
    gap1 = arteries.r1 + outer1 + AIRWAY_GAP_MM
    # Only within the lungs (not beside the roots in the hila): the main bronchi end at the hila, so the airways' air
    # stays apart from the trachea's, as the lung threshold of preprocessing expects.
    inside = [lungs.depth_at(p) > 1.0 for p in (arteries.start, middle, arteries.end)]
    has = (arteries.r0 >= AIRWAY_MIN_ARTERY_MM) & (arteries.parent >= 0) & inside[0] & inside[1] & inside[2]
    draws = rng.standard_normal((b, 3))
    # Parents come before their children, so one pass in creation order sees every parent's side and end first.
    for row in np.flatnonzero(has):
        p = arteries.parent[row]
        inherited = side[p] if p >= 0 and has[p] else draws[row]
        side[row] = _perpendicular(direction[row : row + 1], inherited[None])[0]
        start[row] = (
            end[p]
            if p >= 0 and has[p]
            else arteries.start[row] + side[row] * (arteries.r0[row] + outer0[row] + AIRWAY_GAP_MM)
        )
        end[row] = arteries.end[row] + side[row] * gap1[row]
    rows = np.flatnonzero(has)
    gap_mid = 0.5 * (arteries.r0 + arteries.r1 + outer0 + outer1) + AIRWAY_GAP_MM
    mid = middle + side * gap_mid[:, None]

    def lumen(outer: np.ndarray) -> np.ndarray:
        return np.maximum(outer - np.maximum(0.25 * outer, 0.3), 0.0)

    caps = _capsules(
        start[rows], mid[rows], end[rows], (outer0[rows], outer1[rows]), (lumen(outer0[rows]), lumen(outer1[rows]))
    )
    # Rows of (branch, half): branch r's first half is r, its second r + b, as in _capsules.
    return caps, np.concatenate([rows, rows + b])


def grow_vessel_trees(
    anatomy: ChestAnatomy, lungs: LungField, rng: np.random.Generator, terminals_per_lung: int | None = None
) -> VesselTrees:
    """Grow the artery and vein trees of both lungs and the airways beside the arteries.

    Args:
        anatomy: the chest; artery trees start at the hila, vein trees lower and further back.
        lungs: the lungs, in which the terminal territories are drawn (deeper than ``SUBPLEURAL_MM``).
        rng: random generator of this scan.
        terminals_per_lung: terminal branches of each tree; by default ``TERMINALS_PER_LITRE`` per litre of that lung,
            so small and adult chests have the same density of vessels. A tree has ``4 * terminals - 2`` capsules.

    Returns:
        the trees; vessel capsules are in ``vessels`` (arteries then veins).
    """
    roots, radii, territories, artery = [], [], [], []
    for hilum, side in zip(anatomy.hilum, (-1.0, 1.0)):
        x = lungs.first[0] + lungs.spacing * np.arange(lungs.depth.shape[2])
        litres = np.count_nonzero(lungs.depth[:, :, side * (x - anatomy.cx) > 0]) * lungs.spacing**3 / 1e6
        if terminals_per_lung is None:
            count = int(np.clip(TERMINALS_PER_LITRE * litres, 50, MAX_TERMINALS))
        else:
            count = terminals_per_lung
        # Calibres scale with the lung's linear size, so a small lung is a scaled-down adult one.
        s = (max(litres, 0.05) / ADULT_LUNG_LITRES) ** (1 / 3)
        # Terminals at least 3 mm inside the pleura: real vessels thin out under it, the subpleural lung is sparse.
        points = lungs.sample(rng, SUBPLEURAL_MM + lungs.spacing, np.inf, size=12 * count)
        points = points[side * (points[:, 0] - anatomy.cx) > 0]
        vein_root = np.add(hilum, (-side * 4.0 * anatomy.scale, 12.0 * anatomy.scale, -22.0 * anatomy.scale))
        for root, radius, is_artery, part in (
            (np.asarray(hilum), rng.uniform(6.5, 8.5) * s, True, points[:count]),
            (vein_root, rng.uniform(6.0, 7.5) * s, False, points[count : 2 * count]),
        ):
            roots.append(root)
            radii.append(radius)
            territories.append(part)
            artery.append(is_artery)
    # Arteries and veins are grown separately, so that the airways follow the artery trees only.
    grown = []
    for which in (True, False):
        pick = [i for i, a in enumerate(artery) if a == which]
        tree_roots, tree_radii = np.array([roots[i] for i in pick]), np.array([radii[i] for i in pick])
        grown.append(_grow(tree_roots, tree_radii, [territories[i] for i in pick], rng))
    arteries, veins = grown
    a_mid = _curve(arteries, rng)
    v_mid = _curve(veins, rng)
    a_caps = _vessel_capsules(arteries, a_mid)
    v_caps = _vessel_capsules(veins, v_mid)
    airways, halves = _airways(arteries, a_mid, lungs, rng)
    # The artery capsule beside each airway capsule: branches with airways are thick, so they have both halves.
    n_a = len(arteries.r0)
    second = n_a + np.cumsum(arteries.r0 >= STRAIGHT_BELOW_MM) - 1
    airway_artery = np.where(halves < n_a, halves, second[halves % n_a])
    vessels = np.concatenate([a_caps, v_caps])
    is_artery = np.arange(len(vessels)) < len(a_caps)
    return VesselTrees(vessels, is_artery, airways, airway_artery)
