"""Inputs and outputs of ``medlora infer``: finding cases, reading CT volumes, checking them, writing results.

Inputs are NIfTI files (``.nii``, ``.nii.gz``), folders of them (nnU-Net ``imagesTs`` style names
``CASE_0000.nii.gz`` give case id ``CASE``), and DICOM series folders. Every reader returns the same
thing, a NIfTI-equivalent volume: a float32 array indexed (i, j, k) and the 4 x 4 affine that maps
voxel indices to RAS+ millimetres, exactly as nibabel (and MONAI's ``LoadImaged``) reads a NIfTI file.
A DICOM series read with SimpleITK therefore has its LPS geometry turned into RAS here.

Every problem with one input is an :class:`InputError` whose message is one line naming the file and
the problem, so that ``medlora infer`` can report it and go on with the other cases.

Plausibility of CT intensities (:func:`check_ct`; the network expects Hounsfield units, and a scan in
other units silently gives garbage):

* every voxel finite (no NaN or Inf);
* values within [-32768, 32767]: CT stores HU as 16-bit integers. We deliberately accept far more
  than the physical [-1024, 3071]: scanners pad outside the field of view with -2048, -3024 or
  -32768, and extended-HU reconstructions of metal reach tens of thousands;
* some voxel above -500 HU (else the scan holds only air, or is not in HU);
* some voxel below +500 HU (a head CT always contains air, fat or soft tissue);
* a spread (max - min) of at least 500 HU: a normalised ([0, 1]) or windowed image is not raw HU.

A scan stored without its rescale intercept (air near 0, water near 1024) passes these checks; it
cannot be told from a real HU volume by its range alone.
"""

from __future__ import annotations

import csv
import gzip
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

from ..data.dataset import DatasetError, load_nifti
from ..errors import MedloraError
from ..fileio import atomic_write_bytes

__all__ = [
    "HU_LIMITS",
    "MIN_HU_SPREAD",
    "NIFTI_ENDINGS",
    "VOLUME_FIELDS",
    "InputCase",
    "InputError",
    "Volume",
    "case_id_for",
    "check_ct",
    "dicom_affine",
    "find_inputs",
    "read_case",
    "read_dicom_series",
    "read_nifti_volume",
    "read_volume_rows",
    "voxel_volume_mm3",
    "write_nifti",
    "write_overlay",
    "write_volume_tables",
]

NIFTI_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii")
HU_LIMITS: tuple[float, float] = (-32768.0, 32767.0)
SOFT_TISSUE_HU: float = 500.0
MIN_HU_SPREAD: float = 500.0
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


