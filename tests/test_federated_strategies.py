"""Federated aggregation strategies as pure functions, against independent references (loops over sites, dense
merged weights, scipy's optimiser on a numpy transcription of LoRA-FAIR's objective, the FedSmoothLoRA arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from medlora.adapters import AdapterConfig, inject, iter_adapters, merge
from medlora.adapters.io import adapter_state
from medlora.federated.strategies import (
    AggregationError,
    Pair,
    SiteUpdate,
    aggregate,
    fedit,
    fedit_error,
    fedsmooth,
    fedsmooth_start,
    fedsmooth_upload,
    ffa,
    fingerprint,
    ga_factors,
    lora_fair,
    lora_fair_objective,
    truncated_svd,
    zeta_schedule,
)

S = 0.75
PAIR = Pair("layer.lora_A", "layer.lora_B", S)


def sites(rng, counts, m=6, r=3, n=8, shared_a=None):
    out = []
    for i, c in enumerate(counts):
        a = shared_a if shared_a is not None else rng.standard_normal((r, n))
        out.append(SiteUpdate(f"site{i}", {PAIR.a: a.copy(), PAIR.b: rng.standard_normal((m, r))}, float(c)))
    return out


def test_fedit_error_is_the_weighted_factor_covariance():
    rng = np.random.default_rng(0)
    ups = sites(rng, [3, 5, 9])
    p = np.array([3, 5, 9]) / 17
    agg = fedit(ups, [PAIR])
    ideal = np.zeros((6, 8))
    for u, pk in zip(ups, p, strict=True):  # the ideal global update, one site at a time
        ideal += pk * S * u.tensors[PAIR.b] @ u.tensors[PAIR.a]
    error = ideal - S * agg.tensors[PAIR.b] @ agg.tensors[PAIR.a]
    a_bar = sum(pk * u.tensors[PAIR.a] for u, pk in zip(ups, p, strict=True))
    b_bar = sum(pk * u.tensors[PAIR.b] for u, pk in zip(ups, p, strict=True))
    covariance = S * np.einsum("k,kmr,krn->mn", p, np.stack([u.tensors[PAIR.b] - b_bar for u in ups]),
                               np.stack([u.tensors[PAIR.a] - a_bar for u in ups]))
    np.testing.assert_allclose(error, covariance, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fedit_error(ups, PAIR), covariance, rtol=0, atol=1e-12)
    assert np.abs(covariance).max() > 0.1 and not agg.exact and any("not exact" in n for n in agg.notes)

    # one factor shared by every site: FedIT is exact (the FFA-LoRA case)
    same_a = sites(rng, [3, 5, 9], shared_a=rng.standard_normal((3, 8)))
    assert np.abs(fedit_error(same_a, PAIR)).max() == 0 and fedit(same_a, [PAIR]).exact


def _lora_layer(method: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv3d(3, 5, 3, padding=1))
    return inject(model, AdapterConfig(method, rank=2, alpha=3.0))


@pytest.mark.parametrize("method", ["lora", "conv_lora"])
def test_ffa_merged_aggregate_is_fedavg_of_merged_weights(method, float64_default):
    rng = np.random.default_rng(1)
    counts = [4, 1, 7]
    template = _lora_layer(method)
    (_, _, reparam), = iter_adapters(template)
    ((a, b, s),) = reparam.rule_pairs()
    pair = Pair("0.lora_A", "0.lora_B", s)
    global_a = {pair.a: a.detach().numpy().copy()}
    ups, merged = [], []
    for i, c in enumerate(counts):
        site = _lora_layer(method)  # the same seed: the same base and the same frozen A on every site
        (_, _, rp), = iter_adapters(site)
        with torch.no_grad():
            rp.lora_B.copy_(torch.from_numpy(rng.standard_normal(tuple(rp.lora_B.shape))))
        tensors = {k: v.numpy() for k, v in adapter_state(site).items()}
        ups.append(SiteUpdate(f"h{i}", tensors, c, a_fingerprint=fingerprint({pair.a: tensors[pair.a]})))
        merged.append(merge(site)[0].weight.detach().numpy().copy())
    agg = ffa(ups, [pair], global_a)
    reference = sum(c * w for c, w in zip(counts, merged, strict=True)) / sum(counts)
    glob = _lora_layer(method)
    (_, _, rp), = iter_adapters(glob)
    with torch.no_grad():
        for pname, p in rp.named_parameters():
            p.copy_(torch.from_numpy(agg.tensors[f"0.{pname}"]))
    np.testing.assert_allclose(merge(glob)[0].weight.detach().numpy(), reference, rtol=0, atol=1e-12)
    assert agg.exact and agg.notes == []
    np.testing.assert_array_equal(agg.tensors[pair.a], global_a[pair.a])


def test_ffa_refuses_a_moved_or_foreign_a_and_a_different_base():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 8))
    ups = sites(rng, [2, 3], shared_a=a)
    for u in ups:
        u.a_fingerprint = fingerprint({PAIR.a: u.tensors[PAIR.a]})
        u.base_fingerprint = "base0"
    assert aggregate("ffa", ups, [PAIR], base_fingerprint="base0", global_tensors={PAIR.a: a}).exact
    moved = [ups[0], SiteUpdate("Hospital B", {**ups[1].tensors, PAIR.a: a + 1e-3}, 3, "base0",
                                ups[1].a_fingerprint)]  # claims the right fingerprint, but A moved
    with pytest.raises(AggregationError, match=r"^site Hospital B: its frozen A differs") as info:
        ffa(moved, [PAIR], {PAIR.a: a})
    assert "\n" not in str(info.value)
    foreign = SiteUpdate("Hospital C", {**ups[1].tensors, PAIR.a: rng.standard_normal((3, 8))}, 3, "base0")
    foreign.a_fingerprint = fingerprint({PAIR.a: foreign.tensors[PAIR.a]})
    with pytest.raises(AggregationError, match="site Hospital C: its frozen A differs"):
        ffa([ups[0], foreign], [PAIR], {PAIR.a: a})
    other_base = SiteUpdate("Hospital D", dict(ups[1].tensors), 3, "base1", ups[1].a_fingerprint)
    for name in ("ffa", "fedit", "lora_fair", "full_fedavg"):
        with pytest.raises(AggregationError, match="site Hospital D: trained on a different base model"):
            aggregate(name, [ups[0], other_base], [PAIR], base_fingerprint="base0", global_tensors={PAIR.a: a})


def _cos(x, y):
    return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_lora_fair_identical_clients_change_nothing():
    rng = np.random.default_rng(3)
    one = sites(rng, [1])[0]
    same = [SiteUpdate(f"s{i}", {k: v.copy() for k, v in one.tensors.items()}, c) for i, c in enumerate([2, 5])]
    agg = lora_fair(same, [PAIR])
    for k, v in one.tensors.items():
        np.testing.assert_array_equal(agg.tensors[k], v)


def test_lora_fair_moves_towards_dw_and_minimises_its_objective():
    rng = np.random.default_rng(4)
    ups = sites(rng, [3, 1, 2], m=5, r=2, n=6)
    p = np.array([3, 1, 2]) / 6
    lam = 0.01
    a_bar = sum(pk * u.tensors[PAIR.a] for u, pk in zip(ups, p, strict=True))
    b_bar = sum(pk * u.tensors[PAIR.b] for u, pk in zip(ups, p, strict=True))
    dw = sum(pk * u.tensors[PAIR.b] @ u.tensors[PAIR.a] for u, pk in zip(ups, p, strict=True))
    agg = lora_fair(ups, [PAIR], lam=lam)
    np.testing.assert_allclose(agg.tensors[PAIR.a], a_bar, rtol=0, atol=1e-12)
    refined = agg.tensors[PAIR.b]
    assert _cos(dw, refined @ a_bar) > _cos(dw, b_bar @ a_bar) + 1e-3

    def objective(x):  # an independent transcription: 1 - cos + lam ||dB||_F
        d = x.reshape(b_bar.shape)
        m = (b_bar + d) @ a_bar
        return 1 - np.sum(dw * m) / np.sqrt(np.sum(dw ** 2) * np.sum(m ** 2)) + lam * np.sqrt(np.sum(d ** 2))

    ours = objective((refined - b_bar).ravel())
    assert ours == pytest.approx(lora_fair_objective(refined - b_bar, b_bar, a_bar, dw, lam), abs=1e-14)
    best = min(minimize(objective, x0, method="Powell", options={"xtol": 1e-10, "ftol": 1e-14, "maxiter": 100000}).fun
               for x0 in (np.zeros(b_bar.size), rng.standard_normal(b_bar.size) * 0.1))
    assert ours <= best + 1e-8
    assert ours < objective(np.zeros(b_bar.size)) - 1e-4


def test_fedsmooth_start_keeps_the_effective_weight_and_round_matching():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 9))
    grad = rng.standard_normal((6, 9))
    r = 2
    ga = ga_factors(grad, r, gamma=16.0)
    (b0, a0), shift = fedsmooth_start(ga, r)
    np.testing.assert_allclose(w - S * shift + S * b0 @ a0, w, rtol=0, atol=1e-14)
    # the GA construction: B from singular vectors r..2r-1, A from the first r, both scaled p^(1/4)/sqrt(gamma)
    u, sv, vt = np.linalg.svd(grad)
    scale = 6 ** 0.25 / 4.0
    np.testing.assert_allclose(np.abs(ga[0].T @ u[:, r:2 * r]), np.eye(r) * scale, atol=1e-12)
    np.testing.assert_allclose(np.abs(ga[1] @ vt[:r].T), np.eye(r) * scale, atol=1e-12)

    # a later round with zeta = 1 and the rank large enough: the site starts from its own previous end point
    prev_b, prev_a = rng.standard_normal((6, 1)), rng.standard_normal((1, 9))
    glob_b, glob_a = rng.standard_normal((6, 1)), rng.standard_normal((1, 9))
    rm = zeta_schedule(3, 10, "constant") * (prev_b @ prev_a - glob_b @ glob_a)
    big = 2 * r + 2  # >= rank(B_ga A_ga + RM)
    ga_big = ga_factors(grad, big, gamma=16.0)
    (b1, a1), shift1 = fedsmooth_start(ga_big, big, rm)
    np.testing.assert_allclose(w - S * shift1 + S * b1 @ a1, w + S * rm, rtol=0, atol=1e-12)
    # the upload is the end point relative to the round's base, over s
    up_b, up_a = fedsmooth_upload(b1, a1, shift1, big)
    np.testing.assert_allclose(up_b @ up_a, rm, atol=1e-12)


def test_zeta_schedule_is_the_official_cosine():
    assert zeta_schedule(0, 10) == 1.0 and zeta_schedule(10, 10) == pytest.approx(0.0, abs=1e-15)
    assert zeta_schedule(5, 10, zeta0=1.0, zeta_min=0.2) == pytest.approx(0.6)
    assert zeta_schedule(7, 10, "constant", zeta0=0.5) == 0.5
    with pytest.raises(AggregationError, match="zeta_mode"):
        zeta_schedule(1, 10, "linear")


def test_fedsmooth_weights_each_site_by_its_own_count():
    rng = np.random.default_rng(6)
    counts = {"s0": 1.0, "s1": 2.0, "s2": 7.0}
    uploads = {name: truncated_svd(rng.standard_normal((5, 2)) @ rng.standard_normal((2, 7)), 2) for name in counts}
    selected = ["s2", "s0"]  # the order in which sites replied
    ups = [SiteUpdate(n, {PAIR.b: uploads[n][0], PAIR.a: uploads[n][1]}, counts[n]) for n in selected]
    agg = fedsmooth(ups, [PAIR], rank=2)
    products = {n: uploads[n][0] @ uploads[n][1] for n in counts}
    right = (7 * products["s2"] + 1 * products["s0"]) / 8
    u, sv, vt = np.linalg.svd(right)
    reference = (u[:, :2] * sv[:2]) @ vt[:2]  # rank-2 projection of the correctly weighted mean
    np.testing.assert_allclose(agg.merged[PAIR.b] @ agg.merged[PAIR.a], reference, atol=1e-12)
    # the official code's arithmetic (count_list indexed by loop position) gives another answer here
    count_list = [counts["s0"], counts["s1"], counts["s2"]]
    official = sum(count_list[i] / 8 * products[n] for i, n in enumerate(selected))
    assert np.abs(official - right).max() > 0.1


def test_non_pair_tensors_are_averaged_and_flagged_not_exact():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 8))
    ups = sites(rng, [1, 2], shared_a=a)
    for i, u in enumerate(ups):
        u.tensors["layer.magnitude"] = np.full(6, float(i))
        u.a_fingerprint = fingerprint({PAIR.a: a})
    agg = ffa(ups, [PAIR], {PAIR.a: a})
    np.testing.assert_allclose(agg.tensors["layer.magnitude"], np.full(6, 2 / 3))
    assert not agg.exact and "layer.magnitude" in agg.notes[0]
    with pytest.raises(AggregationError, match="fedsmooth: tensor 'layer.magnitude' is not part of a plain"):
        fedsmooth(ups, [PAIR], rank=3)


def test_fedsmooth_projects_each_pair_to_its_own_rank():
    rng = np.random.default_rng(8)
    p1, p2 = Pair("x.lora_A", "x.lora_B", 1.0), Pair("y.lora_A", "y.lora_B", 1.0)
    ups = [SiteUpdate(f"s{i}", {p1.a: rng.standard_normal((2, 7)), p1.b: rng.standard_normal((5, 2)),
                                p2.a: rng.standard_normal((3, 4)), p2.b: rng.standard_normal((6, 3))}, 1.0 + i)
           for i in range(3)]
    merged = fedsmooth(ups, [p1, p2]).merged
    assert merged[p1.a].shape == (2, 7) and merged[p2.a].shape == (3, 4)
    for pair, r in ((p1, 2), (p2, 3)):
        mean = sum(u.weight * u.tensors[pair.b] @ u.tensors[pair.a] for u in ups) / 6.0
        u, sv, vt = np.linalg.svd(mean)
        np.testing.assert_allclose(merged[pair.b] @ merged[pair.a], (u[:, :r] * sv[:r]) @ vt[:r], atol=1e-12)


def test_fedsmooth_lr_is_the_official_cosine_over_rounds():
    from medlora.federated.strategies import fedsmooth_lr

    # by hand: 0.005 (1 + cos(pi t / 5)) for t = 0..4 (official cosine_learning_rate, min_lr 0)
    want = [0.01, 0.009045085, 0.006545085, 0.003454915, 0.000954915]
    assert [fedsmooth_lr(t, 5, 0.01) for t in range(5)] == pytest.approx(want, abs=1e-9)
    # with a floor of 0.001: 0.001 + 0.0045 (1 + cos(pi t / 5))
    assert [fedsmooth_lr(t, 5, 0.01, 0.001) for t in range(5)] == pytest.approx(
        [0.01, 0.009140576, 0.006890576, 0.004109424, 0.001859424], abs=1e-9)
    assert fedsmooth_lr(3, 5, 0.01, schedule="constant") == 0.01
    with pytest.raises(ValueError, match="lr_schedule must be 'cosine' or 'constant'"):
        fedsmooth_lr(0, 5, 0.01, schedule="step")
