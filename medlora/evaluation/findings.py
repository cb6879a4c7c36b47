"""The seed paper's qualitative findings as data, and a checker that tests them with the study's statistics.

Seed paper: Minoccheri, Hodgman et al. 2025, arXiv 2508.01772 (LoRA-family transfer from TBI to SAH
segmentation). It reports a no-fine-tuning Dice of 0.410 ± 0.26 and finds that LoRA-family adapters beat
standard (full and module-wise) fine-tuning, that CP-LoRA is about as good as other adapters with far
fewer parameters, that a higher rank is better and that all methods do better on larger bleeds.

Each :class:`Finding` has a stable name a study can list (``findings:`` in the study info; all by
default), the number it carries in the report, the paper's claim, the paired comparisons it needs (they
join the study's Holm family, see :mod:`.statistics`) and a check that returns a :class:`Verdict`:
*agrees*, *contradicts*, *inconclusive* (an interval that spans 0, or a p-value that does not survive
Holm's adjustment) or *not checked* (the study lacks the jobs), with the numbers it rests on (Δ, 95%
bootstrap interval, adjusted p). Mean differences alone never decide a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .statistics import (
    ALPHA,
    BETTER,
    BOOTSTRAP_SAMPLES,
    BOOTSTRAP_SEED,
    INCONCLUSIVE,
    PAPER_BINS,
    WORSE,
    Comparison,
    JobStats,
    bootstrap_ci_two_sample,
    compare_all,
    decide,
    mann_whitney_p,
    nanmean,
    per_case,
    study_pairs,
)
from .tables import fmt_comparison, fmt_mean_std, fmt_p, fmt_signed

SEED_PAPER = "Minoccheri, Hodgman et al. 2025"
SEED_NO_FINETUNE_DICE: tuple[float, float] = (0.410, 0.26)  # mean ± std over the seed paper's SAH cases
# Non-inferiority margin in Dice for "CP-LoRA is about as good as other adapters".
DICE_TOLERANCE = 0.05
CP_METHODS: tuple[str, ...] = ("cp_lora", "cp_dora")
# The Dice-by-volume test needs this many cases in each of the two bins it compares.
MIN_BIN_CASES = 2

AGREES, CONTRADICTS, INCONCLUSIVE_FINDING, NOT_CHECKED = "agrees", "contradicts", "inconclusive", "not checked"
STATUSES: tuple[str, ...] = (AGREES, CONTRADICTS, INCONCLUSIVE_FINDING, NOT_CHECKED)
_MARKS = {AGREES: "✔ agrees", CONTRADICTS: "✘ contradicts", INCONCLUSIVE_FINDING: "≈ inconclusive",
          NOT_CHECKED: "– not checked"}
_STATUS_OF = {BETTER: AGREES, WORSE: CONTRADICTS, INCONCLUSIVE: INCONCLUSIVE_FINDING}


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one finding: ``status`` is one of :data:`STATUSES`."""

    number: str
    status: str
    text: str

    def line(self) -> str:
        """The report's bullet, e.g. ``- (4) ✔ agrees — highest rank beats ...``."""
        return f"- ({self.number}) {_MARKS[self.status]} — {self.text}"


@dataclass
class Evidence:
    """What the checks read: per-job statistics (report order), per-case rows and the study's comparisons."""

    stats: Sequence[JobStats]
    rows: Sequence[dict[str, Any]]
    comparisons: Sequence[Comparison] = ()
    scored: list[JobStats] = field(init=False)  # jobs with at least one defined Dice
    tuned: list[JobStats] = field(init=False)  # scored jobs that fine-tune something
    adapters: list[JobStats] = field(init=False)

    def __post_init__(self) -> None:
        self.scored = [s for s in self.stats if s.dice[2] > 0]
        self.tuned = [s for s in self.scored if s.family != "none"]
        self.adapters = [s for s in self.tuned if s.family == "adapter"]

    def best(self, jobs: Iterable[JobStats]) -> JobStats | None:
        """The job of highest mean Dice (the first of equals), or None."""
        return max(jobs, key=lambda s: s.dice[0], default=None)

    def comparison(self, method: str, reference: str) -> Comparison | None:
        """The study's comparison of ``method`` against ``reference`` (read either way round), or None."""
        for c in self.comparisons:
            if (c.method, c.reference) == (method, reference):
                return c
            if (c.method, c.reference) == (reference, method):
                return c.flipped()
        return None


