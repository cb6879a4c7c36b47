"""Post-hoc rank tools (set_active_rank, truncate_rank, LoRA-Squeeze) and adapter merging (linear, LoRA-LEGO)."""

from __future__ import annotations

import copy
import itertools
import types

import numpy as np
import pytest
import torch
from torch import nn

from medlora.adapters import (
    AdapterConfig,
    RankAnnealer,
    RankSchedule,
    adapters_of,
    base_weight,
    inject,
    iter_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_rank,
    squeeze,
    truncate_rank,
)

# tiny test layers: adapters as large as the layer are intended here
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*adapter parameters >= the layer:UserWarning"),
    pytest.mark.usefixtures("float64_default"),
]


def base_model() -> nn.Module:
    """The same base weights at every call (the layers are looked at one by one, not chained)."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return nn.Sequential(nn.Linear(12, 10), nn.Conv3d(3, 5, (3, 3, 1)), nn.ConvTranspose2d(4, 6, 2, groups=2))


def canonical_np(weight: np.ndarray, layer: nn.Module) -> np.ndarray:
    """(O, I/groups, *k) flattened to O x F, with loops, independent of medlora's layout code."""
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g, (in_total, out_pg) = layer.groups, weight.shape[:2]
        out = np.zeros((out_pg * g, in_total // g, *weight.shape[2:]))
        for grp, j, i in itertools.product(range(g), range(out_pg), range(in_total // g)):
            out[grp * out_pg + j, i] = weight[grp * (in_total // g) + i, j]
        weight = out
    return weight.reshape(weight.shape[0], -1)


def delta_np(layer: nn.Module) -> np.ndarray:
    """The adapted layer's dW on the O x F matricisation."""
    return canonical_np(layer.weight.detach().numpy(), layer) - canonical_np(base_weight(layer).detach().numpy(),
                                                                             layer)


def factors_np(layer: nn.Module) -> tuple[np.ndarray, np.ndarray, float]:
    reparam = adapters_of(layer)
    inner = getattr(reparam, "inner", reparam)
    return inner.lora_B.detach().numpy().copy(), inner.lora_A.detach().numpy().copy(), inner.scaling


def best_rank_k(m: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def set_low_rank_update(model: nn.Module, true_rank: int, scale: float = 0.3) -> None:
    """Random trained-looking LoRA factors whose product has rank ``true_rank``."""
    with torch.no_grad():
        for _, _, reparam in iter_adapters(model):
            inner = getattr(reparam, "inner", reparam)
            r = inner.lora_A.shape[0]
            inner.lora_A.normal_(0, scale)
            inner.lora_B.copy_(torch.randn(inner.lora_B.shape[0], true_rank) @ torch.randn(true_rank, r) * scale)


# --- LoRA-Squeeze -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("svd", ["randomized", "exact"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_squeeze_rank16_of_true_rank4_is_lossless(method, svd, tmp_path):
    model = base_model()
    inject(model, AdapterConfig(method, rank=16, alpha=32))
    set_low_rank_update(model, true_rank=4)
    before = [layer.weight.detach().clone() for layer in model]
    errors = squeeze(model, 4, method=svd)
    assert set(errors) == {"0", "1", "2"} and max(errors.values()) < 1e-6
    for layer, w in zip(model, before, strict=True):
        b, a, s = factors_np(layer)
        assert a.shape[0] == b.shape[1] == 4 and adapters_of(layer).config.rank == 4
        assert s == 32 / 4  # alpha is kept, the scale follows the new rank
        torch.testing.assert_close(layer.weight, w, rtol=1e-10, atol=1e-10)
    # the squeezed adapter is an ordinary rank-4 adapter file
    path = save_adapter(model, tmp_path / "squeezed.safetensors")
    fresh = load_adapter(base_model(), path)
    for layer, other in zip(model, fresh, strict=True):
        assert torch.equal(layer.weight, other.weight)


def test_squeeze_is_the_best_rank_k_approximation():
    model = base_model()
    inject(model, AdapterConfig("lora", rank=8))
    set_low_rank_update(model, true_rank=8)
    dense = [s * b @ a for b, a, s in (factors_np(layer) for layer in model)]
    errors = squeeze(model, 3, method="exact")
    for (name, layer), full in zip(model.named_children(), dense, strict=True):
        reference = best_rank_k(full, 3)
        np.testing.assert_allclose(delta_np(layer), reference, rtol=1e-9, atol=1e-9)
        expected_error = np.linalg.norm(full - reference) / np.linalg.norm(full)
        assert errors[name] == pytest.approx(expected_error, rel=1e-6)
    # randomized SVD with power iterations gets the same top spectrum on these small factors
    model2 = base_model()
    inject(model2, AdapterConfig("lora", rank=8))
    set_low_rank_update(model2, true_rank=8)
    dense = [s * b @ a for b, a, s in (factors_np(layer) for layer in model2)]
    squeeze(model2, 3, generator=torch.Generator().manual_seed(0))
    for layer, full in zip(model2, dense, strict=False):
        if isinstance(layer, nn.Linear):
            np.testing.assert_allclose(delta_np(layer), best_rank_k(full, 3), atol=1e-6)


def test_squeeze_refuses_other_methods_and_keeps_low_ranks():
    from medlora.adapters import list_methods

    squeezable = set()
    for method in list_methods():
        options = {"warmup_steps": 2.0} if method == "lora_sb" else {}
        layer = inject(nn.Sequential(nn.Linear(8, 8)), AdapterConfig(method, rank=2, options=options))[0]
        if adapters_of(layer).rank_factors() is not None:
            squeezable.add(method)
    assert squeezable == {"lora", "dora"}
    model = base_model()
    inject(model, AdapterConfig("bone", rank=2, targets=["0"]))
    with pytest.raises(ValueError, match="bone"):
        squeeze(model, 1)
    model = base_model()
    inject(model, AdapterConfig("lora", rank=2))
    a = adapters_of(model[0]).lora_A
    assert squeeze(model, 4) == {} and adapters_of(model[0]).lora_A is a and a.shape[0] == 2


def head_model() -> nn.Module:
    """A segmentation tail: a 6-output convolution and a 2-class 1x1x1 head (both below rank 8 on the output side)."""
    with torch.random.fork_rng():
        torch.manual_seed(99)
        return nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv3d(6, 2, 1))


def _check_file_and_peft(model: nn.Module, path) -> None:
    """The saved file loads onto a fresh base with the same outputs, and PEFT computes them from its export."""
    peft = pytest.importorskip("peft")
    from medlora.adapters import export_peft

    x = torch.randn(1, 3, 4, 4, 4)
    save_adapter(model, path)
    fresh = load_adapter(head_model(), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    export_peft(model, path.parent / "peft")
    theirs = peft.PeftModel.from_pretrained(head_model(), str(path.parent / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("how", ["exact", "randomized", "annealer"])
def test_squeeze_below_a_layers_dimensions_gives_it_its_full_rank(how, tmp_path):
    """Rank 8 squeezed to 4: the 6-output conv gets rank 4, the 2-class head rank 2 (all its update has)."""
    model = head_model()
    inject(model, AdapterConfig("lora", rank=8, alpha=16))
    set_low_rank_update(model, true_rank=8)
    layers = [model[0], model[2]]
    dense = [s * b @ a for b, a, s in (factors_np(layer) for layer in layers)]
    if how == "annealer":
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        annealer = RankAnnealer(model, RankSchedule(8, 4, end_step=2), optimizers=[optimiser])
        for step in (1, 2):
            annealer.step(step)
    else:
        squeeze(model, 4, method=how, generator=torch.Generator().manual_seed(0))
    for layer, full, rank in zip(layers, dense, (4, 2), strict=True):
        b, a, _ = factors_np(layer)
        assert a.shape[0] == b.shape[1] == rank == adapters_of(layer).config.rank
        np.testing.assert_allclose(delta_np(layer), best_rank_k(full, rank), rtol=1e-8, atol=1e-8)
    _check_file_and_peft(model, tmp_path / "squeezed.safetensors")


def test_linear_merge_to_a_rank_above_a_layers_dimensions(tmp_path):
    paths, dense = [], []
    for seed in (1, 2):
        model = head_model()
        inject(model, AdapterConfig("lora", rank=8, alpha=8))
        torch.manual_seed(seed)
        set_low_rank_update(model, true_rank=8)
        dense.append([delta_np(model[0]), delta_np(model[2])])
        paths.append(save_adapter(model, tmp_path / f"{seed}.safetensors"))
    out = merge_adapters(paths, "linear", [0.7, 0.3], rank=4, out=tmp_path / "merged.safetensors")
    merged = load_adapter(head_model(), out)
    for i, (layer, rank) in enumerate(((merged[0], 4), (merged[2], 2))):
        assert adapters_of(layer).config.rank == rank == factors_np(layer)[1].shape[0]
        reference = best_rank_k(0.7 * dense[0][i] + 0.3 * dense[1][i], rank)
        np.testing.assert_allclose(delta_np(layer), reference, rtol=1e-9, atol=1e-9)
    _check_file_and_peft(merged, tmp_path / "again.safetensors")


def test_rank_schedule_values():
    schedule = RankSchedule(16, 4, end_step=12, start_step=4)
    expected = [16] * 5 + [round(16 - (s - 4) / 8 * 12) for s in range(5, 12)] + [4, 4]
    assert [schedule.rank_at(s) for s in range(14)] == expected
    cosine = RankSchedule(8, 2, end_step=10, shape="cosine")
    ranks = [cosine.rank_at(s) for s in range(12)]
    assert ranks[0] == 8 and ranks[-1] == 2 and all(x >= y for x, y in itertools.pairwise(ranks))
    with pytest.raises(ValueError):
        RankSchedule(4, 8, end_step=3)


def test_in_training_annealing_from_a_plain_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(64, 10)
    y = teacher(x).detach()
    inject(net, AdapterConfig("lora", rank=8, alpha=8))
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=0.02)
    annealer = RankAnnealer(net, RankSchedule(8, 2, start_step=10, end_step=40), optimizers=[optimiser])
    losses, ranks = [], []
    for step in range(1, 61):
        optimiser.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        annealer.step(step)
        ranks.append(adapters_of(net[0]).lora_A.shape[0])
    assert ranks[0] == 8 and ranks[-1] == 2 and all(x >= y for x, y in itertools.pairwise(ranks))
    trained = [p for p in net.parameters() if p.requires_grad]  # the optimiser holds the new factors
    assert [id(p) for p in optimiser.param_groups[0]["params"]] == [id(p) for p in trained]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


def test_lightning_callback_steps_the_annealer():
    lightning = pytest.importorskip("lightning.pytorch")
    net = nn.Sequential(nn.Linear(6, 5))
    inject(net, AdapterConfig("lora", rank=4))
    set_low_rank_update(net, true_rank=4)
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad])
    callback = RankAnnealer(net, RankSchedule(4, 1, end_step=3)).lightning_callback()
    assert isinstance(callback, lightning.Callback)
    for step in range(1, 5):
        trainer = types.SimpleNamespace(global_step=step, optimizers=[optimiser])
        callback.on_train_batch_end(trainer, None, None, None, step)
    assert adapters_of(net[0]).lora_A.shape[0] == 1


# --- nested ranks: choosing the deployment rank ------------------------------------------------------------


@pytest.mark.parametrize("method", ["dylora", "matryoshka"])
def test_set_active_rank_and_truncate_rank(method, tmp_path):
    model = base_model()
    inject(model, AdapterConfig(method, rank=4, alpha=8))
    with torch.no_grad():
        for _, _, reparam in iter_adapters(model):
            reparam.lora_B.normal_()
    model.eval()
    full = [delta_np(layer) for layer in model]
    assert set_active_rank(model, 2) == 3
    expected = []
    for layer in model:
        b, a, _ = factors_np(layer)
        scale = 8 / 2 if method == "dylora" else (8 / 4) / np.sqrt(2)  # alpha / r ; (alpha / R) / sqrt(r)
        expected.append(scale * b[:, :2] @ a[:2])
        np.testing.assert_allclose(delta_np(layer), expected[-1], rtol=1e-12, atol=1e-12)
    set_active_rank(model, None)
    for layer, d in zip(model, full, strict=True):
        np.testing.assert_allclose(delta_np(layer), d, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        set_active_rank(model, 5)
    truncate_rank(model, 2)
    for layer, d in zip(model, expected, strict=True):
        reparam = adapters_of(layer)
        assert reparam.config.method == "lora" and reparam.lora_A.shape == (2, d.shape[1])
        np.testing.assert_allclose(delta_np(layer), d, rtol=1e-12, atol=1e-12)
    path = save_adapter(model, tmp_path / "r2.safetensors")
    fresh = load_adapter(base_model(), path)
    for layer, other in zip(model, fresh, strict=True):
        assert torch.equal(layer.weight, other.weight)
    with pytest.raises(ValueError, match="nested-rank"):
        set_active_rank(model, 1)


# --- merging -----------------------------------------------------------------------------------------------


def trained_adapter(tmp_path, name, rank, seed, **config):
    model = base_model()
    inject(model, AdapterConfig("lora", rank=rank, **config))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for _, _, reparam in iter_adapters(model):
            reparam.lora_B.normal_()
    return model, save_adapter(model, tmp_path / f"{name}.safetensors")


def test_linear_merge_equals_the_dense_weighted_sum(tmp_path):
    m1, p1 = trained_adapter(tmp_path, "a", 2, 1)
    m2, p2 = trained_adapter(tmp_path, "b", 3, 2, alpha=12, targets=["0", "2"], rank_pattern={"2": 1})
    m3, p3 = trained_adapter(tmp_path, "c", 4, 3, use_rslora=True)
    weights = [0.5, 1.5, -0.25]
    out = merge_adapters([p1, p2, p3], "linear", weights, out=tmp_path / "merged.safetensors")
    merged = load_adapter(base_model(), out)
    for i, layer in enumerate(merged):
        reference = sum(w * delta_np(m[i]) for w, m in zip(weights, (m1, m2, m3), strict=True)
                        if adapters_of(m[i]) is not None)
        np.testing.assert_allclose(delta_np(layer), reference, rtol=1e-10, atol=1e-10)
    # compressed to rank 2: the best rank-2 approximation of that sum
    meta, tensors = merge_adapters([p1, p2, p3], "linear", weights, rank=2)
    assert all(t.shape[0] == 2 for k, t in tensors.items() if k.endswith("lora_A"))
    merged2 = base_model()
    load_adapter(merged2, merge_adapters([(meta, tensors)], "linear", [1.0], out=tmp_path / "m2.safetensors"))
    for i, layer in enumerate(merged2):
        np.testing.assert_allclose(delta_np(layer), best_rank_k(delta_np(merged[i]), 2), rtol=1e-9, atol=1e-9)


def test_lego_recovers_known_rank1_units(tmp_path):
    """Three adapters built from three prototype units (each unit rescaled, sign-flipped, permuted)."""
    rng = np.random.default_rng(0)
    model = base_model()
    layer = model[1]
    o, f = 5, 27
    proto_b, proto_a = rng.normal(size=(o, 3)), rng.normal(size=(3, f)) * np.array([[1.0], [3.0], [0.3]])
    members = [[0, 1], [1, 2], [2, 0, 1]]  # heterogeneous ranks 2, 2, 3
    weights = [0.5, 0.3, 0.2]
    paths = []
    for j, units in enumerate(members):
        m = base_model()
        inject(m, AdapterConfig("lora", rank=len(units), alpha=2.0 * len(units), targets=["1"]))
        c = rng.uniform(0.5, 2.0, size=len(units)) * rng.choice([-1, 1], size=len(units))
        with torch.no_grad():  # s = alpha / r = 2: B holds b / (2 c), A holds c a
            adapters_of(m[1]).lora_B.copy_(torch.from_numpy(proto_b[:, units] / (2 * c)))
            adapters_of(m[1]).lora_A.copy_(torch.from_numpy(proto_a[units] * c[:, None]))
        paths.append(save_adapter(m, tmp_path / f"t{j}.safetensors"))
    out = merge_adapters(paths, "lego", weights, rank=3, out=tmp_path / "lego.safetensors")
    load_adapter(model, out)
    b, a, s = factors_np(layer)
    assert a.shape == (3, f) and s == 1.0
    # each merged unit is one prototype, carrying the summed weight of the adapters that hold it
    unit_weight = [sum(w for w, units in zip(weights, members, strict=True) if p in units) for p in range(3)]
    for p in range(3):
        target = unit_weight[p] * np.outer(proto_b[:, p], proto_a[p])
        matches = [np.abs(np.outer(b[:, q], a[q]) - target).max() for q in range(3)]
        assert min(matches) < 1e-10
    reference = sum(unit_weight[p] * np.outer(proto_b[:, p], proto_a[p]) for p in range(3))
    np.testing.assert_allclose(delta_np(layer), reference, rtol=1e-10, atol=1e-10)
    # fewer clusters than units: still a valid adapter; pairs two of the units
    meta, tensors = merge_adapters(paths, "lego", weights, rank=2)
    assert tensors["1.lora_A"].shape == (2, f)


def test_merge_refuses_mixed_bases_and_other_methods(tmp_path):
    _, p1 = trained_adapter(tmp_path, "a", 2, 1)
    other = base_model()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    inject(other, AdapterConfig("lora", rank=2))
    p2 = save_adapter(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="different base"):
        merge_adapters([p1, p2])
    bone = base_model()
    inject(bone, AdapterConfig("bone", rank=2))
    p3 = save_adapter(bone, tmp_path / "bone.safetensors")
    with pytest.raises(ValueError, match="only plain lora"):
        merge_adapters([p1, p3], "lego")
    with pytest.raises(ValueError, match="method"):
        merge_adapters([p1], "ties")
