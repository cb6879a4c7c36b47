"""Deterministic synthetic head-CT phantoms with intracranial hemorrhage (the embedded default dataset).

No real data can be downloaded where this toolkit is developed and tested, so demos, tests and tutorials
run on phantoms instead: non-contrast head CT in Hounsfield units with scalp, a skull of varying
thickness (cortical tables and diploe), skull base, sinuses, orbits, grey and white matter, deep grey
nuclei, brainstem, cerebellum, lateral/third/fourth ventricles, basal cisterns, sylvian and
interhemispheric fissures and cortical sulci, sampled on a clinical 5 mm-slice grid with partial-volume
averaging and correlated noise.

Two domains mimic the transfer-learning setting of the seed paper (TBI source -> SAH target):

* ``"tbi"``: contusions / intraparenchymal blobs, subdural crescents, epidural lenses; about one case in
  seven has no bleed.
* ``"sah"``: blood spreading from an aneurysm site through the basal cisterns, sylvian fissures,
  interhemispheric fissure and cortical sulci (sometimes the ventricles): thin and branching.

Hemorrhage volumes cycle through the seed paper's bins (0-25, 25-50, 50-100, 100-225 mL) by case index,
with a random target inside the bin; the bleed is grown until its labelled volume reaches the target.
The label is every voxel whose blood fraction (after slice averaging) is at least 0.5.

Determinism: a case depends only on ``(domain, seed, index)`` (and the grid arguments), through
``numpy.random.SeedSequence([seed, domain_code, index])``; generating 3 or 300 cases gives the same arrays
for the shared indices. Only numpy and scipy.ndimage are used for generation (nibabel to write files).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .dataset import atomic_write_bytes, save_nifti

__all__ = [
    "GENERATOR_VERSION",
    "DOMAINS",
    "HEMORRHAGE_TYPES",
    "TYPE_LABELS",
    "parse_types",
    "VOLUME_BINS_ML",
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "case_id",
    "target_volume_ml",
    "generate_case",
    "write_dataset",
    "phantom_affine",
]

GENERATOR_VERSION = "1.0"
DOMAINS = ("tbi", "sah", "ich")
_DOMAIN_CODE = {"tbi": 1, "sah": 2, "ich": 3}
# Multi-class labels of the "ich" domain: the five types of BHSD (Wu et al. 2023), in the order its data card lists
# them (EDH, IPH, IVH, SAH, SDH), values 1-5. Which integer BHSD's own files use is not verified here (see
# data_cards/bhsd.md); a converted BHSD dataset states its own mapping in dataset.json and medlora reads it from there.
HEMORRHAGE_TYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
TYPE_LABELS = {t: i + 1 for i, t in enumerate(HEMORRHAGE_TYPES)}
_TYPE_ALIASES = {"edh": "epidural", "iph": "intraparenchymal", "contusion": "intraparenchymal",
                 "ivh": "intraventricular", "sah": "subarachnoid", "sdh": "subdural"}
# Volume caps (mL) of one type inside a mixed case: larger epidurals are implausible (as in the tbi domain) and
# intraventricular blood is bounded by the distended ventricles; the rest of the case's share is not moved elsewhere.
_TYPE_MAX_ML = {"epidural": 60.0, "intraventricular": 40.0}
VOLUME_BINS_ML: tuple[tuple[float, float], ...] = ((0.0, 25.0), (25.0, 50.0), (50.0, 100.0), (100.0, 225.0))
DEFAULT_SHAPE = (96, 96, 32)
DEFAULT_SPACING = (2.0, 2.0, 5.0)
_EMPTY_EVERY = 7  # tbi cases with index % 7 == 6 carry no bleed (~14%)
_MIN_FOV_MM = (180.0, 180.0, 100.0)

_F32 = np.float32
# Reference head (half-axes, mm) in which all internal landmarks below are specified; each case scales them.
_REF_AXES = np.array([74.0, 87.0, 83.0])


# ------------------------------------------------------------------------------------ small helpers


def _ramp(sd: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre is at signed distance ``sd`` (mm, < 0 inside)."""
    return np.clip(0.5 - sd * (1.0 / width), 0.0, 1.0)


def _slab(d: np.ndarray, half: float | np.ndarray, width: float) -> np.ndarray:
    """Fraction of a voxel (1-D box of ``width``) covered by a sheet of half-thickness ``half`` whose
    mid-plane is ``d`` (>= 0) away; exact for a box filter, so sub-voxel sheets (sulci) get their share."""
    hw = 0.5 * width
    return np.clip(np.minimum(d + half, hw) - np.maximum(d - half, -hw), 0.0, None) * (1.0 / width)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _sd_ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, r: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid centred at 0 (exact on the surface)."""
    a, b, c = (float(v) for v in r)
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    k1 = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2 + (z / (c * c)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _rotation(pitch: float, roll: float, yaw: float) -> np.ndarray:
    """Head-frame -> world rotation (degrees): pitch about x (gantry-tilt-like), roll about y, yaw about z."""
    p, r, y = (math.radians(v) for v in (pitch, roll, yaw))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(r), 0, math.sin(r)], [0, 1, 0], [-math.sin(r), 0, math.cos(r)]])
    rz = np.array([[math.cos(y), -math.sin(y), 0], [math.sin(y), math.cos(y), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Unit-variance Gaussian random field (smoothed white noise), float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=_F32), sigma_vox, truncate=2.5)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS+ affine with ``spacing`` on the diagonal and the volume centre at world (0, 0, 0)."""
    aff = np.eye(4)
    for i in range(3):
        aff[i, i] = float(spacing[i])
        aff[i, 3] = -0.5 * (int(shape[i]) - 1) * float(spacing[i])
    return aff


def case_id(domain: str, index: int) -> str:
    """Case identifier used in file names, e.g. ``SAH_000``."""
    return f"{_check_domain(domain).upper()}_{index:03d}"


def _check_domain(domain: str) -> str:
    d = str(domain).lower()
    if d not in _DOMAIN_CODE:
        raise ValueError(f"unknown phantom domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return d


def target_volume_ml(domain: str, seed: int, index: int, volume_bins: Sequence[int] | None = None
                     ) -> tuple[float, int]:
    """Scheduled hemorrhage volume (mL) and bin index for a case (bin -1: no bleed).

    Bins cycle with the case index so every small dataset covers all four; the value inside a bin is
    drawn from the case's own seed, away from the bin edges so the achieved volume stays in the bin.
    ``volume_bins`` restricts the cycle to those bin indices (a site that sees mostly small or mostly large
    bleeds); None cycles through all of them.
    """
    domain = _check_domain(domain)
    if domain == "tbi" and index % _EMPTY_EVERY == _EMPTY_EVERY - 1:
        return 0.0, -1
    bins = _check_bins(volume_bins)
    b = index % len(VOLUME_BINS_ML) if bins is None else bins[index % len(bins)]
    lo, hi = VOLUME_BINS_ML[b]
    lo = max(lo, 3.0)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _DOMAIN_CODE[domain], int(index), 99]))
    u = float(rng.uniform(0.08, 0.92))
    return lo + u * (hi - lo), b


def _check_bins(volume_bins: Sequence[int] | None) -> list[int] | None:
    if volume_bins is None:
        return None
    bins = [int(b) for b in volume_bins]
    if not bins or any(not 0 <= b < len(VOLUME_BINS_ML) for b in bins):
        raise ValueError(f"volume_bins must list bin indices 0-{len(VOLUME_BINS_ML) - 1} "
                         f"({', '.join(f'{lo:g}-{hi:g} mL' for lo, hi in VOLUME_BINS_ML)}), got {list(volume_bins)}")
    return bins


