"""The study report: ``RUN_DIR/jobs/<job>/fold_<k>/summary.json`` -> results.csv, significance.csv, plots, report.md.

:func:`build_report` only orchestrates: it scans the run folder (:mod:`.results`), aggregates per job and
runs the paired comparisons (:mod:`.statistics`), writes ``results.csv`` (one row per job and case),
``significance.csv`` (one row per comparison), the figures under ``plots/``
(:mod:`.plots`) and ``report.md`` from the tables of :mod:`.tables`, whose last section checks the seed
paper's findings (:mod:`.findings`) against this study's numbers. Summaries are read and written by
:mod:`.summary`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes
from .calibration import CalibrationHistogram
from .findings import Finding, check_findings, comparison_plan, introduction, select_findings
from .grid import SEEDS_NOTE, SIZE_NOTE, forgetting_section, seeds_table, size_table
from .plots import plot_report
from .results import RunScan, collect, job_sort_key, scan_run, write_results_csv
from .statistics import JobStats, compare_all, job_stats
from .summary import ReportError
from .tables import (
    CALIBRATION_NOTE,
    RESULTS_NOTE,
    SIGNIFICANCE_NOTE,
    calibration_table,
    folds_table,
    results_table,
    significance_csv,
    significance_table,
    study_table,
)

_STUDY_INFO_FILE = "study_info.json"


@dataclass
class _StudyInfo:
    info: dict[str, Any] | None
    findings: list[Finding]
    named: list[tuple[str, str]]  # the study's own comparisons that can be computed
    skipped: list[str]  # notes on those that cannot (an unfinished job)


def _load_study_info(run_dir: Path, study_info: dict[str, Any] | None, finished: set[str]) -> _StudyInfo:
    """The study info (given, or saved by an earlier call), the findings and comparisons it selects.

    A given one is saved after its selections are checked, so that a bad one leaves nothing behind.
    """
    # kept beside the results so that `medlora report RUN_DIR` rebuilds the same header later
    path = run_dir / _STUDY_INFO_FILE
    if study_info is None and path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReportError(f"{path}: unreadable study info ({exc})".replace("\n", " ")) from None
        info = loaded if isinstance(loaded, dict) else None
    else:
        info = study_info
    findings = _findings_of(info, path)
    job_names = (info or {}).get("job_names")
    named, skipped = _named_pairs(info, path, finished, job_names if isinstance(job_names, list) else None)
    if study_info is not None:
        atomic_write_bytes(path, json.dumps(study_info, indent=2, default=str) + "\n")
    return _StudyInfo(info, findings, named, skipped)


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


def _named_pairs(study_info: dict[str, Any] | None, path: Path, finished: set[str],
                 expected: Sequence[str] | None) -> tuple[list[tuple[str, str]], list[str]]:
    """The pairs a study names (``comparisons: [[a, b], ...]``) that can be computed, and notes on the others.

    A malformed list, or a job the study does not know (neither finished nor expected), is refused in one line
    naming ``study_info.json``; a pair with an expected but unfinished job is left out with a note.
    """
    names = (study_info or {}).get("comparisons")
    if names is None:
        return [], []
    ok = isinstance(names, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(j, str) for j in p) for p in names)
    if not ok:
        raise ReportError(f"{path}: 'comparisons' must be a list of [method_job, reference_job] pairs, not {names!r}")
    pairs, notes = [], []
    for a, b in names:
        unknown = [j for j in (a, b) if j not in finished and j not in (expected or ())]
        if unknown:
            raise ReportError(f"{path}: comparison [{a}, {b}] names an unknown job {unknown[0]!r} "
                              f"(jobs: {', '.join(sorted(finished))})")
        if a in finished and b in finished:
            pairs.append((a, b))
        else:
            notes.append(f"comparison {a} vs {b} left out: {a if a not in finished else b} has no finished fold.")
    return pairs, notes


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


def _pooled_calibration(scan: RunScan) -> dict[str, CalibrationHistogram]:
    """Per job, the calibration histograms of its folds added up (jobs whose summaries carry none are left out)."""
    pooled: dict[str, CalibrationHistogram] = {}
    for fold in scan.folds:
        hist = fold.info.get("calibration")
        if hist is None:
            continue
        job = fold.info["job"]
        try:
            pooled[job] = hist if job not in pooled else pooled[job] + hist
        except ValueError as exc:
            raise ReportError(f"{fold.path}: {exc}") from None
    return pooled


def build_report(run_dir: str | os.PathLike[str], study_info: dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, ``results.csv`` and ``plots/*.png`` into ``run_dir``; returns the report's path.

    ``study_info`` (dataset, k, seed, budgets, ``expected_jobs``, ``job_names``, optionally ``findings``: the
    names of the seed paper's findings to check, and ``comparisons``: ``[method_job, reference_job]`` pairs
    to test besides the standard ones) becomes the header and the completeness check; it is saved as
    ``study_info.json`` and reused when a later call passes none. The paired comparisons go to the
    significance table, ``significance.csv`` and a forest plot, and decide the findings' verdicts.
    """
    run_dir = Path(run_dir)
    scan = scan_run(run_dir)
    if not scan.folds:
        raise ReportError(f"{run_dir}: no finished jobs (no jobs/<job>/seed_<s>/cases_<n>/fold_<k>/summary.json)")
    loaded = _load_study_info(run_dir, study_info, {f.info["job"] for f in scan.folds})
    study_info, findings = loaded.info, loaded.findings
    job_names = (study_info or {}).get("job_names")
    job_names = [str(n) for n in job_names] if isinstance(job_names, list) else None
    # the target cases of jobs trained on whole folds, each case averaged over the seeds: tables, statistics,
    # findings (the seeds, training-set sizes and source-domain cases have sections of their own, .grid)
    main = scan.select()
    averaged = main.seed_averaged()
    rows = averaged.rows(job_names)
    stats = sorted(job_stats(averaged.folds), key=lambda s: job_sort_key(s.family, s.method, s.rank, s.job,
                                                                          job_names))
    comparisons = compare_all(rows, comparison_plan(stats, rows, findings, loaded.named))
    names = {s.job: s.name for s in stats}
    write_results_csv(scan.rows(job_names), run_dir / "results.csv")  # every row: all seeds, sizes, domains
    atomic_write_bytes(run_dir / "significance.csv", significance_csv(comparisons, names))
    calibration = _pooled_calibration(main)
    size_rows = scan.select(train_cases=None).seed_averaged().rows(job_names)
    plots = plot_report(stats, rows, run_dir / "plots", comparisons, calibration, size_rows)

    title = (study_info or {}).get("name") or run_dir.name
    md = [f"# Transfer study report: {title}", ""]
    if study_info:
        md += ["## Study", "", study_table(study_info), ""]
    finished = scan.select(train_cases=None)  # every finished job run (target summaries)
    md += ["## Completeness", "", *(f"- {line}" for line in _completeness(finished, study_info, stats)), ""]
    md += ["## Results per method and rank", "", results_table(stats), "", RESULTS_NOTE, ""]
    md += ["## Dice per fold", "", folds_table(stats), ""]
    md += ["## Significance (paired per case)", ""]
    if comparisons:
        md += [significance_table(comparisons, names), "", SIGNIFICANCE_NOTE, ""]
    else:
        md += ["No comparisons: the study has no full fine-tuning, module-wise or named reference job.", ""]
    md += [f"- {note}" for note in loaded.skipped] + ([""] if loaded.skipped else [])
    seeds = seeds_table(main, stats)
    if seeds:
        md += ["## Seeds", "", seeds, "", SEEDS_NOTE, ""]
    sizes = size_table(scan.select(train_cases=None).seed_averaged(), stats)
    if sizes:
        md += ["## Training-set size", "", sizes, "", SIZE_NOTE, ""]
    forgetting = forgetting_section(scan, stats)
    if forgetting:
        md += ["## Forgetting on the source domain", "", *forgetting, ""]
    if calibration:
        md += ["## Calibration of the probability maps", "",
               calibration_table([(s.name, calibration[s.job]) for s in stats if s.job in calibration]), "",
               CALIBRATION_NOTE, ""]
    md += ["## Plots", ""]
    for caption, path in plots.items():
        md += [f"![{caption}]({path.relative_to(run_dir).as_posix()})", ""]
    md += ["## Findings vs. the seed paper", "", introduction(findings), "",
           *(v.line() for v in check_findings(stats, rows, findings, comparisons)), ""]
    report = run_dir / "report.md"
    atomic_write_bytes(report, "\n".join(md))
    return report


__all__ = ["ReportError", "build_report", "collect", "write_results_csv"]
