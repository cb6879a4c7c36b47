"""Parameter sharing and random bases: vera, randlora, unilora, flylora against float64 numpy references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from medlora.adapters import (
    AdapterConfig,
    adapters_of,
    base_weight,
    get_method,
    inject,
    iter_adapters,
    load_adapter,
    merge,
    parameter_report,
    read_adapter_file,
    remove,
    save_adapter,
)
from medlora.adapters.shared import shared_of


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Net(nn.Module):
    """Linear, Conv2d and ConvTranspose3d layers of different shapes (fan-in > O and fan-in < O)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 9)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose3d(4, 2, (2, 2, 1), stride=(2, 2, 1))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, img: torch.Tensor, vol: torch.Tensor) -> torch.Tensor:
        a = self.fc(x)
        b = self.conv(img).mean(dim=(2, 3))
        c = self.up(vol).mean(dim=(2, 3, 4))
        return torch.cat([a, b, self.head(b), c], dim=1)


def inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, 4, 5, generator=g), torch.randn(5, 4, 2, 3, 2, generator=g)


SHARED_TARGETS = ["fc", "conv", "up"]
CONFIGS = {
    "vera": dict(rank=4),
    "randlora": dict(rank=3),
    "unilora": dict(rank=2, options={"theta_d_length": 40}),
}


def adapted(method: str, **extra) -> tuple[Net, Net]:
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    kwargs = {**CONFIGS[method], **extra}
    inject(model, AdapterConfig(method, targets=SHARED_TARGETS, **kwargs))
    return base, model


def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def canonical_w0(module: nn.Module) -> np.ndarray:
    reparam = adapters_of(module)
    return reparam.layout.to_canonical(base_weight(module).detach()).numpy()


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


# ---------------------------------------------------------------- dense references (float64 numpy, loops)

def vera_reference(reparam, w0: np.ndarray) -> np.ndarray:
    o, n, r = w0.shape[0], int(np.prod(w0.shape[1:])), reparam.rank
    a, b = np_(reparam.shared.vera_A), np_(reparam.shared.vera_B)
    lb, ld = np_(reparam.vera_lambda_b), np_(reparam.vera_lambda_d)
    dw = np.zeros((o, n))
    for i in range(o):
        for j in range(n):
            dw[i, j] = sum(lb[i] * b[i, k] * ld[k] * a[k, j] for k in range(r))
    return w0 + dw.reshape(w0.shape)


