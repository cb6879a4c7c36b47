"""Training rules (medlora.adapters.optim) against independent float64 numpy computations of the papers' updates."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from medlora.adapters import AdapterConfig, inject
from medlora.adapters.optim import build_optimizer, describe_rule, list_rules, lora_pairs

pytestmark = [pytest.mark.filterwarnings("ignore:.*adapter parameters >="), pytest.mark.usefixtures("one_thread")]


RULES = ["adamw", "ffa", "stable_lora", "allora", "lora_pro", "altlora", "altlora_plus"]
S = 2.0  # alpha / r with alpha = 4, r = 2
LR = 0.05


def _toy(alpha: float = 4.0):
    """Linear 3 -> 4 (no bias), LoRA rank 2 (A 2x3, B 4x2), B made non-zero so every term of every rule matters."""
    torch.manual_seed(1)
    layer = nn.Linear(3, 4, bias=False).double()
    model = nn.Sequential(layer)
    inject(model, AdapterConfig("lora", rank=2, alpha=alpha))
    (pair,) = lora_pairs(model)
    with torch.no_grad():
        pair.B.copy_(torch.randn(4, 2, dtype=torch.float64) * 0.5)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64)
    w0 = layer.parametrizations["weight"].original.detach().numpy().copy()
    return model, pair, x, y, w0


def _np_grads(w0, a, b, s, x, y):
    """Loss sum((x W^T - y)^2) with W = W0 + s B A: gradients of A and B computed by hand."""
    w = w0 + s * b @ a
    g_w = 2.0 * (x @ w.T - y).T @ x  # dL/dW, 4 x 3
    return s * b.T @ g_w, s * g_w @ a.T


def _run(rule: str, steps: int, alpha: float = 4.0, **options):
    model, pair, x, y, w0 = _toy(alpha)
    a0, b0 = pair.A.detach().numpy().copy(), pair.B.detach().numpy().copy()
    opt = build_optimizer(model, rule, lr=LR, **options)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).sum().backward()
        opt.step()
    return (a0, b0, w0, x.numpy(), y.numpy()), (pair.A.detach().numpy(), pair.B.detach().numpy())


def _adam(state, g, betas=(0.9, 0.999), eps=1e-8):
    state["t"] = state.get("t", 0) + 1
    state["m"] = betas[0] * state.get("m", 0.0) + (1 - betas[0]) * g
    state["v"] = betas[1] * state.get("v", 0.0) + (1 - betas[1]) * g * g
    t = state["t"]
    return (state["m"] / (1 - betas[0] ** t)) / (np.sqrt(state["v"] / (1 - betas[1] ** t)) + eps)


def test_adamw_matches_hand_computation():
    (a, b, w0, x, y), (a1, b1) = _run("adamw", 2)
    sa, sb = {}, {}
    for _ in range(2):
        ga, gb = _np_grads(w0, a, b, S, x, y)
        a = a * (1 - LR * 0.01) - LR * _adam(sa, ga)
        b = b * (1 - LR * 0.01) - LR * _adam(sb, gb)
    np.testing.assert_allclose(a1, a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b1, b, rtol=1e-10, atol=1e-12)


def test_ffa_freezes_a_and_trains_b():
    (a, b, w0, x, y), (a1, b1) = _run("ffa", 2)
    np.testing.assert_array_equal(a1, a)
    sb = {}
    for _ in range(2):
        _, gb = _np_grads(w0, a, b, S, x, y)
        b = b * (1 - LR * 0.01) - LR * _adam(sb, gb)
    np.testing.assert_allclose(b1, b, rtol=1e-10, atol=1e-12)


def test_stable_lora_shrinks_a_then_stops():
    ratio = 0.1
    (a, b, w0, x, y), (a1, b1) = _run("stable_lora", 3, shrink_ratio=ratio)
    sa, sb, keep = {}, {}, True
    for _ in range(3):
        ga, gb = _np_grads(w0, a, b, S, x, y)  # gradients at the point before the shrink
        if keep and np.linalg.norm(a) >= (a.size / b.size) * np.linalg.norm(b):
            a = a * (1 - ratio)
        else:
            keep = False
        a = a * (1 - LR * 0.01) - LR * _adam(sa, ga)
        b = b * (1 - LR * 0.01) - LR * _adam(sb, gb)
    np.testing.assert_allclose(a1, a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b1, b, rtol=1e-10, atol=1e-12)


def test_stable_lora_stops_for_good():
    model, pair, x, y, _ = _toy()
    with torch.no_grad():
        pair.B.mul_(100.0)  # ||A|| < (|A|/|B|) ||B|| from the start
    opt = build_optimizer(model, "stable_lora", lr=0.0, shrink_ratio=0.5, weight_decay=0.0)
    a0 = pair.A.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        ((model(x) - y) ** 2).sum().backward()
        opt.step()
    assert opt.keep_shrinking == [False]
    torch.testing.assert_close(pair.A.detach(), a0)


def test_allora_per_row_learning_rate():
    eta = 3.0
    with pytest.warns(UserWarning, match="scaling-free"):
        _run("allora", 1, eta=eta)
    (a, b, w0, x, y), (a1, b1) = _run("allora", 2, alpha=2.0, eta=eta)  # alpha = rank: scale 1
    sa, sb = {}, {}
    for _ in range(2):
        ga, gb = _np_grads(w0, a, b, 1.0, x, y)
        ca = np.array([1 / np.sqrt(np.sum(row**2) + 1 / eta**2) for row in a])[:, None]
        cb = np.array([1 / np.sqrt(np.sum(row**2) + 1 / eta**2) for row in b])[:, None]
        a = a - LR * ca * _adam(sa, ga)
        b = b - LR * cb * _adam(sb, gb)
    np.testing.assert_allclose(a1, a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b1, b, rtol=1e-10, atol=1e-12)


def _official_sylvester(p, q, c):
    """``X`` with ``P X + X Q = C`` as the official code's ``solve_sylvester`` (general eigendecompositions)."""
    r, u = np.linalg.eig(p)
    s, v = np.linalg.eig(-q)
    y = np.linalg.solve(u, (c + 0j) @ v) / (r[:, None] - s[None, :])
    return (u @ y @ np.linalg.inv(v)).real