def parse_types(groups: Sequence[str | Sequence[str]] | None) -> tuple[tuple[str, ...], ...]:
    """The per-case type mix of an ``"ich"`` cohort: one group of types per entry, cases cycle through the groups.

    An entry is a type name, a ``+``-joined string (``"subarachnoid+intraventricular"``: both in the same case) or a
    sequence of names. Names are those of :data:`HEMORRHAGE_TYPES` or the abbreviations edh, iph (contusion), ivh,
    sah, sdh. Each group comes back sorted in label order without repeats. None: the five types, one per case.
    """
    if groups is None:
        return tuple((t,) for t in HEMORRHAGE_TYPES)
    if isinstance(groups, str):
        groups = [g for g in groups.replace(",", " ").split() if g]
    out = []
    for group in groups:
        names = group.split("+") if isinstance(group, str) else list(group)
        canon = set()
        for name in names:
            key = str(name).strip().lower()
            key = _TYPE_ALIASES.get(key, key)
            if key not in TYPE_LABELS:
                raise ValueError(f"unknown hemorrhage type {name!r}; choose from {', '.join(HEMORRHAGE_TYPES)} "
                                 f"(or {', '.join(_TYPE_ALIASES)}), '+' joins types of one case")
            canon.add(key)
        if not canon:
            raise ValueError(f"empty group of hemorrhage types in {list(groups)!r}")
        out.append(tuple(sorted(canon, key=TYPE_LABELS.__getitem__)))
    if not out:
        raise ValueError("types: give at least one hemorrhage type")
    return tuple(out)


# --------------------------------------------------------------------------------------------- grid