Pairs = Callable[[Evidence], list[tuple[str, str]]]


def _no_pairs(ev: Evidence) -> list[tuple[str, str]]:
    return []


@dataclass(frozen=True)
class Finding:
    """One claim of the seed paper, the comparisons it needs and its check (None: does not apply to a study)."""

    name: str
    number: str
    claim: str | None  # for the section's introduction; None: covered by the introduction's baseline Dice
    check: Callable[[Evidence], Verdict | None]
    pairs: Pairs = _no_pairs


def _missing(number: str, what: str) -> Verdict:
    return Verdict(number, NOT_CHECKED, what)


def _untested(number: str, subject: str) -> Verdict:
    # a comparison without paired cases (the jobs share no case with a defined Dice)
    return Verdict(number, NOT_CHECKED, f"{subject}: no case has a defined Dice in both jobs.")


def _fine_tuning_pairs(ev: Evidence) -> list[tuple[str, str]]:
    baseline = next((s for s in ev.scored if s.family == "none"), None)
    best = ev.best(ev.tuned)
    return [(best.job, baseline.job)] if baseline and best else []


def _fine_tuning_helps(ev: Evidence) -> Verdict:
    baseline = next((s for s in ev.scored if s.family == "none"), None)
    best = ev.best(ev.tuned)
    if baseline is None or best is None:
        return _missing("1", "no fine-tuning vs fine-tuning: the study lacks "
                        + ("a no-fine-tuning job." if baseline is None else "fine-tuned jobs."))
    c = ev.comparison(best.job, baseline.job)
    if c is None or c.n == 0:
        return _untested("1", "no fine-tuning vs fine-tuning")
    seed = (f" (seed paper without fine-tuning: {SEED_NO_FINETUNE_DICE[0]:.3f} ± {SEED_NO_FINETUNE_DICE[1]:.2f};"
            f" here {fmt_mean_std(baseline.dice)})")
    text = (f"best fine-tuned method {best.name} (Dice {best.dice[0]:.3f}) vs no fine-tuning "
            f"({baseline.dice[0]:.3f}): {fmt_comparison(c)}")
    status = _STATUS_OF[c.verdict]
    if status == AGREES:
        return Verdict("1", AGREES, f"{text}; fine-tuning helps{seed}.")
    if status == CONTRADICTS:
        return Verdict("1", CONTRADICTS, f"{text}; no fine-tuning is significantly BETTER than every fine-tuned "
                                         f"method: fine-tuning did not help in this study{seed}.")
    return Verdict("1", INCONCLUSIVE_FINDING, f"{text}; not significant: this study cannot tell whether "
                                              f"fine-tuning helps{seed}.")


def _adapters_beat(number: str, family: str, what: str, optional: bool) -> tuple[Pairs, Callable[[Evidence],
                                                                                                 Verdict | None]]:
    def reference(ev: Evidence) -> JobStats | None:
        return ev.best(s for s in ev.tuned if s.family == family)

    def pairs(ev: Evidence) -> list[tuple[str, str]]:
        # every adapter against the reference is already a standard comparison of the study
        best_adapter, other = ev.best(ev.adapters), reference(ev)
        return [(best_adapter.job, other.job)] if best_adapter and other else []

    def check(ev: Evidence) -> Verdict | None:
        best_adapter, other = ev.best(ev.adapters), reference(ev)
        if other is None and optional:
            return None
        if best_adapter is None or other is None:
            return _missing(number, f"adapters vs {what}: the study lacks "
                            + ("adapter jobs." if best_adapter is None else f"{what}."))
        c = ev.comparison(best_adapter.job, other.job)
        if c is None or c.n == 0:
            return _untested(number, f"adapters vs {what}")
        versus = f"the best {what} job, {other.name}" if optional else what
        tally = [ev.comparison(s.job, other.job) for s in ev.adapters]
        counts = {v: sum(t is not None and t.verdict == v for t in tally) for v in (BETTER, WORSE, INCONCLUSIVE)}
        text = (f"best adapter {best_adapter.name} (Dice {best_adapter.dice[0]:.3f}) vs {versus} "
                f"({other.dice[0]:.3f}): {fmt_comparison(c)}; of {len(ev.adapters)} adapter jobs "
                f"{counts[BETTER]} significantly better, {counts[WORSE]} significantly worse, "
                f"{counts[INCONCLUSIVE]} inconclusive")
        # the claim is about the family: it holds when some adapter is significantly better (Holm keeps the
        # choice of the best one honest), and fails when none is while some are significantly worse
        if c.verdict == BETTER:
            return Verdict(number, AGREES, text + "; the LoRA family beats standard fine-tuning.")
        if counts[WORSE]:
            return Verdict(number, CONTRADICTS, text + f"; no adapter is significantly better than {what} and "
                                                       f"{counts[WORSE]} are significantly WORSE.")
        return Verdict(number, INCONCLUSIVE_FINDING, text + f"; no adapter differs significantly from {what}.")

    return pairs, check


