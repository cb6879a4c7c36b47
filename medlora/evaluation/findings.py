"""The seed paper's qualitative findings as data, and a checker that tests them against a study's numbers.

Seed paper: Minoccheri, Hodgman et al. 2025, arXiv 2508.01772 (LoRA-family transfer from TBI to SAH
segmentation). It reports a no-fine-tuning Dice of 0.410 ± 0.26 and finds that LoRA-family adapters beat
standard (full and module-wise) fine-tuning, that CP-LoRA is about as good as other adapters with far
fewer parameters, that a higher rank is better and that all methods do better on larger bleeds.

Each :class:`Finding` has a stable name a study can list (``findings:`` in the study info; all by
default), the number it carries in the report, the paper's claim, and a check that returns a
:class:`Verdict` (agrees, contradicts, not checked) with the numbers it rests on. The checks compare mean
Dice over the cases of all folds; they say plainly where the study disagrees with the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .statistics import JobStats, bin_dice
from .tables import fmt_mean_std, fmt_signed

SEED_PAPER = "Minoccheri, Hodgman et al. 2025"
SEED_NO_FINETUNE_DICE: tuple[float, float] = (0.410, 0.26)  # mean ± std over the seed paper's SAH cases
# Dice differences smaller than this count as "about equal" when checking "CP-LoRA ≈ other adapters".
DICE_TOLERANCE = 0.05
CP_METHODS: tuple[str, ...] = ("cp_lora", "cp_dora")

AGREES, CONTRADICTS, NOT_CHECKED = "agrees", "contradicts", "not checked"
_MARKS = {AGREES: "✔ agrees", CONTRADICTS: "✘ contradicts", NOT_CHECKED: "– not checked"}


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one finding: ``status`` is one of agrees, contradicts, not checked."""

    number: str
    status: str
    text: str

    def line(self) -> str:
        """The report's bullet, e.g. ``- (4) ✔ agrees — highest rank beats ...``."""
        return f"- ({self.number}) {_MARKS[self.status]} — {self.text}"


@dataclass
class Evidence:
    """What the checks read: per-job statistics (in report order) and the per-case rows."""

    stats: Sequence[JobStats]
    rows: Sequence[dict[str, Any]]
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


@dataclass(frozen=True)
class Finding:
    """One claim of the seed paper and its check; ``check`` returns None when it does not apply to a study."""

    name: str
    number: str
    claim: str | None  # for the section's introduction; None: covered by the introduction's baseline Dice
    check: Callable[[Evidence], Verdict | None]


def _fine_tuning_helps(ev: Evidence) -> Verdict:
    baseline = next((s for s in ev.scored if s.family == "none"), None)
    best = ev.best(ev.tuned)
    if baseline is None or best is None:
        return Verdict("1", NOT_CHECKED, "no fine-tuning vs fine-tuning: the study lacks "
                       + ("a no-fine-tuning job." if baseline is None else "fine-tuned jobs."))
    gap = best.dice[0] - baseline.dice[0]
    seed = (f" (seed paper without fine-tuning: {SEED_NO_FINETUNE_DICE[0]:.3f} ± {SEED_NO_FINETUNE_DICE[1]:.2f};"
            f" here {fmt_mean_std(baseline.dice)})")
    if gap > 0:
        return Verdict("1", AGREES, f"no fine-tuning (Dice {baseline.dice[0]:.3f}) is worse than the best "
                                    f"fine-tuned method, {best.name} ({best.dice[0]:.3f}), by {gap:.3f} Dice{seed}.")
    return Verdict("1", CONTRADICTS, f"no fine-tuning (Dice {baseline.dice[0]:.3f}) is NOT worse than the best "
                                     f"fine-tuned method, {best.name} ({best.dice[0]:.3f}; {fmt_signed(gap)} Dice): "
                                     f"fine-tuning did not help in this study{seed}.")


def _adapters_beat(number: str, family: str, what: str, optional: bool) -> Callable[[Evidence], Verdict | None]:
    def check(ev: Evidence) -> Verdict | None:
        best_adapter = ev.best(ev.adapters)
        other = ev.best(s for s in ev.tuned if s.family == family)
        if other is None and optional:
            return None
        if best_adapter is None or other is None:
            return Verdict(number, NOT_CHECKED, f"adapters vs {what}: the study lacks "
                           + ("adapter jobs." if best_adapter is None else f"{what}."))
        diff = best_adapter.dice[0] - other.dice[0]
        versus = f"the best {what} job, {other.name}" if optional else what
        text = (f"best adapter, {best_adapter.name} (Dice {best_adapter.dice[0]:.3f}), vs {versus} "
                f"({other.dice[0]:.3f}): {fmt_signed(diff)} Dice")
        if diff > 0:
            return Verdict(number, AGREES, text + "; the LoRA family beats standard fine-tuning.")
        return Verdict(number, CONTRADICTS, text + f"; no adapter beats {what} in this study.")

    return check