def _official_lora_pro(a, b, w0, x, y, steps, delta=1e-8):
    """mrflogs/LoRA-Pro ``lorapro_full_adjustment`` (DeepSpeed stage_1_and_2.py) followed by the SGD step of its
    ``optim="sgd"`` trainer, transcribed in float64 numpy; s = 16/8 as hard-coded there. Every step takes the
    ``global_step > 0`` branch, as the official code does (DeepSpeed advances the step before the call). Bias
    corrections use the step count t (medlora's documented deviation: the official code uses t + 1)."""
    s, (beta1, beta2) = 16 / 8, (0.9, 0.999)
    m = v = None
    for t in range(1, steps + 1):
        grad_a_orin, grad_b_orin = _np_grads(w0, a, b, s, x, y)
        aat_inv = np.linalg.pinv(a @ a.T + delta * np.eye(a.shape[0]))
        btb_inv = np.linalg.pinv(b.T @ b + delta * np.eye(a.shape[0]))
        grad_a = (1 / s**2) * btb_inv @ grad_a_orin
        grad_b = (1 / s**2) * ((np.eye(b.shape[0]) - b @ btb_inv @ b.T) @ grad_b_orin @ aat_inv)
        equiv_grad = s * b @ grad_a + s * grad_b @ a
        m = (1 - beta1) * equiv_grad if m is None else m + (1 - beta1) * (equiv_grad - m)  # lerp_
        v = (1 - beta2) * equiv_grad**2 if v is None else beta2 * v + (1 - beta2) * equiv_grad**2
        denom = np.sqrt(v) / np.sqrt(1 - beta2**t) + 1e-8
        g = (m / (1 - beta1**t)) / denom
        grad_a_orin_, grad_b_orin_ = s * b.T @ g, s * g @ a.T
        x_ = _official_sylvester(b.T @ b, a @ a.T, -(1 / s**2) * btb_inv @ grad_a_orin_ @ a.T)
        grad_a = (1 / s**2) * btb_inv @ grad_a_orin_ + x_ @ a
        grad_b = (1 / s**2) * ((np.eye(b.shape[0]) - b @ btb_inv @ b.T) @ grad_b_orin_ @ aat_inv) - b @ x_
        a, b = a - LR * grad_a, b - LR * grad_b
    return a, b


