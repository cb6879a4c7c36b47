"""Read and validate CT segmentation datasets stored in the nnU-Net v2 raw layout, and build k-fold splits.

Layout (nnU-Net v2 ``documentation/dataset_format.md``)::

    DatasetXXX_Name/
      dataset.json                 channel_names, labels, numTraining, file_ending
      imagesTr/CASE_0000.nii.gz    one file per channel: CASE_XXXX<file_ending>
      labelsTr/CASE.nii.gz         integer labels, background 0

``dataset.json`` may instead list the files explicitly under a ``"dataset"`` key
(``{case: {"images": [...], "label": ...}}``, paths relative to the dataset folder), as nnU-Net allows.
nnU-Net v2 also accepts absolute paths and ``$VARIABLES`` there (``get_filenames_of_train_images_and_targets``
expands them), so entries that lead outside the dataset folder are used, with one warning per dataset
naming the first such entry: a listing that was meant to be self-contained but points elsewhere (a copied
dataset whose ``../`` paths still lead to the original) is then visible instead of silent.

Validation (:func:`validate_dataset`) also applies the CT plausibility test of ``medlora infer``
(:func:`medlora.data.ct.ct_problem`) to every channel that ``channel_names`` calls ``CT``: a normalised
or windowed image would train without complaint and give a model that expects the wrong units.

Every problem is reported as a :class:`DatasetError` whose message is ONE line naming the file (and case)
and what is wrong, so command-line tools can print it as-is and exit non-zero.

Folds follow nnU-Net's ``splits_final.json`` format (a list of ``{"train": [...], "val": [...]}``) and
:func:`make_splits` reproduces nnU-Net's default split exactly (``KFold(n_splits=5, shuffle=True,
random_state=12345)`` over the sorted case ids) without depending on scikit-learn.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedloraError
from ..fileio import atomic_write_bytes
from .ct import ct_problem
from .nifti import NiftiError, write_nifti
from .nifti import load_nifti as _load_nifti

__all__ = [
    "AFFINE_ATOL_MM",
    "DatasetError",
    "CaseRecord",
    "DatasetIndex",
    "read_dataset",
    "validate_dataset",
    "load_nifti",
    "save_nifti",
    "atomic_write_bytes",
    "make_splits",
    "load_splits",
    "write_splits",
    "check_splits",
    "ensure_splits",
]

AFFINE_ATOL_MM = 1e-3
SPLITS_FILE = "splits_final.json"
_CHANNEL_RE = re.compile(r"_(\d{4})$")


class DatasetError(MedloraError, ValueError):
    """A dataset file is missing, malformed or inconsistent; the message is one line naming the file."""


@dataclass(frozen=True)
class CaseRecord:
    """One training case: its id, one image file per channel (in channel order) and its label file."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None

    def as_dict(self) -> dict[str, Any]:
        """MONAI-style data dict (``{"image": [...], "label": ..., "case_id": ...}``) with string paths."""
        return {
            "case_id": self.case_id,
            "image": [str(p) for p in self.images],
            "label": None if self.label is None else str(self.label),
        }


@dataclass(frozen=True)
class DatasetIndex:
    """A dataset folder: its root, the parsed ``dataset.json`` and the cases sorted by id."""

    root: Path
    meta: dict[str, Any]
    cases: list[CaseRecord]

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    @property
    def file_ending(self) -> str:
        return str(self.meta["file_ending"])

    @property
    def num_channels(self) -> int:
        return len(self.meta["channel_names"])

    @property
    def label_values(self) -> set[int]:
        return _label_values(self.meta["labels"])

    def case(self, case_id: str) -> CaseRecord:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)


# ----------------------------------------------------------------------------------------------- I/O


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# One writer for every NIfTI file medlora writes (datasets and predictions): medlora.data.nifti.
save_nifti = write_nifti


