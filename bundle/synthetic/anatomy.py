"""The chest of one synthetic scan: body, fat, muscle, ribs, spine, mediastinum, heart, airways, aorta and lungs.

Everything is defined analytically in LPS world mm (x to the patient's Left, y Posterior, z Superior) and evaluated
slice by slice on 2D maps precomputed once per scan, so rendering is a handful of vectorised numpy operations per
slice. The axial cross-section is a superellipse whose size changes slowly with z; the chest wall, ribs and lungs are
placed by their *depth* below the skin (mm along the ray from the body centre), which keeps the wall equally thick
all round. Tubular organs (trachea, main bronchi, aorta, oesophagus) are capsules, rendered with partial volume by
:func:`~bundle.synthetic.raster.paint_capsules`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bundle.synthetic.raster import ScanGrid

__all__ = ["HU", "Tube", "Fissure", "ChestAnatomy", "Plane", "LungField", "SLICE_RECONSTRUCTIONS"]

#: Densities (Hounsfield units) of the tissues, before blur and noise.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "mediastinal_fat": -90.0,
    "muscle": 40.0,
    "blood": 40.0,
    "liver": 55.0,
    "spleen": 45.0,
    "csf": 15.0,
    "cartilage": 110.0,
    "disc": 90.0,
    "cancellous_bone": 220.0,
    "cortical_bone": 700.0,
    "pleura": 40.0,
}
FISSURE_HALF_MM = 0.15  # half the thickness of a fissure (two layers of visceral pleura)

APEX_SPREAD = 5.0  # apex_e reached by the whole lung cross-section where the apex starts narrowing
ADULT_HALF_WIDTH_MM = 150.0  # body semi-axis (left-right) of the reference adult; organ sizes scale with a / this
#: Reconstructions drawn: (slice thickness, slice spacing) mm and probability. Clinical archives hold 0.6-5 mm slices,
#: some reconstructed overlapping (thickness twice the spacing); LUNA16 itself kept 0.6-2.5 mm.
SLICE_RECONSTRUCTIONS = (
    ((0.625, 0.625), 0.06),
    ((1.0, 1.0), 0.12),
    ((1.25, 1.25), 0.14),
    ((1.5, 1.5), 0.08),
    ((2.0, 2.0), 0.14),
    ((2.0, 1.0), 0.06),
    ((2.5, 2.5), 0.18),
    ((2.5, 1.25), 0.06),
    ((3.0, 3.0), 0.06),
    ((5.0, 5.0), 0.10),
)


@dataclass(frozen=True)
class Fissure:
    """An interlobar fissure of one lung: the sheet ``z = f(x, y)`` (LPS mm), with
    ``f = z0 + gx * u + gy * v - curvature * (u**2 + v**2)``, ``u = |x - cx| - lung_x`` (lateral offset from the lung's
    centre) and ``v = y - y0``. ``side`` is -1 (right lung) or +1 (left); a ``minor`` fissure (right lung only) exists
    only in front of the major fissure (where the major one lies below it)."""

    side: float
    z0: float
    y0: float
    gx: float
    gy: float
    curvature: float
    minor: bool = False


@dataclass(frozen=True)
class Tube:
    """A capsule organ: segment ``start -> end`` (LPS mm) of ``radius`` mm and density ``hu``."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius: float
    hu: float


