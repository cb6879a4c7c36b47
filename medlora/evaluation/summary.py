"""``summary.json`` in nnU-Net's shape: build, write and read it; and the atomic JSON writer runs use.

nnU-Net v2 (``nnunetv2/evaluation/evaluate_predictions.py``) writes one ``summary.json`` per evaluated
folder: ``metric_per_case`` (a list of ``{"metrics": {label: {metric: value}}, "prediction_file",
"reference_file"}``), ``mean`` (per label) and ``foreground_mean`` (over the foreground labels), with NaN
written as ``NaN``. Ours is that shape with two additions: every per-case entry carries its ``case_id``,
and a ``medlora`` block records what produced the fold (job, method, rank, family, parameters, times).
:func:`write_summary` and :func:`load_summary` are the pair every writer and reader goes through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedloraError
from ..fileio import atomic_write_bytes
from .statistics import nanmean

# The binary hemorrhage task has one foreground label; nnU-Net keys the per-label blocks by its string.
FOREGROUND_LABELS: tuple[str, ...] = ("1",)
_NOT_METRICS = ("case_id", "reference_file", "prediction_file")


class ReportError(MedloraError, ValueError):
    """A summary or run folder that cannot be read or reported on; the one-line message names the file."""


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and paths reach the summaries from the metric code
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as indented JSON (NaN as ``NaN``, as nnU-Net does) atomically: temp file, then rename.

    Numpy and torch scalars, arrays and paths are converted; anything else not serialisable raises
    ``TypeError`` before the file is touched.
    """
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, default=_json_default) + "\n")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def summarise_job(case_rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """The ``summary.json`` content of one (job, fold): nnU-Net's shape plus the ``medlora`` block ``info``.

    ``case_rows`` are :func:`~medlora.evaluation.metrics.case_metrics` dicts with ``case_id`` and
    ``reference_file`` (optionally ``prediction_file``) added. ``mean`` holds nan-aware means of every
    numeric metric per label, ``foreground_mean`` their mean over the foreground labels (here only "1").
    """
    label = FOREGROUND_LABELS[0]
    per_case = []
    keys: dict[str, None] = {}
    for row in case_rows:
        metrics = {k: v for k, v in row.items() if k not in _NOT_METRICS}
        keys.update(dict.fromkeys(k for k, v in metrics.items() if _is_number(v)))
        per_case.append({"metrics": {label: metrics}, "case_id": row.get("case_id"),
                         "prediction_file": row.get("prediction_file"), "reference_file": row.get("reference_file")})
    mean = {label: {k: nanmean(c["metrics"][label][k] for c in per_case
                               if _is_number(c["metrics"][label].get(k))) for k in keys}}
    foreground_mean = {k: nanmean(mean[lb][k] for lb in mean) for k in keys}
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": foreground_mean, "medlora": dict(info)}


def write_summary(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a summary (from :func:`summarise_job`) to ``path`` atomically; returns the path.

    A dict without a ``metric_per_case`` list is refused with ``ValueError`` and nothing is written, so that
    a reader never finds a ``summary.json`` that :func:`load_summary` would reject as corrupt.
    """
    path = Path(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("metric_per_case"), list):
        raise ValueError(f"{path}: not a summary (no 'metric_per_case' list); nothing written")
    write_json_atomic(summary, path)
    return path


def _metric_value(value: Any) -> Any:
    # integers (voxel counts) stay exact; a JSON null (a metric that could not be computed) reads as NaN
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return float("nan") if value is None else float(value)


def load_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a ``summary.json`` in nnU-Net's shape (ours or nnU-Net's own).

    Returns the parsed dict with every per-case metric as a number (``int`` kept, otherwise ``float``, null as
    NaN). Anything else (unreadable, not JSON, no ``metric_per_case`` list, a per-case entry without a
    ``metrics`` mapping of labels to metric mappings, a non-numeric metric) raises :class:`ReportError` with one
    line naming the file. The ``medlora`` block, if present, is returned as is.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ReportError(f"{path}: corrupt summary.json ({exc.msg} at {where})") from None
    except UnicodeDecodeError as exc:
        raise ReportError(f"{path}: corrupt summary.json (not UTF-8 text: {exc.reason})") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read summary.json ({exc.strerror or exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metric_per_case"), list):
        raise ReportError(f"{path}: corrupt summary.json (no 'metric_per_case' list)")
    for i, case in enumerate(data["metric_per_case"]):
        try:
            labels = case["metrics"]
            if not isinstance(labels, dict):
                raise TypeError(f"'metrics' is a {type(labels).__name__}, not a mapping of labels")
            case["metrics"] = {label: {k: _metric_value(v) for k, v in metrics.items()}
                               for label, metrics in labels.items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path}: corrupt summary.json (metric_per_case[{i}]: {type(exc).__name__} {exc})"
                              .replace("\n", " ")) from None
    return data


__all__ = ["FOREGROUND_LABELS", "ReportError", "load_summary", "summarise_job", "write_json_atomic",
           "write_summary"]