def case_id_for(path: str | os.PathLike[str]) -> str:
    """``CASE_0000.nii.gz`` -> ``CASE`` (nnU-Net channel 0), ``scan.nii`` -> ``scan``, a folder -> its name."""
    p = Path(path)
    stem = _nifti_stem(p.name)
    if stem is None:
        return p.name
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
    if series:
        if len(series) == 1:
            return [InputCase(folder.name, folder, "dicom", series[0])]
        return [InputCase(f"{folder.name}_{i}", folder, "dicom", uid) for i, uid in enumerate(series, start=1)]
    # A folder of patient folders, each holding one DICOM series.
    cases = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for uid in _dicom_series(sub):
            cases.append(InputCase(sub.name, sub, "dicom", uid))
    if not cases:
        return [InputCase(folder.name, folder, "dicom",
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
            cases.append(InputCase(p.name, p, "nifti",
                                   problem=f"{p}: not a NIfTI file (.nii, .nii.gz) or a DICOM series folder"))
        else:
            cases.append(InputCase(p.name, p, "nifti", problem=f"{p}: file not found"))
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
    (see the module docstring for the rules and why)."""
    if data.ndim != 3:
        raise InputError(f"{source}: expected a 3D volume, got a {data.ndim}D array of shape {tuple(data.shape)}")
    if data.size == 0:
        raise InputError(f"{source}: empty volume of shape {tuple(data.shape)}")
    finite = np.isfinite(data)
    if not finite.all():
        bad = ~finite
        n_nan = int(np.isnan(data).sum())
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{source}: {int(bad.sum())} non-finite voxel(s) ({n_nan} NaN, {int(bad.sum()) - n_nan} "
                         f"Inf), first at index {first}")
    lo, hi = float(data.min()), float(data.max())
    span = f"intensities [{lo:g}, {hi:g}]"
    if lo < HU_LIMITS[0] or hi > HU_LIMITS[1]:
        raise InputError(f"{source}: {span} outside [{HU_LIMITS[0]:g}, {HU_LIMITS[1]:g}]: not a CT in Hounsfield "
                         "units")
    if hi < -SOFT_TISSUE_HU:
        raise InputError(f"{source}: {span}: no voxel above {-SOFT_TISSUE_HU:g} HU (only air, or not in Hounsfield "
                         "units)")
    if lo > SOFT_TISSUE_HU:
        raise InputError(f"{source}: {span}: no voxel below {SOFT_TISSUE_HU:g} HU (no air or soft tissue): not a "
                         "CT in Hounsfield units")
    if hi - lo < MIN_HU_SPREAD:
        raise InputError(f"{source}: {span} span less than {MIN_HU_SPREAD:g} HU: a normalised or windowed image, "
                         "not a CT in Hounsfield units")


@dataclass
class Volume:
    """A CT volume as NIfTI holds it: voxels indexed (i, j, k), the RAS+ affine, and the voxel spacing as
    recorded by the file (NIfTI ``pixdim``; for DICOM the series' spacing), which outputs repeat bit for bit."""

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]


def read_nifti_volume(path: str | os.PathLike[str]) -> Volume:
    """A NIfTI file as a float32 :class:`Volume`, read like MONAI's ``LoadImaged`` (nibabel, scaled values)."""
    try:
        data, affine = load_nifti(path)
        zooms = nib.load(str(path)).header.get_zooms()
    except DatasetError as exc:
        raise InputError(str(exc)) from None
    # Converters sometimes write a trailing singleton 4th axis; it is still one volume.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    spacing = tuple(float(z) for z in zooms[:3])
    if len(spacing) < 3:  # a 2D file: check_ct reports it; the spacing only matters for writing
        spacing = spacing + (1.0,) * (3 - len(spacing))
    return Volume(np.asarray(data, dtype=np.float32), affine, spacing)  # type: ignore[arg-type]


def dicom_affine(direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """The RAS+ voxel-to-world affine of an ITK image (whose geometry is in LPS+) indexed (i, j, k).

    ITK: ``x_LPS = origin + direction @ diag(spacing) @ index``; RAS flips the first two world axes.
    """
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, np.float64))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_dicom_series(folder: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """A DICOM series as a float32 :class:`Volume` (indexed (i, j, k), RAS affine), as if converted to NIfTI.

    SimpleITK (GDCM) sorts the slices by position and applies the rescale slope and intercept, so the
    values are Hounsfield units.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    label = str(folder) if series_uid is None else f"{folder} (DICOM series {series_uid})"
    try:
        if series_uid is None:
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            if not uids:
                raise InputError(f"{label}: no DICOM series found")
            series_uid = uids[0]
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        image = reader.Execute()
    except InputError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK trace
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if "rror" in ln or "annot" in ln), lines[-1] if lines else "")
        raise InputError(f"{label}: cannot read DICOM series ({type(exc).__name__}: {_one_line(detail)})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{label}: expected a 3D single-component series, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    # SimpleITK arrays are indexed (k, j, i); NIfTI arrays (i, j, k).
    data = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0)).astype(np.float32, copy=False)
    spacing = tuple(float(v) for v in image.GetSpacing())
    return Volume(data, dicom_affine(image.GetDirection(), spacing, image.GetOrigin()), spacing)  # type: ignore[arg-type]


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


def write_nifti(
    path: str | os.PathLike[str], data: np.ndarray, affine: np.ndarray, zooms: Sequence[float], dtype: type
) -> Path:
    """Atomically write a NIfTI-1 file on the input's grid: qform = sform = ``affine`` (code 1, scanner) and
    pixdim = the input's ``zooms`` exactly (deriving them from the float32-stored affine could differ in the
    last bit). Gzip without a timestamp, so equal arrays give equal files."""
    arr = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_zooms(tuple(float(z) for z in zooms))
    raw = img.to_bytes()
    if Path(path).name.endswith(".gz"):
        # Level 1: label maps compress nearly as well as at 6, which took ~1 s for 512 x 512 x 32.
        raw = gzip.compress(raw, compresslevel=1, mtime=0)
    return atomic_write_bytes(path, raw)


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