class _Grid:
    """The fine sampling grid: in-plane as the output, ``zsub`` samples per slice in z (averaged at the end
    to model the 5 mm slice profile). Holds the HU canvas and optional tissue-fraction maps."""

    def __init__(self, shape, spacing, zsub, centre, rot, maps: bool):
        nx, ny, nz = shape
        sx, sy, sz = spacing
        self.shape = tuple(shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.zsub = zsub
        self.fshape = (nx, ny, nz * zsub)
        self.w = float(min(sx, sy))  # in-plane voxel size: width of partial-volume ramps
        self.rot = rot
        self.centre = np.asarray(centre, dtype=np.float64)
        kz = (np.arange(nz * zsub) + 0.5) / zsub - 0.5
        self.axes = (
            (np.arange(nx) - 0.5 * (nx - 1)) * sx - self.centre[0],
            (np.arange(ny) - 0.5 * (ny - 1)) * sy - self.centre[1],
            (kz - 0.5 * (nz - 1)) * sz - self.centre[2],
        )
        self.full = (slice(None),) * 3
        self.qx, self.qy, self.qz = self.q(self.full)
        self.hu = np.full(self.fshape, -1000.0, dtype=_F32)
        self.maps = {k: np.zeros(self.fshape, _F32) for k in ("soft", "bone", "brain", "csf", "blood")} \
            if maps else None

    def q(self, sl):
        """Head-frame coordinates (mm) of a block of the fine grid."""
        xs = self.axes[0][sl[0]].astype(_F32)[:, None, None]
        ys = self.axes[1][sl[1]].astype(_F32)[None, :, None]
        zs = self.axes[2][sl[2]].astype(_F32)[None, None, :]
        rt = self.rot.T.astype(_F32)
        return tuple(rt[i, 0] * xs + rt[i, 1] * ys + rt[i, 2] * zs for i in range(3))

    def box(self, centre, half):
        """Slices of the fine grid that cover the head-frame box ``centre +- half`` (None if outside)."""
        c = np.asarray(centre, float)
        h = np.asarray(half, float)
        corners = np.array([[c[0] + sx * h[0], c[1] + sy * h[1], c[2] + sz * h[2]]
                            for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        world = corners @ self.rot.T
        out = []
        for i in range(3):
            ax = self.axes[i]
            lo = int(np.searchsorted(ax, world[:, i].min(), side="left"))
            hi = int(np.searchsorted(ax, world[:, i].max(), side="right"))
            lo, hi = max(lo - 1, 0), min(hi + 1, len(ax))
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def paint(self, sl, alpha, value, tissue: str | None) -> None:
        """Alpha-composite ``value`` over the canvas (and the tissue maps) on index ``sl``."""
        views = all(isinstance(s, slice) for s in sl)
        h = self.hu[sl]
        h += alpha * (value - h)
        if not views:
            self.hu[sl] = h
        if self.maps is not None:
            for name, m in self.maps.items():
                mv = m[sl]
                mv *= 1.0 - alpha
                if name == tissue:
                    mv += alpha
                if not views:
                    m[sl] = mv

    def to_coarse(self, fine: np.ndarray) -> np.ndarray:
        nx, ny, nz = self.shape
        return fine.reshape(nx, ny, nz, self.zsub).mean(axis=-1, dtype=np.float64).astype(_F32)


# ------------------------------------------------------------------------------------------ phantom


class _Phantom:
    def __init__(self, domain, seed, index, shape, spacing, tilt_deg, noise_sigma, zsub, maps, head_scale=1.0):
        self.domain, self.seed, self.index = domain, seed, index
        ss = np.random.SeedSequence([int(seed), _DOMAIN_CODE[domain], int(index)])
        rng_anat, self.rng_bleed, self.rng_noise = (np.random.default_rng(s) for s in ss.spawn(3))
        r = rng_anat
        # Every draw happens unconditionally and in a fixed order, so a parameter such as tilt_deg=0
        # changes only what it names and never shifts the random stream of the rest.
        self.ax, self.ay, self.azt = r.uniform(68, 79), r.uniform(82, 89), r.uniform(78, 87)
        if head_scale != 1.0:  # a population with larger or smaller heads; the random stream is unchanged
            self.ax, self.ay, self.azt = (v * head_scale for v in (self.ax, self.ay, self.azt))
        self.azb = 115.0
        self.shape_c = np.clip(r.normal(0.0, 1.0, 8), -2.5, 2.5)
        offset = r.uniform([-3, -3, 4], [3, 3, 12])
        tilt_u = r.uniform(-1, 1, 3)
        self.scalp_t = r.uniform(4.0, 6.5)
        self.skull_t0 = r.uniform(5.0, 6.5)
        self.skull_c = r.normal(0.0, 0.7, 4)
        self.atrophy = r.beta(1.5, 2.5)
        self.gap = 1.0 + 2.0 * self.atrophy + r.uniform(0, 0.5)
        self.ctx = r.uniform(2.5, 3.5)
        self.hu_gm, self.hu_wm = r.uniform(36, 41), r.uniform(24, 28.5)
        self.hu_csf, self.hu_scalp = r.uniform(4, 10), r.uniform(30, 50)
        self.hu_cort, self.hu_dipl = r.uniform(1300, 1700), r.uniform(350, 650)
        self.sulc_depth = r.uniform(10, 16)
        self.sulc_half = 0.35 + 0.6 * self.atrophy
        self.fiss_half = 0.8 + 1.0 * self.atrophy
        self.vent_scale = 0.85 + 0.7 * self.atrophy
        self.mid_c = r.normal(0.0, 1.0, 2)
        self.choroid = r.uniform(size=2) < 0.5
        self.frontal_sinus = r.uniform() < 0.75
        self.sulc_sigma = r.uniform(3.8, 4.6)
        self.sylv_phase = r.uniform(0, 2 * np.pi, (2, 3))
        self.default_noise = r.uniform(3.0, 6.0)
        self.rng_tex = np.random.default_rng(r.integers(2**63))

        nx, ny, nz = shape
        fov_top = 0.5 * nz * spacing[2]
        centre = (offset[0], offset[1], fov_top - self.azt - offset[2])
        self.tilt = (float(tilt_u[0] * tilt_deg), float(tilt_u[1] * tilt_deg * 0.5),
                     float(tilt_u[2] * tilt_deg * 0.5))
        self.noise_sigma = self.default_noise if noise_sigma is None else float(noise_sigma)
        self.g = _Grid(shape, spacing, zsub, centre, _rotation(*self.tilt), maps)
        self.S = np.array([self.ax, self.ay, self.azt]) / _REF_AXES
        self.sah_structs: list[tuple] = []
        self.info: dict[str, Any] = {}

    # Reference-head landmark -> this head (mm, head frame).
    def P(self, x, y, z):
        return np.array([x, y, z]) * self.S

    # ---------------------------------------------------------------------------------- anatomy

    def anatomy(self) -> None:
        g = self.g
        qx, qy, qz = g.qx, g.qy, g.qz
        w = g.w
        sx, sy, sz = self.S
        dz = g.spacing[2] / g.zsub
        self.tex = _smooth_noise(self.rng_tex, g.fshape, (2.5 / g.spacing[0], 2.5 / g.spacing[1], 2.5 / dz))

        # Head outline: ellipsoid (taller below the centre, towards the neck) plus a smooth shape modulation.
        az = np.where(qz > 0, _F32(self.azt), _F32(self.azb))
        xa, ya, za = qx / _F32(self.ax), qy / _F32(self.ay), qz / az
        k0 = np.sqrt(xa * xa + ya * ya + za * za)
        k1 = np.sqrt((xa / self.ax) ** 2 + (ya / self.ay) ** 2 + (za / az) ** 2)
        inv = 1.0 / np.maximum(k0, 1e-6)
        ux, uy, uz = xa * inv, ya * inv, za * inv
        c = self.shape_c
        mod = (c[0] * ux * uy + c[1] * uy * uz + c[2] * (ux * ux - uy * uy) + c[3] * uy ** 3
               + c[4] * ux * uz + c[5] * uz ** 3 + 0.6 * c[6] * ux + c[7] * uy * ux * ux)
        sd_head = k0 * (k0 - 1.0) / np.maximum(k1, 1e-6) - mod
        del k0, k1, xa, ya, za, az, mod
        self.u = (ux, uy, uz)

        # Scalp.
        g.paint(g.full, _ramp(sd_head, w), self.hu_scalp + 4.0 * self.tex, "soft")

        # Cranial floor: anterior fossa high, sella, deep temporal fossae, deepest posterior fossa (behind
        # the petrous ridges, which run postero-laterally from the dorsum sellae) with the foramen magnum.
        aqx, yr = np.abs(qx) / _F32(sx), qy / _F32(sy)
        s_ant = _sigmoid((yr - 30) / 4)
        y_ridge = -2.0 - 0.45 * aqx
        s_post = _sigmoid((y_ridge - yr) / 3)
        s_lat = _sigmoid((aqx - 17) / 4)
        fm = _sigmoid((14 - aqx) / 2.5) * _sigmoid((yr + 38) / 2.5) * _sigmoid((-yr - 6) / 2.5)
        z_temporal = -52.0 + np.minimum(12.0 * ((yr - 8.0) / 24.0) ** 2, 20.0)  # bowl-shaped middle fossa
        z_mid = -32.0 + (z_temporal + 32.0) * s_lat
        # Orbital roofs dome upwards; the cribriform plate between them sits lower.
        z_ant = -27.0 + 5.0 * np.exp(-(((aqx - 26.0) / 13.0) ** 2)) - 4.0 * np.exp(-((aqx / 6.0) ** 2))
        z_floor = (s_ant * z_ant + (1 - s_ant) * ((1 - s_post) * z_mid + s_post * (-70.0 - 40.0 * fm))) * sz
        sd_floor = (z_floor - qz).astype(_F32)
        # Skull-base thickness under the floor: thin orbital roofs, the sphenoid body and clivus in the
        # middle, dense petrous bone along the ridges.
        central = _sigmoid((13 - aqx) / 3) * _sigmoid((yr + 30) / 4) * _sigmoid((32 - yr) / 4)
        petrous = (np.exp(-(((yr - y_ridge - 4) / 9) ** 2)) * _sigmoid((aqx - 12) / 3)).astype(_F32)
        base_t = ((4.0 + 22.0 * central + 16.0 * petrous) * sz).astype(_F32)
        del s_ant, s_post, s_lat, fm, z_mid, z_temporal, z_ant, z_floor, central, y_ridge, aqx, yr

        # Skull: thicker frontally/occipitally, cortical tables around a diploe.
        sc = self.skull_c
        T = np.clip(self.skull_t0 + 1.8 * uy * uy + 0.8 * np.maximum(uz, 0) + sc[0] * ux * uy + sc[1] * uz
                    + sc[2] * ux + sc[3] * uy * uz, 4.0, 10.0).astype(_F32)
        sd_outer = sd_head + _F32(self.scalp_t)
        ds = -sd_outer  # depth below the outer table
        tt = np.minimum(T / 3.2, 2.0)
        table = np.maximum(np.exp(-((ds / tt) ** 2)), np.exp(-(((T - ds) / tt) ** 2)))
        bone = self.hu_dipl + (self.hu_cort - self.hu_dipl) * table + 60.0 * self.tex
        # Deeper than the vault (only reached below the cranial floor): skull base, petrous bone densest.
        bone = np.where(ds > T, _F32(750.0) + 700.0 * petrous + 200.0 * self.tex, bone)
        g.paint(g.full, _ramp(sd_outer, w), bone, "bone")
        del bone, table, tt, ds, petrous
        sd_cav = sd_outer + T  # inner table
        self.sd_cav = sd_cav
        del T, sd_head

        # Deep soft tissue (face, nasal cavity, neck) under the skull base.
        g.paint(g.full, _ramp(np.maximum(sd_cav, base_t - sd_floor), w), self.hu_scalp + 5.0 * self.tex,
                "soft")
        del base_t
        self._sinuses_orbits()

        # Intracranial space: CSF first, brain inside it.
        sd_ic = np.maximum(sd_cav, sd_floor)
        self.cav_a = _ramp(sd_ic, w)
        g.paint(g.full, self.cav_a, self.hu_csf, "csf")
        sd_brain = np.maximum(sd_cav + _F32(self.gap), sd_floor + _F32(1.5))
        self.depth = -sd_brain
        self.brain_a = _ramp(sd_brain, w)
        g.paint(g.full, self.brain_a, self.hu_gm + 1.8 * self.tex, "brain")
        # Convexity subarachnoid space (for SAH): the layer between brain surface and inner table.
        self.sah_structs.append((g.full, "sheet", np.abs(sd_cav + _F32(0.5 * self.gap)), 0.5 * self.gap,
                                 _ramp(sd_floor, w) * 1.0, 0.6))
        del sd_ic

        # Cerebellum (posterior fossa, under the tentorium).
        z_tent = (-16.0 - 0.2 * np.abs(qx) + 0.25 * np.minimum(qy + 10 * sy, 0)) * sz
        self.cb_a = (_ramp(qz - z_tent, 3.0) * _ramp(qy + 6 * sy, 3.0)).astype(_F32)
        del z_tent

        # White matter: deeper than the cortical ribbon, not in the cerebellum.
        wm_a = _ramp(sd_brain + _F32(self.ctx), w) * (1.0 - self.cb_a)
        g.paint(g.full, wm_a, self.hu_wm + 1.3 * self.tex, "brain")
        del wm_a, sd_brain
        cb_white = self._ellipsoids([((18, -38, -44), (11, 9, 7)), ((-18, -38, -44), (11, 9, 7))])
        for sl, sd in cb_white:
            g.paint(sl, _ramp(sd, w) * self.cb_a[sl], self.hu_wm + 3.0, "brain")

        self._sulci()
        self._deep_grey()
        self._fissures()
        self._brainstem_cisterns()
        self._ventricles()

    def _ellipsoids(self, specs):
        """[(slices, signed distance)] for reference-head ellipsoids (centre, half-axes)."""
        out = []
        for centre, radii in specs:
            c = self.P(*centre)
            r = np.asarray(radii, float) * self.S
            sl = self.g.box(c, r + 4.0)
            if sl is None:
                continue
            qx, qy, qz = self.g.q(sl)
            out.append((sl, _sd_ellipsoid(qx - c[0], qy - c[1], qz - c[2], r)))
        return out

    def _sinuses_orbits(self) -> None:
        g, w = self.g, self.g.w
        air = []
        air.append(((0, 20, -44), (12, 10, 8), -1000.0))  # sphenoid
        air.append(((0, 60, -40), (7, 13, 9), -650.0))  # ethmoid cells (septated: partial air)
        if self.frontal_sinus:
            air.append(((0, 74, -10), (13, 4, 8), -1000.0))
        for s in (-1, 1):
            air.append(((s * 50, -22, -58), (9, 9, 9), -450.0))  # mastoid air cells
        for centre, radii, hu in air:
            for sl, sd in self._ellipsoids([(centre, radii)]):
                g.paint(sl, _ramp(sd, w), hu, "soft")
        for s in (-1, 1):
            # Front of the face at the orbit's x (ellipse outline), in reference-head units.
            y_front = 0.95 * _REF_AXES[1] * math.sqrt(1.0 - (31.0 / _REF_AXES[0]) ** 2) - 3.0
            for sl, sd in self._ellipsoids([((s * 31, y_front - 22, -36), (15, 18, 12))]):
                g.paint(sl, _ramp(sd, w) * 0.9, -80.0, "soft")  # orbital fat
            c_globe = (s * 31, y_front - 12, -36)
            for sl, sd in self._ellipsoids([(c_globe, (12, 12, 12))]):
                g.paint(sl, _ramp(sd, w), 12.0, "soft")
            for sl, sd in self._ellipsoids([((c_globe[0], c_globe[1] + 10, c_globe[2]), (4, 1.8, 4))]):
                g.paint(sl, _ramp(sd, w), 110.0, "soft")

    def _sulci(self) -> None:
        """Cortical sulci: the zero set of a random field on the sphere of directions, extended radially
        through the cortex, so sulci are sheets perpendicular to the surface that branch and meander."""
        g = self.g
        r0, step = 70.0, 2.0
        n = int(2 * (r0 * 1.1) / step) + 1
        grid_field = _smooth_noise(self.rng_tex, (n, n, n), (self.sulc_sigma / step,) * 3)
        grads = np.gradient(grid_field, step)
        gmag = float(np.mean(np.sqrt(sum(gr * gr for gr in grads)))) * math.sqrt(2.0 / 3.0)
        del grads
        band_max = self.sulc_depth + self.ctx + 4.0
        shell = (self.depth > -1.0) & (self.depth < band_max) & (self.cb_a < 0.5) & (self.cav_a > 0)
        idx = np.nonzero(shell)
        qx, qy, qz = g.qx[idx], g.qy[idx], g.qz[idx]
        rad = np.sqrt(qx * qx + qy * qy + qz * qz) + 1e-3
        scale = r0 / rad
        coords = np.stack([(qx * scale + r0 * 1.1) / step, (qy * scale + r0 * 1.1) / step,
                           (qz * scale + r0 * 1.1) / step])
        f = ndimage.map_coordinates(grid_field, coords, order=1, mode="nearest").astype(_F32)
        d = np.abs(f) * rad / _F32(gmag * r0)  # distance (mm) to the sulcal mid-plane
        depth = self.depth[idx]
        D = self.sulc_depth + 3.0 * self.tex[idx]
        band_gm = _ramp(depth - D - self.ctx, 3.0)
        band = _ramp(depth - D, 3.0)
        brain = self.brain_a[idx]
        g.paint(idx, _slab(d, self.sulc_half + self.ctx, g.w) * band_gm * brain,
                self.hu_gm + 1.8 * self.tex[idx], "brain")
        g.paint(idx, _slab(d, self.sulc_half, g.w) * band * brain, self.hu_csf, "csf")
        self.sah_structs.append((idx, "sheet", d, self.sulc_half, band * brain, 1.0))

    def _deep_grey(self) -> None:
        g, w = self.g, self.g.w
        specs = []
        for s in (-1, 1):
            specs += [((s * 13, 24, 14), (5, 8, 7)),  # caudate head
                      ((s * 22, 4, 2), (6, 14, 9)),  # lentiform nucleus
                      ((s * 10, -12, 4), (7, 11, 8))]  # thalamus
        for sl, sd in self._ellipsoids(specs):
            g.paint(sl, _ramp(sd, w) * self.brain_a[sl], self.hu_gm - 2.0 + 1.5 * self.tex[sl], "brain")

    def _sheet(self, sl, d, half, weight, grey=True, sah_weight=1.0):
        g = self.g
        cav = self.cav_a[sl]
        if grey:
            g.paint(sl, _slab(d, half + self.ctx, g.w) * weight * self.brain_a[sl],
                    self.hu_gm + 1.8 * self.tex[sl], "brain")
        g.paint(sl, _slab(d, half, g.w) * weight * cav, self.hu_csf, "csf")
        self.sah_structs.append((sl, "sheet", d, half, weight * cav, sah_weight))

    def _fissures(self) -> None:
        g = self.g
        sx, sy, sz = self.S
        # Interhemispheric fissure: midline sheet down to the corpus callosum, to the floor in front of and
        # behind it.
        qx, qy, qz = g.qx, g.qy, g.qz
        x_mid = self.mid_c[0] * 0.8 + self.mid_c[1] * 0.02 * qy
        d = np.abs(qx - x_mid)
        cc = _sigmoid((36 * sy - np.abs(qy + 2 * sy)) / 2.0)  # inside the callosal span
        z_cc = 30.0 * sz
        weight = 1.0 - cc * _sigmoid((z_cc - qz) / 2.0)
        near = np.nonzero(d < self.fiss_half + self.ctx + 2 * g.w)
        self._sheet(near, d[near], self.fiss_half, (weight[near] * (1 - self.cb_a[near])).astype(_F32))
        # Sylvian fissures: a stem running laterally from the suprasellar cistern between the frontal and
        # temporal lobes, and the insular cistern rising lateral to the insula.
        for s in (-1, 1):
            c = self.P(s * 40, 10, -6)
            sl = g.box(c, np.array([32, 28, 26]) * self.S)
            if sl is None:
                continue
            qx, qy, qz = g.q(sl)
            ax_ = s * qx
            ph = self.sylv_phase[(s + 1) // 2]
            y_line = (12 + 0.25 * (ax_ / sx - 14) - 0.004 * (ax_ / sx - 14) ** 2
                      + 2.5 * np.sin(ax_ / (8.0 * sx) + ph[0])) * sy
            z_stem = -16 * sz
            # stem: sheet normal mostly along y, bounded in z and medially
            d_stem = np.abs(qy - y_line - 0.3 * (qz - z_stem))
            w_stem = _ramp(np.abs(qz - z_stem) - 9 * sz, 3.0) * _ramp(12 * sx - ax_, 2.0)
            x_ins = (36 - 0.06 * (qy / sy) + 2.0 * np.sin(qy / (9.0 * sy) + ph[1])
                     + 1.5 * np.sin(qz / (7.0 * sz) + ph[2])) * sx
            d_ins = np.abs(ax_ - x_ins)
            w_ins = (_ramp(np.abs(qy / sy - 2) - 20, 3.0) * _ramp(np.abs(qz / sz - 2) - 14, 3.0))
            self._sheet(sl, d_stem, self.fiss_half, w_stem.astype(_F32))
            self._sheet(sl, d_ins, self.fiss_half * 0.8, w_ins.astype(_F32))

    def _brainstem_cisterns(self) -> None:
        g, w = self.g, self.g.w
        sx, sy, sz = self.S
        cisterns = [((0, 14, -18), (12, 9, 5)), ((0, -20, -12), (7, 5, 5)), ((0, -46, -58), (13, 8, 9)),
                    ((0, 3, -32), (9, 5, 9))]  # suprasellar, quadrigeminal, cisterna magna, prepontine
        for sl, sd in self._ellipsoids(cisterns):
            g.paint(sl, _ramp(sd, w) * self.cav_a[sl], self.hu_csf, "csf")
            self.sah_structs.append((sl, "blob", sd, 0.0, self.cav_a[sl], 1.0))
        # Brainstem column: midbrain, pons, medulla; ringed by the perimesencephalic (ambient) cistern.
        segs = [(-6, -24, -6, (11, 10)), (-6, -44, -24, (14, 12)), (-14, -90, -44, (9, 8))]
        for yc, z0, z1, (rx, ry) in segs:
            c = self.P(0, yc, 0.5 * (z0 + z1))
            half = np.array([rx + 6, ry + 6, 0.5 * (z1 - z0) + 3]) * self.S
            sl = g.box(c, half)
            if sl is None:
                continue
            qx, qy, qz = g.q(sl)
            rxs, rys = rx * sx, ry * sy
            k = np.sqrt(((qx - c[0]) / rxs) ** 2 + ((qy - c[1]) / rys) ** 2)
            sd_xy = (k - 1) * min(rxs, rys)
            sd_z = np.abs(qz - c[2]) - 0.5 * (z1 - z0) * sz
            sd = np.maximum(sd_xy, sd_z)
            if z1 == -6:  # midbrain: ambient cistern around it
                ring = _slab(np.abs(sd_xy - 2.0), 1.5 + self.atrophy, w) * _ramp(sd_z, w) * self.cav_a[sl]
                g.paint(sl, ring, self.hu_csf, "csf")
                self.sah_structs.append((sl, "sheet", np.abs(sd_xy - 2.0), 1.5 + self.atrophy,
                                         _ramp(sd_z, w) * self.cav_a[sl], 1.0))
            g.paint(sl, _ramp(sd, w) * self.cav_a[sl], self.hu_wm + 3.0 + 1.2 * self.tex[sl], "brain")

    def _capsule(self, p0, p1, r0, r1):
        g = self.g
        a, b = self.P(*p0), self.P(*p1)
        rmax = max(r0, r1) * self.vent_scale
        lo, hi = np.minimum(a, b) - rmax - 4, np.maximum(a, b) + rmax + 4
        sl = g.box(0.5 * (lo + hi), 0.5 * (hi - lo))
        if sl is None:
            return None
        qx, qy, qz = g.q(sl)
        ab = b - a
        t = ((qx - a[0]) * ab[0] + (qy - a[1]) * ab[1] + (qz - a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        dx, dy, dz = qx - (a[0] + t * ab[0]), qy - (a[1] + t * ab[1]), qz - (a[2] + t * ab[2])
        rad = (r0 + (r1 - r0) * t) * self.vent_scale
        return sl, np.sqrt(dx * dx + dy * dy + dz * dz) - rad

    def _ventricles(self) -> None:
        g, w = self.g, self.g.w
        self.vent = []
        for s in (-1, 1):
            pts = [(s * 9, 30, 14), (s * 10, 14, 18), (s * 13, -12, 20), (s * 20, -28, 14), (s * 13, -46, 10)]
            rad = [3.5, 4.5, 4.0, 5.0, 2.0]
            caps = [self._capsule(pts[i], pts[i + 1], rad[i], rad[i + 1]) for i in range(4)]
            caps.append(self._capsule((s * 20, -28, 14), (s * 28, -14, -4), 4.5, 2.5))
            caps.append(self._capsule((s * 28, -14, -4), (s * 30, 6, -16), 2.5, 2.0))
            self.vent += [c for c in caps if c is not None]
        third = self._ellipsoids([((0, -1, -4), (1.5 + 2 * self.atrophy, 13, 8))])
        fourth = self._ellipsoids([((0, -24, -38), (6, 4, 6))])
        self.vent += third + fourth
        for sl, sd in self.vent:
            g.paint(sl, _ramp(sd, w) * self.cav_a[sl], self.hu_csf, "csf")
        for i, s in enumerate((-1, 1)):
            if self.choroid[i]:
                for sl, sd in self._ellipsoids([((s * 20, -28, 13), (2.5, 2.5, 2.5))]):
                    g.paint(sl, _ramp(sd, w), 160.0, "bone")

    # -------------------------------------------------------------------------------- hemorrhage

    def _fit(self, fraction_at: Callable[[float], tuple[Any, np.ndarray]], lo: float, hi: float,
             target_vox: float) -> float:
        """Bisection on a growth parameter; labelled volume is non-decreasing in it."""
        for _ in range(28):
            mid = 0.5 * (lo + hi)
            if self._count(*fraction_at(mid)) < target_vox:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-3 * max(hi, 1.0):
                break
        return hi

    def _coarse_index(self, idx) -> np.ndarray:
        nx, ny, nz = self.g.shape
        return (idx[0] * ny + idx[1]) * nz + idx[2] // self.g.zsub

    def _count(self, idx, b) -> int:
        nx, ny, nz = self.g.shape
        acc = np.bincount(self._cidx, weights=b, minlength=nx * ny * nz)
        return int(np.count_nonzero(acc >= 0.5 * self.g.zsub))

    def hemorrhage(self, target_ml: float) -> np.ndarray | None:
        """Blood fraction on the fine grid (None: no bleed), grown to ``target_ml`` labelled mL."""
        vox_ml = float(np.prod(self.g.spacing)) / 1000.0
        target_vox = target_ml / vox_ml
        r = self.rng_bleed
        self.blood_hu = r.uniform(62.0, 80.0)
        if target_ml <= 0:
            self.info["lesions"] = []
            return None
        if self.domain == "tbi":
            return self._tbi(r, target_ml, target_vox)
        return self._sah(r, target_ml, target_vox)

    def _blob_phi(self, centre, elong, irregular):
        g = self.g
        return (np.sqrt(((g.qx - centre[0]) / elong[0]) ** 2 + ((g.qy - centre[1]) / elong[1]) ** 2
                        + ((g.qz - centre[2]) / elong[2]) ** 2) * (1.0 + 0.22 * irregular))

    def _random_brain_point(self, r, depth_mm, uz_min=-0.15):
        """A point ``depth_mm`` below the (reference) brain surface in a random upper-hemisphere direction."""
        while True:
            u = r.normal(size=3)
            u /= np.linalg.norm(u)
            if u[2] > uz_min:
                break
        axes = (_REF_AXES - np.array([12.0, 12.0, 12.0])) * self.S
        rad = 1.0 / math.sqrt(float(np.sum((u / axes) ** 2)))
        return u * (rad - depth_mm)

    def _tbi(self, r, target_ml, target_vox, kind=None, satellites=True):
        g = self.g
        irregular = _smooth_noise(r, g.fshape, (6.0 / g.spacing[0], 6.0 / g.spacing[1],
                                                6.0 / (g.spacing[2] / g.zsub)))
        # The primary lesion rotates with the index (offset per block of 4 so that every kind meets every
        # volume bin), so even a dozen cases contain all three; a 100+ mL epidural would be implausible.
        if kind is None:
            kind = ("contusion", "subdural", "epidural")[(self.index + self.index // 4) % 3]
        if kind == "epidural" and target_ml >= 100:
            kind = "subdural"
        side = float(r.choice([-1.0, 1.0]))
        extra_contusions = int(r.integers(0, 3))  # satellites of a subdural/epidural: 0, 1 or 2
        if not satellites:  # a multi-class case labels contusions as their own class, grown on their own
            extra_contusions = 0
        lesions = [kind]
        phis = []
        cav = self.cav_a
        if kind == "contusion":
            n_blobs = 1 + int(r.integers(0, 3)) if target_ml < 50 else 1
            for i in range(n_blobs):
                c = self._random_brain_point(r, r.uniform(12, 30) if i == 0 else r.uniform(6, 14))
                elong = r.uniform(0.75, 1.3, 3)
                weight = 1.0 if i == 0 else r.uniform(0.35, 0.7)
                phis.append(self._blob_phi(c, elong, irregular) / weight)
            allowed = self.brain_a * 1.0
            tau_max = 80.0
        else:
            el = math.radians(r.uniform(-5, 40))
            az = math.radians(r.uniform(-60, 60))
            u0 = np.array([side * math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
            ux, uy, uz = self.u
            cosang = np.clip(ux * u0[0] + uy * u0[1] + uz * u0[2], -1.0, 1.0)
            ang = np.degrees(np.arccos(cosang))
            depth_in = -self.sd_cav
            # Choose the arc so that the collection reaches a plausible maximal thickness (mm) for its
            # volume: a spherical cap of radius R, half-angle ext and mean profile m holds about
            # thick * m * 2 pi R^2 (1 - cos ext). Growth then fits the exact volume.
            R = float(np.mean([self.ax, self.ay, self.azt])) - 12.0
            if kind == "subdural":
                thick, m = r.uniform(5, 10) + 8.0 * min(target_ml / 225.0, 1.0), 0.5
            else:
                thick, m = r.uniform(8, 14) + 12.0 * min(target_ml / 100.0, 1.0), 2.0 / 3.0
            cap = min(target_ml * 1000.0 / (thick * m * 2 * math.pi * R * R), 1.0)
            ext = float(np.clip(math.degrees(math.acos(1.0 - cap)), 22.0, 95.0))
            if kind == "subdural":
                prof = np.clip(1.0 - (ang / ext) ** 2, 0.0, None)
            else:
                prof = np.sqrt(np.clip(1.0 - (ang / ext) ** 2, 0.0, None))
            # Not across the falx; the bleed sits against the inner table.
            hemi = _ramp(-(side * (g.qx - _F32(self.mid_c[0] * 0.8))) + 1.5, 2.0)
            phis.append(np.where(prof > 1e-3, depth_in / np.maximum(prof, 1e-3), np.inf).astype(_F32))
            allowed = cav * hemi
            tau_max = 45.0
            self.info["extent_deg"] = round(float(ext), 1)
            if extra_contusions:
                lesions.append("contusion")
            for _ in range(extra_contusions):
                c = self._random_brain_point(r, r.uniform(8, 20))
                c[0] = side * abs(c[0])
                # Small satellite contusions, in the brain, grow with the main lesion's thickness.
                sat = self._blob_phi(c, r.uniform(0.75, 1.3, 3), irregular) / r.uniform(0.5, 0.9)
                phis.append(np.where(self.brain_a > 0.5, sat, np.inf).astype(_F32))
        phi = phis[0]
        for p in phis[1:]:
            phi = np.minimum(phi, p)
        self.info["lesions"] = lesions
        self.info["side"] = "right" if side > 0 else "left"
        return self._grow(phi, allowed, tau_max, target_vox, ramp_w=2.0)

    def _grow(self, phi, allowed, tau_max, target_vox, ramp_w):
        cand = np.nonzero((allowed > 0) & (phi < tau_max + ramp_w))
        self._cidx = self._coarse_index(cand)
        phi_c, al_c = phi[cand], allowed[cand]

        def frac(tau):
            return cand, al_c * _ramp(phi_c - _F32(tau), ramp_w)

        tau = self._fit(frac, 0.0, tau_max, target_vox)
        b = np.zeros(self.g.fshape, _F32)
        b[cand] = frac(tau)[1]
        self.info["growth_mm"] = round(float(tau), 2)
        return b

    def _sah(self, r, target_ml, target_vox, ivh=None):
        g = self.g
        sites = {"acom": (0, 24, -15), "mca_left": (-30, 14, -14), "mca_right": (30, 14, -14),
                 "pcom_left": (-12, 8, -18), "pcom_right": (12, 8, -18), "basilar": (0, 2, -22)}
        names = list(sites)
        site = names[int(r.choice(len(names), p=[0.3, 0.17, 0.17, 0.12, 0.12, 0.12]))]
        src = self.P(*sites[site])
        irregular = _smooth_noise(r, g.fshape, (8.0 / g.spacing[0], 8.0 / g.spacing[1],
                                                8.0 / (g.spacing[2] / g.zsub)))
        with_ivh = bool(r.uniform() < 0.4) and target_ml >= 50
        if ivh is not None:  # drawn above all the same, so the stream after it is unchanged
            with_ivh = ivh
        y_level = r.uniform(-15, 5)
        phi = (np.sqrt((g.qx - src[0]) ** 2 + (g.qy - src[1]) ** 2 + (1.3 * (g.qz - src[2])) ** 2)
               * (1.0 + 0.25 * irregular)).astype(_F32)
        del irregular
        self.info["source"] = site
        self.info["lesions"] = ["subarachnoid"] + (["intraventricular"] if with_ivh else [])
        # Clot thickness: larger bleeds distend the cisterns and sulci (expansion e, mm, beyond the native
        # CSF space); the spread radius is then fitted. Thin layers stay partial-volume and unlabelled.
        e_levels = [0.0, 0.5, 1.0, 1.5, 2.25, 3.0, 4.0, 5.0, 6.5]
        start = {0: 0, 1: 2, 2: 3, 3: 4}.get(int(np.searchsorted([25, 50, 100], target_ml, side="right")), 0)
        b = None
        for e in e_levels[start:]:
            space = np.zeros(g.fshape, _F32)
            for sl, kind, d, half, weight, sah_w in self.sah_structs:
                ee = e * sah_w
                f = _slab(d, half + ee, g.w) if kind == "sheet" else _ramp(d - ee, g.w)
                views = all(isinstance(s, slice) for s in sl)
                cur = space[sl]
                np.maximum(cur, f * weight, out=cur)
                if not views:
                    space[sl] = cur
            if with_ivh:
                for sl, sd in self.vent:
                    dep = _ramp(g.q(sl)[1] - _F32(y_level), 4.0)  # supine: blood layers posteriorly
                    cur = space[sl]
                    np.maximum(cur, _ramp(sd, g.w) * dep * self.cav_a[sl], out=cur)
            space *= self.cav_a
            b = self._grow(phi, space, 260.0, target_vox, ramp_w=6.0)
            if self._labelled(b) >= 0.97 * target_vox:
                self.info["expansion_mm"] = e
                break
            self.info["expansion_mm"] = e
        return b

    def _ivh(self, r, target_ml, target_vox):
        """Intraventricular blood spreading from one atrium through the ventricular system; a volume the
        ventricles cannot hold distends them (cast ventricles), as the cisterns are distended in ``_sah``."""
        g = self.g
        side = float(r.choice([-1.0, 1.0]))
        src = self.P(side * 20, -28, 14)
        irregular = _smooth_noise(r, g.fshape, (8.0 / g.spacing[0], 8.0 / g.spacing[1],
                                                8.0 / (g.spacing[2] / g.zsub)))
        phi = (np.sqrt((g.qx - src[0]) ** 2 + (g.qy - src[1]) ** 2 + (g.qz - src[2]) ** 2)
               * (1.0 + 0.25 * irregular)).astype(_F32)
        del irregular
        self.info["side"] = "right" if side > 0 else "left"
        b = None
        for e in (0.0, 1.0, 2.0, 3.0, 4.5, 6.0):
            space = np.zeros(g.fshape, _F32)
            for sl, sd in self.vent:
                cur = space[sl]
                np.maximum(cur, _ramp(sd - _F32(e), g.w) * self.cav_a[sl], out=cur)
            b = self._grow(phi, space, 200.0, target_vox, ramp_w=4.0)
            self.info["expansion_mm"] = e
            if self._labelled(b) >= 0.97 * target_vox:
                break
        return b

    def mixed_hemorrhage(self, total_ml: float, types: Sequence[str]) -> dict[str, np.ndarray] | None:
        """Blood fraction per type (fine grid) for a multi-class case; None when ``total_ml`` is 0.

        The case's volume is shared among its types (random shares, each at least half an equal share, capped by
        ``_TYPE_MAX_ML``); each type grows on its own random stream, ``(seed, index, type)``, so a type's bleed does
        not depend on which other types share the case.
        """
        vox_ml = float(np.prod(self.g.spacing)) / 1000.0
        r = self.rng_bleed
        self.blood_hu = r.uniform(62.0, 80.0)
        if total_ml <= 0:
            return None
        shares = 0.5 / len(types) + 0.5 * r.dirichlet([2.0] * len(types))
        outer, parts, per_type = self.info, {}, {}
        for t, share in zip(types, shares, strict=True):
            ml = max(min(float(total_ml * share), _TYPE_MAX_ML.get(t, math.inf)), 2.0)
            rt = np.random.default_rng(np.random.SeedSequence(
                [self.seed, _DOMAIN_CODE[self.domain], self.index, 100 + TYPE_LABELS[t]]))
            self.info = {}
            if t == "subarachnoid":
                parts[t] = self._sah(rt, ml, ml / vox_ml, ivh=False)
            elif t == "intraventricular":
                parts[t] = self._ivh(rt, ml, ml / vox_ml)
            elif t == "intraparenchymal":
                parts[t] = self._tbi(rt, ml, ml / vox_ml, kind="contusion")
            else:
                parts[t] = self._tbi(rt, ml, ml / vox_ml, kind=t, satellites=False)
            self.info.pop("lesions", None)
            per_type[t] = {"target_ml": round(ml, 3), **self.info}
        self.info = {**outer, "types": per_type}
        return parts

    def _labelled(self, b) -> int:
        return int(np.count_nonzero(self.g.to_coarse(b) >= 0.5))


# ------------------------------------------------------------------------------------------- public


def generate_case(
    domain: str,
    seed: int,
    index: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    *,
    tilt_deg: float = 5.0,
    noise_sigma: float | None = None,
    target_ml: float | None = None,
    hemorrhage: bool = True,
    z_subsamples: int = 3,
    tissue_maps: bool = False,
    hu_offset: float = 0.0,
    head_scale: float = 1.0,
    volume_bins: Sequence[int] | None = None,
    types: Sequence[str | Sequence[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Generate one synthetic head CT with its hemorrhage label.

    Args:
        domain: ``"tbi"`` (source: contusion / subdural / epidural), ``"sah"`` (target: cisternal and
            sulcal blood), both with a binary label, or ``"ich"``: multi-class, labels by type (:data:`TYPE_LABELS`).
        seed: dataset seed (non-negative int). With ``domain`` and ``index`` it fixes the case bitwise.
        index: case index within the dataset (also picks the hemorrhage volume bin).
        shape, spacing: output grid (voxels, mm). In-plane field of view must be >= 180 mm and z >= 100 mm.
        tilt_deg: maximum head pitch (deg); roll and yaw use half of it. 0 gives an untilted head.
        noise_sigma: HU standard deviation of the (slightly correlated) noise; None draws 3-6 HU per case.
        target_ml: override the scheduled hemorrhage volume (mL); 0 gives no bleed.
        hemorrhage: False gives the same head with no bleed (the anatomy stream is separate).
        z_subsamples: samples per slice averaged into each 5 mm slice (partial-volume model).
        tissue_maps: add ``info["tissue"]``: per-voxel fractions of soft, bone, brain, csf, blood.
        hu_offset: whole HU added to every value (rounded; a scanner whose calibration is off, as differs
            between hospitals), before clipping to [-1024, 3071]; 0 leaves the image bitwise as without it.
        head_scale: scale of the head's half-axes and landmarks (0.85-1.1: a population of smaller or
            larger heads); 1 leaves the case bitwise as without it.
        volume_bins: bin indices of :data:`VOLUME_BINS_ML` the scheduled volumes cycle through (a site's
            lesion-volume mix, e.g. ``[0, 1]`` for mostly small bleeds); None: all four.
        types: ``"ich"`` only: the cohort's type mix (see :func:`parse_types`); case ``index`` holds the types of
            group ``index % len(groups)``, the scheduled volume shared among them. A voxel is labelled where the
            summed-over-slice blood fraction of all types together is >= 0.5 (so ``label > 0`` is the binary label
            the same rule gives), with the type whose own fraction there is largest (the lower label on a tie).

    Returns:
        ``(image_hu, label, affine, info)``: float32 HU (integer-valued, in [-1024, 3071]) of shape ``shape``,
        uint8 label (1 = blood fraction >= 0.5), RAS+ 4x4 affine, and a JSON-friendly ``info`` dict with
        ``hemorrhage_ml`` (= label voxels x voxel volume / 1000), ``hemorrhage_voxels``, ``target_ml``,
        ``volume_bin``, ``lesions`` and the case's drawn parameters; ``"ich"`` adds ``class_voxels`` and
        ``class_ml`` per type present and ``types`` (each type's own drawn parameters).
    """
    domain = _check_domain(domain)
    if types is not None and domain != "ich":
        raise ValueError(f"types: only the multi-class 'ich' domain takes a type mix, not {domain!r}")
    groups = parse_types(types) if domain == "ich" else None
    if int(seed) < 0 or int(index) < 0:
        raise ValueError("seed and index must be non-negative integers")
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or min(spacing) <= 0:
        raise ValueError(f"shape and spacing must be 3 positive values, got {shape} and {spacing}")
    fov = [n * s for n, s in zip(shape, spacing, strict=True)]
    if any(f < m for f, m in zip(fov, _MIN_FOV_MM, strict=True)):
        raise ValueError(
            f"field of view {tuple(round(f) for f in fov)} mm is too small for a head; need at least "
            f"{_MIN_FOV_MM} mm (e.g. shape (48, 48, 16) with spacing (4, 4, 10))"
        )
    if int(z_subsamples) < 1:
        raise ValueError("z_subsamples must be >= 1")
    if not (math.isfinite(float(hu_offset)) and abs(float(hu_offset)) <= 200):
        raise ValueError(f"hu_offset must be a finite shift of at most 200 HU, got {hu_offset!r}")
    if not 0.85 <= float(head_scale) <= 1.1:
        raise ValueError(f"head_scale must lie in [0.85, 1.1] (the head must fit the field of view), "
                         f"got {head_scale!r}")
    t0 = time.perf_counter()
    ph = _Phantom(domain, int(seed), int(index), shape, spacing, float(tilt_deg), noise_sigma,
                  int(z_subsamples), tissue_maps, float(head_scale))
    ph.anatomy()
    sched_ml, vbin = target_volume_ml(domain, int(seed), int(index), volume_bins)
    want = sched_ml if target_ml is None else max(float(target_ml), 0.0)
    if target_ml is not None:
        vbin = -1 if want <= 0 else int(np.searchsorted([25, 50, 100], want, side="right"))
    parts = None
    if groups is not None:
        case_types = groups[int(index) % len(groups)]
        parts = ph.mixed_hemorrhage(want, case_types) if hemorrhage else None
        b = None if parts is None else np.max(np.stack(list(parts.values())), axis=0)
        ph.info["lesions"] = list(case_types) if parts is not None else []
    else:
        b = ph.hemorrhage(want) if hemorrhage else None
    g = ph.g
    if b is not None:
        g.paint(g.full, b, ph.blood_hu + 2.5 * ph.tex, "blood")
        label = (g.to_coarse(b) >= 0.5).astype(np.uint8)
        if parts is not None:
            names = list(parts)
            owner = np.argmax(np.stack([g.to_coarse(parts[t]) for t in names]), axis=0)
            codes = np.array([TYPE_LABELS[t] for t in names], np.uint8)
            label = np.where(label > 0, codes[owner], 0).astype(np.uint8)
    else:
        label = np.zeros(shape, np.uint8)
        if not hemorrhage:
            ph.info["lesions"] = []
    hu = g.to_coarse(g.hu)
    if ph.noise_sigma > 0:
        # CT noise is spatially correlated in-plane (reconstruction kernel); keep its sd at noise_sigma.
        noise = ndimage.gaussian_filter(ph.rng_noise.standard_normal(shape, dtype=_F32), (0.6, 0.6, 0.0))
        noise *= _F32(ph.noise_sigma / max(float(noise.std()), 1e-6))
        hu += noise
    hu = np.rint(hu)
    if hu_offset:  # after rounding: an exact calibration shift of the integer HU values
        hu += _F32(round(float(hu_offset)))
    image = np.clip(hu, -1024, 3071).astype(_F32)
    vox_ml = float(np.prod(spacing)) / 1000.0
    n_vox = int(np.count_nonzero(label))
    info: dict[str, Any] = {
        "case_id": case_id(domain, int(index)),
        "domain": domain,
        "seed": int(seed),
        "index": int(index),
        "generator_version": GENERATOR_VERSION,
        "hemorrhage_voxels": n_vox,
        "hemorrhage_ml": n_vox * vox_ml,
        "target_ml": round(want if hemorrhage else 0.0, 3),
        "volume_bin": vbin if hemorrhage else -1,
        **ph.info,
        "noise_sigma_hu": round(ph.noise_sigma, 3),
        "tilt_deg": [round(a, 3) for a in ph.tilt],
        "head_size_mm": [round(2 * ph.ax, 1), round(2 * ph.ay, 1)],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if groups is not None:
        present = [t for t in HEMORRHAGE_TYPES if np.any(label == TYPE_LABELS[t])]
        info["class_voxels"] = {t: int(np.count_nonzero(label == TYPE_LABELS[t])) for t in present}
        info["class_ml"] = {t: n * vox_ml for t, n in info["class_voxels"].items()}
    if tissue_maps and g.maps is not None:
        info["tissue"] = {k: g.to_coarse(v) for k, v in g.maps.items()}
    return image, label, phantom_affine(shape, spacing), info


def write_dataset(
    out_dir: str | os.PathLike[str],
    domain: str,
    n_cases: int,
    seed: int = 0,
    *,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    tilt_deg: float = 5.0,
    noise_sigma: float | None = None,
    z_subsamples: int = 3,
    hu_offset: float = 0.0,
    head_scale: float = 1.0,
    volume_bins: Sequence[int] | None = None,
    types: Sequence[str | Sequence[str]] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> Path:
    """Write ``n_cases`` phantoms of ``domain`` as an nnU-Net v2 raw dataset in ``out_dir`` (returned).

    Files: ``imagesTr/<ID>_0000.nii.gz`` (int16 HU), ``labelsTr/<ID>.nii.gz`` (uint8), ``dataset.json``
    (nnU-Net keys plus a ``"medlora"`` block with the generator settings and each case's hemorrhage mL).
    Every file is written atomically and ``dataset.json`` last, so an interrupted run never looks complete.
    If ``out_dir`` already holds a dataset made with the same settings it is returned untouched; a
    different dataset there raises ``FileExistsError`` unless ``overwrite``. ``hu_offset``, ``head_scale`` and
    ``volume_bins`` (see :func:`generate_case`) are recorded only when they differ from their defaults, so a
    dataset written without them is byte for byte what it was before they existed. The ``"ich"`` domain writes
    multi-class labels: ``dataset.json`` ``"labels"`` maps background and each type of :data:`TYPE_LABELS`, the
    ``"medlora"`` block records the type groups (``types``) and each case's ``class_ml``.
    """
    domain = _check_domain(domain)
    if types is not None and domain != "ich":
        raise ValueError(f"types: only the multi-class 'ich' domain takes a type mix, not {domain!r}")
    groups = parse_types(types) if domain == "ich" else None
    if int(n_cases) < 1:
        raise ValueError("n_cases must be >= 1")
    out = Path(out_dir)
    settings = {
        "generator": "medlora.data.phantoms",
        "generator_version": GENERATOR_VERSION,
        "domain": domain,
        "seed": int(seed),
        "n_cases": int(n_cases),
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "tilt_deg": float(tilt_deg),
        "noise_sigma": None if noise_sigma is None else float(noise_sigma),
        "z_subsamples": int(z_subsamples),
        "volume_bins_ml": [list(b) for b in VOLUME_BINS_ML],
    }
    site = {"hu_offset": float(hu_offset), "head_scale": float(head_scale),
            "volume_bins": None if volume_bins is None else [int(b) for b in volume_bins]}
    settings.update({k: v for k, v in site.items() if v != {"hu_offset": 0.0, "head_scale": 1.0}.get(k)})
    if groups is not None:
        settings["types"] = [list(g) for g in groups]
    meta_path = out / "dataset.json"
    if meta_path.exists() and not overwrite:
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8")).get("medlora", {})
        except (OSError, json.JSONDecodeError):
            old = {}
        if {k: old.get(k) for k in (*settings, *site)} == {**dict.fromkeys(site), **settings}:
            return out
        raise FileExistsError(f"{meta_path}: a different dataset already exists here (pass overwrite=True)")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases: dict[str, dict[str, Any]] = {}
    for i in range(int(n_cases)):
        image, label, affine, info = generate_case(domain, seed, i, shape, spacing, tilt_deg=tilt_deg,
                                                   noise_sigma=noise_sigma, z_subsamples=z_subsamples,
                                                   hu_offset=hu_offset, head_scale=head_scale,
                                                   volume_bins=volume_bins, types=groups)
        cid = info["case_id"]
        save_nifti(out / "imagesTr" / f"{cid}_0000.nii.gz", image, affine, np.int16)
        save_nifti(out / "labelsTr" / f"{cid}.nii.gz", label, affine, np.uint8)
        cases[cid] = {
            "hemorrhage_ml": round(info["hemorrhage_ml"], 4),
            "hemorrhage_voxels": info["hemorrhage_voxels"],
            "target_ml": info["target_ml"],
            "volume_bin": info["volume_bin"],
            "lesions": info["lesions"],
        }
        if groups is not None:
            cases[cid]["class_ml"] = {t: round(v, 4) for t, v in info["class_ml"].items()}
        if progress is not None:
            progress(i + 1, int(n_cases), info)
    meta = {
        "name": f"medlora_phantom_{domain}",
        "description": f"Synthetic head CT phantoms ({domain.upper()} hemorrhage), medlora.data.phantoms",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **(TYPE_LABELS if groups is not None else {"hemorrhage": 1})},
        "numTraining": int(n_cases),
        "file_ending": ".nii.gz",
        "medlora": {**settings, "cases": cases},
    }
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return out