def _cp_and_other(ev: Evidence) -> tuple[JobStats | None, JobStats | None]:
    cp = ev.best(s for s in ev.adapters if s.method in CP_METHODS)
    other = ev.best(s for s in ev.adapters if s.method not in CP_METHODS)
    return cp, other


def _cp_pairs(ev: Evidence) -> list[tuple[str, str]]:
    cp, other = _cp_and_other(ev)
    return [(cp.job, other.job)] if cp and other else []


def _cp_lora_efficient(ev: Evidence) -> Verdict:
    cp, other = _cp_and_other(ev)
    if cp is None or other is None:
        return _missing("3", "CP-LoRA vs other adapters: the study lacks "
                        + ("CP-LoRA/CP-DoRA jobs." if cp is None else "non-CP adapter jobs."))
    c = ev.comparison(cp.job, other.job)
    if c is None or c.n == 0:
        return _untested("3", "CP-LoRA vs other adapters")
    ratio = cp.trainable / other.trainable if other.trainable else float("inf")
    relative = (f"{1 / ratio:.3g}× fewer" if 0 < ratio < 1 else f"{ratio:.3g}× as many") if ratio else "none"
    text = (f"best CP adapter {cp.name} (Dice {cp.dice[0]:.3f}, {cp.trainable:,} params) vs best other adapter "
            f"{other.name} (Dice {other.dice[0]:.3f}, {other.trainable:,} params): {fmt_comparison(c)}, with "
            f"a parameter ratio of {ratio:.3g} ({relative})")
    # "about as good" is non-inferiority: the whole interval above −margin; clearly worse: all of it below
    low, high = c.ci
    if cp.trainable >= other.trainable:
        return Verdict("3", CONTRADICTS, f"{text}; CP does NOT use fewer parameters.")
    if high < -DICE_TOLERANCE:
        return Verdict("3", CONTRADICTS, f"{text}; CP is worse by more than the {DICE_TOLERANCE:g} Dice margin "
                                         "(whole interval below it).")
    if low > -DICE_TOLERANCE:
        return Verdict("3", AGREES, f"{text}; non-inferior within {DICE_TOLERANCE:g} Dice (whole interval above "
                                    f"−{DICE_TOLERANCE:g}) with fewer parameters.")
    return Verdict("3", INCONCLUSIVE_FINDING, f"{text}; the interval reaches below −{DICE_TOLERANCE:g} Dice: "
                                              "non-inferiority is not shown.")


def _ranked(ev: Evidence) -> dict[str, list[JobStats]]:
    """Per adapter method its plain jobs by rank: a variant at the same rank (a training rule, the forgetting term;
    job ``lora_fw1_r4`` beside ``lora_r4``) is another treatment, not another point of the rank curve."""
    by_method: dict[str, list[JobStats]] = {}
    for s in ev.adapters:
        if s.rank is not None and s.job == f"{s.method}_r{s.rank}":
            by_method.setdefault(s.method, []).append(s)
    return {m: sorted(v, key=lambda s: s.rank or 0) for m, v in by_method.items() if len({s.rank for s in v}) >= 2}


def _rank_pairs(ev: Evidence) -> list[tuple[str, str]]:
    return [(jobs[-1].job, jobs[0].job) for jobs in _ranked(ev).values()]


