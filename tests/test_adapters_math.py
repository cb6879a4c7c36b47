"""Every method's effective weight against an independent dense reference, per layer type."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from medlora.adapters import AdapterConfig, adapters_of, base_weight, inject, list_methods, merge


@pytest.fixture(autouse=True)
def _float64():
    """References are exact up to float64 round-off in this module; other modules keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


LAYERS = {
    "linear": lambda: nn.Linear(6, 5),
    "linear_nobias": lambda: nn.Linear(7, 4, bias=False),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
    "conv2d_dilated": lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2, bias=False),
    "conv2d_groups_reflect": lambda: nn.Conv2d(4, 6, (3, 2), groups=2, padding=1, padding_mode="reflect"),
    "conv3d_aniso": lambda: nn.Conv3d(3, 5, (3, 3, 1), padding=(1, 1, 0)),
    "conv3d_1x1": lambda: nn.Conv3d(4, 3, 1),
    "convT1d": lambda: nn.ConvTranspose1d(4, 6, 3, stride=2),
    "convT2d_groups": lambda: nn.ConvTranspose2d(4, 6, (2, 3), groups=2),
    "convT3d": lambda: nn.ConvTranspose3d(3, 4, (2, 2, 1), stride=(2, 2, 1)),
}
INPUT_SHAPES = {
    "linear": (2, 6), "linear_nobias": (2, 7), "conv1d": (2, 4, 9), "conv2d_dilated": (2, 4, 7, 6),
    "conv2d_groups_reflect": (2, 4, 6, 5), "conv3d_aniso": (2, 3, 5, 4, 3), "conv3d_1x1": (2, 4, 3, 3, 2),
    "convT1d": (2, 4, 5), "convT2d_groups": (2, 4, 4, 3), "convT3d": (2, 3, 3, 3, 2),
}
METHODS = ["lora", "lora_c", "conv_lora", "cp_lora", "dora", "dora_c", "conv_dora", "cp_dora", "salt", "svd"]


def canonical_np(weight: np.ndarray, layer: nn.Module) -> np.ndarray:
    """(O, I/groups, *k) with explicit loops, independently of medlora's WeightLayout."""
    if not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return weight.copy()
    g = layer.groups
    in_total, out_pg = weight.shape[:2]
    in_pg = in_total // g
    out = np.zeros((out_pg * g, in_pg, *weight.shape[2:]))
    for grp, j, i in itertools.product(range(g), range(out_pg), range(in_pg)):
        out[grp * out_pg + j, i] = weight[grp * in_pg + i, j]
    return out


def from_canonical_np(canon: np.ndarray, layer: nn.Module) -> np.ndarray:
    if not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return canon
    g = layer.groups
    out_total, in_pg = canon.shape[:2]
    out_pg = out_total // g
    out = np.zeros((in_pg * g, out_pg, *canon.shape[2:]))
    for grp, j, i in itertools.product(range(g), range(out_pg), range(in_pg)):
        out[grp * in_pg + i, j] = canon[grp * out_pg + j, i]
    return out


def np_params(reparam: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in reparam.named_parameters()}


def lora_delta(w0, p, s, prefix=""):
    a, b = p[prefix + "lora_A"], p[prefix + "lora_B"]
    return s * np.einsum("or,rf->of", b, a).reshape(w0.shape)


def lora_c_delta(w0, p, s, prefix=""):
    a, b = p[prefix + "lora_A"], p[prefix + "lora_B"]
    o, i, *k = w0.shape
    if not k:
        return s * b @ a
    b3 = b.reshape(o, k[0], -1)             # rows are (o, k1)
    a3 = a.reshape(a.shape[0], i, *k[1:])   # columns are (i, k2..kd)
    return s * np.einsum("okr,ri...->oik...", b3, a3)


