"""The report's sections on the study grid beyond methods and folds: seeds, training-set sizes, forgetting.

A study repeats every job per fine-tuning seed, per training-set size (``train_cases``) and evaluates it on
held-out source-domain cases as well (:mod:`medlora.training.crossval`). The main tables and the paired tests
use the target cases of jobs trained on whole folds, each case averaged over the seeds
(:meth:`~.results.RunScan.seed_averaged`); the sections here show what that average hides:

* **Seeds**: per job the mean Dice of each seed, their mean, the seed-to-seed standard deviation (sample,
  ``n - 1``) and the difference to full fine-tuning per seed, so that a reader sees which conclusions held in
  every seed.
* **Training-set size**: mean Dice per job and size (cases and seeds averaged); the figure is
  :func:`medlora.evaluation.plots.dice_vs_train_cases`.
* **Forgetting**: per fine-tuned job the target gain and the source-domain change against no fine-tuning
  (the base), both as paired comparisons with bootstrap intervals and Holm-adjusted Wilcoxon p-values
  (:func:`~.statistics.compare_all`, one family per domain), and for every job trained with the "Mask the
  Target" regulariser (``forgetting_weight`` λ > 0) whether it lowered forgetting at equal target Dice against
  the same job without it.
"""

from __future__ import annotations

import math
import statistics as pystats
from collections.abc import Sequence
from typing import Any

from ..runs import ALL_CASES, job_name_without_forgetting
from .results import SOURCE, RunScan
from .statistics import BETTER, INCONCLUSIVE, WORSE, Comparison, JobStats, column, compare_all, nanmean, paired_values
from .tables import NA, fmt, fmt_ci, fmt_comparison, fmt_p, fmt_signed, md_table

__all__ = ["forgetting_section", "seeds_table", "size_table"]