def _higher_rank_better(ev: Evidence) -> Verdict:
    ranked = _ranked(ev)
    if not ranked:
        return _missing("4", "higher rank better: not tested, no adapter method was run at two or more ranks.")
    parts, verdicts = [], []
    for jobs in ranked.values():
        low, high = jobs[0], jobs[-1]
        c = ev.comparison(high.job, low.job)
        verdict = INCONCLUSIVE if c is None or c.n == 0 else c.verdict
        verdicts.append(verdict)
        curve = " → ".join(f"r{s.rank} {s.dice[0]:.3f}" for s in jobs)
        said = {BETTER: "higher rank better", WORSE: "higher rank WORSE", INCONCLUSIVE: "inconclusive"}[verdict]
        numbers = "no paired cases" if c is None or c.n == 0 else fmt_comparison(c)
        parts.append(f"{low.name.removesuffix(f' r{low.rank}')}: {curve}; r{high.rank} vs r{low.rank} {numbers} "
                     f"({said})")
    n_better, n_worse = verdicts.count(BETTER), verdicts.count(WORSE)
    text = (f"highest vs lowest rank, significantly better in {n_better}, worse in {n_worse} of {len(ranked)} "
            "adapter methods: " + "; ".join(parts))
    if n_worse:
        return Verdict("4", CONTRADICTS, text + "; a higher rank is significantly WORSE for at least one method.")
    if n_better == len(ranked):
        return Verdict("4", AGREES, text + ".")
    return Verdict("4", INCONCLUSIVE_FINDING, text + "; not significant for every method.")


def _larger_volumes_better(ev: Evidence) -> Verdict:
    tuned_jobs = [s.job for s in ev.tuned]
    # one value per case: its Dice averaged over the fine-tuned jobs (each averaged over seeds first)
    per_job = [per_case(ev.rows, job) for job in tuned_jobs]
    bins = {str(r["case_id"]): r["volume_bin"] for r in ev.rows if r["job"] in set(tuned_jobs)}
    values: dict[str, list[float]] = {b: [] for b in PAPER_BINS}
    for case, b in bins.items():
        v = nanmean(d.get(case, float("nan")) for d in per_job)
        if b in values and not math.isnan(v):
            values[b].append(v)
    present = [b for b in PAPER_BINS if len(values[b]) >= MIN_BIN_CASES]
    if len(present) < 2:
        return _missing("5", f"Dice vs volume: fewer than two volume bins hold {MIN_BIN_CASES} or more cases with a "
                        "defined Dice of the fine-tuned methods.")
    small, large = present[0], present[-1]
    x, y = values[large], values[small]
    diff = float(sum(x) / len(x) - sum(y) / len(y))
    low, high = bootstrap_ci_two_sample(x, y, BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED)
    p = mann_whitney_p(x, y)
    holds = [s for s in ev.tuned if s.bins.get(small, (0, 0))[1] and s.bins.get(large, (0, 0))[1]]
    n_ok = sum(s.bins[large][0] > s.bins[small][0] for s in holds)
    text = (f"Dice averaged over the fine-tuned methods, {large} mL bin ({len(x)} cases, mean {sum(x) / len(x):.3f}) "
            f"vs {small} mL bin ({len(y)} cases, {sum(y) / len(y):.3f}): Δ {fmt_signed(diff)} "
            f"(95% CI {fmt_signed(low)} to {fmt_signed(high)}; Mann–Whitney p {fmt_p(p)}, unpaired, not in the "
            f"Holm family); larger mean is better for {n_ok} of {len(holds)} methods")
    status = _STATUS_OF[decide(low, high, p, ALPHA)]
    if status == AGREES:
        return Verdict("5", AGREES, text + ".")
    if status == CONTRADICTS:
        return Verdict("5", CONTRADICTS, text + "; this study finds significantly WORSE Dice on large bleeds.")
    return Verdict("5", INCONCLUSIVE_FINDING, text + "; not significant: this study cannot tell.")


