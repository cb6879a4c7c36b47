"""Inputs and outputs of ``medlora infer``: finding cases, reading CT volumes, checking them, writing results.

Inputs are NIfTI files (``.nii``, ``.nii.gz``), folders of them (nnU-Net ``imagesTs`` style names
``CASE_0000.nii.gz`` give case id ``CASE``), and DICOM series folders. Every reader returns the same
thing, a NIfTI-equivalent volume: a float32 array indexed (i, j, k) and the 4 x 4 affine that maps
voxel indices to RAS+ millimetres, exactly as nibabel (and MONAI's ``LoadImaged``) reads a NIfTI file.
A DICOM series read with SimpleITK therefore has its LPS geometry turned into RAS here.

Every problem with one input is an :class:`InputError` whose message is one line naming the file and
the problem, so that ``medlora infer`` can report it and go on with the other cases. Every volume must
pass :func:`medlora.data.ct.ct_problem` (finite, 3D, a plausible range in Hounsfield units), the same
test a training dataset passes.

DICOM geometry. SimpleITK (ITK's ``ImageSeriesReader``) builds the volume from the first slice's position
and spreads the slices evenly up to the last one; it does not stop when a slice is missing (it only prints
a warning), nor when the slices are sheared (gantry tilt). Either gives a label map whose slices lie up to
half a slice (or, for a tilt, many millimetres) away from the real ones. :func:`check_slice_positions`
therefore reads every slice's ImagePositionPatient and ImageOrientationPatient and refuses the series
unless every slice lies within ``max(1% of the slice spacing, 0.01 mm)`` (:data:`SLICE_TOLERANCE`) of the
evenly spaced grid along the slice normal that ITK builds, with no offset within the slice plane. We
refuse rather than resample onto the true positions: interpolating across a gap invents a slice. The 1%
(0.05 mm at 5 mm slices) is far below anything that moves a label, and well above the rounding of
positions written as decimal strings with a few digits.

Outputs (:func:`medlora.data.nifti.write_nifti`): a NIfTI input's outputs carry its geometry verbatim
(NIfTI-1 or NIfTI-2, qform and sform with their codes, pixdim, units), so their affine is the input's
exactly. A DICOM series' outputs are NIfTI-1 with qform = sform = the series' RAS affine (code 1,
scanner), as dcm2niix writes, and pixdim = the series' spacing; NIfTI-1 stores the sform in float32,
so the written affine is the DICOM geometry rounded to float32 (about 1e-5 mm at 100 mm from the origin).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..data.ct import HU_LIMITS, MIN_HU_SPREAD, ct_problem
from ..data.nifti import NiftiError, NiftiGeometry, read_nifti
from ..errors import MedloraError
from ..fileio import atomic_write_bytes

__all__ = [
    "HU_LIMITS",
    "MIN_HU_SPREAD",
    "NIFTI_ENDINGS",
    "VOLUME_FIELDS",
    "InputCase",
    "InputError",
    "SLICE_TOLERANCE",
    "Volume",
    "case_id_for",
    "check_ct",
    "check_slice_positions",
    "dicom_affine",
    "find_inputs",
    "read_case",
    "read_dicom_series",
    "read_nifti_volume",
    "read_volume_rows",
    "voxel_volume_mm3",
    "write_overlay",
    "write_volume_tables",
]

NIFTI_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii")
# A slice may lie this far from the evenly spaced grid: max(fraction x slice spacing, millimetres).
SLICE_TOLERANCE: tuple[float, float] = (0.01, 0.01)
VOLUME_FIELDS: tuple[str, ...] = ("case_id", "input", "output", "voxels", "voxel_volume_mm3", "volume_ml")

_CHANNEL_RE = re.compile(r"_(\d{4})$")


class InputError(MedloraError, ValueError):
    """One input volume cannot be used; the message is one line naming the file and the problem."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# -------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class InputCase:
    """One case to segment: a NIfTI file or a DICOM series (folder plus series UID).

    ``problem`` is set when the case is known to be unusable before reading it (an unsupported file,
    a case id that another input already uses); it is then reported like a read error.
    """

    case_id: str
    path: Path
    kind: str  # "nifti" or "dicom"
    series_uid: str | None = None
    problem: str | None = None

    @property
    def label(self) -> str:
        """How messages name the input."""
        return str(self.path) if self.series_uid is None else f"{self.path} (DICOM series {self.series_uid})"