def load_nifti(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI file fully into memory: its voxels and affine; any failure is a one-line :class:`DatasetError`."""
    try:
        return _load_nifti(path)
    except NiftiError as exc:
        raise DatasetError(str(exc)) from None


# ------------------------------------------------------------------------------------- dataset.json


def _label_values(labels: dict[str, Any]) -> set[int]:
    # nnU-Net v2 region-based datasets map a name to a list of label values.
    values: set[int] = set()
    for v in labels.values():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            values.add(int(x))
    return values


def foreground_values(index: DatasetIndex, foreground: Sequence[int | str] | None = None) -> list[int] | None:
    """The label values that the binary view of ``index``'s labels counts as foreground, or None (no view needed).

    ``foreground``: label names or values of ``dataset.json`` ``"labels"`` (e.g. ``["subarachnoid"]``: one class
    of a multi-class dataset). None: every non-background value when the dataset has more than one (the binary
    view of a multi-class dataset); a binary dataset needs no view, so its pipeline is exactly as before.
    """
    labels = index.meta["labels"]
    nonzero = sorted(v for v in index.label_values if v != 0)
    if foreground is None:
        return nonzero if len(nonzero) > 1 else None
    out: set[int] = set()
    for item in foreground:
        if isinstance(item, str) and not item.lstrip("-").isdigit():
            if item not in labels or item == "background":
                raise DatasetError(f"{index.root / 'dataset.json'}: foreground class {item!r} is not one of its labels "
                                   f"({', '.join(k for k in labels if k != 'background')})")
            v = labels[item]
            out.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        elif int(item) in nonzero:
            out.add(int(item))
        else:
            raise DatasetError(f"{index.root / 'dataset.json'}: foreground value {item!r} is not a non-background "
                               f"label value ({', '.join(map(str, nonzero))})")
    if not out:
        raise DatasetError(f"{index.root / 'dataset.json'}: foreground names no class")
    return sorted(out)


def _read_meta(root: Path) -> dict[str, Any]:
    meta_path = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path}: missing dataset.json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{meta_path}: not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: expected a JSON object at top level")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise DatasetError(f"{meta_path}: missing required key '{key}'")
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{meta_path}: 'channel_names' must be a non-empty object like {{\"0\": \"CT\"}}")
    if sorted(channels, key=lambda k: (len(k), k)) != [str(i) for i in range(len(channels))]:
        raise DatasetError(f"{meta_path}: 'channel_names' keys must be \"0\"..\"{len(channels) - 1}\"")
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{meta_path}: 'labels' must be a non-empty object like {{\"background\": 0}}")
    try:
        values = _label_values(labels)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{meta_path}: 'labels' values must be integers ({_one_line(exc)})") from exc
    if 0 not in values:
        raise DatasetError(f"{meta_path}: 'labels' must map background to 0")
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DatasetError(f"{meta_path}: 'file_ending' must be a string like \".nii.gz\"")
    if "numTraining" in meta and not isinstance(meta["numTraining"], int):
        raise DatasetError(f"{meta_path}: 'numTraining' must be an integer")
    return meta


# --------------------------------------------------------------------------------------- case lists


def _visible_files(folder: Path, ending: str) -> list[Path]:
    # Dot-files are skipped: they are temporaries of an interrupted atomic write (or OS litter).
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(ending)
                  and not p.name.startswith("."))


def _cases_from_folders(root: Path, meta: dict[str, Any]) -> list[CaseRecord]:
    ending = meta["file_ending"]
    n_ch = len(meta["channel_names"])
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: missing imagesTr folder")
    if not labels_dir.is_dir():
        raise DatasetError(f"{labels_dir}: missing labelsTr folder")

    for folder in (images_dir, labels_dir):
        for p in sorted(folder.iterdir()):
            if p.is_dir() and p.name.endswith(ending):
                raise DatasetError(f"{p}: a folder, not a {ending} file")
    channels: dict[str, dict[int, Path]] = {}
    for f in _visible_files(images_dir, ending):
        stem = f.name[: -len(ending)]
        m = _CHANNEL_RE.search(stem)
        if m is None:
            raise DatasetError(f"{f}: image name must be CASE_XXXX{ending} (4-digit channel id, e.g. _0000)")
        case_id, ch = stem[: m.start()], int(m.group(1))
        if ch >= n_ch:
            raise DatasetError(
                f"{f}: channel {ch:04d} of case {case_id} but dataset.json declares {n_ch} channel(s)"
            )
        channels.setdefault(case_id, {})[ch] = f
    if not channels:
        raise DatasetError(f"{images_dir}: no images ending in {ending}")

    label_ids = {f.name[: -len(ending)]: f for f in _visible_files(labels_dir, ending)}
    cases = []
    for case_id in sorted(channels):
        chans = channels[case_id]
        for ch in range(n_ch):
            if ch not in chans:
                missing = images_dir / f"{case_id}_{ch:04d}{ending}"
                raise DatasetError(f"{missing}: missing image file (channel {ch:04d} of case {case_id})")
        if case_id not in label_ids:
            raise DatasetError(f"{labels_dir / (case_id + ending)}: missing label file for case {case_id}")
        cases.append(CaseRecord(case_id, tuple(chans[ch] for ch in range(n_ch)), label_ids[case_id]))
    orphans = sorted(set(label_ids) - set(channels))
    if orphans:
        case_id = orphans[0]
        nested = sorted(images_dir.rglob(f"{case_id}_[0-9][0-9][0-9][0-9]{ending}"))
        if nested:
            raise DatasetError(f"{nested[0]}: image of case {case_id} is in a subfolder of {images_dir}; images "
                               "must be directly in imagesTr")
        raise DatasetError(f"{label_ids[case_id]}: label file has no image (no {case_id}_0000{ending} in "
                           f"{images_dir})")
    return cases


def _cases_from_json(root: Path, meta: dict[str, Any]) -> list[CaseRecord]:
    meta_path = root / "dataset.json"
    listing = meta["dataset"]
    if not isinstance(listing, dict) or not listing:
        raise DatasetError(
            f"{meta_path}: 'dataset' must map case ids to {{\"images\": [...], \"label\": ...}}"
        )

    def resolve(p: str) -> Path:
        q = Path(os.path.expandvars(p))
        return q if q.is_absolute() else root / q

    inside = os.path.realpath(root)
    outside: list[tuple[str, str, Path]] = []
    cases = []
    for case_id in sorted(listing):
        entry = listing[case_id]
        if not isinstance(entry, dict) or "images" not in entry or "label" not in entry:
            raise DatasetError(f"{meta_path}: 'dataset' entry for case {case_id} needs 'images' and 'label'")
        images = tuple(resolve(p) for p in entry["images"])
        if len(images) != len(meta["channel_names"]):
            raise DatasetError(
                f"{meta_path}: case {case_id} lists {len(images)} image(s) but "
                f"{len(meta['channel_names'])} channel(s) are declared"
            )
        for ch, p in enumerate(images):
            if not p.is_file():
                raise DatasetError(f"{p}: missing image file (channel {ch:04d} of case {case_id})")
        label = resolve(entry["label"])
        if not label.is_file():
            raise DatasetError(f"{label}: missing label file for case {case_id}")
        for given, path in zip([*entry["images"], entry["label"]], [*images, label], strict=True):
            if os.path.commonpath([inside, os.path.realpath(path)]) != inside:
                outside.append((case_id, str(given), path))
        cases.append(CaseRecord(case_id, images, label))
    if outside:
        case_id, given, path = outside[0]
        warnings.warn(f"{meta_path}: {len(outside)} file(s) listed under 'dataset' lie outside {root} (first: case "
                      f"{case_id}, {given!r} -> {os.path.realpath(path)}); they are used, as nnU-Net v2 allows",
                      UserWarning, stacklevel=3)
    return cases


def read_dataset(root: str | os.PathLike[str]) -> DatasetIndex:
    """Index a dataset in nnU-Net v2 layout without reading any voxels.

    Checks that ``dataset.json`` parses and has the required keys, and that every case has all its
    channel files and a label file. Raises :class:`DatasetError` otherwise.
    """
    root = Path(root)
    meta = _read_meta(root)
    cases = _cases_from_json(root, meta) if "dataset" in meta else _cases_from_folders(root, meta)
    return DatasetIndex(root=root, meta=meta, cases=cases)


# --------------------------------------------------------------------------------------- validation


def _as_volume(data: np.ndarray, path: Path, case_id: str) -> np.ndarray:
    # Some converters write a trailing singleton 4th axis; that is still one 3D volume.
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(
            f"{path} (case {case_id}): expected a 3D volume, got {data.ndim}D array of shape "
            f"{tuple(data.shape)}"
        )
    return data


def _check_finite(data: np.ndarray, path: Path, case_id: str) -> None:
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        bad = ~np.isfinite(data)
        if bad.any():
            n_nan = int(np.isnan(data).sum())
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DatasetError(
                f"{path} (case {case_id}): {int(bad.sum())} non-finite voxel(s) "
                f"({n_nan} NaN, {int(bad.sum()) - n_nan} Inf), first at index {first}"
            )


def _check_geometry(
    path: Path, shape: tuple[int, ...], affine: np.ndarray, ref: Path, ref_shape: tuple[int, ...],
    ref_affine: np.ndarray, case_id: str,
) -> None:
    if shape != ref_shape:
        raise DatasetError(
            f"{path} (case {case_id}): shape {shape} does not match {ref.name} shape {ref_shape}"
        )
    diff = float(np.max(np.abs(affine - ref_affine)))
    if not diff <= AFFINE_ATOL_MM:  # also catches NaN in an affine
        raise DatasetError(
            f"{path} (case {case_id}): affine differs from {ref.name} by up to {diff:.4g} mm "
            f"(tolerance {AFFINE_ATOL_MM} mm)"
        )


def _load_case_file(path: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return load_nifti(path)
    except DatasetError as exc:
        msg, prefix = str(exc), f"{path}: "
        if msg.startswith(prefix):
            msg = f"{path} (case {case_id}): {msg[len(prefix):]}"
        raise DatasetError(msg) from exc


def _check_ct(data: np.ndarray, path: Path, case_id: str) -> None:
    problem = ct_problem(data)
    if problem is not None:
        raise DatasetError(f"{path} (case {case_id}): {problem}")


def _validate_case(case: CaseRecord, allowed: set[int], ct_channels: set[int]) -> None:
    ref_path = case.images[0]
    ref_data, ref_affine = _load_case_file(ref_path, case.case_id)
    ref_data = _as_volume(ref_data, ref_path, case.case_id)
    _check_finite(ref_data, ref_path, case.case_id)
    if 0 in ct_channels:
        _check_ct(ref_data, ref_path, case.case_id)
    ref_shape = tuple(int(s) for s in ref_data.shape)
    del ref_data
    for ch, p in enumerate(case.images[1:], start=1):
        data, affine = _load_case_file(p, case.case_id)
        data = _as_volume(data, p, case.case_id)
        _check_finite(data, p, case.case_id)
        if ch in ct_channels:
            _check_ct(data, p, case.case_id)
        _check_geometry(p, tuple(int(s) for s in data.shape), affine, ref_path, ref_shape, ref_affine,
                        case.case_id)
    if case.label is None:
        return
    lab, lab_affine = _load_case_file(case.label, case.case_id)
    lab = _as_volume(lab, case.label, case.case_id)
    _check_finite(lab, case.label, case.case_id)
    _check_geometry(case.label, tuple(int(s) for s in lab.shape), lab_affine, ref_path, ref_shape, ref_affine,
                    case.case_id)
    if not (np.issubdtype(lab.dtype, np.integer) or np.issubdtype(lab.dtype, np.bool_)):
        if not np.all(np.mod(lab, 1) == 0):
            raise DatasetError(f"{case.label} (case {case.case_id}): label map has non-integer values")
    found = {int(v) for v in np.unique(lab)}
    extra = sorted(found - allowed)
    if extra:
        raise DatasetError(
            f"{case.label} (case {case.case_id}): label value(s) {extra} not in dataset.json labels "
            f"{sorted(allowed)}"
        )


def validate_dataset(root: str | os.PathLike[str], check_voxels: bool = True) -> DatasetIndex:
    """Check a dataset thoroughly and return its index; raise :class:`DatasetError` at the first problem.

    Structure (always): ``dataset.json`` keys, ``imagesTr``/``labelsTr`` present, every case complete,
    no orphan labels, ``numTraining`` equal to the number of cases found.
    Voxels (``check_voxels=True``): every file readable (truncated gzip included), 3D, finite, images and
    label of a case with the same shape and affine (within ``AFFINE_ATOL_MM``), label values declared in
    ``dataset.json``, and every channel named ``CT`` a plausible CT in Hounsfield units
    (:func:`medlora.data.ct.ct_problem`, the test ``medlora infer`` applies to its inputs).
    """
    index = read_dataset(root)
    n_declared = index.meta.get("numTraining")
    if n_declared is not None and n_declared != len(index.cases):
        raise DatasetError(
            f"{index.root / 'dataset.json'}: numTraining is {n_declared} but {len(index.cases)} case(s) found"
        )
    if check_voxels:
        allowed = index.label_values
        ct_channels = {int(k) for k, v in index.meta["channel_names"].items() if str(v).strip().upper() == "CT"}
        for case in index.cases:
            _validate_case(case, allowed, ct_channels)
    return index


# ------------------------------------------------------------------------------------------- splits


def make_splits(case_ids: Iterable[str], k: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net's default cross-validation split, reproduced exactly without scikit-learn.

    nnU-Net sorts the case ids and runs ``KFold(n_splits=k, shuffle=True, random_state=seed)``. KFold
    shuffles ``arange(n)`` with ``RandomState(seed)``, cuts it into k contiguous folds (the first ``n % k``
    one larger) and turns each fold into a boolean mask, so both the train and the val indices come
    out in ascending order.
    """
    ids = sorted(str(c) for c in case_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("make_splits: case ids must be unique")
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"make_splits: k must be an integer >= 2, got {k!r}")
    if k > n:
        raise ValueError(f"make_splits: cannot make {k} folds from {n} case(s)")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(k, n // k, dtype=int)
    sizes[: n % k] += 1
    splits = []
    start = 0
    for size in sizes:
        val_mask = np.zeros(n, dtype=bool)
        val_mask[order[start : start + size]] = True
        start += int(size)
        splits.append({
            "train": [ids[i] for i in np.flatnonzero(~val_mask)],
            "val": [ids[i] for i in np.flatnonzero(val_mask)],
        })
    return splits


def _splits_path(root_or_file: str | os.PathLike[str]) -> Path:
    p = Path(root_or_file)
    return p / SPLITS_FILE if p.is_dir() else p


def load_splits(root_or_file: str | os.PathLike[str]) -> list[dict[str, list[str]]]:
    """Read ``splits_final.json`` (a folder means ``<folder>/splits_final.json``) and check its shape."""
    path = _splits_path(root_or_file)
    if not path.is_file():
        raise DatasetError(f"{path}: splits file not found")
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(splits, list) or not splits:
        raise DatasetError(f"{path}: expected a non-empty list of {{\"train\": [...], \"val\": [...]}}")
    for i, s in enumerate(splits):
        ok = (
            isinstance(s, dict)
            and all(isinstance(s.get(key), list) and all(isinstance(x, str) for x in s[key])
                    for key in ("train", "val"))
        )
        if not ok:
            raise DatasetError(f"{path}: split {i} must be {{\"train\": [case ids], \"val\": [case ids]}}")
        overlap = sorted(set(s["train"]) & set(s["val"]))
        if overlap:
            raise DatasetError(f"{path}: split {i} has case {overlap[0]} in both train and val")
    return splits


def write_splits(root_or_file: str | os.PathLike[str], splits: Sequence[dict[str, list[str]]]) -> Path:
    """Atomically write ``splits`` in nnU-Net's ``splits_final.json`` format; returns the path."""
    path = _splits_path(root_or_file)
    data = [{"train": list(s["train"]), "val": list(s["val"])} for s in splits]
    return atomic_write_bytes(path, (json.dumps(data, indent=4) + "\n").encode("utf-8"))


def check_splits(
    splits: Sequence[dict[str, list[str]]], case_ids: Iterable[str], source: str = SPLITS_FILE
) -> None:
    """Raise :class:`DatasetError` if a split names a case that the dataset does not have."""
    known = set(case_ids)
    for i, s in enumerate(splits):
        for key in ("train", "val"):
            unknown = [c for c in s[key] if c not in known]
            if unknown:
                raise DatasetError(
                    f"{source}: split {i} {key} names case {unknown[0]} which is not in the dataset"
                )


def ensure_splits(
    root: str | os.PathLike[str], k: int = 5, seed: int = 12345, case_ids: Iterable[str] | None = None
) -> list[dict[str, list[str]]]:
    """The dataset's folds: ``<root>/splits_final.json`` if the user provided one, else nnU-Net's default
    split, written there (atomically) so later runs and other tools use the same folds."""
    root = Path(root)
    ids = list(case_ids) if case_ids is not None else read_dataset(root).case_ids
    path = root / SPLITS_FILE
    if path.is_file():
        splits = load_splits(path)
        check_splits(splits, ids, str(path))
        return splits
    splits = make_splits(ids, k=k, seed=seed)
    write_splits(path, splits)
    return splits