def _by(rows: Sequence[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def seeds_table(main: RunScan, stats: Sequence[JobStats]) -> str | None:
    """Per job: mean Dice of each seed, their mean and sample std, and Δ vs full fine-tuning per seed.

    ``main`` holds the per-seed folds (not averaged). None when no job has two seeds.
    """
    rows = main.rows()
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    if len(seeds) < 2:
        return None
    full = next((s.job for s in stats if s.family == "full"), None)
    by_seed = _by(rows, "seed")
    table = []
    for s in stats:
        means = [nanmean(column((r for r in by_seed.get(seed, []) if r["job"] == s.job), "Dice")) for seed in seeds]
        kept = [m for m in means if not math.isnan(m)]
        spread = pystats.stdev(kept) if len(kept) >= 2 else float("nan")
        deltas = []
        for seed in seeds:
            if full is None or s.job == full:
                continue
            _, a, b = paired_values(by_seed.get(seed, []), s.job, full)
            deltas.append(fmt_signed(float((a - b).mean())) if len(a) else NA)
        table.append((s.name, *(fmt(m) for m in means), fmt(nanmean(kept)), fmt(spread),
                      " / ".join(deltas) if deltas else NA))
    header = ("Method", *(f"seed {seed}" for seed in seeds), "mean", "seed sd", "Δ vs full per seed")
    return md_table(header, table, (False, *(True for _ in header[1:])))


SEEDS_NOTE = ("Mean Dice over the held-out cases per fine-tuning seed (every job, fold and training subset "
              "repeated with each seed; the pretrained base is shared unless the study sets pretrain_seeds). seed sd: "
              "sample standard deviation of the per-seed means. Δ vs full per seed: mean paired difference to full "
              "fine-tuning within each seed; a conclusion held across seeds when its sign is the same in every "
              "seed. The other tables average each case over the seeds first.")


def size_table(sizes: RunScan, stats: Sequence[JobStats]) -> str | None:
    """Mean Dice per job and training-set size (``sizes``: seed-averaged target folds of every size); None with
    one size."""
    rows = sizes.rows()
    by_size = _by(rows, "train_cases")
    if len(by_size) < 2:
        return None
    order = sorted(by_size, key=lambda c: (c == ALL_CASES, 0 if c == ALL_CASES else int(c)))
    header = ["Method"]
    for c in order:
        n = nanmean(float(r["n_train_cases"]) for r in by_size[c] if r.get("n_train_cases") is not None)
        header.append(f"{c} cases" if c != ALL_CASES else f"all ({n:.3g} cases)" if not math.isnan(n) else "all")
    table = [(s.name, *(fmt(nanmean(column((r for r in by_size[c] if r["job"] == s.job), "Dice"))) for c in order))
             for s in stats]
    return md_table(header, table, (False, *(True for _ in order)))


SIZE_NOTE = ("Mean Dice over the held-out cases (each averaged over the seeds) when every fold's training part is "
             "cut to the given number of cases: one deterministic draw per seed and fold, nested (the smaller "
             "subsets lie inside the larger). The held-out cases are the same for every size.")


def _verdict_word(c: Comparison, better: str, worse: str, same: str) -> str:
    return {BETTER: better, WORSE: worse, INCONCLUSIVE: same}[c.verdict]


def forgetting_section(scan: RunScan, stats: Sequence[JobStats]) -> list[str] | None:
    """The forgetting table and the regulariser's verdicts (Markdown lines); None without source-domain rows.

    ``scan`` is the whole run folder's scan (target and source folds of whole-fold jobs are used).
    """
    source = scan.select(SOURCE).seed_averaged().rows()
    if not source:
        return None
    target = scan.select().seed_averaged().rows()
    base = next((s for s in stats if s.family == "none"), None)
    if base is None:
        return ["No no-fine-tuning job: the source-domain Dice of the base, which forgetting is measured against, is "
                "unknown."]
    names = {s.job: s.name for s in stats}
    tuned = [s for s in stats if s.family != "none" and any(r["job"] == s.job for r in source)]
    gains = {c.method: c for c in compare_all(target, [(s.job, base.job, "target gain") for s in tuned])}
    drops = {c.method: c for c in compare_all(source, [(s.job, base.job, "source change") for s in tuned])}
    base_source = nanmean(column((r for r in source if r["job"] == base.job), "Dice"))
    table = [(names[base.job], fmt(base.dice[0]), NA, fmt(base_source), NA, "the base")]
    for s in tuned:
        gain, drop = gains[s.job], drops[s.job]
        src = nanmean(column((r for r in source if r["job"] == s.job), "Dice"))
        table.append((s.name, fmt(s.dice[0]), f"{fmt_signed(gain.delta)} {fmt_ci(gain.ci)} p_adj {fmt_p(gain.p_adj)}",
                      fmt(src), f"{fmt_signed(drop.delta)} {fmt_ci(drop.ci)} p_adj {fmt_p(drop.p_adj)}",
                      _verdict_word(drop, "gains on the source", "forgets", "no measurable forgetting")))
    lines = [md_table(("Method", "target Dice", "target gain vs base (95% CI)", "source Dice",
                       "source change vs base (95% CI)", "source verdict"), table,
                      (False, True, True, True, True, False)), "",
             "Target: the held-out target cases (the main table's Dice). Source: held-out source-domain cases the "
             "base never trained on, split over the folds like the target cases; each fold's model is evaluated "
             "on its share. Gains and changes are paired per case against no fine-tuning (the base), 95% "
             "bootstrap CI, Wilcoxon signed-rank p Holm-adjusted within each column. What adapting costs on the "
             "original task is the source change next to the target gain."]
    regularised = sorted({(r["job"], float(r.get("forgetting_weight") or 0.0)) for r in target
                          if float(r.get("forgetting_weight") or 0.0) > 0})
    pairs = [(job, job_name_without_forgetting(job, weight)) for job, weight in regularised]
    pairs = [(job, plain) for job, plain in pairs if plain in names and job in names]
    if pairs:
        on_source = {c.method: c for c in compare_all(source, [(a, b, "λ on source") for a, b in pairs])}
        on_target = {c.method: c for c in compare_all(target, [(a, b, "λ on target") for a, b in pairs])}
        lines += ["", "Mask-the-Target regulariser (forgetting_weight λ) against the same job without it:", ""]
        for job, plain in pairs:
            src, tgt = on_source[job], on_target[job]
            lowers = src.verdict == BETTER
            equal = tgt.verdict == INCONCLUSIVE
            answer = ("yes" if lowers and equal else "no: " + "; ".join(
                ([] if lowers else ["source Dice not significantly higher"])
                + ([] if equal else [f"target Dice significantly {'lower' if tgt.verdict == WORSE else 'higher'}"])))
            lines.append(f"- {names[job]} vs {names[plain]}: lowers forgetting at equal target Dice — {answer}. "
                         f"Source {fmt_comparison(src)}; target {fmt_comparison(tgt)}.")
    return lines
