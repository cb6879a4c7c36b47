"""Paired statistics of the study report against independent computations.

Bootstrap intervals against a direct resampling loop (and scipy.stats.bootstrap), the signed-rank p-value
against an exhaustive enumeration of sign flips (and scipy.stats.wilcoxon), Holm's adjustment against numbers
worked out by hand, verdicts and seed averaging on synthetic per-case tables.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from medlora.evaluation.statistics import (
    BETTER,
    INCONCLUSIVE,
    WORSE,
    PairingError,
    bootstrap_ci,
    bootstrap_ci_two_sample,
    compare_all,
    decide,
    holm,
    mann_whitney_p,
    paired_values,
    wilcoxon_p,
)

NAN = float("nan")


def _percentile_by_hand(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics at rank q·(n − 1) (numpy's default definition)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def test_bootstrap_ci_against_a_direct_resampling_loop():
    d = np.random.default_rng(11).normal(0.03, 0.1, size=13)
    n_boot, seed = 2000, 5
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, d.size, size=(n_boot, d.size))  # the documented draw, then plain Python
    means = []
    for row in draws:
        resample = [float(d[j]) for j in row]
        means.append(math.fsum(resample) / len(resample))
    expected = (_percentile_by_hand(means, 0.025), _percentile_by_hand(means, 0.975))
    low, high = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    assert (low, high) == pytest.approx(expected, rel=1e-12)
    # the same interval as scipy's percentile bootstrap with the same generator
    ref = scipy.stats.bootstrap((d,), np.mean, n_resamples=n_boot, method="percentile",
                                rng=np.random.default_rng(seed)).confidence_interval
    assert (low, high) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert bootstrap_ci(d, n_boot=n_boot, seed=seed) == (low, high)  # fixed generator: reproducible
    assert bootstrap_ci(d, n_boot=n_boot, seed=seed + 1) != (low, high)
    assert low < d.mean() < high
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_two_sample_bootstrap_against_a_loop_and_mann_whitney_against_scipy():
    gen = np.random.default_rng(3)
    x, y = gen.normal(0.7, 0.1, 6), gen.normal(0.5, 0.1, 4)
    rng = np.random.default_rng(9)
    ix, iy = rng.integers(0, 6, size=(500, 6)), rng.integers(0, 4, size=(500, 4))
    diffs = [sum(x[i] for i in a) / 6 - sum(y[j] for j in b) / 4 for a, b in zip(ix, iy, strict=True)]
    expected = (_percentile_by_hand(diffs, 0.025), _percentile_by_hand(diffs, 0.975))
    assert bootstrap_ci_two_sample(x, y, n_boot=500, seed=9) == pytest.approx(expected, rel=1e-12)
    assert mann_whitney_p(x, y) == scipy.stats.mannwhitneyu(x, y).pvalue


def _exact_signed_rank_p(d: np.ndarray) -> float:
    """Two-sided exact p of the signed-rank statistic by enumerating all 2^n sign assignments (no ties, no 0)."""
    ranks = scipy.stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    null = [sum(r for r, s in zip(ranks, signs, strict=True) if s) for signs in
            itertools.product((False, True), repeat=len(d))]
    below = sum(w <= observed for w in null) / len(null)
    above = sum(w >= observed for w in null) / len(null)
    return min(1.0, 2 * min(below, above))


def test_wilcoxon_p_against_an_exhaustive_enumeration_and_scipy():
    d = np.array([0.031, -0.012, 0.044, 0.027, -0.005, 0.052, 0.019, 0.008, -0.021, 0.036])
    assert wilcoxon_p(d) == pytest.approx(_exact_signed_rank_p(d), rel=1e-12)
    assert wilcoxon_p(d) == scipy.stats.wilcoxon(d).pvalue
    # zero differences: scipy's default (dropped, zero_method="wilcox")
    with_zeros = np.concatenate([d, [0.0, 0.0]])
    assert wilcoxon_p(with_zeros) == scipy.stats.wilcoxon(with_zeros).pvalue
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0 and math.isnan(wilcoxon_p([]))
    # five differences of one sign: the smallest two-sided exact p is 2/32, never below 0.05
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)


def test_holm_adjustment_by_hand():
    # m = 4 defined p-values, ascending 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, max(.., 2·0.03), max(.., 1·0.04)
    adjusted = holm([0.01, 0.04, 0.03, 0.005, NAN])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adjusted[4])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, monotone
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_decide_needs_an_interval_off_zero_and_an_adjusted_p():
    assert decide(-0.01, 0.08, 0.001) == INCONCLUSIVE  # spans 0 with a positive mean
    assert decide(-0.08, 0.01, 0.001) == INCONCLUSIVE  # spans 0 with a negative mean
    assert decide(0.0, 0.05, 0.001) == INCONCLUSIVE  # touching 0 is spanning it
    assert decide(0.01, 0.05, 0.20) == INCONCLUSIVE  # off zero, but not significant after Holm
    assert decide(0.01, 0.05, 0.01) == BETTER and decide(-0.05, -0.01, 0.01) == WORSE
    assert decide(NAN, NAN, NAN) == INCONCLUSIVE


def _rows(job: str, values, seed=None, cases=None) -> list[dict]:
    cases = cases or [f"c{i:02d}" for i in range(len(values))]
    return [{"job": job, "case_id": c, "Dice": v, **({} if seed is None else {"seed": seed})}
            for c, v in zip(cases, values, strict=True)]


def test_synthetic_tables_give_better_and_inconclusive_verdicts():
    gen = np.random.default_rng(0)
    full = gen.uniform(0.4, 0.8, 20)
    rows = (_rows("full", full) + _rows("lora", full + 0.08 + gen.normal(0, 0.01, 20))  # clearly better
            + _rows("dora", full + gen.normal(0, 0.05, 20))  # noise around 0
            + _rows("salt", full - 0.1 + gen.normal(0, 0.01, 20)))
    comparisons = compare_all(rows, [("lora", "full"), ("dora", "full"), ("salt", "full"), ("full", "lora"),
                                     ("dora", "dora")])
    assert [(c.method, c.reference) for c in comparisons] == [("lora", "full"), ("dora", "full"), ("salt", "full")]
    lora, dora, salt = comparisons
    assert lora.verdict == BETTER and lora.ci[0] > 0 and lora.n == 20
    assert dora.ci[0] < 0 < dora.ci[1] and dora.verdict == INCONCLUSIVE
    assert salt.verdict == WORSE
    assert [c.p_adj for c in comparisons] == pytest.approx(holm([c.p for c in comparisons]))
    for c in comparisons:
        d = np.array([r["Dice"] for r in rows if r["job"] == c.method]) - full
        assert c.delta == pytest.approx(d.mean()) and c.p == scipy.stats.wilcoxon(d).pvalue
    flipped = lora.flipped()
    assert (flipped.method, flipped.delta, flipped.ci) == ("full", -lora.delta, (-lora.ci[1], -lora.ci[0]))


def test_seeds_are_averaged_per_case_before_pairing():
    # job a: three seeds, job b: two; case c2 lacks b, c3 has a NaN seed of a (left out of its mean)
    rows = (_rows("a", [0.2, 0.4, 0.6, 0.8], seed=0, cases=["c0", "c1", "c2", "c3"])
            + _rows("a", [0.4, 0.4, 0.6, NAN], seed=1, cases=["c0", "c1", "c2", "c3"])
            + _rows("a", [0.9, 0.1, 0.6, 0.6], seed=2, cases=["c0", "c1", "c2", "c3"])
            + _rows("b", [0.5, 0.3, 0.7], seed=0, cases=["c3", "c1", "c0"])
            + _rows("b", [0.3, 0.5, 0.1], seed=1, cases=["c3", "c1", "c0"]))
    cases, a, b = paired_values(rows, "a", "b")
    assert cases == ["c0", "c1", "c3"]
    assert a == pytest.approx([0.5, 0.3, 0.7]) and b == pytest.approx([0.4, 0.4, 0.4])
    (c,) = compare_all(rows, [("a", "b")])
    assert c.n == 3 and c.delta == pytest.approx((0.1 - 0.1 + 0.3) / 3)
    # pooling all rows instead would give another number: the averaging is what is tested
    pooled = np.nanmean([r["Dice"] for r in rows if r["job"] == "a" and r["case_id"] != "c2"]) - 0.4
    assert not math.isclose(c.delta, pooled)
    with pytest.raises(PairingError, match="'a': case 'c1' appears twice under seed 0"):
        paired_values(rows + _rows("a", [0.5], seed=0, cases=["c1"]), "a", "b")


# ------------------------------------------------------------------------------ calibration


def _ece_loop(cases, n_bins: int, region: str) -> float:
    """Expected calibration error by a plain loop over the voxels of all cases."""
    count, conf, pos = [0] * n_bins, [0.0] * n_bins, [0] * n_bins
    for prob, label in cases:
        for p, y in zip(prob.ravel().tolist(), label.ravel().tolist(), strict=True):
            if (region == "foreground" and not y) or (region == "background" and y):
                continue
            b = min(int(p * n_bins), n_bins - 1)
            count[b] += 1
            conf[b] += p
            pos[b] += int(y)
    total = sum(count)
    return sum(n / total * abs(c / n - k / n) for n, c, k in zip(count, conf, pos, strict=True) if n)


def test_ece_and_reliability_against_a_numpy_loop_with_pooled_cases():
    import torch

    from medlora.evaluation.calibration import calibration_histogram, empty_histogram

    gen = np.random.default_rng(5)
    cases = []
    for shape in ((6, 5, 4), (3, 7, 2)):
        label = gen.random(shape) < 0.3
        prob = np.clip(np.where(label, gen.beta(4, 2, shape), gen.beta(1, 6, shape)), 0, 1)
        prob.flat[0], prob.flat[1] = 1.0, 0.0  # the closed ends of the range
        cases.append((prob, label))
    pooled = empty_histogram(8)
    for prob, label in cases:
        pooled = pooled + calibration_histogram(torch.from_numpy(prob), label.astype(np.float32), n_bins=8)
    assert int(pooled.counts.sum()) == sum(p.size for p, _ in cases)
    for region in ("all", "foreground", "background"):
        assert pooled.ece(region) == pytest.approx(_ece_loop(cases, 8, region), rel=1e-12)
    probs = np.concatenate([p.ravel() for p, _ in cases])
    labels = np.concatenate([y.ravel() for _, y in cases])
    assert pooled.ece("foreground") == pytest.approx(np.mean(1 - probs[labels]), rel=1e-12)
    assert pooled.ece("background") == pytest.approx(np.mean(probs[~labels]), rel=1e-12)
    r = pooled.reliability("all")
    in_bin = np.minimum((probs * 8).astype(int), 7) == 3
    assert r["count"][3] == in_bin.sum() and r["confidence"][3] == pytest.approx(probs[in_bin].mean())
    assert r["frequency"][3] == pytest.approx(labels[in_bin].mean())
    back = type(pooled).from_dict(pooled.to_dict())
    assert np.array_equal(back.counts, pooled.counts) and np.array_equal(back.prob_sums, pooled.prob_sums)
    with pytest.raises(ValueError, match="within"):
        calibration_histogram(np.array([0.5, 1.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="pool"):
        pooled + empty_histogram(10)