def randlora_reference(reparam, w0: np.ndarray) -> np.ndarray:
    o, n, r = w0.shape[0], int(np.prod(w0.shape[1:])), reparam.rank
    lo, hi = min(o, n), max(o, n)
    nb = int(np.ceil(lo / r))
    assert reparam.n_bases == nb
    a, b = np_(reparam.shared.randlora_A), np_(reparam.shared.randlora_B)
    lam, gam = np_(reparam.randlora_lambda), np_(reparam.randlora_gamma)
    m = np.zeros((hi, lo))
    for col in range(nb * r):  # column col of the flattened B bases meets row col of the scaled A rows
        b_col = b[:hi, col // r, col % r]
        k, i = col // nb, col % nb
        a_row = lam[k, i] * a[k, 0, :lo] * gam[i]
        m += np.outer(b_col, a_row)
    dw = m if n <= o else m.T
    return w0 + reparam.scaling * dw.reshape(w0.shape)


def unilora_projection(model: nn.Module) -> tuple[np.ndarray, list[tuple[str, int, int, int]]]:
    """Dense P (D x d) from the recorded indices, and each layer's (name, r, fan_in, O) in module order."""
    reparams = list(iter_adapters(model))
    shared = shared_of(reparams[0][2])
    idx = shared.unilora_indices.numpy()
    d = shared.unilora_theta_d.numel()
    counts = np.bincount(idx, minlength=d)
    p = np.zeros((idx.size, d))
    for row, j in enumerate(idx):
        p[row, j] = 1.0 / np.sqrt(counts[j])
    layers = [(name, r.rank, r.fan_in, canonical_w0(m).shape[0]) for name, m, r in reparams]
    return p, layers


def unilora_reference(model: nn.Module) -> dict[str, np.ndarray]:
    p, layers = unilora_projection(model)
    theta = np_(shared_of(next(iter_adapters(model))[2]).unilora_theta_d)
    theta_big = p @ theta
    out, pos = {}, 0
    modules = dict(model.named_modules())
    for name, r, fan_in, o in layers:
        a = theta_big[pos:pos + r * fan_in].reshape(r, fan_in)
        pos += r * fan_in
        b = theta_big[pos:pos + o * r].reshape(o, r)
        pos += o * r
        w0 = canonical_w0(modules[name])
        out[name] = w0 + (b @ a).reshape(w0.shape)
    assert pos == p.shape[0]
    return out


def effective(module: nn.Module) -> np.ndarray:
    reparam = adapters_of(module)
    w0 = reparam.layout.to_canonical(base_weight(module).detach())
    return reparam.effective(w0).detach().numpy()


# ---------------------------------------------------------------- registration

def test_registration_flags():
    for name in ("vera", "randlora", "unilora"):
        assert get_method(name).mergeable and get_method(name).build_shared is not None
    assert not get_method("flylora").mergeable
    assert not get_method("unilora").starts_at_base
    assert get_method("randlora").alpha_over_rank == 20.0


# ---------------------------------------------------------------- dense references

@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_per_layer_methods_match_dense_reference(method):
    _, model = adapted(method)
    perturb(model)
    reference = vera_reference if method == "vera" else randlora_reference
    modules = dict(model.named_modules())
    for name in SHARED_TARGETS:
        reparam = adapters_of(modules[name])
        np.testing.assert_allclose(effective(modules[name]), reference(reparam, canonical_w0(modules[name])),
                                   rtol=1e-10, atol=1e-12)


def test_unilora_matches_dense_projection_and_is_isometric():
    _, model = adapted("unilora")
    perturb(model)
    p, _ = unilora_projection(model)
    # one nonzero per row; orthonormal columns (every slot is used: D >> d)
    assert ((p != 0).sum(axis=1) == 1).all()
    np.testing.assert_allclose(p.T @ p, np.eye(p.shape[1]), atol=1e-12)
    counts = np.bincount(shared_of(next(iter_adapters(model))[2]).unilora_indices.numpy())
    assert counts.max() - counts.min() <= 1  # balanced assignment
    modules = dict(model.named_modules())
    for name, expected in unilora_reference(model).items():
        np.testing.assert_allclose(effective(modules[name]), expected, rtol=1e-10, atol=1e-12)


def test_randlora_update_is_full_rank():
    _, model = adapted("randlora")
    perturb(model)
    for name, module, reparam in iter_adapters(model):
        w0 = reparam.layout.to_canonical(base_weight(module).detach())
        dw = reparam.delta(w0).flatten(1)
        assert torch.linalg.matrix_rank(dw).item() == min(dw.shape), name


def test_vera_bases_are_shared_and_sliced():
    _, model = adapted("vera")
    reparams = [r for _, _, r in iter_adapters(model)]
    shared = shared_of(reparams[0])
    assert all(shared_of(r) is shared for r in reparams)
    # sized by the largest fan-in (conv: 3*3*3 = 27) and output count (fc: 9)
    assert tuple(shared.vera_A.shape) == (4, 27) and tuple(shared.vera_B.shape) == (9, 4)
    bound = np.sqrt(6 / 27)
    assert shared.vera_A.abs().max() <= bound and not shared.vera_A.requires_grad


# ---------------------------------------------------------------- start point, gradients, training

@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_starts_at_base(method):
    base, model = adapted(method)
    torch.testing.assert_close(model(*inputs()), base(*inputs()), rtol=0, atol=1e-12)


def test_unilora_start_point_is_the_projection_of_the_initial_vector():
    base, model = adapted("unilora")
    theta = shared_of(next(iter_adapters(model))[2]).unilora_theta_d
    assert theta.abs().max() <= 0.02 and theta.abs().max() > 0
    assert not torch.allclose(model(*inputs()), base(*inputs()))
    modules = dict(model.named_modules())
    for name, expected in unilora_reference(model).items():
        np.testing.assert_allclose(effective(modules[name]), expected, rtol=1e-10, atol=1e-12)


TRAINED = {
    "vera": {"vera_lambda_b", "vera_lambda_d"},
    "randlora": {"randlora_lambda", "randlora_gamma"},
    "unilora": {"unilora_theta_d"},
}


@pytest.mark.parametrize("method", list(TRAINED))
def test_gradients_reach_only_what_the_paper_trains(method):
    _, model = adapted(method)
    if method != "unilora":
        perturb(model)  # away from zero factors so that every trained tensor gets a gradient
    model(*inputs()).square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert name.rsplit(".", 1)[-1] in TRAINED[method], name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(not b.requires_grad for b in model.buffers())


@pytest.mark.parametrize("method", ["vera", "randlora", "unilora", "flylora"])
def test_toy_regression_loss_decreases(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    target = copy.deepcopy(model)
    with torch.no_grad():
        target[0].weight.add_(0.3 * torch.randn_like(target[0].weight))
        target[2].weight.add_(0.3 * torch.randn_like(target[2].weight))
    x = torch.randn(64, 8)
    y = target(x).detach()
    config = {"flylora": dict(rank=8, options={"top_k": 4}), "unilora": dict(rank=4, options={"theta_d_length": 64})}
    inject(model, AdapterConfig(method, targets=["0", "2"], **config.get(method, CONFIGS.get(method, {}))))
    lr = {"vera": 0.2, "randlora": 1e-2, "unilora": 5e-2, "flylora": 2e-2}[method]
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(15):
        optimiser.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::5]


# ---------------------------------------------------------------- shared state bookkeeping

def test_shared_parameters_counted_once():
    _, model = adapted("unilora")
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("shared.unilora_theta_d")
    report = parameter_report(model)
    assert report.shared_trainable_params == 40 == report.total_trainable_params
    assert all(layer.trainable_params == 0 for layer in report.layers)
    assert report.adapter_params == 40
    assert "(shared by the layers)" in report.table()
    assert sum(k.endswith("unilora_theta_d") for k in model.state_dict()) == 1


def test_vera_report_counts_per_layer_vectors():
    _, model = adapted("vera")
    report = parameter_report(model)
    assert [layer.trainable_params for layer in report.layers] == [9 + 4, 4 + 4, 2 + 4]
    assert report.shared_trainable_params == 0 and report.total_trainable_params == 27


def test_device_move_keeps_sharing():
    _, model = adapted("vera")
    model.to(torch.float32)
    reparams = [r for _, _, r in iter_adapters(model)]
    assert all(shared_of(r).vera_A.dtype == torch.float32 for r in reparams)
    assert shared_of(reparams[1]) is shared_of(reparams[0])
    model(*(t.float() for t in inputs()))


def test_deepcopy_keeps_one_shared_state():
    _, model = adapted("unilora")
    clone = copy.deepcopy(model)
    reparams = [r for _, _, r in iter_adapters(clone)]
    assert all(shared_of(r) is shared_of(reparams[0]) for r in reparams)
    assert shared_of(reparams[0]) is not shared_of(next(iter_adapters(model))[2])
    torch.testing.assert_close(clone(*inputs()), model(*inputs()))


# ---------------------------------------------------------------- merge

@pytest.mark.parametrize("method", ["vera", "randlora", "unilora"])
def test_merge_is_exact(method):
    _, model = adapted(method)
    perturb(model)
    expected = model(*inputs())
    merge(model)
    assert not list(iter_adapters(model))
    torch.testing.assert_close(model(*inputs()), expected, rtol=0, atol=1e-12)


def test_flylora_refuses_merge():
    model = nn.Sequential(nn.Linear(6, 5))
    inject(model, AdapterConfig("flylora", rank=4, options={"top_k": 2}))
    with pytest.raises(ValueError, match="flylora cannot be merged"):
        merge(model)
    assert adapters_of(model[0]) is not None


# ---------------------------------------------------------------- save / load

@pytest.mark.parametrize("method,options", [
    ("vera", {}), ("vera", {"save_projection": False}), ("randlora", {}), ("randlora", {"sparse": True}),
    ("randlora", {"save_projection": False}), ("unilora", {"theta_d_length": 40}),
    ("unilora", {"theta_d_length": 40, "save_indices": True}),
])
def test_save_load_round_trip_is_bitwise(tmp_path, method, options):
    base, model = adapted(method, options=options)
    perturb(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    meta, tensors = read_adapter_file(path)
    assert len(meta["shared"]) == 1 and meta["shared"][0]["layers"] == SHARED_TARGETS
    saves_bases = options.get("save_projection", True) or options.get("save_indices", False)
    shared_keys = {k for k in tensors if k.startswith("shared::0.")}
    expected_keys = {
        "vera": {"shared::0.vera_A", "shared::0.vera_B"},
        "randlora": {"shared::0.randlora_A", "shared::0.randlora_B"},
        "unilora": {"shared::0.unilora_theta_d"} | (
            {"shared::0.unilora_indices", "shared::0.unilora_scales"} if options.get("save_indices") else set()),
    }[method]
    if method != "unilora" and not saves_bases:
        expected_keys = set()
    assert shared_keys == expected_keys
    loaded = copy.deepcopy(base)
    torch.manual_seed(123)  # a different global RNG state must not matter
    load_adapter(loaded, path)
    before = {k: v for k, v in model.state_dict().items()}
    after = loaded.state_dict()
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(loaded(*inputs()), model(*inputs()))
    # loading again into the adapted model (the "existing adapters" path) is also exact
    load_adapter(loaded, path)
    assert torch.equal(loaded(*inputs()), model(*inputs()))


def test_unilora_load_with_rank_pattern_keeps_one_vector(tmp_path):
    if "rank_pattern" not in AdapterConfig.__dataclass_fields__:
        pytest.skip("AdapterConfig.rank_pattern is not available")
    base, model = adapted("unilora", rank_pattern={"conv": 3})
    assert adapters_of(model.conv).rank == 3 and adapters_of(model.fc).rank == 2
    perturb(model)
    path = save_adapter(model, tmp_path / "u.safetensors")
    loaded = copy.deepcopy(base)
    load_adapter(loaded, path)
    reparams = [r for _, _, r in iter_adapters(loaded)]
    assert all(shared_of(r) is shared_of(reparams[0]) for r in reparams)
    assert torch.equal(loaded(*inputs()), model(*inputs()))


def test_remove_restores_base():
    base, model = adapted("randlora")
    perturb(model)
    remove(model)
    torch.testing.assert_close(model(*inputs()), base(*inputs()), rtol=0, atol=0)


# ---------------------------------------------------------------- FlyLoRA

def flylora_reference(layer: nn.Module, x: np.ndarray, w0: np.ndarray, bias: np.ndarray, reparam) -> np.ndarray:
    a, b, d = np_(reparam.lora_A), np_(reparam.lora_B), np_(reparam.route_bias)
    out = np.zeros((x.shape[0], w0.shape[0]))
    for t in range(x.shape[0]):
        y = a @ x[t]
        keep = np.argsort(-np.abs(y + d), kind="stable")[: reparam.top_k]
        mask = np.zeros_like(y)
        mask[keep] = 1
        out[t] = w0 @ x[t] + bias + reparam.scaling * (b @ (y * mask))
    return out


def test_flylora_linear_matches_reference_and_sparse_a():
    torch.manual_seed(0)
    layer = nn.Linear(10, 7)
    base = copy.deepcopy(layer)
    inject(nn.Sequential(layer), AdapterConfig("flylora", rank=8, options={"top_k": 3}))
    reparam = adapters_of(layer)
    assert reparam.scaling == 2.0  # alpha = 2r
    a = reparam.lora_A
    assert ((a != 0).sum(dim=1) == max(1, int(10 * 3 / 8))).all()  # p = rho n nonzeros per row, rho = k / r
    x = torch.randn(6, 10)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: starts at the base
    with torch.no_grad():
        reparam.lora_B.normal_()
        reparam.route_bias.normal_(std=0.1)
    expected = flylora_reference(layer, x.numpy(), np_(base.weight), np_(base.bias), reparam)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    layer(x).sum().backward()
    assert reparam.lora_B.grad is not None and base_weight(layer).grad is None


def test_flylora_routing_bias_updates_in_training_only():
    torch.manual_seed(0)
    layer = nn.Linear(10, 7)
    inject(nn.Sequential(layer), AdapterConfig("flylora", rank=8, options={"top_k": 2, "bias_lr": 0.5}))
    reparam = adapters_of(layer)
    x = torch.randn(32, 10)
    layer.eval()
    layer(x)
    assert torch.equal(reparam.route_bias, torch.zeros(8))
    layer.train()
    y = reparam.lora_A @ x.T
    chosen = (y.T + reparam.route_bias).abs().topk(2, dim=-1).indices
    counts = torch.bincount(chosen.flatten(), minlength=8).double()
    layer(x)
    torch.testing.assert_close(reparam.route_bias, 0.5 * torch.sign(counts.mean() - counts))


def test_flylora_conv_matches_per_voxel_reference(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    base = copy.deepcopy(conv)
    holder = nn.Sequential(conv)
    inject(holder, AdapterConfig("flylora", rank=6, options={"top_k": 2}))
    reparam = adapters_of(conv)
    with torch.no_grad():
        reparam.lora_B.normal_()
    conv.eval()
    img = torch.randn(2, 3, 5, 6)
    out = conv(img).detach().numpy()
    # per output position: the patch (im2col) is the token
    patches = torch.nn.functional.unfold(img, 3, padding=1, stride=2)  # (N, 27, L)
    tokens = patches.transpose(1, 2).reshape(-1, 27).numpy()
    w0 = np_(base.weight).reshape(4, 27)
    ref = flylora_reference(conv, tokens, w0, np_(base.bias), reparam)
    np.testing.assert_allclose(out.reshape(2, 4, -1).transpose(0, 2, 1).reshape(-1, 4), ref, rtol=1e-10, atol=1e-12)
    path = save_adapter(holder, tmp_path / "f.safetensors")
    _, tensors = read_adapter_file(path)
    assert set(tensors) == {"0.lora_A", "0.lora_B", "0.route_bias"}


def test_flylora_round_trip_and_remove(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    base = copy.deepcopy(model)
    inject(model, AdapterConfig("flylora", rank=4, options={"top_k": 2}))
    x = torch.randn(4, 6)
    model.train()
    with torch.no_grad():
        for _, _, r in iter_adapters(model):
            r.lora_B.normal_()
        model(x)  # moves the routing biases
    model.eval()
    path = save_adapter(model, tmp_path / "f.safetensors")
    loaded = copy.deepcopy(base)
    load_adapter(loaded, path)
    loaded.eval()
    assert torch.equal(loaded(x), model(x))
    remove(model)
    assert torch.equal(model(x), base(x))  # the forward hooks are gone too


def test_flylora_refuses_grouped_and_transposed_conv_without_half_adapting():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        inject(model, AdapterConfig("flylora", rank=4, options={"top_k": 2}))
    assert not list(iter_adapters(model)) and not model[0]._forward_hooks
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        inject(nn.Sequential(nn.ConvTranspose2d(4, 4, 2)), AdapterConfig("flylora", rank=4))


def test_flylora_default_top_k_keeps_the_official_ratio():
    model = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 4))
    inject(model, AdapterConfig("flylora", rank=32, targets=["0"]))
    assert adapters_of(model[0]).top_k == 8 and adapters_of(model[0]).scaling == 2.0
    inject(model, AdapterConfig("flylora", rank=2, targets=["1"]))
    assert adapters_of(model[1]).top_k == 1


def test_two_shared_groups_round_trip(tmp_path):
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig("unilora", targets=["fc"], rank=2, options={"theta_d_length": 8}))
    inject(model, AdapterConfig("unilora", targets=["conv", "up"], rank=1, options={"theta_d_length": 12, "seed": 1}))
    perturb(model)
    assert parameter_report(model).adapter_params == 8 + 12  # (a second inject freezes the first group)
    path = save_adapter(model, tmp_path / "two.safetensors")
    meta, tensors = read_adapter_file(path)
    assert [g["layers"] for g in meta["shared"]] == [["fc"], ["conv", "up"]]
    loaded = copy.deepcopy(base)
    load_adapter(loaded, path)
    assert shared_of(adapters_of(loaded.conv)) is shared_of(adapters_of(loaded.up))
    assert shared_of(adapters_of(loaded.conv)) is not shared_of(adapters_of(loaded.fc))
    assert torch.equal(loaded(*inputs()), model(*inputs()))