_LORA_BEATS_STANDARD = "LoRA-family adapters beat standard fine-tuning"
_BEAT_FULL = _adapters_beat("2", "full", "full fine-tuning", optional=False)
_BEAT_MODULE = _adapters_beat("2b", "module", "module-wise fine-tuning", optional=True)
SEED_FINDINGS: tuple[Finding, ...] = (
    Finding("fine_tuning_helps", "1", None, _fine_tuning_helps, _fine_tuning_pairs),
    Finding("adapters_beat_full", "2", _LORA_BEATS_STANDARD, _BEAT_FULL[1], _BEAT_FULL[0]),
    # module-wise fine-tuning is optional in a study: without such a job this finding is left out
    Finding("adapters_beat_module", "2b", _LORA_BEATS_STANDARD, _BEAT_MODULE[1], _BEAT_MODULE[0]),
    Finding("cp_lora_efficient", "3", "CP-LoRA is about as good as other adapters with far fewer parameters",
            _cp_lora_efficient, _cp_pairs),
    Finding("higher_rank_better", "4", "higher rank is better", _higher_rank_better, _rank_pairs),
    Finding("larger_volumes_better", "5", "all methods are better on large volumes", _larger_volumes_better),
)


def select_findings(names: Iterable[str] | None = None) -> list[Finding]:
    """The findings named (by name or number, in the paper's order), or all of them for ``None``.

    An unknown name raises ``ValueError`` listing the known ones.
    """
    if names is None:
        return list(SEED_FINDINGS)
    wanted = [str(n) for n in names]
    known = {key for f in SEED_FINDINGS for key in (f.name, f.number)}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown finding {unknown[0]!r} (known: {', '.join(f.name for f in SEED_FINDINGS)})")
    return [f for f in SEED_FINDINGS if f.name in wanted or f.number in wanted]


def comparison_plan(stats: Sequence[JobStats], rows: Sequence[dict[str, Any]],
                    findings: Sequence[Finding] | None = None,
                    named: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str, str]]:
    """The study's comparisons as ``(method, reference, why)``: the standard ones (:func:`study_pairs`), the
    pairs the study names, then those the findings need (best fine-tuned vs none, best CP vs best other
    adapter, highest vs lowest rank per method)."""
    evidence = Evidence(stats, rows)
    plan = list(study_pairs(stats)) + [(a, b, "named by the study") for a, b in named]
    for f in SEED_FINDINGS if findings is None else findings:
        plan += [(a, b, f"finding ({f.number})") for a, b in f.pairs(evidence)]
    return plan


def check_findings(stats: Sequence[JobStats], rows: Sequence[dict[str, Any]],
                   findings: Sequence[Finding] | None = None,
                   comparisons: Sequence[Comparison] | None = None) -> list[Verdict]:
    """Check ``findings`` (default: all of the seed paper's) against a study's statistics.

    ``comparisons`` are the study's Holm-adjusted comparisons (:func:`~.statistics.compare_all`); without
    them, the family of :func:`comparison_plan` is computed from ``rows``.
    """
    if comparisons is None:
        comparisons = compare_all(rows, comparison_plan(stats, rows, findings))
    evidence = Evidence(stats, rows, comparisons)
    verdicts = (f.check(evidence) for f in (SEED_FINDINGS if findings is None else findings))
    return [v for v in verdicts if v is not None]


def introduction(findings: Sequence[Finding] | None = None) -> str:
    """The paragraph that opens the report's findings section: what the paper reports, for the findings checked."""
    claims = list(dict.fromkeys(f.claim for f in (SEED_FINDINGS if findings is None else findings) if f.claim))
    reported = f"no-fine-tuning Dice {SEED_NO_FINETUNE_DICE[0]:.3f} ± {SEED_NO_FINETUNE_DICE[1]:.2f}"
    if claims:
        reported += " and: " + "; ".join(claims)
    return (f"The seed paper ({SEED_PAPER}) reports {reported}. Checked with this study's paired statistics "
            f"(a difference counts when its 95% bootstrap interval excludes 0 and its Holm-adjusted signed-rank "
            f"p-value is below {ALPHA:g}; otherwise the finding is inconclusive here):")


__all__ = ["AGREES", "CONTRADICTS", "CP_METHODS", "DICE_TOLERANCE", "INCONCLUSIVE_FINDING", "MIN_BIN_CASES",
           "NOT_CHECKED", "SEED_FINDINGS", "SEED_NO_FINETUNE_DICE", "SEED_PAPER", "STATUSES", "Evidence", "Finding",
           "Verdict", "check_findings", "comparison_plan", "introduction", "select_findings"]
