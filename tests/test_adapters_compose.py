"""Output composition of single-class adapters and merging with searched coefficients (medlora.adapters.multi.compose).

References: each adapter's model run alone and fused voxel by voxel in Python loops; the merged weights written out
by hand from the LoRA factors; :func:`merge_adapters` (factor concatenation) loaded onto the base.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from medlora.adapters import (
    AdapterBank,
    AdapterConfig,
    MultiAdapterError,
    inject,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from medlora.adapters.multi import AdapterDeltas, compose_outputs, fuse_class_maps, random_like, search_coefficients

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*adapter parameters >= the layer")]


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 1, 1))


def _adapted(base: nn.Module, seed: int, targets=None) -> nn.Module:


    model = inject(copy.deepcopy(base), AdapterConfig("lora", rank=2, alpha=4.0, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.6 * torch.randn(p.shape, generator=g))
    return model


def _fuse_by_hand(probs, values, rule, threshold, priority):
    """Voxel by voxel: the classes at or above the threshold, then the most probable or the first in priority."""
    n, k = probs.shape[:2]
    out = torch.zeros((n, *probs.shape[2:]), dtype=torch.long)
    for i in range(n):
        for idx in itertools.product(*(range(s) for s in probs.shape[2:])):
            p = [float(probs[(i, c, *idx)]) for c in range(k)]
            hits = [c for c in range(k) if p[c] >= threshold]
            if not hits:
                continue
            if rule == "probability":
                best = max(hits, key=lambda c: (p[c], -c))
            else:
                best = next(c for c in priority if c in hits)
            out[(i, *idx)] = values[best]
    return out


@pytest.mark.parametrize("rule,priority", [("probability", None), ("priority", [2, 0, 1])])
def test_composition_equals_separate_runs_fused_by_hand(rule, priority):
    base = _base()
    models = [_adapted(base, s) for s in (1, 2, 3)]
    bank = AdapterBank(base)
    for name, m in zip("abc", models, strict=True):
        bank.add(name, m)
    x = torch.randn(2, 1, 7, 6, generator=torch.Generator().manual_seed(9))
    values = [4, 3, 5]
    labels, probs = compose_outputs(bank, x, ["a", "b", "c"], values=values, rule=rule, threshold=0.5,
                                    priority=priority)
    with torch.no_grad():
        alone = torch.stack([torch.sigmoid(m(x)[:, 0]) for m in models], dim=1)
    torch.testing.assert_close(probs, alone, rtol=1e-5, atol=1e-6)
    assert int(((alone >= 0.5).sum(1) >= 2).sum()) > 3  # overlaps exist, so the rule matters
    want = _fuse_by_hand(alone, values, rule, 0.5, priority or [0, 1, 2])
    assert torch.equal(labels, want)


def test_fusion_rules_on_a_tiny_example_and_errors():
    probs = torch.tensor([[[0.9, 0.6, 0.2, 0.55]], [[0.7, 0.8, 0.1, 0.55]]]).permute(1, 0, 2)  # (1, 2, 4)
    assert fuse_class_maps(probs).tolist() == [[1, 2, 0, 1]]  # a tie goes to the lower class
    assert fuse_class_maps(probs, rule="priority", priority=[1, 0]).tolist() == [[2, 2, 0, 2]]
    with pytest.raises(MultiAdapterError, match="priority must order the 2 classes"):
        fuse_class_maps(probs, rule="priority", priority=[1, 1])
    with pytest.raises(MultiAdapterError, match="unknown fusion rule"):
        fuse_class_maps(probs, rule="vote")


def test_merge_with_known_coefficients_is_the_weighted_sum_of_updates(tmp_path):
    base = _base()
    models = [_adapted(base, 11), _adapted(base, 12), _adapted(base, 13, targets=["2"])]
    w = [0.3, -0.7, 1.2]
    merged = AdapterDeltas(base, models).apply(w)
    layers = dict(base.named_modules())
    for name in ("0", "2", "4"):
        want = layers[name].weight.detach().clone()
        for wk, m in zip(w, models, strict=True):
            params = {n.rsplit(".", 1)[-1]: p for n, p in m.named_parameters()
                      if n.startswith(f"{name}.parametrizations.")}
            if params:  # dW = (alpha / r) B A, reshaped to the kernel (the DESIGN table's lora row)
                want = want + wk * (4.0 / 2) * (params["lora_B"] @ params["lora_A"]).view(want.shape)
        torch.testing.assert_close(dict(merged.named_modules())[name].weight, want, rtol=1e-5, atol=1e-6)
    # the same merge through merge_adapters (factors concatenated into one LoRA), loaded onto the base
    files = [save_adapter(m, tmp_path / f"a{i}.safetensors") for i, m in enumerate(models)]
    out = merge_adapters(files, "linear", w, out=tmp_path / "merged.safetensors")


    ref = load_adapter(copy.deepcopy(base), out)
    x = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(MultiAdapterError, match="need 3 finite weights"):
        AdapterDeltas(base, models).apply([1.0, float("nan"), 0.0])


def test_random_pool_matches_update_norms_per_layer():
    base = _base()
    trained = _adapted(base, 21)
    rnd = random_like(trained, torch.Generator().manual_seed(0), scale_to=trained)
    d_t, d_r = AdapterDeltas(base, [trained]), AdapterDeltas(base, [rnd])
    for n in d_t.layers:
        assert float(d_r.deltas[n][0].norm()) == pytest.approx(float(d_t.deltas[n][0].norm()), rel=1e-4)
        assert not torch.allclose(d_r.deltas[n][0], d_t.deltas[n][0])


def test_coefficient_search_stays_in_budget_and_bounds_and_finds_a_quadratic_minimum():
    target = [0.8, -0.4]
    calls = []

    def objective(w):
        calls.append(list(w))
        return sum((a - b) ** 2 for a, b in zip(w, target, strict=True))

    best, history = search_coefficients(objective, 2, budget=120, l1=0.0)
    assert len(calls) == len(history) <= 120
    assert all(abs(v) <= 1.5 for h in history for v in h[0])
    assert best == pytest.approx(target, abs=0.02)
    assert history[0][0] == [0.0, 0.0]  # LoraHub's start: no adapter
    best, history = search_coefficients(objective, 2, budget=10, l1=0.0)
    assert len(history) == 10
