"""Reports of k-fold transfer studies: ``RUN_DIR/jobs/<job>/fold_<k>/summary.json`` -> results, plots, findings.

A study run folder holds one nnU-Net-style ``summary.json`` per (job, fold), extended by a ``medlora``
block (method, rank, family, trainable parameters, wall time). :func:`build_report` turns the finished
ones into ``RUN_DIR/results.csv`` (one row per job and case), PNG plots under ``RUN_DIR/plots`` and
``RUN_DIR/report.md``, whose last section checks the seed paper's qualitative findings (Minoccheri,
Hodgman et al. 2025, arXiv 2508.01772) against this study's numbers, saying plainly where they disagree.

Conventions (DESIGN.md, "Evaluation conventions"): statistics are over cases pooled across folds, mean
and population std, nan-aware (Dice is NaN when prediction and reference are both empty, as in nnU-Net);
volume bins are the seed paper's (0, 25], (25, 50], (50, 100], (100, 225] mL of the true volume.
:func:`summarise_job` and :func:`write_json_atomic` are what the study runner writes the summaries with.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedloraError
from ..fileio import atomic_write_bytes
from .metrics import VOLUME_BINS_ML, nanmean_std, volume_bin

METRIC_COLUMNS: tuple[str, ...] = (
    "Dice", "IoU", "soft_Dice", "HD95_mm", "TP", "FP", "FN", "TN", "n_pred", "n_ref",
    "volume_true_ml", "volume_pred_ml", "volume_soft_ml", "volume_error_ml",
)
ID_COLUMNS: tuple[str, ...] = ("job", "method", "label", "rank", "family", "fold", "case_id")
TAIL_COLUMNS: tuple[str, ...] = ("volume_bin", "trainable_params", "total_params", "percent_trainable",
                                 "train_seconds")
FOREGROUND_LABELS: tuple[str, ...] = ("1",)
PAPER_BINS: tuple[str, ...] = tuple(
    f"{lo:g}-{hi:g}" for lo, hi in zip(VOLUME_BINS_ML[:-1], VOLUME_BINS_ML[1:], strict=True)
)
SEED_NO_FINETUNE_DICE: tuple[float, float] = (0.410, 0.26)
# Dice differences smaller than this count as "about equal" when checking "CP-LoRA ≈ other adapters".
DICE_TOLERANCE = 0.05
CP_METHODS: tuple[str, ...] = ("cp_lora", "cp_dora")

_FAMILY_ORDER = {"none": 0, "full": 1, "module": 2, "adapter": 3}
# Used only when the study does not tell its own method order (``study_info["job_names"]``).
_ADAPTER_ORDER = ("lora", "dora", "lora_c", "dora_c", "conv_lora", "conv_dora", "cp_lora", "cp_dora", "salt", "svd")
_FAMILY_BY_JOB = {"no_finetune": "none", "full": "full"}
_STUDY_INFO_FILE = "study_info.json"
_NA = "—"
_AGREE, _CONTRA, _UNCHECKED = "✔ agrees", "✘ contradicts", "– not checked"


class ReportError(MedloraError, ValueError):
    """A run folder that cannot be reported on; the one-line message names the file."""


# ------------------------------------------------------------------------------------------- writing


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
    """Write ``obj`` as indented JSON (NaN as ``NaN``, as nnU-Net does) atomically: temp file, then rename."""
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, default=_json_default) + "\n")


# ---------------------------------------------------------------------------------------- summaries


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _nanmean(values: Iterable[Any]) -> float:
    return nanmean_std([float(v) for v in values])[0]


def summarise_job(case_rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """The ``summary.json`` of one (job, fold) in nnU-Net's shape plus a ``medlora`` block.

    ``case_rows`` are :func:`~medlora.evaluation.metrics.case_metrics` dicts with ``case_id`` and
    ``reference_file`` (optionally ``prediction_file``) added. ``mean`` holds nan-aware means of every
    numeric metric per label, ``foreground_mean`` their mean over the foreground labels (here only "1").
    """
    label = FOREGROUND_LABELS[0]
    not_metrics = {"case_id", "reference_file", "prediction_file"}
    per_case = []
    keys: dict[str, None] = {}
    for row in case_rows:
        metrics = {k: v for k, v in row.items() if k not in not_metrics}
        keys.update(dict.fromkeys(k for k, v in metrics.items() if _is_number(v)))
        per_case.append({"metrics": {label: metrics}, "case_id": row.get("case_id"),
                         "prediction_file": row.get("prediction_file"), "reference_file": row.get("reference_file")})
    mean = {label: {k: _nanmean(c["metrics"][label][k] for c in per_case
                                if _is_number(c["metrics"][label].get(k))) for k in keys}}
    foreground_mean = {k: _nanmean(mean[lb][k] for lb in mean) for k in keys}
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": foreground_mean, "medlora": dict(info)}


# ---------------------------------------------------------------------------------------- collecting


@dataclass
class _FoldRun:
    path: Path
    info: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def _infer_family(job: str) -> str:
    if job in _FAMILY_BY_JOB:
        return _FAMILY_BY_JOB[job]
    return "module" if job.startswith("module_") else "adapter"


def _as_float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _read_fold(path: Path) -> _FoldRun:
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
    block = data.get("medlora")
    if not isinstance(block, dict):
        raise ReportError(f"{path}: summary.json has no 'medlora' block (not written by a medlora study?)")
    job_dir, fold_dir = path.parent.parent.name, path.parent.name
    job = str(block.get("job") or job_dir)
    try:
        fold = int(block["fold"]) if block.get("fold") is not None else int(fold_dir.removeprefix("fold_"))
        rank = None if block.get("rank") is None else int(block["rank"])
        trainable = int(block.get("trainable_params") or 0)
        total = int(block.get("total_params") or 0)
        train_seconds = _as_float(block.get("train_seconds", 0.0))
    except (TypeError, ValueError) as exc:
        raise ReportError(f"{path}: corrupt 'medlora' block ({exc})".replace("\n", " ")) from None
    info = {
        "job": job, "method": str(block.get("method") or job), "label": str(block.get("label") or job),
        "rank": rank, "family": str(block.get("family") or _infer_family(job)), "fold": fold,
        "trainable_params": trainable, "total_params": total,
        "percent_trainable": 100.0 * trainable / total if total else float("nan"),
        "train_seconds": train_seconds,
    }
    run = _FoldRun(path, info)
    label = FOREGROUND_LABELS[0]
    for i, case in enumerate(data["metric_per_case"]):
        try:
            metrics = case["metrics"][label]
            case_id = str(case["case_id"])
            values = {k: (v if isinstance(v, int) and not isinstance(v, bool) else _as_float(v))
                      for k, v in metrics.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path}: corrupt summary.json (metric_per_case[{i}]: {type(exc).__name__} {exc})"
                              .replace("\n", " ")) from None
        true_ml = values.get("volume_true_ml", float("nan"))
        row = {k: info[k] for k in ID_COLUMNS if k != "case_id"}
        row["case_id"] = case_id
        row.update(values)
        row["volume_bin"] = "" if math.isnan(true_ml) else volume_bin(true_ml)
        row.update({k: info[k] for k in TAIL_COLUMNS if k != "volume_bin"})
        run.rows.append(row)
    return run


def _job_sort_key(family: str, method: str, rank: int | None, job: str,
                  job_names: Sequence[str] | None = None) -> tuple[Any, ...]:
    # the study's order: no fine-tuning, full, module-wise, adapters; within a family the config's order
    if job_names and job in job_names:
        within: tuple[Any, ...] = (0, job_names.index(job))
    elif method in _ADAPTER_ORDER:
        within = (1, _ADAPTER_ORDER.index(method), method, rank or 0, job)
    else:
        within = (2, 0, method, rank or 0, job)
    return (_FAMILY_ORDER.get(family, len(_FAMILY_ORDER)), *within)


def _scan(run_dir: Path) -> tuple[list[_FoldRun], list[str]]:
    """Finished fold runs and the ``job/fold`` names of unfinished ones (a folder without summary.json)."""
    runs, unfinished = [], []
    for fold_dir in sorted(p for p in (run_dir / "jobs").glob("*/fold_*") if p.is_dir()):
        summary = fold_dir / "summary.json"
        if summary.is_file():
            runs.append(_read_fold(summary))
        else:
            unfinished.append(f"{fold_dir.parent.name}/{fold_dir.name}")
    return runs, unfinished


def _sort_rows(rows: list[dict[str, Any]], job_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (*_job_sort_key(r["family"], r["method"], r["rank"], r["job"], job_names),
                                       r["fold"], r["case_id"]))


def collect(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per (job, fold, case) of every finished job: ids, all metrics, volume bin, parameters, time.

    Job folders without a ``summary.json`` (unfinished) are skipped; a corrupt one raises :class:`ReportError`
    (a ``ValueError``) whose one-line message names the file.
    """
    runs, _ = _scan(Path(run_dir))
    return _sort_rows([row for run in runs for row in run.rows])


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    fixed = set(ID_COLUMNS) | set(METRIC_COLUMNS) | set(TAIL_COLUMNS)
    extra = sorted({k for r in rows for k in r} - fixed)
    return [*ID_COLUMNS, *METRIC_COLUMNS, *extra, *TAIL_COLUMNS]