class Plane:
    """Maps over an axial grid (world ``x``, ``y`` axes, mm) that do not change with z, relative to the body centre."""

    def __init__(self, x: np.ndarray, y: np.ndarray, anatomy: ChestAnatomy) -> None:
        an = anatomy
        self.x, self.y = x, y
        self.dx = (x[None, :] - an.cx).astype(np.float32)
        self.dy = (y[:, None] - an.cy).astype(np.float32)
        dx, dy = np.broadcast_arrays(self.dx, self.dy)
        radial = np.hypot(dx, dy)
        rho = (np.abs(dx / an.a) ** an.p + np.abs(dy / an.b) ** an.p) ** (1.0 / an.p)
        self.radial = radial
        # Radius of the body outline along the ray through each point; depth below the skin = ray_radius * c - radial.
        self.ray_radius = np.where(rho > 1e-6, radial / np.maximum(rho, 1e-6), an.b).astype(np.float32)
        # Angle from the posterior midline, 0 (back) .. pi (front), mirrored left-right.
        self.phi = np.arctan2(np.abs(dx), dy).astype(np.float32)
        self.rib_phase = (an.rib_slope * self.phi).astype(np.float32)
        self.side_dx = np.abs(dx) - an.lung_x  # lateral offset from the centre of the lung on the same side
        self.apex_e = (self.side_dx / an.apex_axes[0]) ** 2 + ((dy - an.lung_y) / an.apex_axes[1]) ** 2
        dome = ((self.side_dx / an.dome_axes[0]) ** 2 + ((dy - an.dome_y) / an.dome_axes[1]) ** 2).astype(np.float32)
        dome_height = np.where(dx < 0, an.dome_height[0], an.dome_height[1])
        self.diaphragm_z = an.z_base + dome_height * np.clip(1.0 - dome, 0.0, 1.0)
        self.is_right = dx < 0
        # Wide in the middle (great vessels, hila), narrow at the anterior junction and in front of the spine.
        v = dy / an.b
        self.mediastinum_half = an.mediastinum_half + an.mediastinum_bulge * np.exp(-(((v + 0.1) / 0.3) ** 2))

    def window(self, x_lo: float, x_hi: float, y_lo: float, y_hi: float) -> tuple[slice, slice]:
        """Index slices ``(rows, columns)`` of the plane covering world ``[x_lo, x_hi] x [y_lo, y_hi]`` mm."""
        i0, i1 = np.searchsorted(self.x, [x_lo, x_hi])
        j0, j1 = np.searchsorted(self.y, [y_lo, y_hi])
        return slice(j0, j1), slice(i0, i1)


