"""Structured and nested-rank methods (bone, paca, bd_lora, dylora, matryoshka) against float64 references."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from medlora.adapters import AdapterConfig, adapters_of, base_weight, inject, load_adapter, merge, save_adapter

LAYERS = {
    "linear": (lambda: nn.Linear(8, 6), (3, 8)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
    "conv3d_aniso": (lambda: nn.Conv3d(4, 4, (3, 3, 1), padding=(1, 1, 0), bias=False), (2, 4, 4, 4, 2)),
    "convT2d_groups": (lambda: nn.ConvTranspose2d(4, 6, 2, groups=2, stride=2), (2, 4, 3, 3)),
}


# tiny test layers: adapters as large as the layer are intended here
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*adapter parameters >= the layer:UserWarning"),
    pytest.mark.usefixtures("float64_default"),
]


def canonical_np(weight: np.ndarray, layer: nn.Module) -> np.ndarray:
    """(O, I/groups, *k), with loops, independent of medlora's layout code."""
    if not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return weight.copy()
    g, (in_total, out_pg) = layer.groups, weight.shape[:2]
    out = np.zeros((out_pg * g, in_total // g, *weight.shape[2:]))
    for grp, j, i in itertools.product(range(g), range(out_pg), range(in_total // g)):
        out[grp * out_pg + j, i] = weight[grp * (in_total // g) + i, j]
    return out


def from_canonical_np(canon: np.ndarray, layer: nn.Module) -> np.ndarray:
    if not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return canon
    g, (out_total, in_pg) = layer.groups, canon.shape[:2]
    out = np.zeros((in_pg * g, out_total // g, *canon.shape[2:]))
    for grp, j, i in itertools.product(range(g), range(out_total // g), range(in_pg)):
        out[grp * in_pg + i, j] = canon[grp * (out_total // g) + j, i]
    return out


# --- references: dW (or W_eff) on the O x F matricisation, written with loops -----------------------------

def ref_bone(w, p, s, rank, opts):
    o_n, f_n = w.shape
    d = p["bone_block"]
    out = w.copy()
    variant = opts.get("variant", "bone")
    for o, c in itertools.product(range(o_n), range(f_n)):
        if variant == "bone":
            out[o, c] += d[c % rank, o]
        elif variant == "mini":
            out[o, c] += d[c % rank, o % opts["mini_r"]]
    if variant == "bat":
        for i, j in itertools.product(range(o_n // rank), range(f_n // rank)):
            blk = w[i * rank:(i + 1) * rank, j * rank:(j + 1) * rank]
            out[i * rank:(i + 1) * rank, j * rank:(j + 1) * rank] += blk @ d[i] + d[i]
    return out


def ref_bd_lora(w, p, s, rank, opts):
    n, mode = opts.get("nblocks", 2), opts.get("block_diagonal", "both")
    o_n, f_n = w.shape
    a_full, b_full = np.zeros((rank, f_n)), np.zeros((o_n, rank))
    a, b = p["bd_A"], p["bd_B"]
    rb = rank // n
    for k in range(n):
        if mode in ("both", "A"):
            a_full[k * rb:(k + 1) * rb, k * (f_n // n):(k + 1) * (f_n // n)] = a[k * rb:(k + 1) * rb]
        if mode in ("both", "B"):
            b_full[k * (o_n // n):(k + 1) * (o_n // n), k * rb:(k + 1) * rb] = b[k * (o_n // n):(k + 1) * (o_n // n)]
    if mode == "B":
        a_full = a
    if mode == "A":
        b_full = b
    return w + s * b_full @ a_full


def ref_paca(w, p, s, rank, opts, kernel=1):
    out = w.copy()
    idx, cols = p["paca_index"], p["paca_w"].reshape(w.shape[0], -1)
    width = kernel if opts.get("unit", "channel") == "channel" else 1
    for j, i in enumerate(idx):
        out[:, i * width:(i + 1) * width] = s * cols[:, j * width:(j + 1) * width]
    return out


def ref_dylora(w, p, s, rank, opts, active=None):
    b = active or rank
    return w + (s * rank / b) * p["lora_B"][:, :b] @ p["lora_A"][:b]


def _scale_fn(kind):
    return {"none": lambda r: 1.0, "rank": lambda r: 1.0 / r, "sqrt": lambda r: 1.0 / math.sqrt(r)}[kind]


def ref_matryoshka(w, p, s, rank, opts, active=None):
    g = _scale_fn(opts.get("scale", "sqrt"))
    a, b = p["lora_A"], p["lora_B"]
    if active is not None:
        return w + s * g(active) * b[:, :active] @ a[:active]
    ranks = opts.get("train_ranks") or sorted({2**i for i in range(8) if 2**i <= rank} | {rank})
    delta = np.zeros_like(w)
    for r in ranks:  # the "binary" form: a sum over the nested ranks; "diag" is |S| times it
        delta += g(r) * b[:, :r] @ a[:r]
    if opts.get("mask_type", "diag") == "binary":
        delta /= len(ranks)
    return w + s * delta


REFS = {"bone": ref_bone, "bd_lora": ref_bd_lora, "paca": ref_paca, "dylora": ref_dylora,
        "matryoshka": ref_matryoshka}
CASES = [
    ("bone", {}), ("bone", {"variant": "mini", "mini_r": 2}), ("bone", {"variant": "bat"}),
    ("bd_lora", {}), ("bd_lora", {"block_diagonal": "A"}), ("bd_lora", {"block_diagonal": "B"}),
    ("paca", {}), ("paca", {"unit": "column"}),
]
NESTED_CASES = [("dylora", {}), ("dylora", {"frozen": False}), ("matryoshka", {}),
                ("matryoshka", {"mask_type": "binary", "scale": "rank", "train_ranks": [1, 2, 4]})]
ALL_CASES = CASES + NESTED_CASES


def _case_id(case):
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


def build(layer_name, method, opts, rank=2, alpha=None):
    factory, x_shape = LAYERS[layer_name]
    layer = factory()
    model = nn.Sequential(layer)
    plain = copy.deepcopy(layer)  # (a parametrized layer must not be deep-copied: the copy shares its class)
    inject(model, AdapterConfig(method, rank=rank, alpha=alpha, options=opts))
    return model, layer, plain, torch.randn(*x_shape)


def randomise(reparam):
    with torch.no_grad():
        for p in reparam.parameters():
            if p.is_floating_point():
                p.normal_(0, 0.5)


def reference_weight(layer, method, opts, rank, active=None):
    reparam = adapters_of(layer)
    w0 = canonical_np(base_weight(layer).detach().numpy(), layer)
    params = {k: v.detach().numpy().copy() for k, v in reparam.named_parameters()}
    kwargs = {"active": active} if method in ("dylora", "matryoshka") else {}
    if method == "paca":
        kwargs["kernel"] = int(np.prod(w0.shape[2:]))
    ref = REFS[method](w0.reshape(w0.shape[0], -1), params, reparam.scaling, rank, opts, **kwargs)
    return from_canonical_np(ref.reshape(w0.shape), layer)


def official_diag_mask(rank: int, train_ranks: list[int], scaling: str) -> list[float]:
    """IST-DASLab/MatryoshkaLoRA ``MatryoshkaLayer._create_masks`` for mask_type "diag" (Algorithm 1), transcribed."""
    get_scale = _scale_fn(scaling)
    mapping, d, p = {}, [0] * rank, [0] * rank
    c, n = 0, len(train_ranks)
    for r in range(rank, 0, -1):
        i = r - 1
        if r in train_ranks:
            c += 1
        d[i] = c
        if c not in mapping:
            mapping[c] = sum(get_scale(train_ranks[j]) for j in range(n - c, n))
    for i in range(rank):
        p[i] = mapping[d[i]]
    return p


@pytest.mark.parametrize("rank", [32, 8, 12])
def test_matryoshka_defaults_are_the_authors_script(rank):
    """scripts/bash_run.sh: TRAIN_EVAL_RANKS=1,2,4,...,256 with ranks above R removed (config.py), --lora_scaling
    sqrt, mask diag. At R = 12 (not a power of two) medlora adds R to S so that components 9..12 train."""
    train_ranks = sorted(r for r in map(int, "1,2,4,8,16,32,64,128,256".split(",")) if r <= rank)
    if rank == 12:
        train_ranks.append(12)
    layer = nn.Linear(20, 10)
    inject(nn.Sequential(layer), AdapterConfig("matryoshka", rank=rank))
    reparam = adapters_of(layer)
    randomise(reparam)
    a, b = reparam.lora_A.detach().numpy(), reparam.lora_B.detach().numpy()
    # the official forward x @ (A * P) @ B with its A = our A^T, B = our B^T: dW = B diag(P) A
    expected = b @ np.diag(official_diag_mask(rank, train_ranks, "sqrt")) @ a
    dw = (layer.weight - base_weight(layer)).detach().numpy()
    np.testing.assert_allclose(dw, expected, rtol=1e-12, atol=1e-12)
    assert reparam.scaling == 1.0


def test_bd_lora_block_diagonal_a_is_initialised_as_peft():
    """PEFT's BD-LoRA (BlockDiagonalLinear) draws its A blocks kaiming-uniform with a = 0: bound sqrt(6 n / F)."""
    peft = pytest.importorskip("peft")
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(512, 64))
    config = peft.LoraConfig(r=16, target_modules=["proj"],
                             use_bdlora=peft.BdLoraConfig(target_modules_bd_a=["proj"], nblocks=2))
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    their_a = theirs.base_model.model.proj.lora_A["default"].weight.detach()
    inject(base, AdapterConfig("bd_lora", rank=16, options={"nblocks": 2, "block_diagonal": "A"}))
    our_a = adapters_of(base.proj).bd_A.detach()
    assert our_a.shape == their_a.shape == (16, 256)
    bound = math.sqrt(6.0 / 256)
    for a in (our_a, their_a):
        assert 0.99 * bound < a.abs().max() <= bound
        assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.04)


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_effective_weight_matches_reference(layer_name, case):
    method, opts = case
    rank = 4 if method == "matryoshka" else 2
    model, layer, plain, x = build(layer_name, method, opts, rank=rank)
    # start point: W0 (paca: W0 up to the round-off of s * (W0 / s); s = 2 here, so exactly)
    assert torch.equal(layer.weight, plain.weight)
    randomise(adapters_of(layer))
    model.eval()
    expected = reference_weight(layer, method, opts, rank)
    np.testing.assert_allclose(layer.weight.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
@pytest.mark.parametrize("layer_name", ["linear", "conv2d"])
def test_gradients_training_merge_and_round_trip(layer_name, case, tmp_path):
    method, opts = case
    rank = 4 if method == "matryoshka" else 2
    model, layer, plain, x = build(layer_name, method, opts, rank=rank)
    # a reachable target: the same adapter with perturbed parameters
    reparam = adapters_of(layer)
    start = {k: v.detach().clone() for k, v in reparam.named_parameters()}
    with torch.no_grad():
        for p in reparam.parameters():
            if p.is_floating_point():
                p.add_(0.3 * torch.randn_like(p))
        y_target = model.eval()(x)
        for k, v in reparam.named_parameters():
            v.copy_(start[k])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=0.05)
    model.train()
    losses = []
    for _ in range(15):
        optimiser.zero_grad()
        loss = (model(x) - y_target).square().mean()
        loss.backward()
        losses.append(loss.item())
        if not losses[1:]:  # gradients reach only what the paper trains
            reparam = adapters_of(layer)
            for name, p in model.named_parameters():
                owned = any(p is q for q in reparam.parameters())
                assert p.requires_grad == (owned and p.is_floating_point()), name
                assert (p.grad is not None) == p.requires_grad, name
        optimiser.step()
    assert losses[-1] < 0.9 * losses[0]
    model.eval()
    path = save_adapter(model, tmp_path / "a.safetensors")
    fresh = nn.Sequential(copy.deepcopy(plain))
    load_adapter(fresh, path)
    fresh.eval()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(model(x), fresh(x))
    y = model(x)
    merge(model)
    assert adapters_of(model[0]) is None
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-12)


# --- PaCA's activation-saving path ------------------------------------------------------------------------

PACA_LAYERS = {
    "linear": (lambda: nn.Linear(8, 6), (2, 3, 8)),
    "conv1d_stride": (lambda: nn.Conv1d(6, 4, 3, stride=2, padding=1), (2, 6, 9)),
    "conv2d_reflect": (lambda: nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"), (2, 6, 5, 5)),
    "conv3d_dilated": (lambda: nn.Conv3d(6, 4, 3, dilation=2, padding=2), (2, 6, 5, 5, 5)),
}


@pytest.mark.parametrize("layer_name", list(PACA_LAYERS))
def test_paca_saving_path_gives_identical_gradients(layer_name):
    from medlora.adapters.methods.paca import paca_save_activations

    factory, x_shape = PACA_LAYERS[layer_name]
    model = nn.Sequential(factory())
    model[0].bias.requires_grad_(True)
    inject(model, AdapterConfig("paca", rank=2))
    model[0].bias.requires_grad_(True)
    randomise(adapters_of(model[0]))
    x = torch.randn(*x_shape, requires_grad=True)
    grad_y = torch.randn_like(model(x))

    def grads():
        x.grad = None
        for p in model.parameters():
            p.grad = None
        y = model(x)
        y.backward(grad_y)
        return y.detach(), x.grad.clone(), adapters_of(model[0]).paca_w.grad.clone(), model[0].bias.grad.clone()

    plain = grads()
    assert paca_save_activations(model) == 1
    saving = grads()
    for a, b in zip(plain, saving, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert paca_save_activations(model, enable=False) == 0
    assert "forward" not in vars(model[0])


def saved_bytes(fn) -> int:
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_paca_saving_path_keeps_only_chosen_channels():
    """A 32 -> 32 channel 3x3x3 conv at rank 4: backward keeps x[:, idx] (4 of 32 channels) plus W."""
    from medlora.adapters.methods.paca import paca_save_activations

    torch.set_default_dtype(torch.float32)
    model = nn.Sequential(nn.Conv3d(32, 32, 3, padding=1))
    inject(model, AdapterConfig("paca", rank=4))
    x = torch.randn(1, 32, 12, 12, 12, requires_grad=True)  # an input that requires grad (mid-network)
    plain = saved_bytes(lambda: model(x))
    paca_save_activations(model)
    saving = saved_bytes(lambda: model(x))
    x_bytes, w_bytes = x.numel() * 4, 32 * 32 * 27 * 4
    assert plain >= x_bytes  # the weight-space path keeps the whole input
    assert saving == x_bytes * 4 // 32 + w_bytes
    # merged or removed: the layer is an ordinary conv again
    merge(model)
    assert model(x).shape == x.shape


def test_dylora_one_rank_per_step_and_frozen_lower_components():
    """draw_dylora_rank: one b for every layer; W = W0 + alpha / b B[:, :b] A[:b]; only component b trains."""
    from medlora.adapters import draw_dylora_rank

    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    inject(model, AdapterConfig("dylora", rank=4, alpha=8))
    for layer in model:
        randomise(adapters_of(layer))
    model.train()
    generator = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(12):
        drawn = draw_dylora_rank(model, generator)
        assert len(set(drawn.values())) == 1
        b = drawn["0"]
        seen.add(b)
        for layer in model:
            reparam = adapters_of(layer)
            w = layer.weight  # one training-mode evaluation of the parametrization
            w0, bb, aa = (t.detach().numpy() for t in (base_weight(layer), reparam.lora_B, reparam.lora_A))
            np.testing.assert_allclose(w.detach().numpy(), w0 + 8 / b * bb[:, :b] @ aa[:b], rtol=1e-12, atol=1e-12)
            w.sum().backward()
            grad_rows = reparam.lora_A.grad.abs().sum(1).numpy()
            assert (grad_rows > 0).tolist() == [i == b - 1 for i in range(4)]
            assert (reparam.lora_B.grad.abs().sum(0).numpy() > 0).tolist() == [i == b - 1 for i in range(4)]
            reparam.lora_A.grad = reparam.lora_B.grad = None
    assert seen == {1, 2, 3, 4}
