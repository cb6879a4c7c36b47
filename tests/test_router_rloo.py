"""RLOO training of a case router (ReMix): on a constructed problem where one adapter is right per case, training
with the Dice-based composition reward raises the probability of choosing it, and the softmax's effective number
of experts falls (the collapse is logged)."""

from __future__ import annotations

import pytest
import torch

from medlora.adapters.multi import CaseRouter, fuse_class_maps
from medlora.training.composition import composition_reward

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(n_cases=12, k_adapters=3, size=8):
    """Case i holds class ``right[i]`` in its left half, which only adapter ``right[i]`` finds; every other adapter
    claims a small patch elsewhere for its class. Rewards: the right adapter alone 1, with a wrong one 0.5 (a
    false class), wrong ones alone 0. The case's
    features say which class it holds (one-hot plus noise), as pooled features of a good base would."""
    g = torch.Generator().manual_seed(0)
    right = torch.arange(n_cases) % k_adapters
    values = [2, 3, 4]
    truth = torch.zeros(n_cases, 1, size, size, dtype=torch.long)
    truth[:, :, :, : size // 2] = torch.tensor(values)[right][:, None, None, None]
    probs = torch.full((n_cases, k_adapters, 1, size, size), 0.05)
    for i in range(n_cases):
        for j in range(k_adapters):
            if j == right[i]:
                probs[i, j, :, :, : size // 2] = 0.9
            else:  # a wrong adapter misses the lesion and claims a patch of healthy tissue for its class
                probs[i, j, :, :2, -2:] = 0.9
    features = torch.eye(k_adapters)[right] + 0.1 * torch.randn(n_cases, k_adapters, generator=g)
    return right, values, truth, probs, features


def _reward_fn(values, truth, probs):
    def reward(i, subset):
        labels = fuse_class_maps(probs[i][list(subset)].reshape(1, len(subset), 8, 8),
                                 [values[j] for j in subset])
        return composition_reward(labels, truth[i], values)
    return reward


def test_reward_is_the_mean_dice_of_the_classes_in_truth_or_prediction():
    truth = torch.tensor([[0, 2, 2, 3]])
    assert composition_reward(torch.tensor([[0, 2, 2, 3]]), truth, [2, 3, 4]) == 1.0
    # class 2: 2*1/(1+2); class 3 missed: 0; class 4 predicted where absent: 0
    assert composition_reward(torch.tensor([[4, 2, 0, 0]]), truth, [2, 3, 4]) == pytest.approx((2 / 3) / 3)
    assert composition_reward(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), [2]) == 1.0


@pytest.mark.parametrize("k", [1, 2])
def test_rloo_raises_the_probability_of_the_right_adapter(k):
    right, values, truth, probs, features = _problem()
    reward = _reward_fn(values, truth, probs)
    assert (reward(0, (0,)), reward(0, (1,)), reward(0, (0, 1)), reward(0, (1, 2))) == (1.0, 0.0, 0.5, 0.0)
    torch.manual_seed(0)
    router = CaseRouter(3, 3)
    with torch.no_grad():
        router.head.weight.zero_()
        router.head.bias.zero_()
    before = torch.softmax(router((features - features.mean(0)) / features.std(0)), 1)[torch.arange(12), right]
    hist = router.fit_rloo(features, reward, k, steps=150, samples=4, lr=0.1,
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        after = torch.softmax(router(features), 1)[torch.arange(12), right]
    assert torch.allclose(before, torch.full((12,), 1 / 3))
    assert after.min() > 0.8  # every case: the right adapter is now the likely first draw
    assert hist["effective_experts"][0] == pytest.approx(3.0) and hist["effective_experts"][-1] < 1.6
    best = {1: 1.0, 2: 0.5}[k]  # the right adapter alone; with k = 2 one wrong adapter always comes along
    # under the uniform start the expected reward is 1/3 for both k; trained, it comes close to the best
    assert hist["reward"][0] < 0.9 * best < sum(hist["reward"][-15:]) / 15
    with torch.no_grad():
        top = torch.topk(router(features), k).indices
    assert all(int(right[i]) in top[i].tolist() for i in range(12))