@dataclass(frozen=True)
class ChestAnatomy:
    """Geometry of one synthetic chest (all lengths in mm, positions in LPS world mm). Draw with :meth:`draw`."""

    grid: ScanGrid
    cx: float  # body centre
    cy: float
    a: float  # body semi-axes at mid-chest (x, y)
    b: float
    p: float  # superellipse exponent of the outline (2 = ellipse, larger = boxier)
    fat: float  # subcutaneous fat thickness
    wall: float  # depth of the pleura (lung surface) below the skin
    rib_depth: float  # depth of the rib centres
    rib_half: tuple[float, float]  # rib half-thickness radially and half-height along z
    rib_pitch: float
    rib_slope: float  # mm of descent per radian from the spine towards the sternum
    rib_z0: float
    rib_count: tuple[int, int]  # first and last rib index
    z_base: float  # lowest point of the lungs (costophrenic recess)
    z_apex: float
    lung_x: float  # lateral offset of each lung's centre from the body centre
    lung_y: float
    apex_axes: tuple[float, float]
    apex_height: float
    dome_y: float
    dome_axes: tuple[float, float]
    dome_height: tuple[float, float]  # right, left hemidiaphragm (the right one is higher, above the liver)
    mediastinum_half: float
    mediastinum_bulge: float
    heart_centre: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    spine_y: float  # y of the vertebral body centre
    vertebra_radius: float
    canal_radius: float
    disc_pitch: float
    hilum: tuple[tuple[float, float, float], tuple[float, float, float]]  # right, left
    hilum_radius: float
    tubes: tuple[Tube, ...]
    airway_lumen: tuple[Tube, ...]
    lung_hu: float
    lung_gradient_hu: float  # denser towards the back (gravity-dependent lung)
    dependent_band: tuple[float, float]  # HU and depth (mm) of the subpleural dependent density at the back (0: none)
    fissures: tuple[Fissure, ...]
    fov_radius: float | None  # radius of the reconstruction circle (outside: -2048 padding), None if not padded

    @property
    def scale(self) -> float:
        """Size of this chest relative to the reference adult."""
        return self.a / ADULT_HALF_WIDTH_MM

    @classmethod
    def draw(cls, rng: np.random.Generator, full_size: bool) -> ChestAnatomy:
        """Draw a chest and its scan grid: a small chest (default) or an adult one on a 512 x 512 grid."""
        u = rng.uniform
        if full_size:
            a, lung_height, margin = u(135.0, 175.0), u(220.0, 280.0), (u(12.0, 40.0), u(12.0, 40.0))
            offset = u(-25.0, 25.0, size=2)
            spacing_xy = u(max(0.6, (a + 50.0) / 256.0), 1.0)
            n_xy = 512
        else:
            a, lung_height, margin = u(80.0, 100.0), u(95.0, 125.0), (u(6.0, 15.0), u(6.0, 15.0))
            offset = u(-10.0, 10.0, size=2)
            spacing_xy = u(0.6, 1.0)
            n_xy = int(np.ceil(2.0 * (a + np.abs(offset).max() * 1.5 + u(10.0, 25.0)) / spacing_xy))
        b = a * u(0.7, 0.82)
        s = a / ADULT_HALF_WIDTH_MM
        choice = rng.choice(len(SLICE_RECONSTRUCTIONS), p=[p for _, p in SLICE_RECONSTRUCTIONS])
        thickness, dz = SLICE_RECONSTRUCTIONS[choice][0]
        image_centre = (u(-20.0, 20.0), u(-30.0, 30.0))
        cx, cy = image_centre[0] + offset[0], image_centre[1] + offset[1]
        z0 = u(-400.0, -100.0)
        z_base = z0 + margin[0]
        z_apex = z_base + lung_height
        n_z = int(np.ceil((lung_height + margin[0] + margin[1]) / dz)) + 1
        # Rounded as the header will store them, so the rendering and the file agree exactly.
        spacing_xy = round(spacing_xy, 6)
        origin = (*(round(c - 0.5 * (n_xy - 1) * spacing_xy, 4) for c in image_centre), round(z0, 4))
        grid = ScanGrid((n_xy, n_xy, n_z), (spacing_xy, spacing_xy, dz), origin, None if thickness == dz else thickness)

        # The chest wall is a share of the body's half-width, so the lungs of the small chests stay ~120 mm wide.
        wall = a * (u(0.2, 0.26) if full_size else u(0.27, 0.33))
        rib_radial = max(2.2, 3.5 * s)  # half-thickness of a rib across the chest wall
        rib_depth = wall - u(1.5, 3.0) - rib_radial
        fat = min(a * u(0.04, 0.11), rib_depth - rib_radial - 3.0)  # at least 3 mm of muscle over the ribs
        pitch = lung_height / u(9.5, 11.0)
        rib_half = (rib_radial, 0.27 * pitch)
        rib_z0 = z_apex - u(0.0, 1.0) * pitch
        first_rib = int(np.floor((z_base - 0.5 * pitch - rib_z0) / pitch))

        zeta_carina = u(0.58, 0.66)
        z_carina = z_base + zeta_carina * lung_height
        spine_y = cy + 0.3 * b
        vertebra_radius = 18.0 * s
        canal_radius = 8.0 * s
        oesophagus_radius = 7.0 * s
        trachea_radius = 9.0 * s
        airway_wall = 2.0 * s**0.5 + 0.5
        trachea_x = cx + u(-3.0, 3.0) * s
        trachea_y = spine_y - vertebra_radius - 2 * oesophagus_radius - trachea_radius - airway_wall - 2.0 * s
        hilum_x = trachea_radius + 26.0 * s
        hilum = (
            (cx - hilum_x, trachea_y + 6.0 * s, z_carina - 14.0 * s),
            (cx + hilum_x + 4.0 * s, trachea_y + 8.0 * s, z_carina - 20.0 * s),
        )
        z_top = z0 + dz * (n_z - 1) + 20.0
        z_bottom = z0 - 20.0
        carina = (trachea_x, trachea_y, z_carina)
        aorta_r = 12.0 * s
        asc = (cx - 4.0 * s, trachea_y - trachea_radius - aorta_r - 10.0 * s)
        desc = (cx + 0.6 * vertebra_radius + aorta_r, spine_y - vertebra_radius + 0.2 * aorta_r)
        z_arch = z_carina + u(14.0, 22.0) * s
        heart_centre = (cx + 0.12 * a, cy - 0.22 * b, z_base + 0.22 * lung_height)
        heart_axes = (0.32 * a, 0.45 * b, 0.36 * lung_height)
        tissue = HU["muscle"]
        tubes = (
            Tube((*asc, heart_centre[2] + 0.5 * heart_axes[2]), (*asc, z_arch), aorta_r, HU["blood"]),
            Tube((asc[0], asc[1], z_arch), (desc[0], desc[1], z_arch), aorta_r * 0.92, HU["blood"]),
            Tube((desc[0], desc[1], z_arch), (desc[0], desc[1], z_bottom), aorta_r * 0.85, HU["blood"]),
            Tube(
                (trachea_x + 2.0 * s, spine_y - vertebra_radius - oesophagus_radius - 1.0, z_top),
                (cx + 6.0 * s, spine_y - vertebra_radius - oesophagus_radius, z_bottom),
                oesophagus_radius,
                tissue,
            ),
            Tube((trachea_x, trachea_y, z_top), carina, trachea_radius + airway_wall, tissue),
            Tube(carina, hilum[0], 0.75 * trachea_radius + airway_wall, tissue),
            Tube(carina, hilum[1], 0.68 * trachea_radius + airway_wall, tissue),
        )
        # The bronchial lumen stops short of the hilum, so the rounded end of the wall seals it: the air of the airways
        # is not connected to the lungs' (on a real scan the bronchial wall separates them at this resolution too).
        lumen = (Tube(tubes[4].start, carina, trachea_radius, HU["air"]),) + tuple(
            Tube(carina, tuple(np.add(carina, 0.92 * np.subtract(t.end, carina))), t.radius - airway_wall, HU["air"])
            for t in tubes[5:]
        )
        padded = rng.uniform() < 0.7
        # Major fissures run from high at the back to low at the front (45-60 degrees), the right minor fissure is a
        # shallow dome in front of the right major one at about the fourth rib.
        major = [
            Fissure(side, z_base + u(0.4, 0.5) * lung_height, cy + 0.05 * b, u(0.4, 0.9), u(1, 1.6), u(2, 8) / s / 1e3)
            for side in (-1.0, 1.0)
        ]
        minor = Fissure(-1.0, z_base + u(0.52, 0.62) * lung_height, cy - 0.2 * b, u(-0.1, 0.1), u(-0.05, 0.15),
                        u(4, 12) * 1e-3 / s, minor=True)  # fmt: skip
        fissures = (*major, minor)
        band = (u(60.0, 250.0), u(2.0, 6.0)) if rng.uniform() < 0.4 else (0.0, 1.0)
        return cls(
            grid=grid,
            cx=cx,
            cy=cy,
            a=a,
            b=b,
            p=u(2.0, 2.6),
            fat=fat,
            wall=wall,
            rib_depth=rib_depth,
            rib_half=rib_half,
            rib_pitch=pitch,
            rib_slope=2.5 * pitch / np.pi,
            rib_z0=rib_z0,
            rib_count=(first_rib, 0),
            z_base=z_base,
            z_apex=z_apex,
            lung_x=0.48 * a,
            lung_y=0.05 * b,
            apex_axes=(0.3 * a, 0.45 * b),
            apex_height=0.3 * lung_height,
            dome_y=-0.1 * b,
            dome_axes=(0.42 * a, 0.75 * b),
            dome_height=(u(0.22, 0.3) * lung_height, u(0.16, 0.24) * lung_height),
            mediastinum_half=u(9.0, 13.0) * s,
            mediastinum_bulge=u(0.08, 0.14) * a,
            heart_centre=heart_centre,
            heart_axes=heart_axes,
            spine_y=spine_y,
            vertebra_radius=vertebra_radius,
            canal_radius=canal_radius,
            disc_pitch=u(0.9, 1.1) * pitch,
            hilum=hilum,
            hilum_radius=14.0 * s,
            tubes=tubes,
            airway_lumen=lumen,
            lung_hu=u(-900.0, -850.0),
            lung_gradient_hu=u(20.0, 110.0),
            dependent_band=band,
            fissures=fissures,
            fov_radius=0.5 * n_xy * spacing_xy if padded else None,
        )

    def plane(self, x: np.ndarray | None = None, y: np.ndarray | None = None) -> Plane:
        """2D maps over world axes ``x``, ``y`` (mm); the scan's own in-plane axes by default."""
        return Plane(self.grid.axis(0) if x is None else x, self.grid.axis(1) if y is None else y, self)

    def scale_at(self, z: float) -> float:
        """Relative size of the axial cross-section at height ``z``: widest at mid-chest, narrower towards the neck."""
        zeta = (z - self.z_base) / (self.z_apex - self.z_base)
        return float(1.0 - 0.08 * np.clip(zeta - 0.45, 0.0, 1.2) ** 2 / 0.3)

    def _tube_zone(self, plane: Plane, z: float, margin: float) -> np.ndarray:
        """Points of the plane within ``margin`` mm of a tube's wall at height ``z`` (mediastinal organs)."""
        zone = np.zeros(plane.radial.shape, dtype=bool)
        for tube in self.tubes:
            a, b = np.asarray(tube.start), np.asarray(tube.end)
            reach = tube.radius + margin
            if not min(a[2], b[2]) - reach <= z <= max(a[2], b[2]) + reach:
                continue
            lo, hi = np.minimum(a, b) - reach, np.maximum(a, b) + reach
            rows, cols = plane.window(lo[0], hi[0], lo[1], hi[1])
            px = plane.x[cols][None, :] - a[0]
            py = plane.y[rows][:, None] - a[1]
            ab = b - a
            t = np.clip((px * ab[0] + py * ab[1] + (z - a[2]) * ab[2]) / (ab @ ab), 0.0, 1.0)
            d2 = (px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
            zone[rows, cols] |= d2 < reach**2
        return zone

    def regions(self, plane: Plane, z: float) -> dict[str, np.ndarray]:
        """Boolean maps of the plane at height ``z``: ``body``, ``inner`` (inside the ribcage), ``lung``, ``heart``
        (with its fat), ``abdomen`` (below the diaphragm) and the ``depth`` (mm) below the skin."""
        c = self.scale_at(z)
        depth = plane.ray_radius * c - plane.radial
        inner = depth > self.wall
        above_diaphragm = z > plane.diaphragm_z
        hx, hy, hz = self.heart_centre
        ha = self.heart_axes
        heart = ((plane.dx - (hx - self.cx)) / ha[0]) ** 2 + ((plane.dy - (hy - self.cy)) / ha[1]) ** 2 < 1.0 - (
            (z - hz) / ha[2]
        ) ** 2
        s = self.scale
        mediastinum = np.abs(plane.dx) < plane.mediastinum_half
        r = self.vertebra_radius
        spine_dy = plane.dy - (self.spine_y - self.cy + 0.6 * r)
        spine_zone = (plane.dx / (r + 9.0 * s)) ** 2 + (spine_dy / (2.2 * r)) ** 2 < 1.0
        for hxyz in self.hilum:
            if abs(z - hxyz[2]) < 1.6 * self.hilum_radius:
                r2 = self.hilum_radius**2 * (1.0 - ((z - hxyz[2]) / (1.6 * self.hilum_radius)) ** 2)
                mediastinum |= (plane.dx - (hxyz[0] - self.cx)) ** 2 + (plane.dy - (hxyz[1] - self.cy)) ** 2 < r2
        apex_start = self.z_apex - self.apex_height
        lung = inner & above_diaphragm & ~mediastinum & ~spine_zone & ~heart & ~self._tube_zone(plane, z, 3.0)
        if z > apex_start:
            # The cross-section shrinks to the apex ellipse and then to nothing: a dome without a step at its base.
            lung &= plane.apex_e < APEX_SPREAD * (1.0 - (z - apex_start) / self.apex_height) ** 1.5
        return {
            "depth": depth,
            "body": depth > 0,
            "inner": inner,
            "lung": lung,
            "heart": heart & inner & above_diaphragm,
            "abdomen": inner & ~above_diaphragm,
        }

    def render_slice(self, plane: Plane, z: float, texture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32) and lung mask of the axial slice at height ``z`` before vessels, nodules, blur and noise.

        ``texture`` is a unit-variance low-frequency field on the plane that gives the parenchyma its texture.
        """
        reg = self.regions(plane, z)
        depth = reg["depth"]
        hu = np.full(depth.shape, HU["air"], dtype=np.float32)
        hu[reg["body"]] = HU["muscle"]
        hu[reg["body"] & (depth < self.fat)] = HU["fat"]
        self._paint_bones(plane, z, depth, hu)
        hu[reg["inner"]] = HU["mediastinal_fat"]
        hx, hy, hz = self.heart_centre
        ha = np.asarray(self.heart_axes) * 0.88  # myocardium and blood inside a rim of epicardial fat
        muscle = ((plane.dx - (hx - self.cx)) / ha[0]) ** 2 + ((plane.dy - (hy - self.cy)) / ha[1]) ** 2 < 1.0 - (
            (z - hz) / ha[2]
        ) ** 2
        hu[reg["heart"] & muscle] = HU["blood"]
        for hxyz in self.hilum:
            if abs(z - hxyz[2]) < 1.6 * self.hilum_radius:
                near_x, near_y = plane.dx - (hxyz[0] - self.cx), plane.dy - (hxyz[1] - self.cy)
                near = near_x**2 + near_y**2 < self.hilum_radius**2
                hu[reg["inner"] & near & ~reg["lung"]] = HU["muscle"]
        abdomen = reg["abdomen"]
        hu[abdomen] = np.where(plane.is_right[abdomen], HU["liver"], HU["spleen"])
        self._paint_spine(plane, z, hu)
        lung = reg["lung"]
        # Parenchyma: denser towards the back (dependent lung), with low-frequency texture.
        gradient = self.lung_gradient_hu * np.clip((plane.dy[:, 0] / self.b + 0.3) / 1.2, 0.0, 1.0)
        parenchyma = self.lung_hu + gradient[:, None] + 22.0 * texture
        if self.dependent_band[0] > 0:
            # Subpleural density at the back (dependent atelectasis of a supine patient), fading inwards.
            back = np.clip(1.0 - plane.phi / 1.1, 0.0, 1.0)
            inward = np.maximum(depth - self.wall, 0.0)
            parenchyma = parenchyma + self.dependent_band[0] * back * np.exp(-inward / self.dependent_band[1])
        values = np.broadcast_to(parenchyma, hu.shape)[lung]
        hu[lung] = self._add_fissures(plane, z, lung, values)
        return hu, lung

    def _add_fissures(self, plane: Plane, z: float, lung: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``values`` (HU of the ``lung`` pixels) with the fissures crossing the slice at ``z`` composited in.

        A fissure is a sheet thinner than a voxel: its share of a voxel (the sheet's profile filtered by the voxel's
        extent along the sheet's normal: the in-plane width times the normal's in-plane part, plus the slice
        thickness times its z part) moves the voxel towards pleura. So a fissure is a thin grey line where it cuts the
        slice steeply and a faint broad haze where it lies nearly in the slice, as on real CT.
        """
        dx, dy = np.broadcast_arrays(plane.dx, plane.dy)
        dx, dy = dx[lung], dy[lung] + self.cy
        width, thickness = self.grid.spacing[0], self.grid.slice_thickness
        out = values
        major = {}
        for fissure in self.fissures:
            on_side = np.sign(dx) == fissure.side
            u = np.abs(dx) - self.lung_x
            v = dy - fissure.y0
            height = fissure.z0 + fissure.gx * u + fissure.gy * v - fissure.curvature * (u**2 + v**2)
            if not fissure.minor:
                major[fissure.side] = height
            else:
                on_side &= major[fissure.side] < z  # in front of (above) the major fissure: upper vs middle lobe
            slope = np.hypot(fissure.gx - 2 * fissure.curvature * u, fissure.gy - 2 * fissure.curvature * v)
            norm = np.sqrt(1.0 + slope**2)
            distance = (z - height) / norm
            extent = (width * slope + thickness) / norm
            near = on_side & (np.abs(distance) < FISSURE_HALF_MM + extent)
            if near.any():
                share = _sheet_share(distance[near], FISSURE_HALF_MM, extent[near])
                out[near] += share * (HU["pleura"] - out[near])
        return out

    def heart_motion(self, plane: Plane, z: float) -> np.ndarray | None:
        """Weight (0-1) of cardiac motion blur on the slice at ``z``: 1 in the heart, fading over 15 mm into the lung
        beside it (more on the left, where the ventricles beat); None when the slice misses the heart."""
        hx, hy, hz = self.heart_centre
        ha = self.heart_axes
        level = 1.0 - ((z - hz) / ha[2]) ** 2
        if level <= 0.0:
            return None
        e = np.sqrt(((plane.dx - (hx - self.cx)) / ha[0]) ** 2 + ((plane.dy - (hy - self.cy)) / ha[1]) ** 2)
        outside_mm = np.maximum(e - np.sqrt(level), 0.0) * 0.5 * (ha[0] + ha[1])
        side = np.where(plane.dx > hx - self.cx, 1.0, 0.6)
        return (np.clip(1.0 - outside_mm / 15.0, 0.0, 1.0) * side).astype(np.float32)

    def _paint_bones(self, plane: Plane, z: float, depth: np.ndarray, hu: np.ndarray) -> None:
        """Ribs (cortex and marrow) with their costal cartilages, the sternum and the scapulae, into ``hu``."""
        radial_off = depth - self.rib_depth
        band = np.abs(radial_off) < self.rib_half[0]
        g = z + plane.rib_phase[band] - self.rib_z0
        k = np.round(g / self.rib_pitch)
        along_z = g - k * self.rib_pitch
        e = (radial_off[band] / self.rib_half[0]) ** 2 + (along_z / self.rib_half[1]) ** 2
        phi = plane.phi[band]
        in_rib = (e < 1.0) & (k >= self.rib_count[0]) & (k <= self.rib_count[1]) & (phi > 0.42)
        bone = in_rib & (phi < 2.45)
        values = hu[band]
        values[bone] = np.where(e[bone] > 0.4, HU["cortical_bone"], HU["cancellous_bone"])
        values[in_rib & (phi >= 2.45) & (phi < 2.95)] = HU["cartilage"]
        sternum_zone = (phi >= 2.95) & (z > self.z_base + 0.3 * (self.z_apex - self.z_base))
        values[sternum_zone] = np.where(np.abs(radial_off[band][sternum_zone]) > 0.6 * self.rib_half[0], 450.0, 200.0)
        hu[band] = values
        if z > self.z_base + 0.45 * (self.z_apex - self.z_base):
            s = self.scale
            scapula = (np.abs(depth - (self.fat + 3.0 * s**0.5)) < 1.5 * s**0.5 + 0.5) & (plane.phi > 0.6)
            scapula &= plane.phi < 1.25
            hu[scapula] = 500.0

    def _paint_spine(self, plane: Plane, z: float, hu: np.ndarray) -> None:
        """Vertebral body (cortex, cancellous bone, discs), spinal canal and posterior elements, into ``hu``."""
        s, r = self.scale, self.vertebra_radius
        rows, cols = plane.window(self.cx - r - 30 * s, self.cx + r + 30 * s, self.spine_y - r - 2, self.cy + self.b)
        dx = plane.dx[:, cols]
        dy = plane.y[rows][:, None] - self.spine_y
        view = hu[rows, cols]
        dist = np.hypot(dx, dy)
        in_disc = abs(((z - self.rib_z0) % self.disc_pitch) - 0.5 * self.disc_pitch) > 0.5 * self.disc_pitch - 2.5 * s
        view[dist < r] = HU["disc"] if in_disc else HU["cancellous_bone"]
        if not in_disc:
            view[(dist < r) & (dist > r - 1.5 * s**0.5 - 0.5)] = HU["cortical_bone"]
        canal_y = r + self.canal_radius + 2.0 * s
        canal_dist = np.hypot(dx, dy - canal_y)
        arch = (canal_dist < self.canal_radius + 4.0 * s) & (canal_dist >= self.canal_radius) & (dy > r)
        spinous = (dx / (3.5 * s)) ** 2 + ((dy - canal_y - self.canal_radius - 11.0 * s) / (12.0 * s)) ** 2 < 1.0
        transverse = ((np.abs(dx) - self.canal_radius - 12.0 * s) / (12.0 * s)) ** 2 + (
            (dy - canal_y + 1.0 * s) / (4.5 * s)
        ) ** 2 < 1.0
        view[arch | spinous | transverse] = 550.0
        view[canal_dist < self.canal_radius] = HU["csf"]


def _sheet_share(distance: np.ndarray, half: float, extent: np.ndarray) -> np.ndarray:
    """Share of a voxel of ``extent`` mm (along the sheet's normal), centred ``distance`` mm from a sheet of
    half-thickness ``half`` mm, that the sheet fills: its box profile filtered by the voxel's box."""
    lo = np.maximum(distance - 0.5 * extent, -half)
    hi = np.minimum(distance + 0.5 * extent, half)
    return np.clip((hi - lo) / extent, 0.0, 1.0)


class LungField:
    """The lungs on a coarse isotropic grid of ``spacing`` mm with their distance map: for each point, how deep (mm)
    it lies inside the lungs (0 outside). Vessel growth and nodule placement query it instead of the full scan."""

    def __init__(self, anatomy: ChestAnatomy, spacing: float) -> None:
        an = anatomy
        self.spacing = spacing
        self.first = np.array([an.cx - an.a, an.cy - an.b, an.z_base - 2.0 * spacing])
        x = np.arange(self.first[0], an.cx + an.a, spacing)
        y = np.arange(self.first[1], an.cy + an.b, spacing)
        z = np.arange(self.first[2], an.z_apex + 2.0 * spacing, spacing)
        plane = an.plane(x, y)
        mask = np.stack([an.regions(plane, float(zz))["lung"] for zz in z])
        self.depth = ndimage.distance_transform_edt(mask, sampling=spacing).astype(np.float32)

    def depth_at(self, points: np.ndarray) -> np.ndarray:
        """Depth (mm) inside the lungs of ``points`` ``(n, 3)`` (LPS mm), nearest coarse voxel; 0 outside."""
        idx = np.rint((np.atleast_2d(points) - self.first) / self.spacing).astype(int)[:, ::-1]
        inside = np.all((idx >= 0) & (idx < self.depth.shape), axis=1)
        out = np.zeros(len(idx), dtype=np.float32)
        out[inside] = self.depth[tuple(idx[inside].T)]
        return out

    def sample(self, rng: np.random.Generator, lo: float, hi: float, size: int | None = None) -> np.ndarray | None:
        """Random points (LPS mm) whose depth inside the lungs is in ``[lo, hi)`` mm, uniform over that region: one
        ``(3,)`` point, or ``(size, 3)``; None if the region is empty.

        Points are jittered within their coarse voxel, so ``lo`` should include about one coarse voxel of margin.
        """
        candidates = np.flatnonzero((self.depth >= lo) & (self.depth < hi))
        if candidates.size == 0:
            return None
        k, j, i = np.unravel_index(rng.choice(candidates, size=size), self.depth.shape)
        jitter = rng.uniform(-0.5, 0.5, size=(1 if size is None else size, 3)) * self.spacing
        points = self.first + np.column_stack([i, j, k]) * self.spacing + jitter
        return points[0] if size is None else points
