"""The study report: ``RUN_DIR/jobs/<job>/fold_<k>/summary.json`` -> results.csv, plots and report.md.

:func:`build_report` only orchestrates: it scans the run folder (:mod:`.results`), aggregates per job
(:mod:`.statistics`), writes ``results.csv`` (one row per job and case), the figures under ``plots/``
(:mod:`.plots`) and ``report.md`` from the tables of :mod:`.tables`, whose last section checks the seed
paper's findings (:mod:`.findings`) against this study's numbers. Summaries are read and written by
:mod:`.summary`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes
from .findings import Finding, check_findings, introduction, select_findings
from .plots import plot_report
from .results import RunScan, collect, job_sort_key, scan_run, write_results_csv
from .statistics import JobStats, job_stats
from .summary import ReportError
from .tables import RESULTS_NOTE, folds_table, results_table, study_table

_STUDY_INFO_FILE = "study_info.json"


def _load_study_info(run_dir: Path, study_info: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list[Finding]]:
    """The study info (given, or saved by an earlier call) and the findings it selects; a given one is saved."""
    # kept beside the results so that `medlora report RUN_DIR` rebuilds the same header later
    path = run_dir / _STUDY_INFO_FILE
    if study_info is not None:
        findings = _findings_of(study_info, path)  # a bad selection is refused before anything is written
        atomic_write_bytes(path, json.dumps(study_info, indent=2, default=str) + "\n")
        return study_info, findings
    if not path.is_file():
        return None, select_findings()
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: unreadable study info ({exc})".replace("\n", " ")) from None
    loaded = loaded if isinstance(loaded, dict) else None
    return loaded, _findings_of(loaded, path)


def _findings_of(study_info: dict[str, Any] | None, path: Path) -> list[Finding]:
    # a study may name the findings to check (``findings: [...]``); all of the seed paper's by default
    names = (study_info or {}).get("findings")
    if names is None:
        return select_findings()
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ReportError(f"{path}: 'findings' must be a list of finding names, not {names!r}")
    try:
        return select_findings(names)
    except ValueError as exc:
        raise ReportError(f"{path}: {exc}") from None


def _completeness(scan: RunScan, study_info: dict[str, Any] | None, stats: Sequence[JobStats]) -> list[str]:
    lines = [f"Finished job runs (job × fold): {len(scan.folds)} from {len(stats)} jobs."]
    expected = (study_info or {}).get("expected_jobs")
    names = (study_info or {}).get("job_names")
    if isinstance(expected, (list, tuple)):
        names, expected = list(expected), None
    if isinstance(expected, int):
        state = "complete" if len(scan.folds) >= expected else f"INCOMPLETE, {expected - len(scan.folds)} missing"
        lines.append(f"Expected job runs: {expected} — found {len(scan.folds)} ({state}).")
    if isinstance(names, list):
        missing = [n for n in names if n not in {s.job for s in stats}]
        lines.append(f"Expected jobs: {len(names)} — found {len(names) - len(missing)}"
                     + (f"; missing entirely: {', '.join(map(str, missing))}." if missing else "."))
    if scan.unfinished:
        lines.append(f"Unfinished (folder without summary.json, left out): {', '.join(scan.unfinished)}.")
    return lines


def build_report(run_dir: str | os.PathLike[str], study_info: dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, ``results.csv`` and ``plots/*.png`` into ``run_dir``; returns the report's path.

    ``study_info`` (dataset, k, seed, budgets, ``expected_jobs``, ``job_names``, optionally ``findings``: the
    names of the seed paper's findings to check) becomes the header and the completeness check; it is saved
    as ``study_info.json`` and reused when a later call passes none.
    """
    run_dir = Path(run_dir)
    scan = scan_run(run_dir)
    if not scan.folds:
        raise ReportError(f"{run_dir}: no finished jobs (no jobs/<job>/fold_<k>/summary.json)")
    study_info, findings = _load_study_info(run_dir, study_info)
    job_names = (study_info or {}).get("job_names")
    job_names = [str(n) for n in job_names] if isinstance(job_names, list) else None
    rows = scan.rows(job_names)
    stats = sorted(job_stats(scan.folds), key=lambda s: job_sort_key(s.family, s.method, s.rank, s.job, job_names))
    write_results_csv(rows, run_dir / "results.csv")
    plots = plot_report(stats, rows, run_dir / "plots")

    title = (study_info or {}).get("name") or run_dir.name
    md = [f"# Transfer study report: {title}", ""]
    if study_info:
        md += ["## Study", "", study_table(study_info), ""]
    md += ["## Completeness", "", *(f"- {line}" for line in _completeness(scan, study_info, stats)), ""]
    md += ["## Results per method and rank", "", results_table(stats), "", RESULTS_NOTE, ""]
    md += ["## Dice per fold", "", folds_table(stats), ""]
    md += ["## Plots", ""]
    for caption, path in plots.items():
        md += [f"![{caption}]({path.relative_to(run_dir).as_posix()})", ""]
    md += ["## Findings vs. the seed paper", "", introduction(findings), "",
           *(v.line() for v in check_findings(stats, rows, findings)), ""]
    report = run_dir / "report.md"
    atomic_write_bytes(report, "\n".join(md))
    return report


__all__ = ["ReportError", "build_report", "collect", "write_results_csv"]