def _nifti_stem(name: str) -> str | None:
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def _name(path: Path) -> str:
    """The last component of ``path``; for ``.``, ``..`` or ``a/sub/..`` that of the folder it resolves to
    (``..`` follows symlinks as the operating system does)."""
    if path.name not in ("", ".", ".."):
        return path.name
    return path.resolve().name or str(path.resolve())


def case_id_for(path: str | os.PathLike[str]) -> str:
    """``CASE_0000.nii.gz`` -> ``CASE`` (nnU-Net channel 0), ``scan.nii`` -> ``scan``, a folder -> its name."""
    p = Path(path)
    stem = _nifti_stem(p.name)
    if stem is None:
        return _name(p)
    m = _CHANNEL_RE.search(stem)
    return stem[: m.start()] if m is not None and m.group(1) == "0000" and m.start() > 0 else stem


def _dicom_series(folder: Path) -> list[str]:
    import SimpleITK as sitk

    try:
        return sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return []


def _nifti_cases(files: Sequence[Path]) -> list[InputCase]:
    """Cases of NIfTI files in one folder; nnU-Net channel files other than _0000 cannot be used."""
    stems = {_nifti_stem(f.name) for f in files}
    cases = []
    for f in files:
        stem = _nifti_stem(f.name) or f.name
        m = _CHANNEL_RE.search(stem)
        problem = None
        if m is not None and m.group(1) != "0000" and f"{stem[: m.start()]}_0000" in stems:
            problem = (f"{f}: channel {m.group(1)} of case {stem[: m.start()]}; the model takes one input "
                       "channel (CT), so only the _0000 file is used")
        cases.append(InputCase(case_id_for(f), f, "nifti", problem=problem))
    return cases


def _folder_cases(folder: Path) -> list[InputCase]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and _nifti_stem(p.name) is not None)
    if files:
        return _nifti_cases(files)
    series = _dicom_series(folder)
    name = _name(folder)
    if series:
        if len(series) == 1:
            return [InputCase(name, folder, "dicom", series[0])]
        return [InputCase(f"{name}_{i}", folder, "dicom", uid) for i, uid in enumerate(series, start=1)]
    # A folder of patient folders, each holding one DICOM series.
    cases = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for uid in _dicom_series(sub):
            cases.append(InputCase(sub.name, sub, "dicom", uid))
    if not cases:
        return [InputCase(name, folder, "dicom",
                          problem=f"{folder}: no NIfTI files (.nii, .nii.gz) and no DICOM series found")]
    return cases


def find_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[InputCase]:
    """The cases named by the command line's inputs, in order; a case id used twice is a problem of the
    later input (two outputs cannot share one name)."""
    cases: list[InputCase] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            cases += _folder_cases(p)
        elif p.is_file() and _nifti_stem(p.name) is not None:
            cases.append(InputCase(case_id_for(p), p, "nifti"))
        elif p.is_file():
            cases.append(InputCase(_name(p), p, "nifti",
                                   problem=f"{p}: not a NIfTI file (.nii, .nii.gz) or a DICOM series folder"))
        else:
            cases.append(InputCase(_name(p), p, "nifti", problem=f"{p}: file not found"))
    seen_paths: set[tuple[str, str | None]] = set()
    first_use: dict[str, InputCase] = {}
    unique = []
    for case in cases:
        key = (os.path.realpath(case.path), case.series_uid)
        if key in seen_paths:  # the same file named twice (e.g. a file and its folder) runs once
            continue
        seen_paths.add(key)
        if case.problem is None and case.case_id in first_use:
            other = first_use[case.case_id]
            case = InputCase(case.case_id, case.path, case.kind, case.series_uid,
                             problem=f"{case.label}: case id {case.case_id!r} is already used by {other.label}; "
                                     "rename one of them")
        if case.problem is None:  # a case that fails anyway writes nothing, so it reserves no name
            first_use.setdefault(case.case_id, case)
        unique.append(case)
    return unique