def write_results_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` (from :func:`collect`) as CSV with a stable column order, atomically. Returns the path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------------------- statistics


@dataclass
class _JobStats:
    job: str
    name: str
    method: str
    rank: int | None
    family: str
    trainable: int
    total: int
    percent: float
    n_cases: int
    dice: tuple[float, float, int]
    soft_dice: tuple[float, float, int]
    hd95: tuple[float, float, int]
    abs_volume_error: float
    bins: dict[str, tuple[float, int]]
    train_seconds: float
    folds: dict[int, float]


def _display_name(label: str, rank: int | None) -> str:
    # the study runner's labels already carry the rank ("CP-DoRA r8"); hand-written ones may not
    if rank is None or label.endswith(f" r{rank}"):
        return label
    return f"{label} r{rank}"


def _values(rows: Iterable[dict[str, Any]], key: str) -> list[float]:
    return [_as_float(r.get(key)) for r in rows]


def _job_stats(runs: Sequence[_FoldRun], job_names: Sequence[str] | None) -> list[_JobStats]:
    by_job: dict[str, list[_FoldRun]] = {}
    for run in runs:
        by_job.setdefault(run.info["job"], []).append(run)
    stats = []
    for job, job_runs in by_job.items():
        job_runs.sort(key=lambda r: r.info["fold"])
        info = job_runs[0].info
        rows = [r for run in job_runs for r in run.rows]
        bins = {}
        for b in PAPER_BINS:
            mean, _, n = nanmean_std(_values((r for r in rows if r["volume_bin"] == b), "Dice"))
            bins[b] = (mean, n)
        stats.append(_JobStats(
            job=job, name=_display_name(info["label"], info["rank"]), method=info["method"], rank=info["rank"],
            family=info["family"], trainable=info["trainable_params"], total=info["total_params"],
            percent=info["percent_trainable"], n_cases=len(rows),
            dice=nanmean_std(_values(rows, "Dice")), soft_dice=nanmean_std(_values(rows, "soft_Dice")),
            hd95=nanmean_std(_values(rows, "HD95_mm")),
            abs_volume_error=nanmean_std([abs(v) for v in _values(rows, "volume_error_ml")])[0],
            bins=bins,
            # train_seconds is per fold (repeated on every case row), so sum it once per fold
            train_seconds=float(sum(run.info["train_seconds"] for run in job_runs
                                    if not math.isnan(run.info["train_seconds"]))),
            folds={run.info["fold"]: nanmean_std(_values(run.rows, "Dice"))[0] for run in job_runs},
        ))
    stats.sort(key=lambda s: _job_sort_key(s.family, s.method, s.rank, s.job, job_names))
    return stats


# ---------------------------------------------------------------------------------------- formatting


def _fmt(value: float, digits: int = 3) -> str:
    return _NA if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _fmt_ms(stat: tuple[float, float, int], digits: int = 3) -> str:
    mean, std, n = stat
    return _NA if n == 0 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_percent(percent: float) -> str:
    return _NA if math.isnan(percent) else f"{percent:.3g}%"


def _fmt_value(value: Any) -> str:
    if value is None:
        return _NA
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value) or _NA
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    # padded so that the Markdown source reads as a table in a terminal, too
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    widths = [max(w, 3) for w in widths]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) if r else str(c).ljust(w)
                                 for c, w, r in zip(cells, widths, right, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True))
    return "\n".join([line(header), rule + "|", *(line(r) for r in rows)])


# ---------------------------------------------------------------------------------------- findings


def _finding(number: str, verdict: str, text: str) -> str:
    return f"- ({number}) {verdict} — {text}"


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def _findings(stats: Sequence[_JobStats], rows: Sequence[dict[str, Any]]) -> list[str]:
    """The seed paper's qualitative findings, each checked against this study's numbers."""
    lines = []
    scored = [s for s in stats if s.dice[2] > 0]
    tuned = [s for s in scored if s.family != "none"]
    adapters = [s for s in tuned if s.family == "adapter"]
    best = max(tuned, key=lambda s: s.dice[0], default=None)
    baseline = next((s for s in scored if s.family == "none"), None)

    # (1) fine-tuning helps
    if baseline is None or best is None:
        lines.append(_finding("1", _UNCHECKED, "no fine-tuning vs fine-tuning: the study lacks "
                                               + ("a no-fine-tuning job." if baseline is None else "fine-tuned jobs.")))
    else:
        gap = best.dice[0] - baseline.dice[0]
        seed = (f" (seed paper without fine-tuning: {SEED_NO_FINETUNE_DICE[0]:.3f} ± {SEED_NO_FINETUNE_DICE[1]:.2f};"
                f" here {_fmt_ms(baseline.dice)})")
        if gap > 0:
            lines.append(_finding("1", _AGREE, f"no fine-tuning (Dice {baseline.dice[0]:.3f}) is worse than the best "
                                               f"fine-tuned method, {best.name} ({best.dice[0]:.3f}), by {gap:.3f} "
                                               f"Dice{seed}."))
        else:
            lines.append(_finding("1", _CONTRA, f"no fine-tuning (Dice {baseline.dice[0]:.3f}) is NOT worse than the "
                                                f"best fine-tuned method, {best.name} ({best.dice[0]:.3f}; "
                                                f"{_signed(gap)} Dice): fine-tuning did not help in this study{seed}."))

    # (2) LoRA-family adapters beat standard fine-tuning
    best_adapter = max(adapters, key=lambda s: s.dice[0], default=None)
    for number, family, what in (("2", "full", "full fine-tuning"), ("2b", "module", "module-wise fine-tuning")):
        others = [s for s in tuned if s.family == family]
        other = max(others, key=lambda s: s.dice[0], default=None)
        if other is None and family == "module":
            continue  # module-wise fine-tuning is optional in a study
        if best_adapter is None or other is None:
            lines.append(_finding(number, _UNCHECKED, f"adapters vs {what}: the study lacks "
                                                      + ("adapter jobs." if best_adapter is None else f"{what}.")))
            continue
        diff = best_adapter.dice[0] - other.dice[0]
        versus = f"the best {what} job, {other.name}" if family == "module" else what
        text = (f"best adapter, {best_adapter.name} (Dice {best_adapter.dice[0]:.3f}), vs {versus} "
                f"({other.dice[0]:.3f}): {_signed(diff)} Dice")
        if diff > 0:
            lines.append(_finding(number, _AGREE, text + "; the LoRA family beats standard fine-tuning."))
        else:
            lines.append(_finding(number, _CONTRA, text + f"; no adapter beats {what} in this study."))

    # (3) CP-LoRA about as good as other adapters with far fewer parameters
    cps = [s for s in adapters if s.method in CP_METHODS]
    non_cps = [s for s in adapters if s.method not in CP_METHODS]
    if not cps or not non_cps:
        lines.append(_finding("3", _UNCHECKED, "CP-LoRA vs other adapters: the study lacks "
                                               + ("CP-LoRA/CP-DoRA jobs." if not cps else "non-CP adapter jobs.")))
    else:
        cp = max(cps, key=lambda s: s.dice[0])
        other = max(non_cps, key=lambda s: s.dice[0])
        diff = cp.dice[0] - other.dice[0]
        ratio = cp.trainable / other.trainable if other.trainable else float("inf")
        relative = (f"{1 / ratio:.3g}× fewer" if 0 < ratio < 1 else f"{ratio:.3g}× as many") if ratio else "none"
        text = (f"best CP adapter {cp.name} (Dice {cp.dice[0]:.3f}, {cp.trainable:,} params) vs best other adapter "
                f"{other.name} (Dice {other.dice[0]:.3f}, {other.trainable:,} params): {_signed(diff)} Dice with "
                f"a parameter ratio of {ratio:.3g} ({relative})")
        problems = []
        if diff < -DICE_TOLERANCE:
            problems.append(f"CP is worse by more than {DICE_TOLERANCE:g} Dice")
        if cp.trainable >= other.trainable:
            problems.append("CP does not use fewer parameters")
        if problems:
            lines.append(_finding("3", _CONTRA, f"{text}; {' and '.join(problems)}."))
        else:
            lines.append(_finding("3", _AGREE, f"{text}; comparable Dice (within {DICE_TOLERANCE:g} or better) "
                                               "with fewer parameters."))

    # (4) higher rank is better
    by_method: dict[str, list[_JobStats]] = {}
    for s in adapters:
        if s.rank is not None:
            by_method.setdefault(s.method, []).append(s)
    ranked = {m: sorted(v, key=lambda s: s.rank or 0) for m, v in by_method.items() if len({s.rank for s in v}) >= 2}
    if not ranked:
        lines.append(_finding("4", _UNCHECKED, "higher rank better: no adapter method was run at two or more ranks."))
    else:
        parts, agree = [], 0
        for jobs in ranked.values():
            low, high = jobs[0], jobs[-1]
            ok = high.dice[0] > low.dice[0]
            agree += ok
            curve = " → ".join(f"r{s.rank} {s.dice[0]:.3f}" for s in jobs)
            parts.append(f"{low.name.removesuffix(f' r{low.rank}')}: {curve} "
                         f"({'higher rank better' if ok else 'higher rank NOT better'})")
        verdict = _AGREE if agree == len(ranked) else _CONTRA
        lines.append(_finding("4", verdict, f"highest rank beats lowest rank in {agree} of {len(ranked)} adapter "
                                            f"methods: " + "; ".join(parts) + "."))

    # (5) better on larger volumes, over all fine-tuned methods
    tuned_jobs = {s.job for s in tuned}
    tuned_rows = [r for r in rows if r["job"] in tuned_jobs]
    pooled = {b: nanmean_std(_values((r for r in tuned_rows if r["volume_bin"] == b), "Dice")) for b in PAPER_BINS}
    present = [b for b in PAPER_BINS if pooled[b][2] > 0]
    if len(present) < 2:
        lines.append(_finding("5", _UNCHECKED, "Dice vs volume: fewer than two volume bins hold fine-tuned cases."))
    else:
        small, large = present[0], present[-1]
        diff = pooled[large][0] - pooled[small][0]
        holds = [s for s in tuned if s.bins[small][1] and s.bins[large][1]]
        n_ok = sum(s.bins[large][0] > s.bins[small][0] for s in holds)
        text = (f"fine-tuned methods' mean Dice in the largest non-empty bin {large} mL is {pooled[large][0]:.3f} vs "
                f"{pooled[small][0]:.3f} in the smallest, {small} mL ({_signed(diff)}); larger is better for "
                f"{n_ok} of {len(holds)} methods")
        if diff > 0:
            lines.append(_finding("5", _AGREE, text + "."))
        else:
            lines.append(_finding("5", _CONTRA, text + "; this study does NOT find better Dice on large bleeds."))
    return lines


# ---------------------------------------------------------------------------------------- plots


def _plot(stats: Sequence[_JobStats], rows: Sequence[dict[str, Any]], plots_dir: Path) -> dict[str, Path]:
    """The four report figures as PNGs; returns {caption: path}."""
    import matplotlib

    matplotlib.use("Agg")  # headless: reports are built on cluster nodes and in CI
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    cmap = plt.get_cmap("tab10" if len(stats) <= 10 else "tab20")
    colours = {s.job: cmap(i % cmap.N) for i, s in enumerate(stats)}
    names = [s.name for s in stats]
    rows_of = {s.job: [r for r in rows if r["job"] == s.job] for s in stats}
    out: dict[str, Path] = {}

    def save(fig: Any, filename: str, caption: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        path = plots_dir / filename
        atomic_write_bytes(path, buffer.getvalue())
        out[caption] = path

    width = max(6.0, 0.7 * len(stats) + 2)
    # (a) Dice per method, cases of all folds pooled
    fig, ax = plt.subplots(figsize=(width, 4.5))
    data = [[v for v in _values(rows_of[s.job], "Dice") if not math.isnan(v)] for s in stats]
    ax.boxplot([d if d else [float("nan")] for d in data], positions=range(len(stats)), widths=0.6,
               showfliers=False)
    jitter = np.random.default_rng(0)
    for i, (s, d) in enumerate(zip(stats, data, strict=True)):
        ax.scatter(i + jitter.uniform(-0.15, 0.15, len(d)), d, s=12, color=colours[s.job], alpha=0.8, zorder=3)
    ax.set_xticks(range(len(stats)), names, rotation=40, ha="right")
    ax.set_ylabel("Dice per case")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Dice per method (cases of all folds)")
    ax.grid(axis="y", alpha=0.3)
    save(fig, "dice_per_method.png", "Dice per method")

    # (b) mean Dice per volume bin
    fig, ax = plt.subplots(figsize=(max(7.0, 0.4 * len(stats) * len(PAPER_BINS) / 2 + 3), 4.5))
    bar = 0.8 / max(len(stats), 1)
    x = np.arange(len(PAPER_BINS))
    for i, s in enumerate(stats):
        heights = [s.bins[b][0] if s.bins[b][1] else np.nan for b in PAPER_BINS]
        ax.bar(x - 0.4 + bar * (i + 0.5), heights, bar, label=s.name, color=colours[s.job])
    cases_in_bin = {b: len({r["case_id"] for r in rows if r["volume_bin"] == b}) for b in PAPER_BINS}
    ax.set_xticks(x, [f"{b} mL\n(n={cases_in_bin[b]})" for b in PAPER_BINS])
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1.02)
    ax.set_title("Dice by true hemorrhage volume")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    save(fig, "dice_by_volume.png", "Dice by volume bin")

    # (c) predicted vs true volume
    fig, ax = plt.subplots(figsize=(6, 5.5))
    top = 1.0
    for s in stats:
        t = np.array(_values(rows_of[s.job], "volume_true_ml"))
        p = np.array(_values(rows_of[s.job], "volume_pred_ml"))
        ok = ~(np.isnan(t) | np.isnan(p))
        if ok.any():
            top = max(top, float(t[ok].max()), float(p[ok].max()))
        ax.scatter(t[ok], p[ok], s=14, color=colours[s.job], label=s.name, alpha=0.8)
    ax.plot([0, top * 1.05], [0, top * 1.05], "k--", lw=1, label="identity")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("true volume (mL)")
    ax.set_ylabel("predicted volume (mL, thresholded)")
    ax.set_title("Predicted vs true hemorrhage volume")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    save(fig, "volume_pred_vs_true.png", "Predicted vs true volume")

    # (d) Dice vs trainable parameters; no fine-tuning (0 parameters) cannot sit on a log axis: a line instead
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for s in stats:
        if s.dice[2] == 0:
            continue
        if s.trainable > 0:
            ax.errorbar(s.trainable, s.dice[0], yerr=s.dice[1], fmt="o", capsize=3, color=colours[s.job],
                        label=s.name)
            ax.annotate(s.name, (s.trainable, s.dice[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        else:
            ax.axhline(s.dice[0], ls=":", color=colours[s.job], label=f"{s.name} (0 params)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("mean Dice ± std over cases")
    ax.set_title("Dice vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save(fig, "dice_vs_params.png", "Dice vs trainable parameters")
    return out


# ---------------------------------------------------------------------------------------- report


def _load_study_info(run_dir: Path, study_info: dict[str, Any] | None) -> dict[str, Any] | None:
    # kept beside the results so that `medlora report RUN_DIR` rebuilds the same header later
    path = run_dir / _STUDY_INFO_FILE
    if study_info is not None:
        atomic_write_bytes(path, json.dumps(study_info, indent=2, default=str) + "\n")
        return study_info
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: unreadable study info ({exc})".replace("\n", " ")) from None
    return loaded if isinstance(loaded, dict) else None


def _completeness(runs: Sequence[_FoldRun], unfinished: Sequence[str], study_info: dict[str, Any] | None,
                  stats: Sequence[_JobStats]) -> list[str]:
    lines = [f"Finished job runs (job × fold): {len(runs)} from {len(stats)} jobs."]
    expected = (study_info or {}).get("expected_jobs")
    names = (study_info or {}).get("job_names")
    if isinstance(expected, (list, tuple)):
        names, expected = list(expected), None
    if isinstance(expected, int):
        state = "complete" if len(runs) >= expected else f"INCOMPLETE, {expected - len(runs)} missing"
        lines.append(f"Expected job runs: {expected} — found {len(runs)} ({state}).")
    if isinstance(names, list):
        missing = [n for n in names if n not in {s.job for s in stats}]
        lines.append(f"Expected jobs: {len(names)} — found {len(names) - len(missing)}"
                     + (f"; missing entirely: {', '.join(map(str, missing))}." if missing else "."))
    if unfinished:
        lines.append(f"Unfinished (folder without summary.json, left out): {', '.join(unfinished)}.")
    return lines


def build_report(run_dir: str | os.PathLike[str], study_info: dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, ``results.csv`` and ``plots/*.png`` into ``run_dir``; returns the report's path.

    ``study_info`` (dataset, k, seed, budgets, ``expected_jobs``, ``job_names`` ...) becomes the header and
    the completeness check; it is saved as ``study_info.json`` and reused when a later call passes none.
    """
    run_dir = Path(run_dir)
    runs, unfinished = _scan(run_dir)
    if not runs:
        raise ReportError(f"{run_dir}: no finished jobs (no jobs/<job>/fold_<k>/summary.json)")
    study_info = _load_study_info(run_dir, study_info)
    job_names = (study_info or {}).get("job_names")
    job_names = [str(n) for n in job_names] if isinstance(job_names, list) else None
    rows = _sort_rows([row for run in runs for row in run.rows], job_names)
    stats = _job_stats(runs, job_names)
    write_results_csv(rows, run_dir / "results.csv")
    plots = _plot(stats, rows, run_dir / "plots")

    title = (study_info or {}).get("name") or run_dir.name
    md = [f"# Transfer study report: {title}", ""]
    if study_info:
        md += ["## Study", "",
               _md_table(("Setting", "Value"),
                         [(str(k), _fmt_value(v)) for k, v in study_info.items() if k != "job_names"],
                         (False, False)), ""]
    md += ["## Completeness", "", *(f"- {line}" for line in _completeness(runs, unfinished, study_info, stats)), ""]

    header = ("Method", "Rank", "Trainable params", "% of model", "Dice", "n", "soft Dice", "HD95 (mm)",
              "Abs. vol. error (mL)", *(f"Dice {b}" for b in PAPER_BINS), "Train (s)")
    table = [(s.name, _NA if s.rank is None else str(s.rank), f"{s.trainable:,}", _fmt_percent(s.percent),
              _fmt_ms(s.dice), f"{s.dice[2]}/{s.n_cases}", _fmt_ms(s.soft_dice), _fmt_ms(s.hd95, 1),
              _fmt(s.abs_volume_error, 2), *(_fmt(s.bins[b][0]) if s.bins[b][1] else _NA for b in PAPER_BINS),
              f"{s.train_seconds:.1f}") for s in stats]
    md += ["## Results per method and rank", "",
           _md_table(header, table, (False, True, True, True, True, True, True, True, True, True, True, True, True,
                                     True)), "",
           "Mean ± population std over the cases of all folds, nan-aware: n counts the cases with a defined "
           "Dice of all held-out cases (Dice is NaN when prediction and reference are both empty, as in nnU-Net). "
           "Abs. vol. error: mean absolute error of the thresholded predicted volume. Dice per volume bin: mean "
           f"over cases whose true volume lies in (lo, hi] mL ({_NA}: no case). Train: training wall time summed "
           "over folds.",
           ""]

    folds = sorted({f for s in stats for f in s.folds})
    md += ["## Dice per fold", "",
           _md_table(("Method", *(f"fold {f}" for f in folds)),
                     [(s.name, *(_fmt(s.folds[f]) if f in s.folds else _NA for f in folds)) for s in stats],
                     (False, *(True for _ in folds))), ""]

    md += ["## Plots", ""]
    for caption, path in plots.items():
        md += [f"![{caption}]({path.relative_to(run_dir).as_posix()})", ""]

    md += ["## Findings vs. the seed paper", "",
           "The seed paper (Minoccheri, Hodgman et al. 2025) reports no-fine-tuning Dice 0.410 ± 0.26 and: "
           "LoRA-family adapters beat standard fine-tuning; CP-LoRA is about as good as other adapters with far "
           "fewer parameters; higher rank is better; all methods are better on large volumes. Checked against "
           "this study's mean Dice:", "", *_findings(stats, rows), ""]
    report = run_dir / "report.md"
    atomic_write_bytes(report, "\n".join(md))
    return report


__all__ = ["ReportError", "build_report", "collect", "summarise_job", "write_json_atomic", "write_results_csv"]