def test_lora_pro_matches_the_official_adjustment():
    """Adjusted gradients before the full-size Adam moments, and the Sylvester X from the first step on."""
    (a, b, w0, x, y), (a1, b1) = _run("lora_pro", 4)
    a_ref, b_ref = _official_lora_pro(a, b, w0, x, y, 4)
    np.testing.assert_allclose(a1, a_ref, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(b1, b_ref, rtol=1e-7, atol=1e-10)


def test_lora_pro_step_is_the_projected_full_adam_step():
    """The equivalent gradient is the best low-rank approximation P_B G + (I - P_B) G P_A of the full gradient G,
    and the pair's first-order step is -lr times the projection of the full Adam step onto {B X + Y A}."""
    (a, b, w0, x, y), (a1, b1) = _run("lora_pro", 1, delta=0.0)
    g_full = 2.0 * (x @ (w0 + S * b @ a).T - y).T @ x
    p_b = b @ np.linalg.inv(b.T @ b) @ b.T
    p_a = a.T @ np.linalg.inv(a @ a.T) @ a
    g = _adam({}, p_b @ g_full + (np.eye(4) - p_b) @ g_full @ p_a)
    projected = p_b @ g + (np.eye(4) - p_b) @ g @ p_a
    first_order = S * (b @ (a1 - a) + (b1 - b) @ a)
    np.testing.assert_allclose(first_order, -LR * projected, rtol=1e-6, atol=1e-9)


def test_altlora_matches_hand_computation():
    betas, reg, wd = (0.9, 0.98), 1e-3, 1e-5
    (a, b, w0, x, y), (a1, b1) = _run("altlora", 3, betas=betas)
    ma, mb = np.zeros_like(a), np.zeros_like(b)
    b_prev, a_prev = np.zeros_like(b), np.zeros_like(a)
    for t in range(1, 4):
        ga, gb = _np_grads(w0, a, b, S, x, y)
        pre_a = np.linalg.inv(b.T @ b + reg * np.eye(2))
        ma = betas[0] * (pre_a @ b.T @ b_prev) @ ma + (1 - betas[0]) * pre_a @ ga
        b_prev = b.copy()
        a = (a - LR * ma / (1 - betas[0] ** t)) * (1 - LR * wd)
        pre_b = np.linalg.inv(a @ a.T + reg * np.eye(2))  # the new A
        mb = betas[0] * mb @ (a_prev @ a.T @ pre_b) + (1 - betas[0]) * gb @ pre_b
        a_prev = a.copy()
        b = (b - LR * mb / (1 - betas[0] ** t)) * (1 - LR * wd)
    np.testing.assert_allclose(a1, a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b1, b, rtol=1e-9, atol=1e-12)


def _official_altlora_plus(p1, p2, w0, x, y, steps, lr=LR, betas=(0.999, 0.98), eps=1e-6, weight_decay=1e-5,
                           reg=1e-3):
    """LucasXinYu/AltLoRA ``optimizer_new.py::altlora_plus.step`` with its defaults, transcribed in float64 numpy:
    p1 = lora_A, p2 = lora_B; both gradients come from the backward before the step."""
    (r, d), k = p1.shape, p2.shape[0]
    beta1, beta2 = betas
    st1 = {"exp_avg": np.zeros((r, d)), "exp_avg_sq": np.zeros((r, d)), "p2old": np.zeros((k, r))}
    st2 = {"exp_avg": np.zeros((k, r)), "exp_avg_sq": np.zeros((k, r)), "p1old": np.zeros((r, d))}
    for step in range(1, steps + 1):
        g1, g2 = _np_grads(w0, p1, p2, S, x, y)
        b_precon = np.linalg.inv(p2.T @ p2 + reg * np.eye(r))
        p_at = b_precon @ p2.T @ st1["p2old"]
        grad1_scaled = b_precon @ g1
        step_size = lr / (1.0 - beta1**step)
        st1["exp_avg_sq"] = st1["exp_avg_sq"] * beta2 + (1.0 - beta2) * grad1_scaled * grad1_scaled
        denom = np.sqrt(st1["exp_avg_sq"]) + eps
        p1 = p1 - step_size * (beta1 * p_at @ st1["exp_avg"] + (1 - beta1) * grad1_scaled) / denom
        p1 = p1 + p1 * (-lr * weight_decay)
        st1["exp_avg"] = beta1 * st1["exp_avg"] + (1 - beta1) * grad1_scaled
        st1["p2old"] = p2.copy()
        a_precon = np.linalg.inv(p1 @ p1.T + reg * np.eye(r))
        p_bt = st2["p1old"] @ p1.T @ a_precon
        grad2_scaled = g2 @ a_precon
        st2["exp_avg_sq"] = st2["exp_avg_sq"] * beta2 + (1.0 - beta2) * grad2_scaled * grad2_scaled
        denom = np.sqrt(st2["exp_avg_sq"]) + eps
        p2 = p2 - step_size * (beta1 * st2["exp_avg"] @ p_bt + (1 - beta1) * grad2_scaled) / denom
        p2 = p2 + p2 * (-lr * weight_decay)
        st2["exp_avg"] = beta1 * st2["exp_avg"] + (1 - beta1) * grad2_scaled
        st2["p1old"] = p1.copy()
    return p1, p2


@pytest.mark.parametrize("betas", [None, (0.9, 0.98)])
def test_altlora_plus_matches_the_official_optimizer(betas):
    """Default options are the authors' (betas, eps 1e-6, weight decay, lambda); second moment uncorrected, and
    the momentum carried to the next step is the untransported one."""
    options = {} if betas is None else {"betas": betas}
    (a, b, w0, x, y), (a1, b1) = _run("altlora_plus", 4, **options)
    a_ref, b_ref = _official_altlora_plus(a, b, w0, x, y, 4, **options)
    np.testing.assert_allclose(a1, a_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b1, b_ref, rtol=1e-9, atol=1e-12)


def test_altlora_plus_corrected_adam_option():
    betas, reg, wd, eps = (0.9, 0.98), 1e-3, 1e-5, 1e-6
    (a, b, w0, x, y), (a1, b1) = _run("altlora_plus", 3, betas=betas, corrected_adam=True)
    va, vb = np.zeros_like(a), np.zeros_like(b)
    ma, mb = np.zeros_like(a), np.zeros_like(b)
    b_prev, a_prev = np.zeros_like(b), np.zeros_like(a)
    for t in range(1, 4):
        ga, gb = _np_grads(w0, a, b, S, x, y)
        pre_a = np.linalg.inv(b.T @ b + reg * np.eye(2))
        ga_p = pre_a @ ga
        ma = betas[0] * (pre_a @ b.T @ b_prev) @ ma + (1 - betas[0]) * ga_p  # transported momentum kept
        va = betas[1] * va + (1 - betas[1]) * ga_p**2
        b_prev = b.copy()
        a = (a - LR * ma / (1 - betas[0] ** t) / (np.sqrt(va / (1 - betas[1] ** t)) + eps)) * (1 - LR * wd)
        pre_b = np.linalg.inv(a @ a.T + reg * np.eye(2))
        gb_p = gb @ pre_b
        mb = betas[0] * mb @ (a_prev @ a.T @ pre_b) + (1 - betas[0]) * gb_p
        vb = betas[1] * vb + (1 - betas[1]) * gb_p**2
        a_prev = a.copy()
        b = (b - LR * mb / (1 - betas[0] ** t) / (np.sqrt(vb / (1 - betas[1] ** t)) + eps)) * (1 - LR * wd)
    np.testing.assert_allclose(a1, a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b1, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_rules_reduce_a_toy_regression_loss_on_conv(rule, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 3, 3, padding=1))
    x, y = torch.randn(4, 2, 5, 5), torch.randn(4, 3, 5, 5)
    inject(model, AdapterConfig(method, rank=2, alpha=2.0))
    opt = build_optimizer(model, rule, lr=0.05 if rule != "altlora" else 0.5)
    losses = []
    for _ in range(20):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0], losses