def conv_lora_delta(w0, p, s, prefix=""):
    # loralib's definition is a row-major reshape of the product; numpy's reshape is the reference.
    a, b = p[prefix + "lora_A"], p[prefix + "lora_B"]
    return s * np.reshape(b @ a, w0.shape, order="C")


def cp_delta(w0, p, s, prefix=""):
    factors = [p[f"{prefix}cp_factors.{j}"] for j in range(w0.ndim)]
    letters = "abcdef"[: w0.ndim]
    spec = ",".join(f"{c}r" for c in letters) + "->" + letters
    return s * np.einsum(spec, *factors)


def dora_ref(w0, p, s, inner):
    v = w0 + inner(w0, p, s, prefix="inner.")
    out = np.empty_like(v)
    for o in range(v.shape[0]):
        out[o] = p["magnitude"][o] * v[o] / np.sqrt((v[o] ** 2).sum())
    return out


def svd_np(w0):
    u, sv, vt = np.linalg.svd(w0.reshape(w0.shape[0], -1), full_matrices=False)
    # sign convention: largest-|.| entry of every left singular vector positive (scikit-learn's svd_flip)
    for j in range(u.shape[1]):
        if u[np.argmax(np.abs(u[:, j])), j] < 0:
            u[:, j] *= -1
            vt[j] *= -1
    return u, sv, vt


def salt_ref(w0, p, reparam):
    u, sv, vt = svd_np(w0)
    r_s = reparam.svd_rank
    sprime = np.diag(sv).copy()
    sprime[:r_s, :r_s] = np.diag(p["salt_scale"] * sv[:r_s] + p["salt_shift"])
    sprime[r_s:, r_s:] += p["salt_X"] @ p["salt_Y"]
    return (u @ np.maximum(sprime, 0) @ vt).reshape(w0.shape)


def svd_ref(w0, p):
    u, sv, vt = svd_np(w0)
    return (u @ np.diag(np.maximum(p["svd_scale"] * sv + p["svd_shift"], 0)) @ vt).reshape(w0.shape)


def reference_weight(method, w0, p, s, reparam):
    additive = {"lora": lora_delta, "lora_c": lora_c_delta, "conv_lora": conv_lora_delta, "cp_lora": cp_delta}
    doras = {"dora": lora_delta, "dora_c": lora_c_delta, "conv_dora": conv_lora_delta, "cp_dora": cp_delta}
    if method in additive:
        return w0 + additive[method](w0, p, s)
    if method in doras:
        return dora_ref(w0, p, s, doras[method])
    if method == "salt":
        return salt_ref(w0, p, reparam)
    return svd_ref(w0, p)


def randomise_(reparam: nn.Module, shift_std: float = 0.5) -> None:
    with torch.no_grad():
        for name, p in reparam.named_parameters():
            if name.endswith(("scale", "magnitude")):
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("shift"):
                p.copy_(shift_std * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))