# ---------------------------------------------------------------------------------------- reading


def check_ct(data: np.ndarray, source: str) -> None:
    """Raise :class:`InputError` unless ``data`` is a finite 3D volume with a plausible CT range in HU
    (:func:`medlora.data.ct.ct_problem`)."""
    problem = ct_problem(data)
    if problem is not None:
        raise InputError(f"{source}: {problem}")


@dataclass
class Volume:
    """A CT volume as NIfTI holds it: voxels indexed (i, j, k), the RAS+ affine the network's preprocessing
    uses, and the header geometry its outputs are written with (the input's own for NIfTI)."""

    data: np.ndarray
    affine: np.ndarray
    geometry: NiftiGeometry

    @property
    def zooms(self) -> tuple[float, float, float]:
        """The voxel spacing as recorded by the file (NIfTI ``pixdim``; for DICOM the series' spacing)."""
        return self.geometry.zooms


def read_nifti_volume(path: str | os.PathLike[str]) -> Volume:
    """A NIfTI file as a float32 :class:`Volume`, read like MONAI's ``LoadImaged`` (nibabel, scaled values)."""
    try:
        data, geometry = read_nifti(path)
    except NiftiError as exc:
        raise InputError(str(exc)) from None
    # Converters sometimes write a trailing singleton 4th axis; it is still one volume.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return Volume(np.asarray(data, dtype=np.float32), geometry.affine, geometry)


def dicom_affine(direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """The RAS+ voxel-to-world affine of an ITK image (whose geometry is in LPS+) indexed (i, j, k).

    ITK: ``x_LPS = origin + direction @ diag(spacing) @ index``; RAS flips the first two world axes.
    """
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, np.float64))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _decimals(text: str, count: int, tag: str, where: str) -> np.ndarray:
    """A DICOM multi-valued decimal string (``"1.5\\-2\\3"``) as ``count`` floats."""
    try:
        values = np.array([float(v) for v in text.strip().split("\\")], dtype=np.float64)
    except ValueError:
        values = np.empty(0)
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise InputError(f"{where}: malformed {tag} {text.strip()!r} (expected {count} numbers)")
    return values


def check_slice_positions(positions: np.ndarray, orientation: np.ndarray, label: str) -> float:
    """Refuse a series whose slices are not evenly spaced along the slice normal; return the spacing (mm).

    ``positions`` (n x 3) are the slices' ImagePositionPatient in the order ITK stacks them, ``orientation``
    the ImageOrientationPatient (row and column direction). Every slice must lie within
    :data:`SLICE_TOLERANCE` of the evenly spaced grid from the first to the last slice (the grid ITK
    builds), and on the line through the first slice along the normal (no shear). See the module docstring.
    """
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    normal = np.cross(orientation[:3], orientation[3:])
    if n < 2 or not np.linalg.norm(normal) > 0.5:
        return 0.0
    normal = normal / np.linalg.norm(normal)
    offsets = positions - positions[0]
    along = offsets @ normal
    steps = np.diff(along)
    typical = float(np.median(steps))
    tolerance = max(SLICE_TOLERANCE[0] * abs(typical), SLICE_TOLERANCE[1])
    spacing = float(along[-1] / (n - 1))
    grid_error = np.abs(along - spacing * np.arange(n))
    if abs(spacing) <= tolerance or grid_error.max() > tolerance:
        k = int(np.argmax(np.abs(steps - typical)))
        counts: dict[str, int] = {}
        for step in steps:
            counts[f"{step:.4g}"] = counts.get(f"{step:.4g}", 0) + 1
        listed = ", ".join(f"{v} mm x{c}" for v, c in sorted(counts.items(), key=lambda kv: -kv[1]))
        raise InputError(
            f"{label}: slices not evenly spaced along the slice normal (missing or duplicate slice?): slices "
            f"{k + 1} and {k + 2} of {n} are {steps[k]:.4g} mm apart (at {along[k]:.4g} and {along[k + 1]:.4g} mm "
            f"from the first), spacings {listed}; an evenly spread volume would misplace slices by up to "
            f"{grid_error.max():.3g} mm (tolerance {tolerance:.3g} mm)")
    shear = float(np.linalg.norm(offsets - np.outer(along, normal), axis=1).max())
    if shear > tolerance:
        raise InputError(
            f"{label}: slices are shifted within the slice plane by up to {shear:.3g} mm from the slice normal "
            f"(gantry tilt?; tolerance {tolerance:.3g} mm): ITK would place them wrongly; convert the series with "
            "a tool that corrects gantry tilt (e.g. dcm2niix) and give the NIfTI file")
    return abs(spacing)