def test_dora_magnitude_trains_with_adamw_inside_the_rule():
    model = nn.Sequential(nn.Linear(3, 4))
    inject(model, AdapterConfig("dora", rank=2))
    opt = build_optimizer(model, "lora_pro", lr=0.1)
    (pair,) = lora_pairs(model)
    magnitude = next(p for n, p in model.named_parameters() if n.endswith("magnitude"))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 1]
    assert opt.param_groups[0]["params"][0] is magnitude and opt.param_groups[1]["params"][0] is pair.A
    before = magnitude.detach().clone()
    model(torch.randn(2, 3)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, magnitude.detach())


def test_only_plain_trainable_pairs_are_rule_pairs():
    from medlora.adapters import list_methods

    model = nn.Sequential(nn.Linear(6, 8))
    inject(model, AdapterConfig("lora", rank=2))
    assert len(lora_pairs(model)) == 1
    lora_pairs(model)[0].A.requires_grad_(False)  # e.g. after FFA: no longer a pair for the other rules
    assert lora_pairs(model) == []
    for method in ("nlora", "lora_sb", "flylora", "dylora", "matryoshka"):  # middle/frozen factor, nested ranks
        if method in list_methods():
            model = nn.Sequential(nn.Linear(16, 16))
            inject(model, AdapterConfig(method, rank=8, options=OPTIONS.get(method, {})))
            assert lora_pairs(model) == [], method


