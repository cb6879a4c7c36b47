"""Case-level routing: ReMix top-k equal weights, effective number of experts, the RLOO estimator (against the
exact policy gradient of a tiny discrete policy, by enumeration), Plackett-Luce subset log-probabilities."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from medlora.adapters.multi import MultiAdapterError
from medlora.adapters.multi.router import (
    CaseRouter,
    effective_experts,
    pooled_features,
    rloo_surrogate,
    sample_subsets,
    topk_equal_weights,
)


def test_topk_equal_weights_and_effective_support():
    scores = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 3.0, 0.0, 1.0]])
    w = topk_equal_weights(scores, 2)
    assert w.tolist() == [[0.0, 0.5, 0.0, 0.5], [0.5, 0.5, 0.0, 0.0]]
    assert effective_experts(w).tolist() == pytest.approx([2.0, 2.0])
    soft = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert effective_experts(soft).tolist() == pytest.approx([1.0, math.exp(h), 3.0])  # collapse shows as 1
    with pytest.raises(MultiAdapterError, match="1 <= k <= K"):
        topk_equal_weights(scores, 5)


def test_rloo_on_one_sample_is_the_leave_one_out_formula():
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    actions, rewards = [0, 2, 2], torch.tensor([1.0, -0.5, 2.0])
    logp = torch.log_softmax(theta, 0)[actions]
    rloo_surrogate(logp, rewards).backward()
    pi = torch.softmax(theta.detach(), 0)
    want = torch.zeros(3)
    for m, a in enumerate(actions):
        others = [float(rewards[j]) for j in range(3) if j != m]
        adv = float(rewards[m]) - sum(others) / 2
        want += adv * (torch.eye(3)[a] - pi) / 3  # grad log softmax = e_a - pi
    torch.testing.assert_close(-theta.grad, want)


def test_rloo_is_unbiased_for_the_policy_gradient():
    """E over all M-tuples of the estimate = grad sum_a pi(a) R(a), enumerated exactly for 3 actions, M = 2 and 3."""
    reward = torch.tensor([1.0, -0.5, 2.0])
    theta0 = torch.tensor([0.3, -0.2, 0.5])
    pi = torch.softmax(theta0, 0)
    exact = sum(pi[a] * reward[a] * (torch.eye(3)[a] - pi) for a in range(3))
    for m in (2, 3):
        expected = torch.zeros(3)
        for tup in itertools.product(range(3), repeat=m):
            theta = theta0.clone().requires_grad_(True)
            rloo_surrogate(torch.log_softmax(theta, 0)[list(tup)], reward[list(tup)]).backward()
            expected += math.prod(float(pi[a]) for a in tup) * -theta.grad
        torch.testing.assert_close(expected, exact, rtol=1e-5, atol=1e-6)
    with pytest.raises(MultiAdapterError, match="M >= 2"):
        rloo_surrogate(torch.zeros(1), torch.zeros(1))


def test_subset_log_probability_is_the_ordered_draw_without_replacement():
    logits = torch.tensor([[0.2, 1.0, -0.5, 0.1]])
    idx, logp = sample_subsets(logits, 2, 50, torch.Generator().manual_seed(0))
    p = torch.softmax(logits[0], 0)
    for s in range(50):
        i, j = idx[s, 0].tolist()
        assert i != j
        assert float(logp[s, 0]) == pytest.approx(math.log(p[i] * p[j] / (1 - p[i])), rel=1e-5)


def test_case_router_learns_which_classes_a_case_holds_and_pools_a_layer():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 5, generator=g)
    present = torch.stack([feats[:, 0] > 0, feats[:, 1] + feats[:, 2] > 0, feats[:, 3] < 0], dim=1)
    router = CaseRouter(5, 3)
    losses = router.fit(feats, present, steps=300)
    assert losses[-1] < 0.5 * losses[0]
    assert ((router(feats) > 0) == present).float().mean() > 0.9
    assert router.route(feats, 1).sum(1).tolist() == [1.0] * 40
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 1, 1))
    x = torch.randn(2, 1, 4, 5)
    with torch.no_grad():
        want = net[1](net[0](x)).mean(dim=(2, 3))
    torch.testing.assert_close(pooled_features(net, "1", x), want)