def _slice_geometry(reader: Any, n_files: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Every slice's ImagePositionPatient and the series' ImageOrientationPatient, from the reader's
    per-file metadata; one orientation for all slices."""
    positions, orientation = [], None
    for k in range(n_files):
        where = f"{label}: slice {k + 1} of {n_files}"
        tags = {}
        for tag, name in (("0020|0032", "ImagePositionPatient"), ("0020|0037", "ImageOrientationPatient")):
            if not reader.HasMetaDataKey(k, tag):
                raise InputError(f"{where}: no {name} ({tag.replace('|', ',')}); the slice positions, and so the "
                                 "geometry, are unknown")
            tags[name] = reader.GetMetaData(k, tag)
        positions.append(_decimals(tags["ImagePositionPatient"], 3, "ImagePositionPatient", where))
        iop = _decimals(tags["ImageOrientationPatient"], 6, "ImageOrientationPatient", where)
        if orientation is None:
            orientation = iop
        elif np.abs(iop - orientation).max() > 1e-4:
            raise InputError(f"{where}: ImageOrientationPatient {iop.tolist()} differs from the first slice's "
                             f"{orientation.tolist()}; one series must have one orientation")
    assert orientation is not None
    return np.asarray(positions), orientation


def read_dicom_series(folder: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """A DICOM series as a float32 :class:`Volume` (indexed (i, j, k), RAS affine), as if converted to NIfTI.

    SimpleITK (GDCM) sorts the slices by position and applies the rescale slope and intercept, so the
    values are Hounsfield units. The slice positions are checked (:func:`check_slice_positions`) and must
    agree with the geometry ITK built. ITK's own warnings are silenced while reading: they would add
    lines to the one-line error, or print for a series we refuse anyway.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    label = str(folder) if series_uid is None else f"{folder} (DICOM series {series_uid})"
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        if series_uid is None:
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            if not uids:
                raise InputError(f"{label}: no DICOM series found")
            series_uid = uids[0]
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        image = reader.Execute()
    except InputError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK trace
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if "rror" in ln or "annot" in ln), lines[-1] if lines else "")
        raise InputError(f"{label}: cannot read DICOM series ({type(exc).__name__}: {_one_line(detail)})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{label}: expected a 3D single-component series, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    if len(files) != image.GetDepth():
        raise InputError(f"{label}: {len(files)} file(s) hold {image.GetDepth()} slices (a multi-frame DICOM); "
                         "their positions cannot be checked here: convert the series to NIfTI (e.g. dcm2niix)")
    positions, orientation = _slice_geometry(reader, len(files), label)
    spacing_along = check_slice_positions(positions, orientation, label)
    spacing = tuple(float(v) for v in image.GetSpacing())
    # The last guard: every slice where ITK's geometry puts it (origin + k * spacing along its third axis).
    step = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2] * spacing[2]
    placed = np.asarray(image.GetOrigin(), dtype=np.float64) + np.outer(np.arange(len(files)), step)
    error = float(np.linalg.norm(placed - positions, axis=1).max())
    if error > max(SLICE_TOLERANCE[0] * spacing_along, SLICE_TOLERANCE[1]):
        raise InputError(f"{label}: ITK's geometry (origin {list(image.GetOrigin())}, slice spacing {spacing[2]:g} "
                         f"mm) places a slice {error:.3g} mm away from its ImagePositionPatient")
    # SimpleITK arrays are indexed (k, j, i); NIfTI arrays (i, j, k).
    data = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0)).astype(np.float32, copy=False)
    affine = dicom_affine(image.GetDirection(), spacing, image.GetOrigin())
    return Volume(data, affine, NiftiGeometry.from_affine(affine, zooms=spacing, shape=data.shape))