OPTIONS = {"lora_sb": {"warmup_steps": 10}}
PAIR_RULES = [r for r in RULES if r != "adamw"]


def _fill_uninitialised(reparam: nn.Module) -> None:
    """Data-initialised methods hold NaN until initialise_from_data: random values stand in for it."""
    with torch.no_grad():
        for t in [*reparam.parameters(), *reparam.buffers()]:
            if t.is_floating_point() and not torch.isfinite(t).all():
                t.normal_()


@pytest.mark.parametrize("layer", [nn.Linear(6, 8), nn.Conv3d(3, 5, (3, 2, 1))], ids=["linear", "conv3d"])
def test_declared_pairs_are_plain_pairs(layer):
    """What a method declares as (A, B, s) changes its update by exactly the entries of s B A, rearranged: the
    multiset of dW(A, B) - dW(A, 0) equals that of s B A (padded with zeros), computed here in numpy."""
    from medlora.adapters import adapters_of, get_method, list_methods

    declared = [m for m in list_methods() if get_method(m).lora_pair]
    assert {"lora", "lora_c", "conv_lora", "pissa", "lora_ga", "dora", "dora_c", "conv_dora"} == set(declared)
    for method in declared:
        model = inject(nn.Sequential(copy.deepcopy(layer)).double(), AdapterConfig(method, rank=2, alpha=3.0))
        reparam = adapters_of(model[0])
        _fill_uninitialised(reparam)
        additive = getattr(reparam, "inner", reparam)  # DoRA: the pair lives in its direction V = W0 + dW
        w0 = reparam.layout.to_canonical(model[0].parametrizations["weight"].original.detach())
        (a, b, s), = reparam.rule_pairs()
        assert s == pytest.approx(3.0 / 2) and a.requires_grad and b.requires_grad, method
        with torch.no_grad():
            a.normal_()
            b.normal_()
            with_b = additive.delta(w0).numpy().ravel()
            saved = b.clone()
            b.zero_()
            without_b = additive.delta(w0).numpy().ravel()
            b.copy_(saved)
        product = s * b.detach().numpy() @ a.detach().numpy()
        expected = np.concatenate([product.ravel(), np.zeros(with_b.size - product.size)])
        np.testing.assert_allclose(np.sort(with_b - without_b), np.sort(expected), rtol=1e-12, atol=1e-12,
                                   err_msg=method)