def test_all_methods_are_registered():
    # the methods checked here against dense references; the other families have their own test files
    assert set(METHODS) <= set(list_methods())


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_effective_weight_matches_dense_reference(method, layer_name):
    layer = LAYERS[layer_name]()
    w0 = layer.weight.detach().numpy().copy()
    rank = 2
    cfg = AdapterConfig(method, rank=rank, alpha=3.0, options={"svd_rank": 2} if method == "salt" else {})
    wrapper = nn.Sequential(layer)
    inject(wrapper, cfg)
    reparam = adapters_of(layer)
    randomise_(reparam)
    p = np_params(reparam)
    canon_w0 = canonical_np(w0, layer)
    expected = from_canonical_np(reference_weight(method, canon_w0, p, 3.0 / rank, reparam), layer)
    actual = layer.weight.detach().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_init_output_equals_base_and_merge_is_exact(method, layer_name):
    layer = LAYERS[layer_name]()
    model = nn.Sequential(layer)
    x = torch.randn(INPUT_SHAPES[layer_name])
    base_out = model(x)
    inject(model, AdapterConfig(method, rank=2))
    torch.testing.assert_close(model(x), base_out, rtol=1e-12, atol=1e-12)

    randomise_(adapters_of(layer))
    adapted_out = model(x)
    assert not torch.allclose(adapted_out, base_out)
    cls = type(LAYERS[layer_name]())
    merge(model)
    assert type(model[0]) is cls and not hasattr(model[0], "parametrizations")
    merged_out = model(x)
    assert (merged_out - adapted_out).abs().max() <= 1e-5 * adapted_out.abs().max()


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_get_gradients(method):
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 1))
    inject(model, AdapterConfig(method, rank=2))
    base = {id(p) for m in model for p in [getattr(m, "bias", None)] if p is not None}
    base |= {id(base_weight(m)) for m in (model[0], model[2])}
    for m in (model[0], model[2]):
        randomise_(adapters_of(m), shift_std=0.01)  # no gradient zero by construction (B = 0, relu < 0)
    model(torch.randn(1, 2, 4, 4, 4)).square().mean().backward()
    for name, p in model.named_parameters():
        if id(p) in base:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_counts_follow_the_design_table():
    # One 32->32 3x3 conv (9,216 weights), rank r (sah_salt.md reference table;
    # parameter-count formulas of docs/adapter_methods.md).
    o = i = 32
    k = (3, 3)
    expected = {
        "lora": lambda r: r * (o + i * 9),
        "lora_c": lambda r: r * (o * 3 + i * 3),
        "conv_lora": lambda r: r * 3 * (i * 3 + o * 3),
        "cp_lora": lambda r: r * (o + i + 3 + 3),
        "dora": lambda r: r * (o + i * 9) + o,
        "cp_dora": lambda r: r * (o + i + 6) + o,
        "svd": lambda r: 2 * 32,
        "salt": lambda r: 2 * 3 + 2 * r * (32 - 3),  # r_s = int(0.1 * 32) = 3
    }
    from medlora.adapters import parameter_report

    for method, formula in expected.items():
        for r in (1, 4, 16):
            model = nn.Sequential(nn.Conv2d(i, o, k))
            inject(model, AdapterConfig(method, rank=r))
            report = parameter_report(model)
            assert report.layers[0].trainable_params == formula(r), (method, r)
            assert report.total_trainable_params == formula(r)
            assert report.total_base_params == 9216 + 32
    # rank-16 convLoRA on a 32-channel 3x3 conv is as large as the layer itself: the report shows it.
    model = nn.Sequential(nn.Conv2d(32, 32, 3, bias=False))
    with pytest.warns(UserWarning, match="adapter parameters >= the layer"):
        inject(model, AdapterConfig("conv_lora", rank=16))
    report = parameter_report(model)
    assert report.layers[0].percent == pytest.approx(100.0)
    assert "100.0" in report.table()


def test_salt_svd_is_taken_from_weights_loaded_after_injection():
    base = nn.Sequential(nn.Linear(8, 6))
    pretrained = copy.deepcopy(base)
    with torch.no_grad():
        pretrained[0].weight.mul_(3).add_(1)
    inject(base, AdapterConfig("salt", rank=2, options={"svd_rank": 3}))
    adapted_state = base.state_dict()
    adapted_state["0.parametrizations.weight.original"] = pretrained[0].weight.detach().clone()
    base.load_state_dict(adapted_state)
    torch.testing.assert_close(base[0].weight, pretrained[0].weight, rtol=0, atol=0)
    reparam = adapters_of(base[0])
    with torch.no_grad():
        reparam.salt_scale.fill_(2.0)
    u, s, vt = np.linalg.svd(pretrained[0].weight.detach().numpy(), full_matrices=False)
    s2 = s.copy()
    s2[:3] *= 2
    np.testing.assert_allclose(base[0].weight.detach().numpy(), u @ np.diag(s2) @ vt, rtol=1e-9, atol=1e-12)