def _cp_lora_efficient(ev: Evidence) -> Verdict:
    cps = [s for s in ev.adapters if s.method in CP_METHODS]
    non_cps = [s for s in ev.adapters if s.method not in CP_METHODS]
    if not cps or not non_cps:
        return Verdict("3", NOT_CHECKED, "CP-LoRA vs other adapters: the study lacks "
                       + ("CP-LoRA/CP-DoRA jobs." if not cps else "non-CP adapter jobs."))
    cp, other = ev.best(cps), ev.best(non_cps)
    assert cp is not None and other is not None
    diff = cp.dice[0] - other.dice[0]
    ratio = cp.trainable / other.trainable if other.trainable else float("inf")
    relative = (f"{1 / ratio:.3g}× fewer" if 0 < ratio < 1 else f"{ratio:.3g}× as many") if ratio else "none"
    text = (f"best CP adapter {cp.name} (Dice {cp.dice[0]:.3f}, {cp.trainable:,} params) vs best other adapter "
            f"{other.name} (Dice {other.dice[0]:.3f}, {other.trainable:,} params): {fmt_signed(diff)} Dice with "
            f"a parameter ratio of {ratio:.3g} ({relative})")
    problems = []
    if diff < -DICE_TOLERANCE:
        problems.append(f"CP is worse by more than {DICE_TOLERANCE:g} Dice")
    if cp.trainable >= other.trainable:
        problems.append("CP does not use fewer parameters")
    if problems:
        return Verdict("3", CONTRADICTS, f"{text}; {' and '.join(problems)}.")
    return Verdict("3", AGREES, f"{text}; comparable Dice (within {DICE_TOLERANCE:g} or better) with fewer parameters.")


def _higher_rank_better(ev: Evidence) -> Verdict:
    by_method: dict[str, list[JobStats]] = {}
    for s in ev.adapters:
        if s.rank is not None:
            by_method.setdefault(s.method, []).append(s)
    ranked = {m: sorted(v, key=lambda s: s.rank or 0) for m, v in by_method.items() if len({s.rank for s in v}) >= 2}
    if not ranked:
        return Verdict("4", NOT_CHECKED, "higher rank better: no adapter method was run at two or more ranks.")
    parts, agree = [], 0
    for jobs in ranked.values():
        low, high = jobs[0], jobs[-1]
        ok = high.dice[0] > low.dice[0]
        agree += ok
        curve = " → ".join(f"r{s.rank} {s.dice[0]:.3f}" for s in jobs)
        parts.append(f"{low.name.removesuffix(f' r{low.rank}')}: {curve} "
                     f"({'higher rank better' if ok else 'higher rank NOT better'})")
    return Verdict("4", AGREES if agree == len(ranked) else CONTRADICTS,
                   f"highest rank beats lowest rank in {agree} of {len(ranked)} adapter methods: "
                   + "; ".join(parts) + ".")


def _larger_volumes_better(ev: Evidence) -> Verdict:
    tuned_jobs = {s.job for s in ev.tuned}
    pooled = bin_dice(r for r in ev.rows if r["job"] in tuned_jobs)
    present = [b for b, (_, _, n) in pooled.items() if n > 0]
    if len(present) < 2:
        return Verdict("5", NOT_CHECKED, "Dice vs volume: fewer than two volume bins hold fine-tuned cases.")
    small, large = present[0], present[-1]
    diff = pooled[large][0] - pooled[small][0]
    holds = [s for s in ev.tuned if s.bins[small][1] and s.bins[large][1]]
    n_ok = sum(s.bins[large][0] > s.bins[small][0] for s in holds)
    text = (f"fine-tuned methods' mean Dice in the largest non-empty bin {large} mL is {pooled[large][0]:.3f} vs "
            f"{pooled[small][0]:.3f} in the smallest, {small} mL ({fmt_signed(diff)}); larger is better for "
            f"{n_ok} of {len(holds)} methods")
    if diff > 0:
        return Verdict("5", AGREES, text + ".")
    return Verdict("5", CONTRADICTS, text + "; this study does NOT find better Dice on large bleeds.")


_LORA_BEATS_STANDARD = "LoRA-family adapters beat standard fine-tuning"
SEED_FINDINGS: tuple[Finding, ...] = (
    Finding("fine_tuning_helps", "1", None, _fine_tuning_helps),
    Finding("adapters_beat_full", "2", _LORA_BEATS_STANDARD,
            _adapters_beat("2", "full", "full fine-tuning", optional=False)),
    # module-wise fine-tuning is optional in a study: without such a job this finding is left out
    Finding("adapters_beat_module", "2b", _LORA_BEATS_STANDARD,
            _adapters_beat("2b", "module", "module-wise fine-tuning", optional=True)),
    Finding("cp_lora_efficient", "3", "CP-LoRA is about as good as other adapters with far fewer parameters",
            _cp_lora_efficient),
    Finding("higher_rank_better", "4", "higher rank is better", _higher_rank_better),
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


def check_findings(stats: Sequence[JobStats], rows: Sequence[dict[str, Any]],
                   findings: Sequence[Finding] | None = None) -> list[Verdict]:
    """Check ``findings`` (default: all of the seed paper's) against a study's job statistics and per-case rows."""
    evidence = Evidence(stats, rows)
    verdicts = (f.check(evidence) for f in (SEED_FINDINGS if findings is None else findings))
    return [v for v in verdicts if v is not None]


def introduction(findings: Sequence[Finding] | None = None) -> str:
    """The paragraph that opens the report's findings section: what the paper reports, for the findings checked."""
    claims = list(dict.fromkeys(f.claim for f in (SEED_FINDINGS if findings is None else findings) if f.claim))
    reported = f"no-fine-tuning Dice {SEED_NO_FINETUNE_DICE[0]:.3f} ± {SEED_NO_FINETUNE_DICE[1]:.2f}"
    if claims:
        reported += " and: " + "; ".join(claims)
    return f"The seed paper ({SEED_PAPER}) reports {reported}. Checked against this study's mean Dice:"


__all__ = ["AGREES", "CONTRADICTS", "CP_METHODS", "DICE_TOLERANCE", "NOT_CHECKED", "SEED_FINDINGS",
           "SEED_NO_FINETUNE_DICE", "SEED_PAPER", "Evidence", "Finding", "Verdict", "check_findings",
           "introduction", "select_findings"]