def test_registry_declaration_matches_the_layers():
    from medlora.adapters import adapters_of, get_method, list_methods

    for method in list_methods():
        model = inject(nn.Sequential(nn.Linear(16, 16)), AdapterConfig(method, rank=4,
                                                                      options=OPTIONS.get(method, {})))
        assert bool(adapters_of(model[0]).rule_pairs()) == get_method(method).lora_pair, method


def test_every_method_has_a_file_a_label_and_a_family():
    """The seed paper's spellings (arXiv 2508.01772, and SALT / S-SAM) are the labels its study tables use; the
    CP family is what its finding "CP-LoRA is about as good with far fewer parameters" compares."""
    from pathlib import Path

    import medlora.adapters.methods as methods
    from medlora.adapters import get_method, list_methods
    from medlora.adapters.config import FAMILIES

    seed = {"lora": "LoRA", "lora_c": "LoRA-C", "conv_lora": "convLoRA", "cp_lora": "CP-LoRA", "dora": "DoRA",
            "dora_c": "DoRA-C", "conv_dora": "convDoRA", "cp_dora": "CP-DoRA", "salt": "SALT", "svd": "S-SAM (SVD)"}
    assert {m: get_method(m).label for m in seed} == seed
    files = {p.stem for p in Path(methods.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert files == set(list_methods())
    assert all(get_method(m).family in FAMILIES and get_method(m).label for m in list_methods())
    assert {m for m in list_methods() if get_method(m).family == "cp"} == {"cp_lora", "cp_dora"}
    assert {m for m in list_methods() if get_method(m).family == "nested-rank"} == {"dylora", "matryoshka"}


@pytest.mark.parametrize("method", ["dylora", "matryoshka", "nlora", "slora", "inttune", "lora_sb", "bd_lora",
                                    "salt", "cp_dora", "vera"])
def test_pair_rules_refuse_methods_without_a_plain_pair(method):
    from medlora.adapters.optim import TrainingRuleError, check_rule_method

    for rule in PAIR_RULES:
        model = nn.Sequential(nn.Linear(16, 16))
        inject(model, AdapterConfig(method, rank=4, options=OPTIONS.get(method, {})))
        before = [p.requires_grad for p in model.parameters()]
        with pytest.raises(TrainingRuleError) as info:
            build_optimizer(model, rule)
        message = str(info.value)
        assert "\n" not in message and f"rule {rule!r}" in message and f"{method!r} adapters" in message
        assert [p.requires_grad for p in model.parameters()] == before  # ffa froze nothing
        with pytest.raises(TrainingRuleError, match=f"rule {rule!r} cannot train {method!r}"):
            check_rule_method(rule, method)
    check_rule_method("adamw", method)
    build_optimizer(model, "adamw")
    for rule in PAIR_RULES:
        check_rule_method(rule, "dora")


def test_fused_output_lora_is_a_pair_only_with_one_block():
    from medlora.adapters.optim import TrainingRuleError

    for blocks, pairs in (([1], 1), ([0, 2], 0)):
        model = nn.Sequential(nn.Linear(4, 12))
        inject(model, AdapterConfig("lora", rank=2, options={"fused_outputs": 3, "adapt_outputs": blocks}))
        assert len(lora_pairs(model)) == pairs
    with pytest.raises(TrainingRuleError, match="layer 0 declares no plain LoRA pair"):
        build_optimizer(model, "lora_pro")


@pytest.mark.parametrize("rule", ["stable_lora", "allora", "lora_pro", "altlora"])
def test_state_dict_resumes_exactly(rule):
    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        inject(model, AdapterConfig("dora", rank=2, alpha=2.0))
        return model, build_optimizer(model, rule, lr=0.05)

    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    model, opt = setup()
    steps(model, opt, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(model, opt, 2)
    resumed, resumed_opt = setup()
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    steps(resumed, resumed_opt, 2)
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_errors_and_descriptions():
    assert sorted(RULES) == list_rules()
    model = nn.Sequential(nn.Linear(3, 4))
    inject(model, AdapterConfig("svd"))
    build_optimizer(model, "adamw")
    with pytest.raises(ValueError, match="rule 'lora_pro' cannot train 'svd' adapters"):
        build_optimizer(model, "lora_pro")
    with pytest.raises(ValueError, match="unknown option"):
        build_optimizer(model, "adamw", shrink_ratio=0.1)
    with pytest.raises(ValueError, match="unknown training rule"):
        build_optimizer(model, "sgdx")
    for rule in RULES:
        assert "paper:" in describe_rule(rule)


def test_rules_are_laid_out_like_methods():
    """One file per rule in medlora.adapters.rules, each registered under its file name with the paper's label;
    medlora.adapters.optim stays importable as the same API."""
    from pathlib import Path

    import medlora.adapters.optim as optim
    import medlora.adapters.rules as rules

    files = {p.stem for p in Path(rules.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert files == set(rules.list_rules()) == set(RULES)
    labels = {r: rules.get_rule(r).label for r in RULES}
    assert labels == {"adamw": "AdamW", "ffa": "FFA-LoRA", "stable_lora": "Stable-LoRA", "allora": "ALLoRA",
                      "lora_pro": "LoRA-Pro", "altlora": "AltLoRA", "altlora_plus": "AltLoRA+"}
    assert optim.build_optimizer is rules.build_optimizer and optim.lora_pairs is rules.lora_pairs


def test_methods_table_script_lists_every_method_and_rule():
    import importlib.util
    from pathlib import Path

    from medlora.adapters import list_methods

    path = Path(__file__).resolve().parents[1] / "scripts" / "methods_table.py"
    spec = importlib.util.spec_from_file_location("methods_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = "intro\n<!-- methods-table:start -->\nstale-row\n<!-- methods-table:end -->\nmid\n" \
           "<!-- rules-table:start -->\n<!-- rules-table:end -->\nend\n"
    text = module.render(page)
    assert text.startswith("intro\n") and "\nmid\n" in text and text.endswith("end\n") and "stale-row" not in text
    for name in list_methods():
        assert f"| `{name}` |" in text
    for name in list_rules():
        assert f"| `{name}` |" in text
    assert module.render(text) == text
    table = "| method | rule | x |\n|---|---|---|\n| a | adamw | 1 |\n| b | adamw | 2 |\n| lora | ffa | 3 |"
    measured = "| method | rule | x |\n|---|---|---|\n| lora | ffa | 9 |\n| c | adamw | 7 |"
    assert module.merge_rows(table, measured) == ("| method | rule | x |\n|---|---|---|\n| a | adamw | 1 |\n"
                                                  "| b | adamw | 2 |\n| lora | ffa | 9 |\n| c | adamw | 7 |")


@pytest.mark.parametrize("rule", ["ffa", "lora_pro"])
def test_trained_adapter_round_trips_through_save_and_load(rule, tmp_path):
    from medlora.adapters import load_adapter, save_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Tanh(), nn.ConvTranspose3d(4, 2, 2))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, AdapterConfig("lora", rank=2))
    opt = build_optimizer(model, rule, lr=0.05)
    x = torch.randn(1, 2, 5, 5, 5)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Tanh(), nn.ConvTranspose3d(4, 2, 2))
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