def read_case(case: InputCase) -> Volume:
    """Read and check one case; :class:`InputError` names the file and the problem."""
    if case.problem is not None:
        raise InputError(case.problem)
    volume = read_dicom_series(case.path, case.series_uid) if case.kind == "dicom" else read_nifti_volume(case.path)
    check_ct(volume.data, case.label)
    affine = volume.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{case.label}: degenerate voxel-to-world affine {affine[:3, :3].tolist()}")
    return volume


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3: |det| of the affine's 3 x 3 part (also right for oblique grids)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


# ---------------------------------------------------------------------------------------- writing


def read_volume_rows(out_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Rows of an existing ``volumes.json`` in ``out_dir`` by case id (empty if there is none)."""
    path = Path(out_dir) / "volumes.json"
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "case_id" in r for r in rows):
            raise ValueError("expected a list of objects with a case_id")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MedloraError(f"{path}: cannot update it ({_one_line(exc)}); move it away or choose another --out") \
            from None
    return {str(r["case_id"]): r for r in rows}


def write_volume_tables(out_dir: str | os.PathLike[str], rows: dict[str, dict[str, Any]]) -> None:
    """Write ``volumes.csv`` and ``volumes.json`` (sorted by case id) atomically."""
    out = Path(out_dir)
    ordered = [rows[k] for k in sorted(rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(VOLUME_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    atomic_write_bytes(out / "volumes.csv", buf.getvalue())
    atomic_write_bytes(out / "volumes.json", json.dumps(ordered, indent=2) + "\n")


def write_overlay(
    path: str | os.PathLike[str],
    volume: Volume,
    label: np.ndarray,
    hu_window: Sequence[float],
    title: str,
    n_slices: int = 4,
) -> Path:
    """A PNG of a few axial slices of the input with the written label map's outline in red.

    Both are shown on the input's own voxels, only reoriented to RAS (axis flips and permutations, no
    resampling), in the model's HU window. The slices shown are those with the most labelled voxels
    (evenly spaced ones when nothing was found); their numbers count along the RAS-reoriented S axis.
    Radiological convention: the patient's right on the left of each panel, anterior at the top.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ornt = nib.orientations.io_orientation(volume.affine)  # input axis i -> RAS axis ornt[i, 0], flipped if -1
    image = nib.orientations.apply_orientation(volume.data, ornt)
    mask = nib.orientations.apply_orientation(np.asarray(label) > 0, ornt)
    spacing = [0.0, 0.0, 0.0]
    for axis, (ras_axis, _) in enumerate(ornt):
        spacing[int(ras_axis)] = float(volume.zooms[axis])
    lo, hi = float(hu_window[0]), float(hu_window[1])
    depth = image.shape[2]
    area = mask.reshape(-1, depth).sum(axis=0)
    if area.any():
        slices = sorted(int(z) for z in np.argsort(-area, kind="stable")[: min(n_slices, int((area > 0).sum()))])
    else:
        slices = sorted({int(round(z)) for z in np.linspace(0, depth - 1, min(n_slices, depth) + 2)[1:-1]} or {0})
    fig = Figure(figsize=(3.0 * len(slices), 3.3), dpi=100)
    FigureCanvasAgg(fig)
    # Rows are P -> A (anterior up with origin="lower"), columns R -> L (the i axis reversed).
    aspect = spacing[1] / spacing[0]
    for n, z in enumerate(slices, start=1):
        ax = fig.add_subplot(1, len(slices), n)
        ax.imshow(image[::-1, :, z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                  interpolation="nearest")
        m = mask[::-1, :, z].T
        if m.any() and not m.all():
            ax.contour(m.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8, origin="lower")
        ax.set_title(f"axial slice {z}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
